"""``gradspec compare``: variants x seeds on a built-in task, with a table, CSV, plots and a
markdown report; comparison files (TOML in ``specs/compare/``) make each one reproducible.

A comparison file::

    title = "DEO against its base"
    claim = "DEO improves on its base optimizer (Hu et al. 2025)"
    task = "saddle"
    variants = ["adam", "deo(adam)"]
    steps = 400
    seeds = 3
    lr_grid = [1e-3, 1e-2]           # optional: each variant's best on the validation loss
    sharpness = false                # optional: top Hessian eigenvalue at the end
    backend = "eager"                # optional
    [[expect]]                       # optional: what the claim predicts, judged on the runs
    better = "deo(adam)"
    than = "adam"
    on = "final_loss"                # final_loss | metric | steps_to_target | sharpness

A learning-rate grid trains as one run where it can: every rate's copy of the initial
parameters is stacked, and one ``torch.func.vmap``-ed loop of ``torch.func.grad`` and the
spec's pure update (:func:`gradspec.transform`) trains them together, on the same batches.
That needs a task whose problem gives its loss as a pure function of the parameters
(``Problem.pure``: every built-in task does) and a spec the functional update runs under
vmap (not one that probes the model: ``deo(...)``, ``sophia``, ``sophia_g``, the bulk and
dominant-subspace methods). Otherwise the grid trains one rate after another, as
``compare(..., vmap=False)`` (``gradspec compare --no-vmap``) forces; the report says which
way each grid ran and why. Both ways score each rate's final parameters with the task's own
validation loss and agree to rounding, so they pick the same rate.
"""
from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field

from ..tasks import Task, get
from . import plots, report
from .runner import pick_lr, train

ON = ("final_loss", "metric", "steps_to_target", "sharpness")


@dataclass
class Comparison:
    task: Task
    summaries: list
    grids: dict = field(default_factory=dict)  # variant -> LrGrid
    settings: dict = field(default_factory=dict)
    verdicts: list = field(default_factory=list)  # (expectation text, verdict, detail)

    def table(self) -> str:
        return report.table(self.task, self.summaries)


def compare(variants: list[str], task: str | Task, steps: int | None = None, seeds: int = 3,
            lr_grid: list | None = None, lr: float | None = None, backend: str = "eager", device: str = "cpu",
            sharpness: bool = False, out: str | None = None, progress: bool = True, settings: dict | None = None,
            expect: list | None = None, vmap: bool = True) -> Comparison:
    """Run every variant on ``task`` for ``seeds`` seeds (0, 1, ...) and summarise. With
    ``lr_grid``, each variant first gets its best learning rate on the validation loss; with
    ``lr``, every variant uses it; otherwise each spec's own default. With ``out``, writes
    runs.csv, loss_vs_step.png, loss_vs_time.png (and trajectories.png for 2-D functions)
    and report.md there. ``vmap=False`` trains a grid one rate at a time even where it could
    be one vmapped run (see :func:`pick_lr`; the two agree to rounding)."""
    task = get(task) if isinstance(task, str) else task
    steps = task.steps if steps is None else steps
    if steps < 1 or seeds < 1:
        raise ValueError(f"a comparison needs at least one step and one seed (got steps={steps}, seeds={seeds})")
    bar = _progress(progress)
    summaries, grids = [], {}
    for variant in variants:
        chosen = lr
        if lr_grid:
            with bar(total=steps * len(lr_grid), desc=f"{variant}: lr grid") as counter:
                grids[variant] = pick_lr(task, variant, lr_grid, steps, backend, device, progress=counter, vmap=vmap)
            chosen = grids[variant].lr
        runs = []
        for seed in range(seeds):
            with bar(total=steps, desc=f"{variant} seed {seed}") as counter:
                runs.append(train(task, variant, seed, steps, chosen, backend, device, sharpness, counter))
        summaries.append(report.summarise(task, variant, chosen, runs))
    settings = {"steps": steps, "seeds": seeds, "backend": backend, "device": device, **(settings or {})}
    settings.setdefault("command", _command(variants, task.name, steps, seeds, lr_grid, lr, sharpness, vmap))
    comparison = Comparison(task, summaries, grids, settings, [judge(e, comparison_summaries(summaries), task)
                                                               for e in expect or []])
    if out:
        write(comparison, out)
    return comparison


def comparison_summaries(summaries):
    return {s.variant: s for s in summaries}


def write(comparison: Comparison, out: str) -> list[str]:
    os.makedirs(out, exist_ok=True)
    task, summaries = comparison.task, comparison.summaries
    report.write_csv(os.path.join(out, "runs.csv"), summaries)
    figures = [plots.loss_curves(os.path.join(out, "loss_vs_step.png"), task, summaries, "step"),
               plots.loss_curves(os.path.join(out, "loss_vs_time.png"), task, summaries, "time")]
    if task.surface:
        figures.append(plots.trajectories(os.path.join(out, "trajectories.png"), task, summaries))
    with open(os.path.join(out, "report.md"), "w") as handle:
        handle.write(report.markdown(task, summaries, comparison.settings, figures, comparison.grids,
                                     comparison.verdicts))
    return figures


def write_results(paths: list[str], results: str, progress: bool = True) -> None:
    """docs/results.md from comparison files: each is run, its figures written next to the
    results file (results/<file stem>/), and its section appended with the verdicts."""
    folder = os.path.join(os.path.dirname(results) or ".", "results")
    sections = ["# Reproducing the papers' claims", "",
                "Generated by `gradspec compare --results " + results + " " + " ".join(paths) + "`: every "
                "comparison below is one file in specs/compare/, every figure measured by that run. A claim "
                "that does not reproduce is reported as such.", ""]
    verdicts = ["| comparison | expectation | verdict | measured |", "| --- | --- | --- | --- |"]
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        comparison = run_file(path, None, progress)
        figures = write(comparison, os.path.join(folder, stem))
        sections.append(report.markdown(comparison.task, comparison.summaries, comparison.settings, figures,
                                        comparison.grids, comparison.verdicts, level=2,
                                        figure_prefix=f"results/{stem}/"))
        verdicts += [f"| {stem} | {text} | **{verdict}** | {detail} |" for text, verdict, detail in comparison.verdicts]
    with open(results, "w") as handle:
        handle.write("\n".join(sections[:4] + verdicts + [""] + sections[4:]))


def load_file(path: str) -> dict:
    """A comparison file's settings, checked: unknown keys and missing ones are errors."""
    with open(path, "rb") as handle:
        data = tomllib.load(handle)
    allowed = {"title", "claim", "source", "task", "variants", "steps", "seeds", "lr_grid", "lr", "sharpness",
               "backend", "device", "expect"}
    unknown = set(data) - allowed
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)} (allowed: {', '.join(sorted(allowed))})")
    for key in ("task", "variants"):
        if key not in data:
            raise ValueError(f"{path}: '{key}' is required")
    for e in data.get("expect", []):
        if set(e) != {"better", "than", "on"} or e["on"] not in ON or not {e["better"], e["than"]} <= set(data["variants"]):
            raise ValueError(f"{path}: an [[expect]] names 'better' and 'than' (two of the variants) and 'on' "
                             f"(one of {', '.join(ON)}); got {e}")
    return data


def run_file(path: str, out: str | None = None, progress: bool = True, steps: int | None = None,
             seeds: int | None = None, vmap: bool = True) -> Comparison:
    data = load_file(path)
    settings = {"title": data.get("title"), "claim": data.get("claim"), "source": data.get("source"),
                "command": f"gradspec compare {path}"}
    return compare(data["variants"], data["task"], steps if steps is not None else data.get("steps"),
                   seeds if seeds is not None else data.get("seeds", 3),
                   data.get("lr_grid"), data.get("lr"), data.get("backend", "eager"), data.get("device", "cpu"),
                   data.get("sharpness", False), out, progress, settings, data.get("expect", []), vmap)


def judge(expectation: dict, by_variant: dict, task: Task) -> tuple[str, str, str]:
    """(expectation, verdict, detail): "reproduced" when ``better`` beats ``than`` by more than
    the larger of their standard deviations, "not reproduced" when it loses by that much,
    "inconclusive" in between (or when neither reached the target)."""
    a, b, on = by_variant[expectation["better"]], by_variant[expectation["than"]], expectation["on"]
    text = f"{expectation['better']} better than {expectation['than']} on {on.replace('_', ' ')}"
    lower_better = {"final_loss": True, "steps_to_target": True, "sharpness": True,
                    "metric": not task.higher_is_better}[on]
    if on == "steps_to_target":
        sa, sb = a.steps_to_target, b.steps_to_target
        if sa is None and sb is None:
            return text, "inconclusive", "neither reached the target"
        if sa is None or sb is None:
            won = sa is not None
            return text, "reproduced" if won else "not reproduced", \
                f"{'only ' + a.variant if won else 'only ' + b.variant} reached the target ({a.reached} vs {b.reached} runs)"
        pair_a, pair_b = (sa, 0.0), (sb, 0.0)
    else:
        pair_a = {"final_loss": a.final_loss, "metric": a.metric, "sharpness": a.sharpness or (math.nan, math.nan)}[on]
        pair_b = {"final_loss": b.final_loss, "metric": b.metric, "sharpness": b.sharpness or (math.nan, math.nan)}[on]
    (ma, sa_), (mb, sb_) = pair_a, pair_b
    if math.isnan(ma) or math.isnan(mb):
        return text, "inconclusive", "a variant diverged or was not measured"
    gain = (mb - ma) if lower_better else (ma - mb)
    noise = max(sa_, sb_, 1e-9 * max(abs(ma), abs(mb)))  # equal up to rounding is not a win
    detail = f"{ma:.4g} vs {mb:.4g} (std {sa_:.2g} / {sb_:.2g})"
    if gain > noise:
        return text, "reproduced", detail
    if gain < -noise:
        return text, "not reproduced", detail
    return text, "inconclusive", detail + ", within noise"


def _command(variants, task, steps, seeds, lr_grid, lr, sharpness, vmap=True) -> str:
    quoted = " ".join(f'"{v}"' if "(" in v else v for v in variants)
    parts = [f"gradspec compare {quoted} --task {task} --steps {steps} --seeds {seeds}"]
    if lr_grid:
        parts.append("--lr-grid " + " ".join(f"{x:g}" for x in lr_grid))
    if lr is not None:
        parts.append(f"--lr {lr:g}")
    if sharpness:
        parts.append("--sharpness")
    if lr_grid and not vmap:
        parts.append("--no-vmap")
    return " ".join(parts)


def _progress(enabled: bool):
    """tqdm progress bars, or a silent stand-in."""
    if enabled:
        from tqdm import tqdm

        def bar(**kwargs):
            return tqdm(leave=False, dynamic_ncols=True, **kwargs)
        return bar

    class _Silent:
        def __init__(self, **kwargs):
            pass

        def __enter__(self):
            return None

        def __exit__(self, *exc):
            return False
    return _Silent
