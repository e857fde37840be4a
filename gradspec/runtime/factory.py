"""Model-level factories: parameter groups with the usual weight-decay exemptions, and an
Optimizer built from a model in one call.

Fine-tuning recipes exempt biases and normalisation weights from weight decay (decaying a
LayerNorm's gain towards 0 fights the normalisation). Matching by name alone misses
``ln_f.weight`` (GPT-2's final norm) and catches ``denormalizer.weight``, so a pattern here
is matched against both the parameter's qualified name and the class of the module that
owns it, case-insensitively.
"""
from __future__ import annotations

import torch

from ..dsl.resolve import Spec, as_spec
from .optimizer import Optimizer

NO_DECAY = ("bias", "norm")


def param_groups(model: torch.nn.Module, weight_decay: float = 0.0, no_decay=NO_DECAY, **group_hyper) -> list:
    """Two parameter groups of ``model``'s trainable parameters: those that decay (with
    ``weight_decay``) and those ``no_decay`` exempts (weight_decay 0). A pattern exempts a
    parameter when it occurs in its qualified name (``encoder.layer.0.output.bias``) or in
    its module's class name (``LayerNorm``, ``RMSNorm``, ``BatchNorm1d``). Shared parameters
    appear once; frozen ones (requires_grad False) are left out; an empty group is dropped.
    ``group_hyper`` goes into both groups (``lr=...``).

    Embeddings decay, as in the HF Trainer's groups (which these equal on transformers'
    models) and nanoGPT's; ``no_decay=("bias", "norm", "embedding")`` exempts them too, by
    their module class (``Embedding``), whatever they are called (GPT-2's ``wte``, ``wpe``)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"param_groups takes a torch.nn.Module, not {type(model).__name__}")
    if isinstance(no_decay, str):
        no_decay = (no_decay,)
    patterns = tuple(p.lower() for p in no_decay)
    owners = {}
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), (f"{module_name}.{name}" if module_name else name, type(module).__name__))
    decay, exempt = [], []
    for param in model.parameters():  # deduplicated, in registration order
        if not param.requires_grad:
            continue
        qualified, owner = owners[id(param)]
        words = (qualified.lower(), owner.lower())
        (exempt if any(p in w for p in patterns for w in words) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, **group_hyper},
              {"params": exempt, "weight_decay": 0.0, **group_hyper}]
    return [g for g in groups if g["params"]]


def create_optimizer(model: torch.nn.Module, spec: str | Spec, *, weight_decay: float | None = None,
                     no_decay=NO_DECAY, **hyper) -> Optimizer:
    """``gradspec.Optimizer`` over ``model``: with ``weight_decay``, over :func:`param_groups`
    (the spec must have a ``weight_decay`` hyperparameter); without, over every trainable
    parameter at the spec's defaults. ``hyper`` are the optimizer's keyword arguments."""
    resolved = as_spec(spec)
    if weight_decay is None:
        params = [p for p in model.parameters() if p.requires_grad]
        return Optimizer(params, spec, **hyper)
    if "weight_decay" not in resolved.hypers:
        raise ValueError(f"{resolved.name} has no weight_decay hyperparameter; choose a spec that decays "
                         "(adamw, lamb, sgd, ...) or leave weight_decay out")
    return Optimizer(param_groups(model, weight_decay, no_decay), spec, weight_decay=weight_decay, **hyper)
