"""Summaries of a comparison's runs: the table, the per-step and per-evaluation CSVs, the
warnings, and the markdown report.

The held-out figure follows AlgoPerf's protocol: each run's test metric is read at the
evaluation with the lowest validation loss (the step a practitioner would have kept without
looking at the test set), beside the test metric at the last evaluation. Taking the best test
value over the evaluations instead would select on the test set.

Times: ms/step is each run's mean over its timed steps (a mean, so that a probe every k steps
counts), the median over seeds; the time to target is the steps to target times the run's
mean CPU ms/step, the same clock and the same mean as the table's CPU column, so the two agree
by construction however busy the machine was.
"""
from __future__ import annotations

import csv
import math
import os
import statistics
from dataclasses import dataclass

from ..tasks import Task
from . import spikes as loss_spikes
from .runner import CLOCKS, Run

STEP_COLUMNS = ["variant", "seed", "lr", "control", "step", "loss", "seconds", "cpu_seconds", *CLOCKS]
TIMING_COLUMNS = ("seconds", "cpu_seconds", *CLOCKS)  # what differs from one execution to the next
BUSY = "†"  # marks wall times measured while the load average exceeded the cores


@dataclass
class Summary:
    """One variant at one learning rate over its seeds."""

    variant: str
    lr: float | None
    runs: list
    final_loss: tuple  # (mean, std) of the last training loss
    metric: tuple  # (mean, std) of the test metric at each run's best validation loss
    final_metric: tuple  # (mean, std) of the test metric at each run's last evaluation
    reached: int  # runs that reached the target loss
    steps_to_target: float | None  # median over the runs that reached it
    seconds_to_target: float | None  # median over them of steps x the run's mean CPU ms/step
    ms: dict  # clock (runner.CLOCKS) -> median over runs of the run's mean ms per timed step
    per_step: dict  # closure calls, gradients, HVPs per step (mean over runs)
    sharpness: tuple | None
    diverged: int
    busy: int  # runs during which the load average exceeded the cores
    max_load: float  # the highest load average read during any of the runs
    # loss spikes above the threshold shared by the summaries compared (see with_spikes):
    # (mean, std) over runs of their count, largest rise and summed rise
    spike_count: tuple | None = None
    spike_largest: tuple | None = None
    spike_total: tuple | None = None
    spike_threshold: float | None = None

    @property
    def ms_per_step(self) -> float:
        """CPU ms per step: the figure the time to target is made of."""
        return self.ms["step_cpu_ms"]


def _mean_std(values) -> tuple:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return (math.nan, math.nan)
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def at_best_validation(run: Run, metric: str) -> float:
    """The test ``metric`` at the run's evaluation with the lowest validation loss (the
    earliest, on a tie); NaN where the run has none."""
    scored = [(m["validation"], step, m[metric]) for step, m in run.evals
              if metric in m and math.isfinite(m.get("validation", math.nan))]
    return min(scored)[2] if scored else math.nan


def summarise(task: Task, variant: str, lr, runs: list[Run]) -> Summary:
    kept = [r for r in runs if r.diverged_at is None]
    hits = [(r.reached(task.target), r) for r in runs]
    hits = [(steps, r) for steps, r in hits if steps is not None]
    per_step = {k: statistics.fmean(r.per_step[k] for r in runs) for k in runs[0].per_step}
    sharp = [r.sharpness for r in runs if r.sharpness is not None]
    return Summary(variant, lr, runs, _mean_std(r.losses[-1] for r in kept),
                   _mean_std(at_best_validation(r, task.metric) for r in kept),
                   _mean_std(r.evals[-1][1].get(task.metric) if r.evals else None for r in kept), len(hits),
                   statistics.median(s for s, _ in hits) if hits else None,
                   statistics.median(s * r.mean_ms("step_cpu_ms") / 1e3 for s, r in hits) if hits else None,
                   {clock: statistics.median(r.mean_ms(clock) for r in runs) for clock in CLOCKS}, per_step,
                   _mean_std(sharp) if sharp else None, sum(r.diverged_at is not None for r in runs),
                   sum(r.busy for r in runs), max(r.max_load for r in runs))


def with_spikes(summaries: list[Summary]) -> list[Summary]:
    """Every summary given its runs' loss spikes, against one threshold pooled over all their
    runs (:mod:`.spikes`): a variant is never judged by a bar of its own. Diverged runs are
    left out, as from the loss columns."""
    curves = {(i, j): run.losses for i, s in enumerate(summaries) for j, run in enumerate(s.runs)
              if run.diverged_at is None and len(run.losses) > 1}
    if not curves:
        return summaries
    threshold = loss_spikes.shared_threshold(list(curves.values()))
    for i, s in enumerate(summaries):
        found = [loss_spikes.spikes(losses, threshold) for (k, _), losses in curves.items() if k == i]
        s.spike_count = _mean_std(f.count for f in found)
        s.spike_largest = _mean_std(f.largest for f in found)
        s.spike_total = _mean_std(f.total for f in found)
        s.spike_threshold = threshold
    return summaries


def _pm(pair, digits=4) -> str:
    mean, std = pair
    if math.isnan(mean):
        return "diverged"
    return f"{mean:.{digits}g} ± {std:.2g}"


def _lr_cell(s: Summary, grids: dict) -> str:
    text = "default" if s.lr is None else f"{s.lr:g}"
    grid = grids.get(s.variant)
    return text + (" (grid edge)" if grid is not None and grid.lr == s.lr and grid.edge else "")


def table(task: Task, summaries: list[Summary], grids: dict | None = None) -> str:
    """The comparison as a markdown table; wall times measured on a busy machine carry
    :data:`BUSY`."""
    grids = grids or {}
    sharp = any(s.sharpness is not None for s in summaries)
    header = ["variant", "lr", "final train loss", f"{task.metric} at best validation loss", f"final {task.metric}",
              f"steps to loss {task.target:g}", "time to target (s) = steps × CPU ms/step",
              "ms/step, CPU / wall", "optimizer ms/step, CPU / wall", "grads/step", "HVPs/step"]
    header += ["sharpness (top Hessian eigenvalue)"] if sharp else []
    spiked = next((s.spike_threshold for s in summaries if s.spike_threshold is not None), None)
    header += [f"loss spikes, rises > {spiked:.3g}: count; largest"] if spiked is not None else []
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
    for s in summaries:
        n = len(s.runs)
        mark = BUSY if s.busy else ""
        steps = f"{s.steps_to_target:g} ({s.reached}/{n})" if s.reached else f"not reached (0/{n})"
        seconds = f"{s.seconds_to_target:.3g}" if s.seconds_to_target is not None else "-"
        row = [f"`{s.variant}`", _lr_cell(s, grids),
               _pm(s.final_loss) + (f" ({s.diverged} diverged)" if s.diverged else ""), _pm(s.metric),
               _pm(s.final_metric), steps, seconds,
               f"{s.ms['step_cpu_ms']:.3g} / {s.ms['step_ms']:.3g}{mark}",
               f"{s.ms['optimizer_cpu_ms']:.3g} / {s.ms['optimizer_ms']:.3g}{mark}",
               f"{s.per_step['gradients']:.3g}", f"{s.per_step['hvps']:.3g}"]
        if sharp:
            row.append(_pm(s.sharpness) if s.sharpness else "-")
        if spiked is not None:
            row.append(f"{_pm(s.spike_count, 3)}; {_pm(s.spike_largest, 3)}" if s.spike_count else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def warnings_for(summaries: list[Summary], grids: dict) -> list[str]:
    """What a reader must know before trusting the figures: runs on a busy machine, and
    learning rates picked on the edge of their grid."""
    out = []
    runs = [r for s in summaries for r in s.runs]
    busy = [r for r in runs if r.busy]
    if busy:
        out.append(f"the 1-minute load average exceeded the {busy[0].cores} cores during {len(busy)} of the "
                   f"{len(runs)} runs (up to {max(r.max_load for r in busy):.1f}): their wall times (marked {BUSY}) "
                   "include time spent waiting for a core; CPU times hold up better")
    for variant, grid in grids.items():
        if grid.edge:
            values = sorted(grid.scores)
            out.append(f"`{variant}` picked lr {grid.lr:g}, the {grid.edge} value of its grid "
                       f"({', '.join(f'{v:g}' for v in values)}): its best rate may lie "
                       f"{'below' if grid.edge == 'lowest' else 'above'} the grid; extend the grid")
    return out


def write_csv(path: str, summaries: list[Summary], controls: list[Summary] = ()) -> None:
    """Every step of every run: variant, seed, lr, whether it is a shared-lr control run,
    step, the raw training loss, cumulative wall and CPU seconds, and the step's times on
    every clock (ms)."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(STEP_COLUMNS)
        for s, control in [(s, False) for s in summaries] + [(s, True) for s in controls]:
            for r in s.runs:
                columns = [r.cumulative_seconds("step_ms"), r.cumulative_seconds("step_cpu_ms"),
                           *(getattr(r, clock) for clock in CLOCKS)]
                for i, loss in enumerate(r.losses):
                    writer.writerow([r.variant, r.seed, r.lr, int(control), i + 1, repr(loss),
                                     *(f"{c[i]:.6f}" for c in columns)])


def write_evals_csv(path: str, summaries: list[Summary], controls: list[Summary] = ()) -> None:
    """Every evaluation of every run: the validation loss and each held-out metric."""
    names = sorted({k for s in [*summaries, *controls] for r in s.runs for _, m in r.evals for k in m})
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["variant", "seed", "lr", "control", "step", *names])
        for s, control in [(s, False) for s in summaries] + [(s, True) for s in controls]:
            for r in s.runs:
                for step, m in r.evals:
                    writer.writerow([r.variant, r.seed, r.lr, int(control), step, *(repr(m.get(k)) for k in names)])


def markdown(task: Task, summaries: list[Summary], settings: dict, figures: list[str], grids: dict,
             verdicts: list, level: int = 1, figure_prefix: str = "", controls: list[Summary] = (),
             warnings: list[str] = ()) -> str:
    """The report: title, claim, settings and command, warnings, table, verdicts, the
    shared-lr control runs, lr grids, figures."""
    lines = [f"{'#' * level} {settings.get('title') or 'Comparison on ' + task.name}", ""]
    if settings.get("claim"):
        lines += [f"Claim: {settings['claim']}" + (f" ({settings['source']})" if settings.get("source") else ""), ""]
    lines += [f"Task `{task.name}`: {task.description}.", "",
              f"{settings['steps']} steps, seeds {settings['seeds']}, backend {settings['backend']}, "
              f"device {settings['device']}"
              + (f", runs {settings['executed']}, {settings['threads']} torch thread(s) each"
                 if settings.get("executed") else "")
              + f". Command: `{settings['command']}`", ""]
    lines += [line for w in warnings for line in (f"> **Warning**: {w}.", "")]
    lines += [table(task, summaries, grids), "",
              f"{task.metric} at best validation loss: the test value at each run's evaluation with the lowest "
              "validation loss (AlgoPerf's protocol); ms/step: the mean over a run's timed steps (its first step is "
              "not timed, and each process trains a variant a few untimed steps before it times it), the median over "
              "seeds; optimizer ms/step: the step less "
              "the time in the closure (the forward and backward passes it runs; a probe's own autograd work, "
              "such as a Hessian-vector product, counts as the optimizer's)."
              + (f" {BUSY}: measured while the load average exceeded the cores." if any(s.busy for s in summaries)
                 else ""), ""]
    if verdicts:
        lines += [f"- **{v.verdict}** ({v.at}): {v.expectation}: {v.detail}" for v in verdicts] + [""]
        lines += [f"- note: {note}" for note in lr_dependence(verdicts)]
        lines += [""] if lr_dependence(verdicts) else []
    if controls:
        lines += ["The same runs at a shared learning rate (each variant at the other's tuned rate), to judge "
                  "the expectations on sharpness and held-out metrics apart from the learning rate:", "",
                  table(task, controls), ""]
    if grids:
        lines += ["Learning rates chosen on the validation loss (seed 10000, not a reported seed):", ""]
        for variant, grid in grids.items():
            shown = ", ".join(f"{lr:g}: {v:.4g}" for lr, v in grid.scores.items())
            edge = f" (the {grid.edge} rate of the grid)" if grid.edge else ""
            lines.append(f"- `{variant}`: {shown}; picked {grid.lr:g}{edge}; trained as {grid.how()}")
        lines.append("")
    lines += [f"![{os.path.basename(f)}]({figure_prefix}{os.path.basename(f)})" for f in figures]
    return "\n".join(lines) + "\n"


def lr_dependence(verdicts: list) -> list[str]:
    """A note for each expectation whose verdict changes with the learning rates it is judged
    at: the difference may come from the rates, not from the methods."""
    notes = []
    for expectation in dict.fromkeys(v.expectation for v in verdicts):
        judged = [v for v in verdicts if v.expectation == expectation]
        if len({v.verdict for v in judged}) > 1:
            notes.append(f"'{expectation}' is " + "; ".join(f"{v.verdict} {v.at}" for v in judged)
                         + ": the learning rate, not the method, may explain the difference")
    return notes
