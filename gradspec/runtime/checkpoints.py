"""Checkpoints: what ``load_state_dict`` accepts, checked before anything changes, and the
translation between torch.optim's state dicts and gradspec's for the methods both have.

torch.optim's own ``load_state_dict`` checks only the number of groups and parameters, so a
state dict of another model, another spec or with a broken hyperparameter loads and every
later step fails (a reshape error, ``KeyError: 'betas'``). Here a state dict is checked
whole first: its spec, each group's hyperparameters (names, types, constraints, the spec's
``require``s), each parameter's state names, shapes and dtypes, and the generator's state;
a ValueError names what differs, and the optimizer is left as it was.

torch.optim's dicts differ from gradspec's in names only (``exp_avg`` is Adam's ``m``,
``momentum_buffer`` SGD's ``buf``), except that torch.optim.SGD counts no steps: its
momentum buffer, when present, means at least one step was taken, which is all gradspec's
SGD reads from the count (``where(step == 1, ...)``), so it is loaded as one step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..compiler.lowerer import BucketShape
from ..compiler.sharded import state_layouts
from ..dsl.errors import SpecError
from .validation import MAXIMIZE, TORCH_FLAGS, flag_problem, hyper_problem

GENERATOR = "generator"  # the key of the probe generator's state in the first parameter group
EVALUATIONS = "evaluations"  # first parameter group: the counts of closure calls, gradients, HVPs
SPEC = "spec"  # top-level key: the name of the spec a state dict was saved from


@dataclass(frozen=True)
class TorchEquivalent:
    """How a stdlib spec's checkpoint reads in torch.optim: its class, the torch.optim names of
    its states, and the group keys torch.optim has and gradspec does not (with the value the
    spec stands for: AdamW is Adam with ``decoupled_weight_decay=True``)."""

    cls: str
    states: dict = field(default_factory=dict)  # gradspec name -> torch.optim name, where they differ
    group_keys: tuple = ()  # torch.optim's flags of this class
    fixed: dict = field(default_factory=dict)  # torch.optim key -> the value this spec means
    counts_steps: bool = True

    def to_gradspec(self, name: str) -> str:
        return {torch_name: ours for ours, torch_name in self.states.items()}.get(name, name)


_COMMON = (MAXIMIZE, "foreach", "differentiable")
TORCH_EQUIVALENTS = {
    "sgd": TorchEquivalent("SGD", {"buf": "momentum_buffer"}, _COMMON + ("fused",), counts_steps=False),
    "adam": TorchEquivalent("Adam", {"m": "exp_avg", "v": "exp_avg_sq", "vmax": "max_exp_avg_sq"},
                            _COMMON + ("capturable", "fused"), {"decoupled_weight_decay": False}),
    "adamw": TorchEquivalent("AdamW", {"m": "exp_avg", "v": "exp_avg_sq", "vmax": "max_exp_avg_sq"},
                             _COMMON + ("capturable", "fused"), {"decoupled_weight_decay": True}),
    "rmsprop": TorchEquivalent("RMSprop", {"buf": "momentum_buffer"}, _COMMON + ("capturable",)),
    "adagrad": TorchEquivalent("Adagrad", {}, _COMMON + ("fused",)),
}


@dataclass(frozen=True)
class Target:
    """What a state dict is loaded into: the spec, its live groups and a way to build the
    program a group's values select (raises SpecError for a broken ``require``)."""

    spec: object
    groups: list
    program_for: object  # dict of hyperparameter values -> Program
    generator_device: torch.device

    @property
    def has_betas(self) -> bool:
        return {"beta1", "beta2"} <= set(self.spec.hypers)


def is_from_torch(state_dict: dict) -> bool:
    """Whether a state dict was saved by torch.optim: gradspec's carry the spec's name, the
    generator's state, or both (torch.distributed.checkpoint keeps only the groups' keys)."""
    if not isinstance(state_dict, dict):
        return False
    groups = state_dict.get("param_groups") or [{}]
    first = groups[0] if isinstance(groups[0], dict) else {}
    return SPEC not in state_dict and GENERATOR not in state_dict and GENERATOR not in first


def from_torch(state_dict: dict, target: Target) -> dict:
    """A torch.optim state dict in gradspec's names. Refused (ValueError) where torch.optim's
    settings ask for other states or another update than this optimizer's: its switches
    (``amsgrad``, ``nesterov``, ``centered``) must be this optimizer's, and AdamW's dict goes
    into ``adamw``, Adam's into ``adam``."""
    name = target.spec.name
    equivalent = TORCH_EQUIVALENTS.get(name)
    if equivalent is None:
        raise ValueError(f"this looks like a torch.optim state dict (no '{SPEC}' or '{GENERATOR}' key), and "
                         f"torch.optim has no {name}; torch.optim state dicts load into "
                         f"{', '.join(TORCH_EQUIVALENTS)}")
    _check_structure(state_dict, target)
    switches = [h for h, hyper in target.spec.hypers.items() if hyper.kind == "bool"]
    groups = []
    for i, (saved, live) in enumerate(zip(state_dict["param_groups"], target.groups)):
        group = dict(saved)
        for key, meant in equivalent.fixed.items():
            value = group.pop(key, meant)
            if value != meant:
                other = next((n for n, e in TORCH_EQUIVALENTS.items() if e.cls != equivalent.cls
                              and e.fixed.get(key) == value), None)
                raise ValueError(f"param group {i} of the torch.optim state dict has {key}={value}, which "
                                 f"{name} does not compute" + (f"; load it into {other}" if other else ""))
        for switch in switches:
            if switch in group and switch in live and group[switch] != live[switch]:
                raise ValueError(f"param group {i} of the torch.optim state dict has {switch}={group[switch]} "
                                 f"and this optimizer {switch}={live[switch]}: their states differ; construct "
                                 f"the optimizer with {switch}={group[switch]} to load it")
        groups.append(group)
    state = {}
    for key, entry in state_dict["state"].items():
        entry = {equivalent.to_gradspec(n): v for n, v in entry.items() if v is not None}
        if not equivalent.counts_steps and entry and "step" not in entry:
            entry["step"] = torch.tensor(1.0, dtype=torch.float64)
        state[key] = entry
    return {"state": state, "param_groups": groups}


def to_torch(state_dict: dict, spec) -> dict:
    """gradspec's state dict as the torch.optim class of the same method loads it."""
    equivalent = TORCH_EQUIVALENTS.get(spec.name)
    if equivalent is None:
        raise ValueError(f"torch.optim has no {spec.name}; torch_state_dict() is for "
                         f"{', '.join(TORCH_EQUIVALENTS)}")
    has_betas = {"beta1", "beta2"} <= set(spec.hypers)
    flags = set(TORCH_FLAGS) | {MAXIMIZE}
    groups = []
    for saved in state_dict["param_groups"]:
        group = {k: v for k, v in saved.items()
                 if k not in (GENERATOR, EVALUATIONS, "beta1", "beta2") and (k not in flags or k in equivalent.group_keys)}
        if has_betas:
            group["betas"] = (saved["beta1"], saved["beta2"])
        for key in equivalent.group_keys:
            group.setdefault(key, TORCH_FLAGS.get(key, False))
        group.update(equivalent.fixed)
        groups.append(group)
    state = {}
    for key, entry in state_dict["state"].items():
        out = {equivalent.states.get(n, n): v for n, v in entry.items() if n != "step"}
        if equivalent.counts_steps and "step" in entry:
            out["step"] = torch.tensor(float(entry["step"]), dtype=torch.float32)
        state[key] = out
    return {"state": state, "param_groups": groups}


def validate(state_dict: dict, target: Target) -> None:
    """ValueError naming the first thing in ``state_dict`` this optimizer cannot resume from."""
    _check_structure(state_dict, target)
    saved_spec = state_dict.get(SPEC)
    if saved_spec is not None and saved_spec != target.spec.name:
        raise ValueError(f"the state dict was saved from {saved_spec}, this optimizer runs {target.spec.name}")
    groups = state_dict["param_groups"]
    saved_generator = state_dict.get(GENERATOR, groups[0].get(GENERATOR))
    if saved_generator is not None:
        _check_generator(saved_generator, target.generator_device)
    if groups[0].get(EVALUATIONS) is not None:
        _check_evaluations(groups[0][EVALUATIONS])
    for i, (saved, live) in enumerate(zip(groups, target.groups)):
        values = _group_values(saved, target, i)
        try:
            program = target.program_for(values)
        except SpecError as error:
            raise ValueError(f"param group {i}: {target.spec.name}: {error.message}") from None
        for key, param in zip(saved["params"], live["params"]):
            entry = state_dict["state"].get(key)
            if entry is not None:
                _check_entry(entry, param, program, f"the state of parameter {key!r} (shape {tuple(param.shape)})")


def _check_structure(state_dict: dict, target: Target) -> None:
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict) \
            or not isinstance(state_dict.get("param_groups"), (list, tuple)):
        raise ValueError("a state dict holds 'state' (a dict) and 'param_groups' (a list)")
    groups = state_dict["param_groups"]
    if len(groups) != len(target.groups):
        raise ValueError(f"the state dict has {len(groups)} parameter groups, this optimizer {len(target.groups)}")
    for i, (saved, live) in enumerate(zip(groups, target.groups)):
        if not isinstance(saved, dict) or len(saved.get("params", ())) != len(live["params"]):
            count = len(saved.get("params", ())) if isinstance(saved, dict) else "no"
            raise ValueError(f"param group {i} of the state dict has {count} parameters, "
                             f"this optimizer's {len(live['params'])}")
    listed = {key for saved in groups for key in saved["params"]}
    strays = [key for key in state_dict["state"] if key not in listed]
    if strays:
        raise ValueError(f"the state dict holds the state of parameter {strays[0]!r}, which no parameter group "
                         "of it lists")


def _group_values(saved: dict, target: Target, index: int) -> dict:
    """The group's hyperparameter values, as they will read after the load (``betas`` wins
    over ``beta1``/``beta2``), each checked."""
    values = dict(saved)
    if target.has_betas and "betas" in values:
        betas = values["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"param group {index}: betas must be a pair (beta1, beta2), got {betas!r}")
        values["beta1"], values["beta2"] = betas
    missing = [h for h in target.spec.hypers if h not in values]
    if missing:
        raise ValueError(f"param group {index} lacks {', '.join(missing)}, which {target.spec.name} reads: "
                         "is it a state dict of another optimizer?")
    for name, hyper in target.spec.hypers.items():
        problem = hyper_problem(hyper, values[name])
        if problem is not None:
            raise ValueError(f"param group {index}: {problem}")
    for name in (*TORCH_FLAGS, MAXIMIZE):
        if name in values and name not in target.spec.hypers:
            problem = flag_problem(name, values[name])
            if problem is not None:
                raise ValueError(f"param group {index}: {problem}")
    return {name: values[name] for name in target.spec.hypers}


def _check_entry(entry: dict, param, program, where: str) -> None:
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be a dict, got {type(entry).__name__}")
    expected = set(program.state_names) | set(program.global_states)
    names = set(entry) - {"step"}
    extra, missing = sorted(names - expected), sorted(expected - names)
    if extra or missing:
        parts = ([f"has {', '.join(extra)}, which {program.spec.name} does not keep"] if extra else []) \
            + ([f"lacks {', '.join(missing)}"] if missing else [])
        raise ValueError(f"{where} {' and '.join(parts)} (expected: {', '.join(sorted(expected)) or 'none'})")
    if "step" in entry:
        step = entry["step"]
        number = step.item() if isinstance(step, torch.Tensor) and step.numel() == 1 else step
        if isinstance(number, bool) or not isinstance(number, (int, float)) \
                or not math.isfinite(number) or number < 0 or number != int(number):
            raise ValueError(f"{where}: step must be a whole number >= 0, got {step!r}")
    ranks = program.state_ranks or {}
    for name in names:
        value = entry[name]
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{where}: {name} must be a tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise ValueError(f"{where}: {name} must be a floating-point tensor, got {value.dtype}")
        if name in program.global_states:
            shape_ok, wanted = value.numel() == 1, "one value"
        else:
            wanted = ((ranks[name],) if name in ranks else ()) + _state_shape(program, name, param)
            shape_ok = tuple(value.shape) == wanted
        if not shape_ok:
            raise ValueError(f"{where}: {name} has shape {tuple(value.shape)}, expected {wanted}: "
                             "a state dict of another model?")


def _state_shape(program, name: str, param) -> tuple:
    """The (whole) shape of a parameter's state: the parameter's, or for a state shaped unlike
    it the shape its layout shows ((rows,) for a per-row state, (0,) where the parameter's
    shape class keeps none; compiler/shaped.py)."""
    if not program.shaped:
        return tuple(param.shape)
    tensor = BucketShape(param.numel(), 1, param.dtype, (tuple(param.shape),))
    layout = state_layouts(program, tensor).get(name)
    return tuple(param.shape) if layout is None else tuple(layout.shapes[0])


def _check_generator(saved, device: torch.device) -> None:
    if not isinstance(saved, torch.Tensor):
        raise ValueError(f"the generator state must be a tensor, got {type(saved).__name__}")
    try:
        torch.Generator(device=device).set_state(saved.to(torch.uint8).cpu())
    except (RuntimeError, TypeError, ValueError) as error:
        raise ValueError(f"the generator state does not fit a {device.type} generator: {error}") from None


def _check_evaluations(saved) -> None:
    """The evaluation counts: three whole numbers >= 0 (closure calls, gradients, HVPs)."""
    if not (isinstance(saved, torch.Tensor) and saved.shape == (3,) and not saved.is_floating_point()
            and not saved.is_complex() and bool((saved >= 0).all())):
        raise ValueError("the evaluation counts must be a tensor of 3 whole numbers >= 0 (closure calls, "
                         f"gradients, Hessian-vector products), got {saved!r}")
