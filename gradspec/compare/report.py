"""Summaries of a comparison's runs: the table, the per-step CSV and the markdown report."""
from __future__ import annotations

import csv
import math
import os
import statistics
from dataclasses import dataclass

from ..tasks import Task
from .runner import Run


@dataclass
class Summary:
    """One variant over its seeds."""

    variant: str
    lr: float | None
    runs: list
    final_loss: tuple  # (mean, std) of the last training loss
    metric: tuple  # (mean, std) of each run's best held-out metric
    reached: int  # runs that reached the target loss
    steps_to_target: float | None  # median over the runs that reached it
    seconds_to_target: float | None
    ms_per_step: float
    per_step: dict  # closure calls, gradients, HVPs per step (mean over runs)
    sharpness: tuple | None
    diverged: int


def _mean_std(values) -> tuple:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return (math.nan, math.nan)
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(task: Task, variant: str, lr, runs: list[Run]) -> Summary:
    best = max if task.higher_is_better else min
    metrics = [best([m[task.metric] for _, m in r.evals if task.metric in m] or [math.nan]) for r in runs
               if r.diverged_at is None]
    reached = [r.reached(task.target) for r in runs]
    hits = [(s, t) for s, t in reached if s is not None]
    per_step = {k: statistics.fmean(r.per_step[k] for r in runs) for k in runs[0].per_step}
    sharp = [r.sharpness for r in runs if r.sharpness is not None]
    return Summary(variant, lr, runs, _mean_std(r.losses[-1] for r in runs if r.diverged_at is None),
                   _mean_std(metrics), len(hits),
                   statistics.median(s for s, _ in hits) if hits else None,
                   statistics.median(t for _, t in hits) if hits else None,
                   statistics.median(r.ms_per_step for r in runs), per_step,
                   _mean_std(sharp) if sharp else None, sum(r.diverged_at is not None for r in runs))


def _pm(pair, digits=4) -> str:
    mean, std = pair
    if math.isnan(mean):
        return "diverged"
    return f"{mean:.{digits}g} ± {std:.2g}"


def table(task: Task, summaries: list[Summary]) -> str:
    """The comparison as a markdown table."""
    sharp = any(s.sharpness is not None for s in summaries)
    header = ["variant", "lr", "final train loss", f"best {task.metric} ({'max' if task.higher_is_better else 'min'})",
              f"steps to loss {task.target:g}", "time to target (s)", "ms/step", "grads/step", "HVPs/step"]
    header += ["sharpness (top Hessian eigenvalue)"] if sharp else []
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
    for s in summaries:
        n = len(s.runs)
        steps = f"{s.steps_to_target:g} ({s.reached}/{n})" if s.reached else f"not reached (0/{n})"
        seconds = f"{s.seconds_to_target:.3g}" if s.seconds_to_target is not None else "-"
        row = [f"`{s.variant}`", "default" if s.lr is None else f"{s.lr:g}",
               _pm(s.final_loss) + (f" ({s.diverged} diverged)" if s.diverged else ""), _pm(s.metric), steps,
               seconds, f"{s.ms_per_step:.3g}", f"{s.per_step['gradients']:.3g}", f"{s.per_step['hvps']:.3g}"]
        if sharp:
            row.append(_pm(s.sharpness) if s.sharpness else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_csv(path: str, summaries: list[Summary]) -> None:
    """Every step of every run: variant, seed, lr, step, training loss, wall seconds."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["variant", "seed", "lr", "step", "loss", "seconds"])
        for s in summaries:
            for r in s.runs:
                for i, (loss, seconds) in enumerate(zip(r.losses, r.seconds)):
                    writer.writerow([r.variant, r.seed, r.lr, i + 1, repr(loss), f"{seconds:.6f}"])


def markdown(task: Task, summaries: list[Summary], settings: dict, figures: list[str], grids: dict,
             verdicts: list, level: int = 1, figure_prefix: str = "") -> str:
    """The report: title, claim, settings and command, table, verdicts, lr grids, figures."""
    lines = [f"{'#' * level} {settings.get('title') or 'Comparison on ' + task.name}", ""]
    if settings.get("claim"):
        lines += [f"Claim: {settings['claim']}" + (f" ({settings['source']})" if settings.get("source") else ""), ""]
    lines += [f"Task `{task.name}`: {task.description}.", "",
              f"{settings['steps']} steps, seeds {settings['seeds']}, backend {settings['backend']}, "
              f"device {settings['device']}. Command: `{settings['command']}`", "", table(task, summaries), ""]
    if verdicts:
        lines += [f"- **{verdict}**: {text}: {detail}" for text, verdict, detail in verdicts] + [""]
    if grids:
        lines += ["Learning rates chosen on the validation loss (seed 10000, not a reported seed):", ""]
        for variant, grid in grids.items():
            shown = ", ".join(f"{lr:g}: {v:.4g}" for lr, v in grid.scores.items())
            lines.append(f"- `{variant}`: {shown}; trained as {grid.how()}")
        lines.append("")
    lines += [f"![{os.path.basename(f)}]({figure_prefix}{os.path.basename(f)})" for f in figures]
    return "\n".join(lines) + "\n"
