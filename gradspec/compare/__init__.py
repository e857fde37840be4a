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
    on = "final_loss"                # final_loss | metric | steps_to_target | sharpness | spikes

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

Runs are independent, so a sweep's runs (each variant's grid, then variants x seeds, then the
control runs below) can train at the same time: ``workers=N`` (``--workers N``, default 1)
in local worker processes, ``ray=ADDRESS`` (``--ray ADDRESS``, the ``ray`` extra) on a Ray
cluster; each run trains with ``threads`` torch threads (default 1) wherever it runs, and the
results are the same as one after another (see :mod:`.sweep`).

An expectation on sharpness or on the held-out metric is judged at each variant's own learning
rate and, where those differ, again at each of the two rates shared (both variants at the
same rate: the control runs): sharpness falls as the rate rises, so a method tuned to a larger
rate can look flatter for that reason alone. Each verdict says at which rates it was judged.
"""
from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field
from typing import NamedTuple

from ..tasks import Task
from . import plots, report, sweep

ON = ("final_loss", "metric", "steps_to_target", "sharpness", "spikes")
LR_SENSITIVE = ("metric", "sharpness")  # expectations judged again at a shared learning rate


class Verdict(NamedTuple):
    expectation: str  # "a better than b on metric"
    at: str  # the learning rates it was judged at
    verdict: str  # reproduced | not reproduced | inconclusive
    detail: str


@dataclass
class Comparison:
    task: Task
    summaries: list
    grids: dict = field(default_factory=dict)  # variant -> LrGrid
    settings: dict = field(default_factory=dict)
    verdicts: list = field(default_factory=list)  # Verdict
    controls: list = field(default_factory=list)  # Summary of a variant at another's learning rate
    warnings: list = field(default_factory=list)  # str: busy machine, lr on the edge of its grid
    files: list = field(default_factory=list)  # what write() wrote

    def table(self) -> str:
        return report.table(self.task, self.summaries, self.grids)


def compare(variants: list[str], task: str | Task, steps: int | None = None, seeds: int = 3,
            lr_grid: list | None = None, lr: float | None = None, backend: str = "eager", device: str = "cpu",
            sharpness: bool = False, out: str | None = None, progress: bool = True, settings: dict | None = None,
            expect: list | None = None, vmap: bool = True, *, workers: int = 1, ray: str | None = None,
            threads: int = 1, smooth: int = 1) -> Comparison:
    """Run every variant on ``task`` for ``seeds`` seeds (0, 1, ...) and summarise. With
    ``lr_grid``, each variant first gets its best learning rate on the validation loss; with
    ``lr``, every variant uses it; otherwise each spec's own default. With ``out``, writes
    runs.csv, evals.csv, loss_vs_step.png, loss_vs_time.png (and trajectories.png for 2-D
    functions) and report.md there; ``smooth`` > 1 plots the training loss as a moving average
    over that many steps (the CSV keeps every raw value). ``vmap=False`` trains a grid one rate
    at a time even where it could be one vmapped run (see :func:`pick_lr`; the two agree to
    rounding). ``workers``, ``ray`` and ``threads``: see the module's documentation."""
    ref = sweep.TaskRef.of(task)
    task = ref.resolve()
    steps = task.steps if steps is None else steps
    if steps < 1 or seeds < 1 or threads < 1 or smooth < 1:
        raise ValueError(f"a comparison needs at least one step, one seed, one thread and a smoothing window of "
                         f"at least 1 (got steps={steps}, seeds={seeds}, threads={threads}, smooth={smooth})")
    engine, bar = sweep.engine(workers, ray, device), _progress(progress)
    grids = {}
    if lr_grid:
        jobs = [sweep.GridJob(ref, v, tuple(lr_grid), steps, backend, device, vmap, threads) for v in variants]
        grids = dict(zip(variants, engine.map(jobs, bar)))
    chosen = {v: grids[v].lr if lr_grid else lr for v in variants}
    controls = _control_rates(expect or [], chosen)
    job = lambda v, seed, at, control=False: sweep.RunJob(ref, v, seed, steps, at, backend, device,  # noqa: E731
                                                           sharpness, threads, control)
    jobs = [job(v, seed, chosen[v]) for seed in range(seeds) for v in sweep.rotated(list(variants), seed)]
    jobs += [job(v, seed, at, True) for seed in range(seeds) for v, at in sweep.rotated(controls, seed)]
    runs = engine.map(jobs, bar)
    summaries = report.with_spikes(
        [report.summarise(task, v, chosen[v], _runs_of(jobs, runs, v, chosen[v], False)) for v in variants])
    control_summaries = report.with_spikes(
        [report.summarise(task, v, at, _runs_of(jobs, runs, v, at, True)) for v, at in controls])
    settings = {"steps": steps, "seeds": seeds, "backend": backend, "device": device, "threads": threads,
                "executed": engine.how, "smooth": smooth, **(settings or {})}
    settings.setdefault("command", _command(variants, task.name, steps, seeds, lr_grid, lr, sharpness, vmap))
    by_variant = {s.variant: s for s in summaries}
    by_rate = {(s.variant, s.lr): s for s in summaries + control_summaries}
    verdicts = [v for e in expect or [] for v in judge_at_rates(e, by_variant, by_rate, task)]
    comparison = Comparison(task, summaries, grids, settings, verdicts, control_summaries,
                            report.warnings_for(summaries + control_summaries, grids))
    if out:
        write(comparison, out)
    return comparison


def _runs_of(jobs, runs, variant, lr, control) -> list:
    """The runs of one (variant, rate), in seed order."""
    picked = [(j.seed, r) for j, r in zip(jobs, runs) if (j.variant, j.lr, j.control) == (variant, lr, control)]
    return [r for _, r in sorted(picked, key=lambda pair: pair[0])]


def _control_rates(expect: list, chosen: dict) -> list:
    """(variant, lr) pairs to train besides the main runs: for every expectation on sharpness
    or the held-out metric whose two variants were trained at different rates, each variant
    at the other's rate. A variant at its spec's default rate counts at that default."""
    pairs = []
    for e in expect:
        if e["on"] not in LR_SENSITIVE:
            continue
        a, b = e["better"], e["than"]
        rate_a, rate_b = _effective_lr(a, chosen[a]), _effective_lr(b, chosen[b])
        if None not in (rate_a, rate_b) and rate_a != rate_b:
            pairs += [(a, rate_b), (b, rate_a)]
    return list(dict.fromkeys(pairs))


def _effective_lr(variant: str, lr: float | None) -> float | None:
    """The rate a variant trained at: the given one, else its spec's default (None for a spec
    without an ``lr``, which then has no shared rate to be judged at)."""
    if lr is not None:
        return lr
    from ..dsl.resolve import load
    return load(variant).hyper_defaults.get("lr")


def judge_at_rates(expectation: dict, by_variant: dict, by_rate: dict, task: Task) -> list[Verdict]:
    """The expectation judged on the main runs (each variant at its tuned, given or default
    rate) and, for sharpness and the held-out metric where those rates differ, at each of the
    two rates shared by both variants."""
    a, b = by_variant[expectation["better"]], by_variant[expectation["than"]]
    verdicts = [judge(expectation, {a.variant: a, b.variant: b}, task, _rates_text(a, b))]
    rate_a, rate_b = _effective_lr(a.variant, a.lr), _effective_lr(b.variant, b.lr)
    if expectation["on"] in LR_SENSITIVE and None not in (rate_a, rate_b) and rate_a != rate_b:
        for rate in sorted({rate_a, rate_b}):
            pair = {v: by_rate.get((v, rate)) or by_variant[v] for v in (a.variant, b.variant)}
            verdicts.append(judge(expectation, pair, task, f"at shared lr {rate:g}"))
    return verdicts


def _rates_text(a, b) -> str:
    if a.lr is None and b.lr is None:
        return "at each spec's default lr"
    if a.lr == b.lr:
        return f"at shared lr {a.lr:g}"
    shown = lambda s: "default" if s.lr is None else f"{s.lr:g}"  # noqa: E731
    return f"at their own lr: {shown(a)} vs {shown(b)}"


def write(comparison: Comparison, out: str) -> list[str]:
    """Write the comparison's CSVs, figures and report.md under ``out``; returns the figures'
    paths, and keeps every file's name in ``comparison.files``."""
    os.makedirs(out, exist_ok=True)
    task, summaries, controls = comparison.task, comparison.summaries, comparison.controls
    report.write_csv(os.path.join(out, "runs.csv"), summaries, controls)
    report.write_evals_csv(os.path.join(out, "evals.csv"), summaries, controls)
    smooth = comparison.settings.get("smooth", 1)
    figures = [plots.loss_curves(os.path.join(out, "loss_vs_step.png"), task, summaries, "step", smooth),
               plots.loss_curves(os.path.join(out, "loss_vs_time.png"), task, summaries, "time", smooth)]
    if task.surface:
        figures.append(plots.trajectories(os.path.join(out, "trajectories.png"), task, summaries))
    with open(os.path.join(out, "report.md"), "w") as handle:
        handle.write(report.markdown(task, summaries, comparison.settings, figures, comparison.grids,
                                     comparison.verdicts, controls=controls, warnings=comparison.warnings))
    comparison.files = ["runs.csv", "evals.csv", *(os.path.basename(f) for f in figures), "report.md"]
    return figures


def write_results(paths: list[str], results: str, progress: bool = True, **execution) -> None:
    """docs/results.md from comparison files: each is run, its figures written next to the
    results file (results/<file stem>/), and its section appended with the verdicts.
    ``execution``: ``workers``, ``ray``, ``threads`` (see :func:`compare`)."""
    folder = os.path.join(os.path.dirname(results) or ".", "results")
    sections = ["# Reproducing the papers' claims", "",
                "Generated by `gradspec compare --results " + results + " " + " ".join(paths) + "`: every "
                "comparison below is one file in specs/compare/, every figure measured by that run. A claim "
                "that does not reproduce is reported as such. An expectation on sharpness or on the held-out "
                "metric is judged at each variant's own learning rate and, where those differ, at each rate "
                "shared by both.", ""]
    verdicts = ["| comparison | expectation | learning rates | verdict | measured |", "| --- | --- | --- | --- | --- |"]
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        comparison = run_file(path, None, progress, **execution)
        figures = write(comparison, os.path.join(folder, stem))
        sections.append(report.markdown(comparison.task, comparison.summaries, comparison.settings, figures,
                                        comparison.grids, comparison.verdicts, level=2,
                                        figure_prefix=f"results/{stem}/", controls=comparison.controls,
                                        warnings=comparison.warnings))
        verdicts += [f"| {stem} | {v.expectation} | {v.at} | **{v.verdict}** | {v.detail} |"
                     for v in comparison.verdicts]
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
             seeds: int | None = None, vmap: bool = True, **execution) -> Comparison:
    """A comparison file run; ``execution``: ``workers``, ``ray``, ``threads``, ``smooth``."""
    data = load_file(path)
    settings = {"title": data.get("title"), "claim": data.get("claim"), "source": data.get("source"),
                "command": f"gradspec compare {path}"}
    return compare(data["variants"], data["task"], steps if steps is not None else data.get("steps"),
                   seeds if seeds is not None else data.get("seeds", 3),
                   data.get("lr_grid"), data.get("lr"), data.get("backend", "eager"), data.get("device", "cpu"),
                   data.get("sharpness", False), out, progress, settings, data.get("expect", []), vmap, **execution)


def judge(expectation: dict, by_variant: dict, task: Task, at: str = "") -> Verdict:
    """"reproduced" when ``better`` beats ``than`` by more than the larger of their standard
    deviations, "not reproduced" when it loses by that much, "inconclusive" in between (or
    when neither reached the target). ``at`` says at which learning rates."""
    a, b, on = by_variant[expectation["better"]], by_variant[expectation["than"]], expectation["on"]
    text = f"{expectation['better']} better than {expectation['than']} on {on.replace('_', ' ')}"
    lower_better = {"final_loss": True, "steps_to_target": True, "sharpness": True, "spikes": True,
                    "metric": not task.higher_is_better}[on]
    if on == "steps_to_target":
        sa, sb = a.steps_to_target, b.steps_to_target
        if sa is None and sb is None:
            return Verdict(text, at, "inconclusive", "neither reached the target")
        if sa is None or sb is None:
            won = sa is not None
            return Verdict(text, at, "reproduced" if won else "not reproduced",
                           f"{'only ' + a.variant if won else 'only ' + b.variant} reached the target "
                           f"({a.reached} vs {b.reached} runs)")
        pair_a, pair_b = (sa, 0.0), (sb, 0.0)
    else:
        pair_a, pair_b = (_judged_value(x, on) for x in (a, b))
    (ma, sa_), (mb, sb_) = pair_a, pair_b
    if math.isnan(ma) or math.isnan(mb):
        return Verdict(text, at, "inconclusive", "a variant diverged or was not measured")
    gain = (mb - ma) if lower_better else (ma - mb)
    noise = max(sa_, sb_, 1e-9 * max(abs(ma), abs(mb)))  # equal up to rounding is not a win
    detail = f"{ma:.4g} vs {mb:.4g} (std {sa_:.2g} / {sb_:.2g})"
    if gain > noise:
        return Verdict(text, at, "reproduced", detail)
    if gain < -noise:
        return Verdict(text, at, "not reproduced", detail)
    return Verdict(text, at, "inconclusive", detail + ", within noise")


def _judged_value(summary, on: str) -> tuple:
    """(mean, std) of what an expectation ``on`` compares; a loss-spike expectation compares
    the summed rise above the shared threshold (count and size in one figure)."""
    missing = (math.nan, math.nan)
    return {"final_loss": summary.final_loss, "metric": summary.metric, "sharpness": summary.sharpness or missing,
            "spikes": summary.spike_total or missing}[on]


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
