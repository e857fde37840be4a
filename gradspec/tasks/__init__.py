"""Built-in comparison tasks, and the registry a user extends with a Python function.

A task makes a :class:`Problem` from a seed: the parameters to train, the training loss at a
step (on that step's batch), and held-out evaluations. A problem may also give its training
loss as a pure function of the parameters (:class:`PureLoss`), which lets ``gradspec compare``
train a whole learning-rate grid as one ``torch.func.vmap``-ed run. Everything a task needs
ships with Python or an installed package; nothing is downloaded. Registering and listing tasks
imports no torch (``gradspec list`` stays light): the built-in tasks import it when they build a
problem. Register your own with::

    @gradspec.tasks.register("my_task", steps=500, target=0.1, metric="accuracy")
    def my_task(seed: int, device: str) -> gradspec.tasks.Problem:
        ...

or name it on the command line as ``--task path/to/file.py:function``.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # annotations only: declaring and listing tasks imports no torch
    import torch


@dataclass
class Problem:
    """One seeded instance of a task.

    ``loss(step)`` returns the training loss on step's batch (a scalar tensor with its
    graph) and the batch's logits (for Sophia-G's label sampling) or None. ``evaluate()``
    returns held-out metrics, the task's ``metric`` among them; ``validate()`` the
    validation loss a learning-rate grid is chosen on; ``sharpness_loss()`` the loss on a
    fixed batch whose Hessian's top eigenvalue is the end-of-training sharpness.
    ``point()``, for 2-D functions, is the current position (for trajectory plots).
    ``pure``, when given, is the same training loss as a function of the parameters (see
    :class:`PureLoss`); without it a learning-rate grid trains one run after another.
    """

    params: list
    loss: Callable[[int], tuple]
    evaluate: Callable[[], dict]
    validate: Callable[[], float]
    sharpness_loss: Callable[[], torch.Tensor]
    point: Callable[[], tuple] | None = None
    pure: "PureLoss | None" = None


@dataclass(frozen=True)
class PureLoss:
    """A problem's training loss as a pure function of its parameters: ``of(params, step)``
    takes a list shaped like ``Problem.params`` (plain tensors, possibly batched by
    ``torch.func.vmap``) and returns ``(loss, outputs)``; it must not read the problem's own
    parameters, which a vmapped grid leaves untouched while it trains its copies. The step's
    batch must depend only on (seed, step), so that every copy sees the batch that every run of
    a sequential grid sees.

    :meth:`of_module` builds it for an ``nn.Module``: the module is evaluated with
    ``torch.func.functional_call`` on the given parameters, so its own stay untouched."""

    of: Callable[[list, int], tuple]

    @staticmethod
    def of_module(model: torch.nn.Module, batch: Callable[[int], tuple],
                  criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> "PureLoss":
        """``batch(step) -> (inputs, targets)``, ``criterion(outputs, targets) -> loss``; the
        parameters are taken in ``model.parameters()`` order."""
        import torch
        names = tuple(name for name, _ in model.named_parameters())

        def of(params, step):
            inputs, targets = batch(step)
            outputs = torch.func.functional_call(model, dict(zip(names, params)), (inputs,))
            return criterion(outputs, targets), outputs
        return PureLoss(of)


def module_losses(model: torch.nn.Module, batch: Callable[[int], tuple],
                  criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple:
    """A module's training loss both ways, from one batch and one criterion: ``loss(step)``
    on the module's own parameters (``Problem.loss``, for the optimizer's backward) and the
    :class:`PureLoss` (``Problem.pure``, for a vmapped grid)."""
    def loss(step):
        inputs, targets = batch(step)
        outputs = model(inputs)
        return criterion(outputs, targets), outputs
    return loss, PureLoss.of_module(model, batch, criterion)


@dataclass(frozen=True)
class Task:
    """A named problem family with its default budget and what counts as success."""

    name: str
    make: Callable[[int, str], Problem]
    description: str = ""
    steps: int = 300  # default budget
    target: float = 0.0  # training loss that counts as reached (time-to-target)
    metric: str = "eval_loss"  # the headline held-out metric in evaluate()'s dict
    higher_is_better: bool = False
    eval_every: int = 50
    surface: dict = field(default_factory=dict)  # 2-D functions: f, bounds, minima, for contour plots


_TASKS: dict[str, Task] = {}


def register(name: str, **settings):
    """Decorator: register ``fn(seed, device) -> Problem`` as task ``name`` (see :class:`Task`
    for the settings)."""
    def wrap(fn):
        description = settings.pop("description", (fn.__doc__ or "").strip().split("\n")[0])
        _TASKS[name] = Task(name, fn, description, **settings)
        return fn
    return wrap


def add(task: Task) -> Task:
    _TASKS[task.name] = task
    return task


def get(name: str) -> Task:
    """A registered task, or one from ``path/to/file.py:function`` (a function registered
    with :func:`register` in that file, or any ``fn(seed, device) -> Problem``)."""
    _load_builtins()
    if name in _TASKS:
        return _TASKS[name]
    if ":" in name:
        path, function = name.rsplit(":", 1)
        spec = importlib.util.spec_from_file_location(f"gradspec_user_task_{abs(hash(path))}", path)
        if spec is None:
            raise ValueError(f"cannot load tasks from {path!r}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        registered = [t for t in _TASKS.values() if t.make is getattr(module, function, None)]
        if registered:
            return registered[0]
        if not hasattr(module, function):
            raise ValueError(f"{path} defines no function {function!r}")
        return Task(name, getattr(module, function))
    from ..dsl.errors import did_you_mean
    hint = did_you_mean(name, _TASKS)
    raise ValueError(f"unknown task {name!r}" + (f"; {hint}" if hint else "") + f" (tasks: {', '.join(names())})")


def names() -> list[str]:
    _load_builtins()
    return sorted(_TASKS)


def _load_builtins():
    from . import functions, learning, text  # noqa: F401  (registering is their import's effect)
