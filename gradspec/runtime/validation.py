"""What the optimizer accepts from its user: parameters, hyperparameter values and torch.optim's
implementation flags. Each check answers with the exception to raise (or None), so the
constructor, ``add_param_group``, ``step()`` and ``load_state_dict`` refuse the same values
with the same words, before anything changes.

The exception types follow torch.optim: a value of the wrong type (``lr="x"``, ``lr=True``)
is a TypeError, a number outside its range (``lr=nan``, ``lr=inf``, ``beta1=1.5``) a
ValueError naming the constraint.
"""
from __future__ import annotations

import math
import numbers

import torch

from ..dsl import ast

# torch.optim's implementation flags: accepted so that code written for torch.optim runs,
# and ignored, because gradspec has one implementation (one fused kernel per bucket)
TORCH_FLAGS = {"foreach": None, "fused": None, "capturable": False, "differentiable": False}
MAXIMIZE = "maximize"  # torch.optim's name: step on -grad (and on -loss) for this group


def parameter_problem(param) -> Exception | None:
    """Why gradspec cannot step ``param``, or None. Complex parameters are refused rather than
    viewed as real pairs as torch.optim does: a spec's per-tensor and matrix operations
    (norms of a matrix, orthogonalisation, Hessian probes) would see a (..., 2) real tensor,
    which is not the complex maths the spec states."""
    if not isinstance(param, torch.Tensor):
        return TypeError(f"optimizer parameters must be tensors, got {type(param).__name__}")
    if param.is_complex():
        return TypeError(f"gradspec does not support complex parameters (got {param.dtype} of shape "
                         f"{tuple(param.shape)}); optimise torch.view_as_real(p) as a real parameter instead")
    if not param.is_floating_point():
        return TypeError(f"gradspec steps floating-point parameters, got {param.dtype} of shape {tuple(param.shape)}")
    if param.is_meta:
        return ValueError(f"a parameter of shape {tuple(param.shape)} is on the meta device, which holds no values "
                          "to step: materialise the model first (model.to_empty(device=...) and initialise it)")
    return None


def hyper_problem(hyper: ast.Hyper, value) -> Exception | None:
    """Why ``value`` cannot be ``hyper``'s value, or None: the type first (TypeError), then
    finiteness (an infinity only where the default is that infinity) and the spec's
    constraint (ValueError). A tensor (a 0-d lr) must hold one
    real number; on an accelerator its value is not read, which would synchronise every step."""
    name = hyper.name
    if hyper.kind == "bool":
        return None if isinstance(value, bool) else TypeError(
            f"{name} must be True or False, got {type(value).__name__} {value!r}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            return TypeError(f"{name} must be a real number or a one-element real tensor, "
                             f"got a {value.dtype} tensor of shape {tuple(value.shape)}")
        if value.device.type != "cpu":
            return None
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    # infinity only where the spec's own default is infinite (Prodigy's unbounded growth_rate):
    # elsewhere an infinite lr or eps is a mistake, however the constraint reads
    if math.isnan(number) or (math.isinf(number) and number != hyper.default):
        allowed = f" ({hyper.constraint.describe(name)})" if hyper.constraint is not None else ""
        return ValueError(f"{name} must be a finite number{allowed}, got {number}")
    problem = hyper.check(value)
    return ValueError(problem) if problem else None


def seed_problem(seed) -> Exception | None:
    """Why ``seed`` cannot seed the probe generator, or None: an integer in the range torch's
    generators take (a signed or unsigned 64-bit number)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        return TypeError(f"seed must be an integer, got {type(seed).__name__} {seed!r}")
    if not -2 ** 63 <= int(seed) < 2 ** 64:
        return ValueError(f"seed must fit in 64 bits, got {seed}")
    return None


def flag_problem(name: str, value) -> Exception | None:
    """Why a torch.optim flag's value is refused (they are no-ops, but a typo'd value is not)."""
    allowed = (True, False, None) if TORCH_FLAGS.get(name, False) is None else (True, False)
    if not any(value is choice for choice in allowed):
        return TypeError(f"{name} must be {' or '.join(map(str, allowed))}, got {value!r}")
    return None
