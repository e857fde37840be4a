"""Figures of a comparison (matplotlib, written to files, no display needed): training loss
against step and against wall time, the mean over seeds with a min-max band, one colour per
variant; for 2-D functions, each variant's trajectory over the function's contours."""
from __future__ import annotations

import math

import torch

from ..tasks import Task


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def loss_curves(path: str, task: Task, summaries, against: str) -> str:
    """Loss against "step" or "time"; returns the path written."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.2))
    positive = all(loss > 0 for s in summaries for r in s.runs for loss in r.losses if math.isfinite(loss))
    for colour, s in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4, summaries):
        runs = [r for r in s.runs if r.losses]
        length = min(len(r.losses) for r in runs)
        losses = torch.tensor([r.losses[:length] for r in runs], dtype=torch.float64)
        mean, low, high = losses.mean(0), losses.min(0).values, losses.max(0).values
        if against == "time":
            x = torch.tensor([r.seconds[:length] for r in runs], dtype=torch.float64).mean(0)
        else:
            x = torch.arange(1, length + 1)
        label = s.variant + ("" if s.lr is None else f" (lr {s.lr:g})")
        axes.plot(x.tolist(), mean.tolist(), color=colour, label=label, linewidth=1.4)
        if len(runs) > 1:
            axes.fill_between(x.tolist(), low.tolist(), high.tolist(), color=colour, alpha=0.2, linewidth=0)
    axes.axhline(task.target, color="grey", linestyle=":", linewidth=1, label=f"target {task.target:g}")
    if positive:
        axes.set_yscale("log")
    axes.set_xlabel("step" if against == "step" else "wall time (s, first step excluded)")
    axes.set_ylabel("training loss")
    return _finish(plt, figure, axes, f"{task.name}: mean over seeds, band = min..max", path)


def trajectories(path: str, task: Task, summaries) -> str:
    """2-D functions: the path of each variant's first seed over the contours."""
    plt = _pyplot()
    surface = task.surface
    x0, x1, y0, y1 = surface["bounds"]
    xs, ys = torch.meshgrid(torch.linspace(x0, x1, 300, dtype=torch.float64),
                            torch.linspace(y0, y1, 300, dtype=torch.float64), indexing="xy")
    values = surface["f"](xs, ys)
    figure, axes = plt.subplots(figsize=(6, 5))
    axes.contour(xs.numpy(), ys.numpy(), torch.log1p(values - values.min()).numpy(), levels=30, cmap="Greys",
                 linewidths=0.6)
    for colour, s in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4, summaries):
        path_xy = s.runs[0].trajectory
        if path_xy:
            axes.plot([surface["start"][0]] + [p[0] for p in path_xy], [surface["start"][1]] + [p[1] for p in path_xy],
                      color=colour, linewidth=1.2, marker=".", markersize=2, label=s.variant)
    for m in surface["minima"]:
        axes.plot(*m, marker="*", color="black", markersize=10)
    axes.set_xlim(x0, x1)
    axes.set_ylim(y0, y1)
    return _finish(plt, figure, axes, f"{task.name}: trajectories (stars: global minima)", path)


def _finish(plt, figure, axes, title: str, path: str) -> str:
    """Title, legend, layout; write the figure and free it."""
    axes.set_title(title)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
