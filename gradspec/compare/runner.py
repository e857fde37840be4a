"""Training runs for a comparison: one variant, one seed, one learning rate at a time; and the
learning-rate grid, trained as one vmapped run where the task and spec allow (:func:`pick_lr`).

A run records the training loss at every step and the step's time on two clocks, wall and
process CPU, both for the whole step and for the optimizer's own part (the step less the time
spent in the closure, that is in the model's forward and backward passes); held-out metrics
and the validation loss every ``eval_every`` steps; the model evaluations the optimizer
counted; the highest load average seen while it ran; and at the end the held-out metrics,
optionally the sharpness (top Hessian eigenvalue, Lanczos) and, for 2-D functions, the
trajectory. The first step (which lowers, and with the compiled backend compiles) is not
timed.

Process CPU time is what survives a busy machine: a process that waits for a core is not
charged for the wait, while its wall time grows with every other process on the machine. The
1-minute load average tells whether that happened: a run during which it exceeded the cores
is marked busy, and the report and plots say so.
"""
from __future__ import annotations

import math
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field

import torch

from ..runtime.lanczos import hessian_eigenpairs
from ..runtime.optimizer import Optimizer
from ..tasks import Task

CLOCKS = ("step_ms", "step_cpu_ms", "optimizer_ms", "optimizer_cpu_ms")
LOAD_EVERY = 25  # steps between two readings of the load average


def cores() -> int:
    """The cores this process may run on (its affinity), which the load average is held to."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def load_average() -> float:
    """The 1-minute load average, or 0 where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - not Unix
        return 0.0


@dataclass
class Run:
    variant: str
    seed: int
    lr: float | None
    losses: list = field(default_factory=list)  # training loss per step
    step_ms: list = field(default_factory=list)  # wall time of each step (0 for the untimed first)
    step_cpu_ms: list = field(default_factory=list)  # process CPU time of each step
    optimizer_ms: list = field(default_factory=list)  # wall time of each step outside the closure
    optimizer_cpu_ms: list = field(default_factory=list)  # process CPU time of each step outside the closure
    evals: list = field(default_factory=list)  # (step, metrics with the "validation" loss among them)
    final: dict = field(default_factory=dict)  # held-out metrics at the end
    per_step: dict = field(default_factory=dict)  # closure calls, gradients, HVPs per step
    sharpness: float | None = None
    trajectory: list = field(default_factory=list)  # 2-D functions: (x, y) after each step
    diverged_at: int | None = None  # first step with a non-finite loss
    max_load: float = 0.0  # highest 1-minute load average read during the run
    cores: int = 1  # the cores that load is held to
    untimed: int = 1  # leading steps left out of every time (the first lowers or compiles)

    def reached(self, target: float) -> int | None:
        """The first step whose training loss reached ``target``, or None."""
        for i, loss in enumerate(self.losses):
            if loss <= target:
                return i + 1
        return None

    def mean_ms(self, clock: str = "step_cpu_ms") -> float:
        """Mean milliseconds per timed step on one of :data:`CLOCKS`. A mean, not a median:
        a probe that runs every k steps is part of the step's cost."""
        timed = getattr(self, clock)[self.untimed:]
        return statistics.fmean(timed) if timed else math.nan

    def cumulative_seconds(self, clock: str = "step_cpu_ms") -> list:
        """Seconds after each step on one clock, untimed steps counting 0."""
        total, out = 0.0, []
        for i, ms in enumerate(getattr(self, clock)):
            total += ms / 1e3 if i >= self.untimed else 0.0
            out.append(total)
        return out

    @property
    def busy(self) -> bool:
        """Whether the load average exceeded the cores while the run trained."""
        return self.max_load > self.cores


def train(task: Task, variant: str, seed: int, steps: int, lr: float | None = None, backend: str = "eager",
          device: str = "cpu", sharpness: bool = False, progress=None) -> Run:
    """One seeded run of ``variant`` (a stdlib name, spec expression or .opt path) on ``task``."""
    problem = task.make(seed, device)
    hyper = {} if lr is None else {"lr": lr}
    opt = Optimizer(problem.params, variant, backend=backend, seed=seed, **hyper)
    run = Run(variant, seed, lr, cores=cores(), max_load=load_average())
    state = {"step": 0, "wall": 0.0, "cpu": 0.0}  # the step's time spent inside the closure

    def closure():
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            opt.zero_grad()
            loss, logits = problem.loss(state["step"])
            if opt.has_probes:
                return (loss, logits) if logits is not None else loss
            loss.backward()
            return loss
        finally:
            state["wall"] += time.perf_counter() - wall
            state["cpu"] += time.process_time() - cpu

    for step in range(1, steps + 1):
        state.update(step=step, wall=0.0, cpu=0.0)
        wall, cpu = time.perf_counter(), time.process_time()
        loss = opt.step(closure)
        value = float(loss.detach())
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        run.step_ms.append(1e3 * wall)
        run.step_cpu_ms.append(1e3 * cpu)
        run.optimizer_ms.append(1e3 * max(wall - state["wall"], 0.0))
        run.optimizer_cpu_ms.append(1e3 * max(cpu - state["cpu"], 0.0))
        run.losses.append(value)
        if problem.point is not None:
            run.trajectory.append(problem.point())
        if step % LOAD_EVERY == 0:
            run.max_load = max(run.max_load, load_average())
        if not math.isfinite(value):
            run.diverged_at = step
            break
        if step % task.eval_every == 0 or step == steps:
            run.evals.append((step, {**problem.evaluate(), "validation": problem.validate()}))
        if progress is not None:
            progress.update(1)
            if step % 25 == 0:
                progress.set_postfix(loss=f"{value:.4g}", refresh=False)
    run.max_load = max(run.max_load, load_average())
    if run.diverged_at is None:
        run.final = dict(run.evals[-1][1])
    counts = opt.evaluations.as_dict()
    done = len(run.losses)
    run.per_step = ({k: v / done for k, v in counts.items()} if opt.has_probes
                    else {"closure_calls": 1.0, "gradients": 1.0, "hvps": 0.0})
    if sharpness and run.diverged_at is None:
        try:
            values, _ = hessian_eigenpairs(problem.sharpness_loss, problem.params, k=1, iters=20, seed=seed)
            run.sharpness = float(values[0])
        except torch.linalg.LinAlgError:  # a run on its way to diverging: a Hessian too large to resolve
            run.sharpness = math.nan
    return run


@dataclass
class LrGrid:
    """A learning-rate grid's outcome: the pick, each rate's validation loss (+inf for a
    diverged run), and how the grid was trained: as one vmapped run, or one run per rate and
    why (``sequential_because``)."""

    lr: float
    scores: dict  # {lr: validation loss after the grid's steps}
    sequential_because: str | None = None  # None: the grid was one vmapped run

    @staticmethod
    def best_of(scores: dict, sequential_because: str | None = None) -> "LrGrid":
        return LrGrid(min(scores, key=lambda lr: (scores[lr], lr)), scores, sequential_because)

    @property
    def vmapped(self) -> bool:
        return self.sequential_because is None

    @property
    def edge(self) -> str | None:
        """"lowest" or "highest" when the pick is the grid's first or last rate (of two or
        more): the best rate may then lie outside the grid."""
        if len(self.scores) < 2:
            return None
        return {min(self.scores): "lowest", max(self.scores): "highest"}.get(self.lr)

    def how(self) -> str:
        """How the grid was trained, for the report."""
        if self.vmapped:
            return f"one vmapped run over the {len(self.scores)} learning rates"
        return f"one run per learning rate ({self.sequential_because})"


class _Sequential(Exception):
    """Why a grid cannot be one vmapped run; the sequential loop then trains it."""


def pick_lr(task: Task, variant: str, grid: list, steps: int, backend: str, device: str,
            seed: int = 10_000, progress=None, vmap: bool = True) -> LrGrid:
    """The grid's learning rate with the lowest validation loss after ``steps`` steps, from a
    seed that no reported run uses; a diverged run scores +inf (ties go to the smaller rate).

    Where the task gives a pure loss (``Problem.pure``) and :func:`gradspec.transform` runs
    the spec, the whole grid trains at once: see :func:`_vmapped_scores`. Otherwise, or with
    ``vmap=False``, one :func:`train` per rate; both score each rate's final parameters with
    the task's own ``validate()`` and agree to rounding. The returned record says which ran."""
    because = "turned off (vmap=False, --no-vmap)"
    if vmap:
        try:
            return LrGrid.best_of(_vmapped_scores(task, variant, grid, steps, device, seed, progress))
        except _Sequential as reason:
            because = str(reason)
            if progress is not None:
                progress.reset()
    scores = {}
    for lr in grid:
        run = train(task, variant, seed, steps, lr, backend, device, progress=progress)
        scores[lr] = _score(run.final.get("validation", math.inf))
    return LrGrid.best_of(scores, because)


def _score(validation: float) -> float:
    return validation if math.isfinite(validation) else math.inf


def _vmapped_scores(task: Task, variant: str, grid: list, steps: int, device: str, seed: int,
                    progress) -> dict:
    """{lr: validation loss} with every rate trained in one ``torch.func.vmap``-ed loop.

    Each rate starts from its own copy of the seed's initial parameters (stacked along a new
    first dimension); the loop takes ``torch.func.grad`` of the task's pure loss and applies
    the spec's pure update with that copy's ``lr`` (eager: ``backend`` applies to sequential
    runs). Batches depend only on (seed, step), and a ``randn()`` initial value comes from one
    generator seeded as the Optimizer's is, so vmap runs with ``randomness="same"``: every copy
    sees the same batch and the same draws, as every sequential run does. A copy whose training
    loss turns non-finite scores +inf, as a sequential run that stops there does. Raises
    :class:`_Sequential` with the reason when the task or the spec cannot run this way (the
    caller then trains one rate at a time)."""
    from ..dsl import ast
    from ..dsl.errors import SpecError
    from ..dsl.resolve import load
    from ..runtime.functional import transform

    problem = task.make(seed, device)
    if problem.pure is None:
        raise _Sequential(f"task {task.name} gives no pure loss (Problem.pure)")
    initial = [p.detach().clone() for p in problem.params]
    try:
        spec = load(variant)
        if any(isinstance(item, ast.Probe) for _, item in spec.items):
            raise _Sequential(f"{variant} probes the model, and the functional update differentiates a probe with "
                              "torch.autograd, which torch.func.vmap does not run")
        for lr in grid:  # the Optimizer's checks on each rate (lr > 0, ...) before anything runs
            transform(spec, lr=lr)
        tx = transform(spec)
        tx.init(initial, generator=torch.Generator(device=initial[0].device))  # lowers every program it runs
    except (SpecError, ValueError, TypeError) as refused:
        raise _Sequential(f"the functional update refuses {variant}: {refused}") from None
    pure = problem.pure.of
    generator = torch.Generator(device=initial[0].device).manual_seed(seed)

    def train_one(lr, params):
        state = tx.init(params, generator=generator)
        losses = []
        for step in range(1, steps + 1):
            grads, loss = torch.func.grad_and_value(lambda ps: pure(ps, step)[0])(params)
            params, state = tx.update(grads, state, params, lr=lr, loss=loss.detach())
            losses.append(loss.detach())
            if progress is not None:
                progress.update(len(grid))
        return params, torch.stack(losses)

    lrs = torch.tensor([float(lr) for lr in grid], dtype=torch.float64, device=initial[0].device)
    stacked = [p.expand(len(grid), *p.shape).clone() for p in initial]
    try:
        with warnings.catch_warnings():  # functorch's note that an op (CPU attention) runs as a loop
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet "
                                                      "implemented the batching rule")
            final, losses = torch.func.vmap(train_one, randomness="same")(lrs, stacked)
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as failed:
        raise _Sequential(f"the vmapped run failed: {type(failed).__name__}: {failed}") from None
    scores = {}
    for i, lr in enumerate(grid):
        if not bool(torch.isfinite(losses[i]).all()):
            scores[lr] = math.inf
            continue
        with torch.no_grad():
            for live, trained in zip(problem.params, final):
                live.copy_(trained[i])
        scores[lr] = _score(problem.validate())
    return scores
