"""``gradspec.Optimizer``: a compiled spec as a drop-in ``torch.optim.Optimizer``.

Per parameter group the optimizer keeps a *plan*: the spec specialised to the group's
compile-time switches, the group's parameters laid out in flat buckets, and the compiled
step. The plan is rebuilt only when something structural changes: which parameters have
gradients, a switch such as ``nesterov``, or a ``load_state_dict``. Numeric hyperparameters
(``lr`` under a scheduler, ``beta2`` changed by hand) are copied into 0-d tensors before each
step and never cause a rebuild or a recompile.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch

from ..check import safety_checked
from ..compiler import backends
from ..compiler.ir import Program, Scope, build, evaluate_scalar
from ..compiler.lower import (StepGraphs, finish_groups, groups_key, groups_values, lower_init, lower_partials,
                              lower_probe_args, lower_step)
from ..compiler.lowerer import bucket_normal, compute_dtype
from ..compiler.sharded import state_layouts
from ..compiler.switches import static_hypers
from ..dsl import ast
from ..dsl.errors import SpecError, did_you_mean
from ..dsl.resolve import Spec, as_spec
from ..symbolic.domains import underflow
from . import checkpoints, distributed
from .buckets import Bucket, GradientCapture, scalar_dtype
from .checkpoints import EVALUATIONS, GENERATOR, SPEC
from .functional import rewritten
from .probes import ClosureDriver, Evaluations
from .validation import MAXIMIZE, TORCH_FLAGS, flag_problem, hyper_problem, parameter_problem, seed_problem

NONFINITE_POLICIES = ("propagate", "skip", "raise")


class UnderflowWarning(UserWarning):
    """A constant of the spec is 0 in the parameters' dtype (eps = 1e-8 in float16)."""


class Optimizer(torch.optim.Optimizer):
    """Run ``spec`` (a stdlib name, spec expression, ``.opt`` path or :class:`Spec`) on ``params``.

    ``backend`` is ``"compiled"`` (torch.compile, one fused kernel per bucket) or ``"eager"``.
    ``nonfinite`` says what a NaN or infinite gradient does: ``"propagate"`` it into the
    parameters as torch.optim does, ``"skip"`` the whole step for the group (parameters,
    states and step count stay as they were; ``skipped_steps`` counts them), or ``"raise"``
    FloatingPointError before anything changes. Other keyword arguments set the spec's
    hyperparameters for every group; param-group dicts may override them per group. Their
    values are checked at construction, in ``add_param_group`` and, when they changed (a
    scheduler, a hand edit), before each step: a value of the wrong type is a TypeError, one
    outside its constraint (or not finite) a ValueError, a broken ``require`` a ValueError.
    A step that raises leaves parameters, gradients, states, step counts and the generator
    as they were.

    ``maximize=True`` (per group, as in torch.optim) steps on the negated objective: the spec
    reads -grad and -loss, and probes evaluate -loss; ``p.grad`` keeps the gradient of the
    loss. torch.optim's implementation flags ``foreach``, ``fused``, ``capturable`` and
    ``differentiable`` are accepted and do nothing: gradspec has one implementation.
    ``load_state_dict`` checks a state dict whole before it changes anything, and takes
    torch.optim's state dicts for sgd, adam, adamw, rmsprop and adagrad;
    :meth:`torch_state_dict` gives one torch.optim loads.

    Specs with probes (``probe every k { ... }``) must be stepped with ``step(closure)``; see
    :mod:`gradspec.runtime.probes` for what the closure returns. ``seed`` seeds the
    generator behind ``randn()`` (initial directions, Hutchinson vectors, sampled labels,
    Lanczos starts); its state is part of ``state_dict()``, so a resumed run draws the same
    numbers. ``evaluations`` counts closure calls, gradients and Hessian-vector products.

    ``state_dtype`` keeps the per-element states in another dtype than the parameters:
    ``torch.bfloat16`` halves the state memory of a float32 model. The step computes in
    float32 and rounds each state to nearest when it stores it (see docs/design.md for the
    measured effect on accuracy).

    Parameters keep storage objects of their own, so every checkpoint library (safetensors,
    accelerate, ``save_pretrained``) saves the model as it would under torch.optim, while the
    step still writes them in place: each is an alias of its part of the flat buffer (see
    :mod:`gradspec.runtime.buckets`).

    Under torch.distributed (see :mod:`gradspec.runtime.distributed` and docs/distributed.md)
    DDP needs nothing, and FSDP2's DTensor parameters are stepped shard by shard with the
    reductions all-reduced. ``process_group`` is the group over which probes average the
    gradients they compute themselves under DDP: ``"auto"`` (the default group when more
    than one process runs and the parameters are plain tensors), a group, or None.
    """

    def __init__(self, params, spec: str | Spec | None = None, *, backend: str = "compiled",
                 nonfinite: str = "propagate", seed: int = 0, state_dtype: torch.dtype | None = None,
                 process_group="auto", **hyper):
        if spec is None:  # no default: a trainer passing only hyperparameters would get a method it did not ask for
            raise TypeError("gradspec.Optimizer needs a spec: a stdlib name such as 'adamw', a spec expression, "
                            "a path to a .opt file or a gradspec.Spec")
        if not isinstance(spec, (str, os.PathLike, Spec)):
            raise TypeError("spec must be a stdlib name, a spec expression, a path to a .opt file or a "
                            f"gradspec.Spec, got {type(spec).__name__}")
        if isinstance(spec, os.PathLike):
            spec = os.fspath(spec)
        self.spec = as_spec(spec)
        self._spec_argument = spec  # a name or expression pickles; an adaptor's Spec holds lambdas
        if self.spec.kind == "adaptor":
            raise ValueError(f"'{self.spec.name}' is an adaptor: apply it to a base, as in {self.spec.name}(adam)")
        safety_checked(self.spec)  # once per spec: SymPy never runs in step()
        if backend not in backends.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(backends.BACKENDS)}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"unknown nonfinite policy {nonfinite!r}; choose one of {', '.join(NONFINITE_POLICIES)}")
        self._fresh_runtime()
        hyper = self._split_betas(hyper)
        for name in hyper:
            if name not in self.spec.hypers and name not in self._flags:
                hint = did_you_mean(name, self.spec.hypers)
                raise TypeError(f"{self.spec.name} has no hyperparameter {name!r}" + (f"; {hint}" if hint else "")
                                + f" (it has: {', '.join(self.spec.hypers)})")
        problem = seed_problem(seed)
        if problem is not None:
            raise problem
        if state_dtype is not None and not (isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point):
            raise ValueError(f"state_dtype must be a floating torch dtype such as torch.bfloat16, got {state_dtype!r}")
        self.backend = backend
        self.nonfinite = nonfinite
        self.state_dtype = state_dtype
        defaults = {**self.spec.hyper_defaults, **self._flags, **hyper}
        if self._has_betas:
            defaults["betas"] = (defaults["beta1"], defaults["beta2"])
        super().__init__(params, defaults)
        self.generator = self._new_generator().manual_seed(seed)
        self._record_in_first_group()
        self._join_processes(process_group)
        if self._sharded and self._has_probes:
            differentiated = {n.attr[0] for n in self._program(self.param_groups[0], self._all_probes()).probes}
            differentiated &= {"hvp", "hessian_eigvecs"}
            if differentiated:
                raise ValueError(
                    f"{self.spec.name} takes exact Hessian-vector products ({', '.join(sorted(differentiated))}), "
                    "which need a double backward that FSDP2 does not support (pytorch/pytorch#172543); "
                    "train it under DDP, or write the product as a finite difference of grad_at")

    def _fresh_runtime(self) -> None:
        """What the optimizer derives from its spec and keeps between steps, empty: compiled
        plans (with the flat buffers), programs, and counters."""
        self._has_betas = {"beta1", "beta2"} <= set(self.spec.hypers)
        self._static_names = static_hypers(self.spec)
        # the structural ints (sizes, ranks, repeat counts, blocks sizes, shape conditions'
        # bounds) shape the plan itself; a real one read by an 'if' (momentum > 0) changes
        # it only through the branch it picks, which the program's switches record
        self._sizing_names = tuple(n for n in self._static_names if self.spec.hypers[n].kind == "int")
        self._plans: dict = {}
        self._capture = GradientCapture()
        self._programs: dict = {}
        self._betas_seen: dict = {}
        self._skipped: dict = {}  # group index -> skipped-step counter, kept across plan rebuilds
        # blocks that evaluate the model need step(closure); ``every k { }`` blocks do not
        self._has_probes = any(isinstance(item, ast.Probe) and item.model for _, item in self.spec.items)
        self.evaluations = Evaluations()
        # torch.optim's flags with their defaults, where the spec does not use the name itself
        self._flags = {name: default for name, default in {**TORCH_FLAGS, MAXIMIZE: False}.items()
                       if name not in self.spec.hypers}
        self._settings_seen: dict = {}  # id(group) -> the hyperparameter values last found valid
        self._new_plans: list = []  # plans made by the step in progress: undone if it raises

    def _new_generator(self) -> torch.Generator:
        """The generator behind randn() and sampled labels, on the first parameter's device."""
        first = self.param_groups[0]["params"][:1]
        return torch.Generator(device=distributed.local(first[0]).device if first else "cpu")

    def _restore_generator(self, saved: torch.Tensor) -> None:
        self.generator.set_state(saved.to(torch.uint8).cpu())  # a checkpoint may have moved or cast it

    def _join_processes(self, process_group) -> None:
        everything = [p for group in self.param_groups for p in group["params"]]
        self.process_group = distributed.data_parallel_group(process_group, everything)
        self._sharded = any(distributed.is_sharded(p) for p in everything)
        # the processes whose batches make one step's batch: the loss a spec reads is their mean
        self._batch_group = distributed.batch_group(self.process_group, self._sharded)

    # ---- torch.optim.Optimizer protocol
    def __getstate__(self) -> dict:
        """For ``copy.deepcopy`` and pickling: what a checkpoint holds (torch.optim's own
        fields, the generator's state in the first group) plus the constructor's choices.
        Plans, buffers and compiled steps are rebuilt on the copy's first step, from its
        parameters and states, as after ``load_state_dict``."""
        self._record_in_first_group()
        return {**super().__getstate__(), "spec": self._spec_argument, "backend": self.backend,
                "nonfinite": self.nonfinite, "state_dtype": self.state_dtype}

    def __setstate__(self, state: dict) -> None:
        if "spec" not in state:  # torch.optim's load_state_dict updates a live optimizer this way
            super().__setstate__(state)
            return
        state = dict(state)
        self._spec_argument, self.backend = state.pop("spec"), state.pop("backend")
        self.spec = as_spec(self._spec_argument)
        self.nonfinite, self.state_dtype = state.pop("nonfinite"), state.pop("state_dtype")
        super().__setstate__(state)
        self._fresh_runtime()
        self.generator = self._new_generator()
        self._restore_generator(self.param_groups[0][GENERATOR])
        self._restore_evaluations(self.param_groups[0].get(EVALUATIONS))
        self._join_processes("auto")

    def add_param_group(self, param_group: dict) -> None:
        param_group = self._split_betas(param_group)
        if self._has_betas and ("beta1" in param_group or "beta2" in param_group):
            param_group["betas"] = (param_group.get("beta1", self.defaults["beta1"]),
                                    param_group.get("beta2", self.defaults["beta2"]))
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate(group)
        except (TypeError, ValueError):
            self.param_groups.pop()  # a refused group must not stay behind
            raise
        for dtype in {p.dtype for p in group["params"]}:
            for warning in underflow(self._program(group), dtype, group):
                warnings.warn(warning.render(), UnderflowWarning, stacklevel=4)

    def state_dict(self) -> dict:
        """torch.optim's state dict, with the probe generator's state as the key "generator" of
        the first parameter group: torch.distributed.checkpoint keeps only "state" and
        "param_groups", and its flattened form rebuilds each group from the live group's
        keys, so the live first group carries the key too (refreshed here). The evaluation
        counts travel the same way, as "evaluations": a resumed run keeps counting."""
        self._record_in_first_group()
        return {**super().state_dict(), SPEC: self.spec.name}

    def _record_in_first_group(self) -> None:
        """The generator's state and the evaluation counts, where a checkpoint finds them."""
        self.param_groups[0][GENERATOR] = self.generator.get_state()
        self.param_groups[0][EVALUATIONS] = torch.tensor(list(self.evaluations.as_dict().values()))

    def _restore_evaluations(self, saved) -> None:
        if saved is not None:  # checked by checkpoints.validate on a load
            self.evaluations.load(dict(zip(Evaluations.FIELDS, saved.tolist())))

    def torch_state_dict(self) -> dict:
        """This optimizer's state dict as the torch.optim class of its method loads it (sgd,
        adam, adamw, rmsprop, adagrad: ``m`` is ``exp_avg``, ``buf`` is ``momentum_buffer``,
        ``beta1``/``beta2`` are ``betas``); a ValueError for a spec torch.optim does not have.
        Like ``state_dict()``, it shares the live state tensors: copy it to keep a snapshot."""
        return checkpoints.to_torch(self.state_dict(), self.spec)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim's ``load_state_dict``, after checking the whole state dict (see
        :mod:`gradspec.runtime.checkpoints`): a ValueError names what does not fit, and
        nothing changes. A torch.optim state dict of the same method is translated first."""
        target = checkpoints.Target(self.spec, self.param_groups, self._program, self.generator.device)
        if checkpoints.is_from_torch(state_dict):
            state_dict = checkpoints.from_torch(state_dict, target)
        checkpoints.validate(state_dict, target)
        state_dict = dict(state_dict, param_groups=[self._loaded_group(g) for g in state_dict["param_groups"]])
        state_dict.pop(SPEC, None)
        saved = state_dict["param_groups"][0].get(GENERATOR, state_dict.pop(GENERATOR, None))  # older checkpoints: top level
        if saved is not None:
            self._restore_generator(saved)
        self._restore_evaluations(state_dict["param_groups"][0].get(EVALUATIONS))
        for plan in self._plans.values():
            plan.detach(self.state)
        self._plans.clear()
        # torch.optim casts every state but "step" to the parameter's dtype; global states are
        # kept in float32 for half-precision groups, so they are put back uncast
        global_names = {n for program in self._programs.values() for n in program.global_states}
        kept = {key: {n: v.clone() for n, v in entry.items() if n in global_names}
                for key, entry in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        self._record_in_first_group()
        # saved keys (indices, or names under torch.distributed.checkpoint) to parameters, as torch.optim pairs them
        params = dict(zip((key for group in state_dict["param_groups"] for key in group["params"]),
                          (p for group in self.param_groups for p in group["params"])))
        for key, values in kept.items():
            self.state[params[key]].update(values)

    @torch.no_grad()
    def init_state(self) -> None:
        """Give every parameter its states now, at their initial values (as for a zero
        gradient), without a step. A fresh optimizer then shows the full state layout that
        ``torch.distributed.checkpoint`` loads into; its own way to get one, a step at lr 0
        on zero gradients, cannot run a spec with probes, which needs a closure."""
        for group in self.param_groups:
            self._check_settings(group)
        for index, group in enumerate(self.param_groups):
            missing = [p for p in group["params"] if p.grad is None and p.requires_grad]
            for p in missing:
                p.grad = torch.zeros_like(p)
            try:
                self._plan(index, group)
            finally:
                self._new_plans.clear()  # plans made here stay: a step undoes only its own
                for p in missing:
                    p.grad = None

    @torch.no_grad()
    def step(self, closure=None, *, loss=None):
        """One step for every group; calls ``closure`` (with grad enabled) first if given and
        returns its loss. Specs that read ``loss`` take it from the closure or from ``loss=``."""
        self._capture.on = False  # gradients computed in here are copied in by the step itself
        try:
            return self._step(closure, loss)
        finally:
            self._capture.on = True

    def _step(self, closure, loss):
        """The step as a transaction: settings are checked before anything runs, and where
        something raises before the parameters change (a closure, a probe, a non-finite
        gradient under "raise"), the states made by this step and the generator's draws are
        undone. Only the plans built by this step have something to undo: an existing
        plan's buffers change in its compiled step alone, which runs last."""
        for group in self.param_groups:
            self._check_settings(group)
        generator = self.generator.get_state()
        try:
            return self._probing_step(closure) if self._has_probes else self._plain_step(closure, loss)
        except BaseException:
            self._undo_new_plans()
            self.generator.set_state(generator)
            raise
        finally:
            self._new_plans.clear()

    def _plain_step(self, closure, loss):
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        returned, loss = loss, self._mean_loss(loss)
        plans = [(self._plan(index, group), group) for index, group in enumerate(self.param_groups)]
        plans = [(plan, group) for plan, group in plans if plan is not None]
        if self.nonfinite == "raise":  # check every group before any group changes
            for plan, _ in plans:
                plan.raise_if_nonfinite()
        # due ``every k { }`` blocks run without a closure
        plans = [(plan, group, self._due(group) if plan.program.probe_periods else frozenset())
                 for plan, group in plans]
        for plan, group, probing in plans:
            if probing and plan.variant(probing).program.probes:  # randn() in a due ``every k { }``
                plan.probe(group, probing, ClosureDriver.draws_only(self.generator, self.evaluations, self.spec.name),
                           loss)
        totals = self._groups_totals(plans, loss)
        for plan, group, probing in plans:
            plan.run(group, loss, probing, totals)
        return returned

    def _groups_totals(self, plans: list, loss) -> dict:
        """The groups.* values of this step (see compiler/lower.py): every group's parts, from
        its partial pass, added up; {} for a spec without them. ``plans``: (plan, group, due
        probe blocks) of the groups that step."""
        if not any(plan.variant(probing).groups for plan, _, probing in plans):
            return {}
        device = plans[0][0].device
        parts, counts, funcs = {}, {}, {}
        for plan, group, probing in plans:
            variant = plan.variant(probing)
            for node, part, count in zip(variant.partials.reductions if variant.partials else (),
                                         plan.partials(group, loss, probing), variant.partials_counts()):
                key = groups_key(node)
                parts.setdefault(key, []).append(part.to(device))
                counts[key] = counts.get(key, 0.0) + count
                funcs[key] = node.attr.func
        totals = {key: finish_groups(funcs[key], values, counts[key]) for key, values in parts.items()}
        totals["numel"] = float(sum(plan.numel for plan, _, _ in plans))
        return totals

    def _undo_new_plans(self) -> None:
        """Drop the plans this step built and give their parameters back the states they had
        (none, on a first step); the next step builds them again."""
        for index, params, before in reversed(self._new_plans):
            plan = self._plans.pop(index, None)
            if plan is not None:
                plan.detach(self.state)
            for p in params:
                if p in before:
                    self.state[p] = before[p]
                else:
                    self.state.pop(p, None)

    def _mean_loss(self, loss):
        """The loss a spec reads: under data parallelism, the mean over the processes' batches
        (what one process would see on the whole batch), else the loss as given."""
        if loss is None or self._batch_group is None or not self._reads_loss():
            return loss
        return distributed.average([torch.as_tensor(loss).detach().reshape(1).double()], self._batch_group)[0][0]

    def _reads_loss(self) -> bool:
        return any(self._program(group).uses_loss for group in self.param_groups)

    def _probing_step(self, closure):
        """A step of a spec with probes: the closure gives the gradient (and keeps its graph when
        a due probe differentiates it), the due probes run for every group, then the steps."""
        if closure is None:
            calls = sorted({n.attr[0] for n in self._program(self.param_groups[0], self._all_probes()).probes})
            raise RuntimeError(f"{self.spec.name} probes the model ({', '.join(calls)}): call step(closure), "
                               "where closure() computes and returns the loss on the current batch")
        due = [self._due(group) for group in self.param_groups]
        probes = [n.attr[0] for group, probing in zip(self.param_groups, due)
                  for n in self._program(group, probing).probes]
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        grads_before = [p.grad for p in params]
        driver = ClosureDriver(closure, params, self.generator, self.evaluations,
                               needs_graph=bool({"hvp", "hessian_eigvecs"} & set(probes)),
                               needs_logits="gauss_newton" in probes, who=self.spec.name,
                               group=self.process_group, batch_group=self._batch_group, sharded=self._sharded)
        try:
            returned = driver.step_gradient()
            loss = self._mean_loss(returned)
            # the gradients are the closure's fresh tensors: a non-finite one is found before a
            # probe runs (a skipped group draws nothing) and before a plan copies it in
            plans = [(self._plan(i, group, checked=self._finite_or_skipped(i, group)), group, probing)
                     for i, (group, probing) in enumerate(zip(self.param_groups, due))]
            plans = [entry for entry in plans if entry[0] is not None]
            for plan, group, probing in plans:
                plan.probe(group, probing, driver, loss)
            totals = self._groups_totals(plans, loss)
            for plan, group, probing in plans:
                plan.run(group, loss, probing, totals)
        except BaseException:
            for p, grad in zip(params, grads_before):
                p.grad = grad
            raise
        finally:
            driver.release()
        return returned

    def _finite_or_skipped(self, index: int, group: dict) -> bool | None:
        """Under "skip" and "raise", whether the group's gradients (as ``p.grad`` holds them)
        are finite: True if so, None if the group skips the step (counted), FloatingPointError
        under "raise". Ranks holding shards of one tensor agree. Always True under "propagate"."""
        if self.nonfinite == "propagate":
            return True
        params = [p for p in group["params"] if p.grad is not None]
        grads = [distributed.local(p.grad) for p in params]
        where = _nonfinite(grads, distributed.shard_group(distributed.sharding_of(params)) if params else None)
        if where is None:
            return True
        if self.nonfinite == "raise":
            raise FloatingPointError(f"non-finite gradient in {where} (nonfinite='raise'); nothing was updated")
        counter = self._skipped.get(index)
        if counter is None:
            device = grads[0].device
            counter = self._skipped[index] = torch.zeros(1, dtype=scalar_dtype(device), device=device)
        counter += 1
        return None

    def _due(self, group: dict) -> frozenset:
        """The probe blocks that run at this step of ``group``: those whose period divides t - 1."""
        periods = self._program(group).probe_periods
        step = next((self.state[p]["step"] for p in group["params"] if "step" in self.state.get(p, {})), 0)
        done = int(step.item() if isinstance(step, torch.Tensor) else step)
        due = set()
        for j, every in enumerate(periods):
            k = group[every] if isinstance(every, str) else every
            if k != int(k) or int(k) < 1:
                raise ValueError(f"{self.spec.name}: the probe period {every} must be a whole number >= 1, got {k}")
            if done % int(k) == 0:
                due.add(j)
        return frozenset(due)

    def _all_probes(self) -> frozenset:
        return frozenset(range(len(self._program(self.param_groups[0]).probe_periods)))

    @property
    def has_probes(self) -> bool:
        """Whether the spec evaluates the model itself (``probe every k { }``): then
        ``step(closure)`` is required, and the closure returns the loss, or (loss, logits),
        without calling backward."""
        return self._has_probes

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients (``nonfinite="skip"``), summed over groups."""
        return int(sum(int(count.item()) for count in self._skipped.values()))

    def program(self, group_index: int = 0) -> Program:
        """The IR the given group runs, specialised to its switches."""
        return self._program(self.param_groups[group_index])

    # ---- internals
    def __repr__(self) -> str:
        """torch.optim's listing of the groups, without the generator's 5056 state bytes and
        the evaluation counts (``evaluations`` shows them)."""
        first = self.param_groups[0] if self.param_groups else {}
        saved = {key: first.pop(key) for key in (GENERATOR, EVALUATIONS) if key in first}
        try:
            return super().__repr__()
        finally:
            first.update(saved)

    def _loaded_group(self, saved: dict) -> dict:
        """A checked group of a state dict as this optimizer keeps groups: ``betas`` (which a
        scheduler may have changed last) decides ``beta1``/``beta2``; flags the dict lacks take
        their defaults."""
        group = {**self._flags, **saved}
        if self._has_betas and "betas" in group:
            group["beta1"], group["beta2"] = group["betas"] = tuple(group["betas"])
        return group

    def _maximizes(self, group: dict) -> bool:
        return bool(group.get(MAXIMIZE, False)) if MAXIMIZE in self._flags else False

    def _split_betas(self, values: dict) -> dict:
        """torch.optim's ``betas=(b1, b2)`` as the spec's ``beta1`` and ``beta2``; a longer tuple
        (pytorch-optimizer's ``betas=(b1, b2, b3)``) sets ``beta3`` and on, where the spec has them."""
        if "betas" not in values or not self._has_betas:
            return values
        values = dict(values)
        betas = tuple(values.pop("betas"))
        names = [f"beta{i}" for i in range(1, len(betas) + 1)]
        missing = [n for n in names if n not in self.spec.hypers]
        if missing or len(betas) < 2:
            raise ValueError(f"{self.spec.name}: betas gives {len(betas)} values, but the spec has "
                             f"{', '.join(n for n in names if n in self.spec.hypers) or 'no betas'}")
        values.update(zip(names, betas))
        return values

    def _sync_betas(self, group: dict) -> None:
        """Keep ``group["betas"]`` (what OneCycleLR and CyclicLR cycle) and ``beta1``/``beta2``
        (what the spec reads) equal: whichever changed since the last step wins."""
        seen = self._betas_seen.get(id(group))
        betas = tuple(group["betas"])
        pair = (group["beta1"], group["beta2"])
        if betas != seen:
            group["beta1"], group["beta2"] = pair = betas
        group["betas"] = pair
        self._betas_seen[id(group)] = pair

    def _validate(self, group: dict) -> None:
        """A group as ``add_param_group`` receives it: its parameters, then its settings."""
        if any(param.is_sparse for param in group["params"]):
            raise ValueError("gradspec does not support sparse parameters")
        for param in group["params"]:
            problem = parameter_problem(param)
            if problem is not None:
                raise problem
        devices = {p.device for p in group["params"]}
        if len(devices) > 1:
            raise ValueError(f"a parameter group must be on one device, got {sorted(map(str, devices))}; "
                             "give each device its own group")
        self._check_settings(group)

    def _check_settings(self, group: dict) -> None:
        """TypeError or ValueError (as torch.optim raises them) for a hyperparameter or flag
        value the group cannot step with, or a ``require`` its values break. Values found
        valid are remembered, so a step checks only what changed since."""
        if self._has_betas:
            self._sync_betas(group)
        values = tuple(group.get(name) for name in (*self.spec.hypers, *self._flags))
        if not any(isinstance(v, torch.Tensor) for v in values) and self._settings_seen.get(id(group)) == values:
            return
        for name, hyper in self.spec.hypers.items():
            problem = hyper_problem(hyper, group[name]) if name in group else KeyError(name)
            if problem is not None:
                raise type(problem)(f"{self.spec.name}: {problem}")
        for name in self._flags:
            problem = flag_problem(name, group.get(name, self._flags[name]))
            if problem is not None:
                raise type(problem)(f"{self.spec.name}: {problem}")
        try:
            plain = self._program(group)
            if plain.probe_periods:  # the probing step's program too: its errors show now
                self._program(group, frozenset(range(len(plain.probe_periods))))
        except SpecError as error:
            raise ValueError(f"{self.spec.name}: {error.message}") from None
        self._settings_seen[id(group)] = values

    def _program(self, group: dict, probing: frozenset = frozenset()) -> Program:
        key = (tuple(group[name] for name in self._static_names), probing)
        if key not in self._programs:
            # SymPy runs here once per setting of the switches, never in step()
            values = {n: group[n] for n in self.spec.hypers}
            self._programs[key] = rewritten(build(self.spec, values, probing=probing))
        return self._programs[key]

    def _plan(self, index: int, group: dict, checked: bool | None = False):
        """The group's plan for this step (rebuilt on a structural change), or None if no
        parameter of the group has a gradient or the group skips this step. ``checked``: the
        gradients were found finite (True), or the group skips (None).

        A new plan initialises states (drawing from the generator for ``randn()``), so under
        "skip" and "raise" the gradients are checked before one is built: a skipped or
        refused first step leaves no state behind."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params or checked is None:
            return None
        program = self._program(group)
        layout = (program.switches, tuple(group[n] for n in self._sizing_names), tuple(map(id, params)))
        plan = self._plans.get(index)
        if plan is None or plan.layout != layout or any(b.params_moved() for b in plan.buckets):
            if not checked and not self._finite_or_skipped(index, group):
                return None
            if plan is not None:
                plan.detach(self.state)
                del self._plans[index]
            self._new_plans.append((index, params, {p: dict(self.state[p]) for p in params if p in self.state}))
            plan = _Plan(self, group, params, layout)
            if plan.skipped is not None:
                plan.skipped = self._skipped.setdefault(index, plan.skipped).to(plan.device)
                self._skipped[index] = plan.skipped
            self._plans[index] = plan
        return plan


class _Variant:
    """The compiled step for one set of due probes (the empty set: an ordinary step), with its
    partial pass where the spec has groups.* reductions."""

    def __init__(self, program: Program, shapes: list, optimizer: Optimizer, device: torch.device):
        self.program = program
        graphs = lower_step(program, shapes, optimizer.nonfinite)
        self.scalar_fn, self.main_fn = backends.cached(
            graphs, shapes, optimizer.backend, device,
            relower=lambda other: lower_step(program, other, optimizer.nonfinite))
        self.groups = [groups_key(node) for node in groups_values(program)]  # the totals main_fn reads
        self.partials = lower_partials(program, shapes)
        if self.partials is not None:
            # compiled as the step is (one kernel of reductions per bucket), and shared alike
            self.partial_fn = backends.cached(
                StepGraphs(graphs.scalar, self.partials.graph), shapes, optimizer.backend, device,
                relower=lambda other: StepGraphs(lower_step(program, other, optimizer.nonfinite).scalar,
                                                 lower_partials(program, other).graph))[1]
        # probes run every few steps, after model evaluations that cost far more: eagerly
        self.probe_args = [lower_probe_args(program, shapes, j) if node.args else None
                           for j, node in enumerate(program.probes)]

    def partials_counts(self) -> tuple:
        return self.partials.counts if self.partials is not None else ()


class _Plan:
    """One group's buckets, hyperparameter tensors and compiled steps."""

    def __init__(self, optimizer: Optimizer, group: dict, params: list, layout):
        self.optimizer = optimizer
        self.program = program = optimizer._program(group)
        self.layout = layout
        self.nonfinite = optimizer.nonfinite
        state = optimizer.state
        every_probe = optimizer._program(group, frozenset(range(len(program.probe_periods))))
        by_size = any(Scope.TENSOR in {n.scope for n in p.nodes()} for p in (program, every_probe))
        groups: dict = {}
        for p in params:
            if p.grad.is_sparse:
                raise ValueError("gradspec does not support sparse gradients")
            step = state.get(p, {}).get("step", 0)
            step = float(step.item() if isinstance(step, torch.Tensor) else step)
            groups.setdefault((p.device, p.dtype, step), []).append(p)
        layouts = functools.partial(state_layouts, program) if program.shaped else None
        self.buckets = [Bucket(ps, state, program.state_names, step, by_size, program.state_ranks,
                               optimizer.state_dtype, optimizer._capture, layouts)
                        for (_, _, step), ps in groups.items()]
        self.shapes = [b.shape for b in self.buckets]
        self.numel = sum(sum(shape.full_numels()) for shape in self.shapes)  # over the shards: groups.numel
        self.device = self.buckets[0].device
        dtype = scalar_dtype(self.device)
        numeric = [n for n, h in optimizer.spec.hypers.items() if h.kind != "bool"]
        self.hypers = {name: torch.zeros((), dtype=dtype, device=self.device) for name in numeric}
        self._hyper_values: dict = {}
        self.skipped = torch.zeros(1, dtype=dtype, device=self.device) if self.nonfinite == "skip" else None
        self.global_states = self._global_states(state, params)
        self._variants: dict = {}
        self._group = group
        self._probed = None  # (probing, scalars, probe values per bucket) of this step
        self._prepared = None  # (probing, scalars) computed by this step's partial pass
        self.variant(frozenset())
        self.refresh_hypers(group)
        for bucket in self.buckets:
            bucket.initialise(self._initial_values(bucket) if bucket.missing else (), state)
        for p in params:  # every parameter's state shows the group's value, as it shows step
            for name, value in self.global_states.items():
                state[p][name] = value.view(())

    def variant(self, probing: frozenset) -> _Variant:
        if probing not in self._variants:
            self._variants[probing] = _Variant(self.optimizer._program(self._group, probing), self.shapes,
                                               self.optimizer, self.device)
        return self._variants[probing]

    def _global_states(self, state: dict, params: list) -> dict:
        """``state s: global`` buffers: restored from any parameter's state, else the initial
        number. Kept in the parameters' dtype (float32 for half types), so a checkpoint,
        which torch.optim casts to the parameter dtype, resumes exactly."""
        dtype = self.buckets[0].dtype
        dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        out = {}
        for name in self.program.global_states:
            saved = next((state[p][name] for p in params if name in state.get(p, {})), None)
            buffer = torch.zeros(1, dtype=dtype, device=self.device)
            if saved is not None:
                buffer.copy_(saved.reshape(1))
            else:  # a number, or hyperparameters: the group's values
                buffer.fill_(evaluate_scalar(self.program.init[name], self._group_values(params)))
            out[name] = buffer
        return out

    def _group_values(self, params: list) -> dict:
        group = next(g for g in self.optimizer.param_groups if any(p is q for q in g["params"] for p in params[:1]))
        return {name: group[name] for name in self.optimizer.spec.hypers if name in group}

    def _initial_values(self, bucket: Bucket):
        """The spec's initial state values for a bucket, computed eagerly once."""
        args = [self.hypers[h] for h in self.program.hypers_used] + [bucket.param, bucket.grad]
        return lower_init(self.program, bucket.shape)(*args, self.optimizer.generator)

    def refresh_hypers(self, group: dict) -> None:
        """Copy the group's numeric hyperparameters into their 0-d tensors, where they changed."""
        for name, tensor in self.hypers.items():
            value = group[name]
            if isinstance(value, torch.Tensor):
                tensor.copy_(value.reshape(()))  # a one-element tensor of any shape, as validated
            elif self._hyper_values.get(name) != value:
                tensor.fill_(float(value))  # a Python int past int64 (lr=10**30) is still a real
                self._hyper_values[name] = value

    def _scalars(self, variant: _Variant, loss, negate: bool) -> list:
        program = variant.program
        scalar_args = [self.hypers[h] for h in program.hypers_used]
        if program.uses_loss:
            if loss is None:
                raise RuntimeError(f"{program.spec.name} reads the loss: call step(closure) or step(loss=...)")
            loss = torch.as_tensor(loss).detach().to(self.device, scalar_dtype(self.device))
            scalar_args.append(-loss if negate else loss)
        scalar_args += [bucket.step for bucket in self.buckets]
        return list(variant.scalar_fn(*scalar_args))

    def _inputs(self, variant: _Variant, scalars: list, probe_values, with_skipped: bool,
                totals: dict | None = None) -> list:
        """The main phase's arguments (see lower.main_inputs for the order); without ``totals``,
        those of the partial pass and the probes' arguments."""
        args = list(scalars)
        if with_skipped and self.skipped is not None:
            args.append(self.skipped)
        args += self.global_states.values()
        if totals is not None:
            dtype = compute_dtype(self.buckets[0].dtype)
            args += [torch.as_tensor(totals[key], dtype=dtype, device=self.device) for key in variant.groups]
        for i, bucket in enumerate(self.buckets):
            args += [bucket.step, bucket.param, bucket.grad, *bucket.states.values()]
            args += probe_values[i] if probe_values else []
        return args

    def probe(self, group: dict, probing: frozenset, driver: ClosureDriver, loss) -> None:
        """Run the due probes, in dependency order, and keep their results for :meth:`run`."""
        self.refresh_hypers(group)
        variant = self.variant(probing)
        probes = variant.program.probes
        negate = self.optimizer._maximizes(group)
        for bucket in self.buckets:
            bucket.gather_grads()
            bucket.gather_params()
        values = [[None] * len(probes) for _ in self.buckets]
        params = [p for bucket in self.buckets for p in bucket.params]
        with _negated_grads(self.buckets, negate):
            scalars = self._scalars(variant, loss, negate)
            for j, node in enumerate(probes):
                args = variant.probe_args[j](*self._inputs(variant, scalars, values, False)) if node.args else None
                for i, out in enumerate(self._evaluate(node, args, params, driver, negate)):
                    values[i][j] = out
        self._probed = (probing, scalars, values)

    def _evaluate(self, node, args, params: list, driver: ClosureDriver, negate: bool) -> list:
        """One probe's result per bucket, as flat buffers ((k, numel) for a subspace).
        ``negate``: the group maximises, so gradients and Hessians are those of -loss; the
        Gauss-Newton estimate, from the model's own logits, does not depend on the sign."""
        func = node.attr[0]
        buckets = self.buckets
        starts = [0]
        for b in buckets:
            starts.append(starts[-1] + len(b.params))
        if func == "randn":
            return [bucket_normal(driver.generator, *b.shape.normal_layout(), compute_dtype(b.dtype), b.device)
                    for b in buckets]
        if func in ("grad_at", "hvp"):  # a scalar or per-group argument is the same for every element
            vectors = [view for b, (x,) in zip(buckets, args)
                       for view in b.views(torch.as_tensor(x, dtype=b.dtype, device=b.device).reshape(-1)
                                           .expand(b.numel).contiguous())]
            result = driver.gradient_at(params, vectors) if func == "grad_at" else driver.hvp(params, vectors)
            result = [-r for r in result] if negate else result
        elif func == "gauss_newton":
            result = driver.gauss_newton(params)
        else:
            _, _, k, iters = node.attr
            result = driver.eigenvectors(params, k, iters, torch.float64, negate)
            return [torch.cat([r.reshape(k, -1) for r in result[a:z]], dim=1).to(b.dtype)
                    for b, a, z in zip(buckets, starts, starts[1:])]
        return [torch.cat([r.reshape(-1) for r in result[a:z]]).to(b.dtype) for b, a, z in zip(buckets, starts, starts[1:])]

    def partials(self, group: dict, loss, probing: frozenset) -> list:
        """This group's parts of the step's groups.* reductions (its partial pass), before any
        group steps; the scalars it computes are kept for :meth:`run`."""
        variant = self.variant(probing)
        if variant.partials is None:
            return []
        probed = self._probed
        self.refresh_hypers(group)
        negate = self.optimizer._maximizes(group)
        for bucket in self.buckets:
            bucket.gather_grads()
        with _negated_grads(self.buckets, negate):
            scalars = probed[1] if probed else self._scalars(variant, loss, negate)
            if not probed:
                for bucket in self.buckets:
                    bucket.gather_params()
            parts = variant.partial_fn(*self._inputs(variant, scalars, probed[2] if probed else None, False))
        if not probed:
            self._prepared = (probing, scalars)
        return list(parts)

    def run(self, group: dict, loss, probing: frozenset = frozenset(), totals: dict | None = None) -> None:
        variant = self.variant(probing)
        probed, self._probed = self._probed, None
        prepared, self._prepared = self._prepared, None
        if probing and variant.program.probes and (probed is None or probed[0] != probing):
            raise RuntimeError("internal: a probing step without its probes")  # pragma: no cover
        self.refresh_hypers(group)
        negate = self.optimizer._maximizes(group)
        for bucket in self.buckets:
            bucket.gather_grads()
        with _negated_grads(self.buckets, negate):
            if probed:
                scalars = probed[1]
            elif prepared is not None and prepared[0] == probing:
                scalars = prepared[1]
            else:
                scalars = self._scalars(variant, loss, negate)
            if not probed:
                for bucket in self.buckets:
                    bucket.gather_params()
            variant.main_fn(*self._inputs(variant, scalars, probed[2] if probed else None, True,
                                          totals if variant.groups else None))
        for bucket in self.buckets:
            bucket.scatter_params()

    def raise_if_nonfinite(self):
        """FloatingPointError if a gradient holds a NaN or an infinity; shards agree, so every
        rank raises or none does. One check per flat buffer; per tensor only to say where."""
        for bucket in self.buckets:
            bucket.gather_grads()
        finite = all(bool(torch.isfinite(bucket.grad).all()) for bucket in self.buckets)
        views = [] if finite else [view for bucket in self.buckets for view in bucket.grad_views]
        where = _nonfinite(views, distributed.shard_group(self.buckets[0].sharding))
        if where is not None:
            raise FloatingPointError(f"non-finite gradient in {where} (nonfinite='raise'); nothing was updated")

    def detach(self, state: dict) -> None:
        for bucket in self.buckets:
            bucket.detach(state)


@contextlib.contextmanager
def _negated_grads(buckets: list, negate: bool):
    """The flat gradient buffers negated while the block runs (``maximize``), then restored:
    the users' ``p.grad`` are views of them. A sign flip is exact, so the restored gradients
    are the same bits; it costs two passes over the gradients, only for maximising groups."""
    if not negate:
        yield
        return
    for bucket in buckets:
        bucket.grad.neg_()
    try:
        yield
    finally:
        for bucket in buckets:
            bucket.grad.neg_()


def _nonfinite(grads: list, shard_group) -> str | None:
    """Where the first gradient holding a NaN or an infinity is, or None if every one is
    finite on every rank of ``shard_group``."""
    bad = next((tuple(g.shape) for g in grads if not bool(torch.isfinite(g).all())), None)
    if not distributed.any_process(bad is not None, shard_group):
        return None
    return f"a parameter of shape {bad}" if bad is not None else "a parameter shard on another rank"
