"""Training runs for a comparison: one variant, one seed, one learning rate at a time.

A run records the training loss and the cumulative wall time at every step, held-out
metrics every ``eval_every`` steps, the model evaluations the optimizer counted, and at the
end the held-out metrics, optionally the sharpness (top Hessian eigenvalue, Lanczos) and,
for 2-D functions, the trajectory. Wall time excludes the first step, which compiles.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from ..runtime.lanczos import hessian_eigenpairs
from ..runtime.optimizer import Optimizer
from ..tasks import Task


@dataclass
class Run:
    variant: str
    seed: int
    lr: float | None
    losses: list = field(default_factory=list)  # training loss per step
    seconds: list = field(default_factory=list)  # cumulative wall time after each step
    evals: list = field(default_factory=list)  # (step, metrics)
    final: dict = field(default_factory=dict)  # held-out metrics at the end
    per_step: dict = field(default_factory=dict)  # closure calls, gradients, HVPs per step
    sharpness: float | None = None
    trajectory: list = field(default_factory=list)  # 2-D functions: (x, y) after each step
    diverged_at: int | None = None  # first step with a non-finite loss

    def reached(self, target: float) -> tuple[int | None, float | None]:
        """(steps, seconds) until the training loss first reached ``target``, or (None, None)."""
        for i, loss in enumerate(self.losses):
            if loss <= target:
                return i + 1, self.seconds[i]
        return None, None

    @property
    def ms_per_step(self) -> float:
        """Median wall time of a step after the first, in milliseconds."""
        gaps = sorted(b - a for a, b in zip(self.seconds, self.seconds[1:]))
        return 1e3 * gaps[len(gaps) // 2] if gaps else math.nan


def train(task: Task, variant: str, seed: int, steps: int, lr: float | None = None, backend: str = "eager",
          device: str = "cpu", sharpness: bool = False, progress=None) -> Run:
    """One seeded run of ``variant`` (a stdlib name, spec expression or .opt path) on ``task``."""
    problem = task.make(seed, device)
    hyper = {} if lr is None else {"lr": lr}
    opt = Optimizer(problem.params, variant, backend=backend, seed=seed, **hyper)
    run = Run(variant, seed, lr)
    state = {"step": 0}

    def closure():
        opt.zero_grad()
        loss, logits = problem.loss(state["step"])
        if opt.has_probes:
            return (loss, logits) if logits is not None else loss
        loss.backward()
        return loss

    elapsed = 0.0
    for step in range(1, steps + 1):
        state["step"] = step
        start = time.perf_counter()
        loss = opt.step(closure)
        value = float(loss.detach())
        if step > 1:
            elapsed += time.perf_counter() - start
        run.losses.append(value)
        run.seconds.append(elapsed)
        if problem.point is not None:
            run.trajectory.append(problem.point())
        if not math.isfinite(value):
            run.diverged_at = step
            break
        if step % task.eval_every == 0 or step == steps:
            run.evals.append((step, problem.evaluate()))
        if progress is not None:
            progress.update(1)
            if step % 25 == 0:
                progress.set_postfix(loss=f"{value:.4g}", refresh=False)
    if run.diverged_at is None:
        run.final = {**problem.evaluate(), "validation": problem.validate()}
    counts = opt.evaluations.as_dict()
    done = len(run.losses)
    run.per_step = ({k: v / done for k, v in counts.items()} if opt.has_probes
                    else {"closure_calls": 1.0, "gradients": 1.0, "hvps": 0.0})
    if sharpness and run.diverged_at is None:
        values, _ = hessian_eigenpairs(problem.sharpness_loss, problem.params, k=1, iters=20, seed=seed)
        run.sharpness = float(values[0])
    return run


def pick_lr(task: Task, variant: str, grid: list, steps: int, backend: str, device: str,
            seed: int = 10_000, progress=None) -> tuple[float, dict]:
    """The grid's learning rate with the lowest validation loss after ``steps`` steps, from a
    seed that no reported run uses; a diverged run scores +inf. Returns (lr, {lr: score})."""
    scores = {}
    for lr in grid:
        run = train(task, variant, seed, steps, lr, backend, device, progress=progress)
        value = run.final.get("validation", math.inf)
        scores[lr] = value if math.isfinite(value) else math.inf
    best = min(scores, key=lambda lr: (scores[lr], lr))
    return best, scores
