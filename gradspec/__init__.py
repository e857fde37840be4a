"""gradspec: optimizers written as short declarative specs, checked and compiled to fused torch.

    import gradspec
    opt = gradspec.Optimizer(model.parameters(), "adam", lr=1e-3)
    spec = gradspec.load("lookahead(adam)").with_hyper(sync_period=10)
"""
from .dsl.errors import Diagnostic, SpecError
from .dsl.resolve import Spec, load
from .dsl.resolve import parse_spec as parse
from .runtime.lanczos import hessian_eigenpairs
from .runtime.functional import Transform, transform
from .runtime.optimizer import Optimizer
from .check import check

__all__ = ["Diagnostic", "Optimizer", "Spec", "SpecError", "Transform", "check", "hessian_eigenpairs", "load", "parse",
           "transform"]
__version__ = "0.1.0"
