"""gradspec: optimizers written as short declarative specs, checked and compiled to fused torch.

    import gradspec
    opt = gradspec.Optimizer(model.parameters(), "adam", lr=1e-3)
    spec = gradspec.load("lookahead(adam)").with_hyper(sync_period=10)
"""
import importlib
import sys
import types

from .dsl.errors import Diagnostic, SpecError
from .dsl.resolve import Spec, load
from .dsl.resolve import parse_spec as parse

__all__ = ["Diagnostic", "Optimizer", "Spec", "SpecError", "Transform", "check", "create_optimizer",
           "hessian_eigenpairs", "load", "param_groups", "parse", "transform"]
__version__ = "0.1.0"

_LAZY = {
    "Optimizer": "runtime.optimizer",
    "Transform": "runtime.functional",
    "transform": "runtime.functional",
    "hessian_eigenpairs": "runtime.lanczos",
    "param_groups": "runtime.factory",
    "create_optimizer": "runtime.factory",
    "check": "check",
    "tasks": None,
}
"""Public names imported on first use. Reading and resolving specs needs only the front end;
the runtime imports torch (about 3 s on a 2-core CPU) and the checker SymPy (about 1 s), so
``gradspec --help`` or ``gradspec.load`` does not pay for them. A name mapped to None is a
submodule itself (``gradspec.tasks.register`` after a bare ``import gradspec``)."""


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'gradspec' has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_LAZY[name] or name}")
    value = module if _LAZY[name] is None else getattr(module, name)
    globals()[name] = value  # later lookups find it directly
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """The package, keeping ``gradspec.check`` the function. Importing the submodule
    ``gradspec.check`` (``from gradspec.check import diagnose``) makes Python set the
    package's attribute ``check`` to that module; eagerly importing the function afterwards
    used to undo it, and lazily there is no afterwards, so the assignment is redirected."""

    def __setattr__(self, name, value):
        if name == "check" and isinstance(value, types.ModuleType):
            value = value.check
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
