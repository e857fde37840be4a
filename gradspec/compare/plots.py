"""Figures of a comparison (matplotlib, written to files, no display needed): training loss
against step and against process CPU time, the mean over seeds with a min-max band, one colour
per variant; for 2-D functions, each variant's trajectory over the function's contours.

The time axis is CPU time, the clock that holds up on a busy machine (see :mod:`.runner`); a
variant with runs measured while the load average exceeded the cores is drawn dashed and
marked in the legend. Smoothing (a trailing moving average) is for the eye only: the CSV keeps
every raw loss.
"""
from __future__ import annotations

import math

import torch

from ..tasks import Task
from .report import BUSY


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def moving_average(values: torch.Tensor, window: int) -> torch.Tensor:
    """Trailing mean over the last ``window`` values along the last dimension (fewer at the
    start); ``window`` 1 returns the values."""
    if window <= 1:
        return values
    sums = torch.cumsum(values, -1)
    shifted = torch.nn.functional.pad(sums, (window, 0))[..., :values.shape[-1]]
    counts = torch.clamp(torch.arange(1, values.shape[-1] + 1, dtype=values.dtype), max=window)
    return (sums - shifted) / counts


def _label(s) -> str:
    return s.variant + ("" if s.lr is None else f" (lr {s.lr:g})")


def loss_curves(path: str, task: Task, summaries, against: str, smooth: int = 1) -> str:
    """Loss against "step" or "time" (CPU seconds); returns the path written."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.2))
    positive = all(loss > 0 for s in summaries for r in s.runs for loss in r.losses if math.isfinite(loss))
    for colour, s in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4, summaries):
        runs = [r for r in s.runs if r.losses]
        length = min(len(r.losses) for r in runs)
        losses = moving_average(torch.tensor([r.losses[:length] for r in runs], dtype=torch.float64), smooth)
        mean, low, high = losses.mean(0), losses.min(0).values, losses.max(0).values
        if against == "time":
            x = torch.tensor([r.cumulative_seconds("step_cpu_ms")[:length] for r in runs], dtype=torch.float64).mean(0)
        else:
            x = torch.arange(1, length + 1)
        busy = against == "time" and s.busy
        label = _label(s) + (f" {BUSY} busy" if busy else "")
        axes.plot(x.tolist(), mean.tolist(), color=colour, label=label, linewidth=1.4,
                  linestyle="--" if busy else "-")
        if len(runs) > 1:
            axes.fill_between(x.tolist(), low.tolist(), high.tolist(), color=colour, alpha=0.2, linewidth=0)
    axes.axhline(task.target, color="grey", linestyle=":", linewidth=1, label=f"target {task.target:g}")
    if positive:
        axes.set_yscale("log")
    axes.set_xlabel("step" if against == "step" else "process CPU time (s; each run's first step untimed)")
    axes.set_ylabel("training loss" + (f" (moving average over {smooth} steps)" if smooth > 1 else ""))
    title = f"{task.name}: mean over seeds, band = min..max"
    if against == "time" and any(s.busy for s in summaries):
        title += f"\n{BUSY} busy: load average above the cores during some runs"
    return _finish(plt, figure, axes, title, path)


def trajectories(path: str, task: Task, summaries) -> str:
    """2-D functions: the path of each variant's first seed over the contours, from the start
    (a circle) to the end (a cross)."""
    plt = _pyplot()
    surface = task.surface
    x0, x1, y0, y1 = surface["bounds"]
    xs, ys = torch.meshgrid(torch.linspace(x0, x1, 300, dtype=torch.float64),
                            torch.linspace(y0, y1, 300, dtype=torch.float64), indexing="xy")
    values = surface["f"](xs, ys)
    figure, axes = plt.subplots(figsize=(6, 5))
    axes.contour(xs.numpy(), ys.numpy(), torch.log1p(values - values.min()).numpy(), levels=30, cmap="Greys",
                 linewidths=0.6)
    start = surface["start"]
    for colour, s in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4, summaries):
        path_xy = s.runs[0].trajectory
        if path_xy:
            axes.plot([start[0]] + [p[0] for p in path_xy], [start[1]] + [p[1] for p in path_xy],
                      color=colour, linewidth=1.2, marker=".", markersize=2, label=_label(s))
            axes.plot(*path_xy[-1], marker="x", color=colour, markersize=8)
    axes.plot(*start, marker="o", markersize=9, markerfacecolor="none", markeredgecolor="black", linestyle="none",
              label=f"start ({start[0]:g}, {start[1]:g})")
    for m in surface["minima"]:
        axes.plot(*m, marker="*", color="black", markersize=10)
    axes.set_xlim(x0, x1)
    axes.set_ylim(y0, y1)
    axes.set_xlabel("x")
    axes.set_ylabel("y")
    return _finish(plt, figure, axes, f"{task.name}: trajectories (o start, x end, * global minima)", path)


def _finish(plt, figure, axes, title: str, path: str) -> str:
    """Title, legend, layout; write the figure and free it."""
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
