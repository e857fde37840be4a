"""What makes compare's figures sound: the held-out metric read at the best validation loss, time
on two clocks with the closure's share apart, marks for a busy machine and for a grid-edge
learning rate, time to target on the ms/step clock, timings independent of a variant's place,
smoothing for the eye only, readable trajectory plots, and verdicts judged at a shared rate."""
import csv
import time

import pytest
import torch

import gradspec.tasks as tasks
from gradspec.compare import Verdict, compare, plots, report, runner, sweep
from gradspec.compare.report import at_best_validation, lr_dependence, summarise, warnings_for
from gradspec.compare.runner import CLOCKS, LrGrid, Run

STEP = {"closure_calls": 1, "gradients": 1, "hvps": 0}


def _run(evals, max_load=0.0, seed=0):
    return Run("x", seed, 0.1, losses=[1.0, 0.5], **{c: [1.0, 1.0] for c in CLOCKS}, evals=evals, per_step=STEP,
               max_load=max_load, cores=2)


def test_the_held_out_metric_is_read_at_the_best_validation_loss_not_at_the_best_test_value():
    evals = [(50, {"accuracy": 0.99, "validation": 0.5}), (100, {"accuracy": 0.90, "validation": 0.2}),
             (150, {"accuracy": 0.80, "validation": 0.2}), (200, {"accuracy": 0.93, "validation": 0.3})]
    assert at_best_validation(_run(evals), "accuracy") == 0.90  # the earlier of two equal validation losses
    s = summarise(tasks.get("digits"), "x", 0.1, [_run(evals)])
    assert s.metric[0] == 0.90 and s.final_metric[0] == 0.93  # not 0.99, the best test value
    header = report.table(tasks.get("digits"), [s]).splitlines()[0]
    assert "accuracy at best validation loss" in header and "final accuracy" in header and "max" not in header


@pytest.mark.parametrize("name", ["digits", "modular_addition", "char_lm"])
def test_learning_tasks_validate_on_data_apart_from_the_test_split(name):
    problem = tasks.get(name).make(0, "cpu")
    assert problem.validate() != pytest.approx(problem.evaluate()["eval_loss"], rel=1e-6)


def _sleepy(seed, device):
    """A bowl whose loss takes 30 ms of sleep (wall time, no CPU) to compute."""
    x = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))

    def loss(step):
        time.sleep(0.03)
        return (x * x).sum(), None
    value = lambda: float((x * x).sum().detach())  # noqa: E731
    return tasks.Problem([x], loss, lambda: {"eval_loss": value()}, value, lambda: (x * x).sum())


def test_step_and_optimizer_times_on_the_wall_and_cpu_clocks():
    run = runner.train(tasks.Task("sleepy", _sleepy), "adam", 0, 4, 0.1)
    for i in range(1, 4):
        assert run.step_ms[i] >= 30  # the wall clock counts the closure's sleep
        assert run.step_cpu_ms[i] < 15  # the CPU clock does not: nothing ran
        assert run.optimizer_ms[i] < run.step_ms[i] - 25  # the optimizer's share leaves the closure out
        assert run.optimizer_cpu_ms[i] <= run.step_cpu_ms[i]
    assert run.mean_ms("step_ms") == pytest.approx(sum(run.step_ms[1:]) / 3)  # the first step is not timed


def _captured_legends(monkeypatch):
    """The titles, axis labels and legend entries of every figure written."""
    seen = []
    finish = plots._finish

    def capture(plt, figure, axes, title, path):
        seen.append({"title": title, "x": axes.get_xlabel(), "y": axes.get_ylabel(),
                     "legend": axes.get_legend_handles_labels()[1]})
        return finish(plt, figure, axes, title, path)
    monkeypatch.setattr(plots, "_finish", capture)
    return seen


def test_a_busy_machine_is_warned_about_and_marked_in_the_table_report_and_plot(tmp_path, monkeypatch):
    seen = _captured_legends(monkeypatch)
    monkeypatch.setattr(runner, "load_average", lambda: 99.0)
    busy = compare(["sgd"], "rosenbrock", steps=5, seeds=1, lr=1e-3, progress=False, out=str(tmp_path))
    assert busy.summaries[0].busy == 1 and "load average exceeded" in busy.warnings[0]
    assert f"{report.BUSY} |" in busy.table() and "**Warning**: the 1-minute load average" in (
        tmp_path / "report.md").read_text()
    assert any("busy" in label for label in seen[1]["legend"]) and "busy" in seen[1]["title"]  # loss_vs_time
    monkeypatch.setattr(runner, "load_average", lambda: 0.5)
    calm = compare(["sgd"], "rosenbrock", steps=5, seeds=1, lr=1e-3, progress=False)
    assert calm.summaries[0].busy == 0 and not calm.warnings and report.BUSY not in calm.table()


def test_a_learning_rate_on_the_edge_of_its_grid_is_warned_about():
    low, middle = LrGrid(1e-3, {1e-3: 0.1, 1e-2: 0.2, 1e-1: 0.3}), LrGrid(1e-2, {1e-3: 0.3, 1e-2: 0.2, 1e-1: 0.3})
    assert low.edge == "lowest" and middle.edge is None and LrGrid(1e-1, {1e-2: 1, 1e-1: 0}).edge == "highest"
    assert LrGrid(1e-3, {1e-3: 0.1}).edge is None  # a grid of one is no grid
    [warning] = warnings_for([], {"sophia": low, "adam": middle})
    assert warning.startswith("`sophia` picked lr 0.001, the lowest value of its grid") and "below" in warning
    s = summarise(tasks.get("digits"), "sophia", 1e-3, [_run([(1, {"accuracy": 1.0, "validation": 0.0})])])
    assert "| `sophia` | 0.001 (grid edge) |" in report.table(tasks.get("digits"), [s], {"sophia": low})


def test_time_to_target_is_steps_to_target_times_the_cpu_ms_per_step():
    task = tasks.get("himmelblau")
    result = compare(["sgd(momentum=0.5)"], task, steps=60, seeds=2, lr=0.01, progress=False)
    s = result.summaries[0]
    assert s.reached == 2
    per_run = sorted(r.reached(task.target) * r.mean_ms("step_cpu_ms") / 1e3 for r in s.runs)
    assert s.seconds_to_target == pytest.approx(sum(per_run) / 2)
    assert "time to target (s) = steps × CPU ms/step" in result.table()


def test_runs_go_seed_by_seed_in_rotated_order_each_variant_warmed_up_before_it_is_timed(monkeypatch):
    calls = []
    real = sweep.train

    def recording(task, variant, seed, steps, *args, **kwargs):
        calls.append((variant, seed, steps))
        return real(task, variant, seed, steps, *args, **kwargs)
    monkeypatch.setattr(sweep, "train", recording)
    monkeypatch.setattr(sweep, "_WARM", set())
    compare(["sgd", "adam", "lion"], "rosenbrock", steps=6, seeds=2, lr=1e-3, progress=False)
    warm = sweep.WARMUP_STEPS
    assert calls == [("sgd", 0, warm), ("sgd", 0, 6), ("adam", 0, warm), ("adam", 0, 6), ("lion", 0, warm),
                     ("lion", 0, 6), ("adam", 1, 6), ("lion", 1, 6), ("sgd", 1, 6)]


def test_smoothing_changes_the_plot_not_the_csv(tmp_path, monkeypatch):
    values = torch.tensor([[4.0, 2.0, 0.0, 2.0, 4.0]], dtype=torch.float64)
    assert plots.moving_average(values, 2).tolist() == [[4.0, 3.0, 1.0, 1.0, 3.0]]
    assert plots.moving_average(values, 1) is values
    seen = _captured_legends(monkeypatch)
    result = compare(["sgd"], "beale", steps=12, seeds=1, lr=1e-3, progress=False, out=str(tmp_path), smooth=4)
    with open(tmp_path / "runs.csv") as handle:
        assert [float(row["loss"]) for row in csv.DictReader(handle)] == result.summaries[0].runs[0].losses
    assert seen[0]["y"] == "training loss (moving average over 4 steps)"


def test_trajectory_plots_have_axis_labels_a_start_marker_and_the_lr(tmp_path, monkeypatch):
    seen = _captured_legends(monkeypatch)
    compare(["sgd", "adam"], "himmelblau", steps=5, seeds=1, lr=1e-2, progress=False, out=str(tmp_path))
    trajectory = seen[-1]
    assert (trajectory["x"], trajectory["y"]) == ("x", "y")
    assert trajectory["legend"] == ["sgd (lr 0.01)", "adam (lr 0.01)", "start (0, 0)"]


def test_sharpness_and_metric_expectations_are_judged_at_each_rate_shared(tmp_path):
    expect = [{"better": "adam", "than": "sgd", "on": "sharpness"}, {"better": "adam", "than": "sgd", "on": "metric"},
              {"better": "adam", "than": "sgd", "on": "final_loss"}]
    result = compare(["sgd", "adam"], "rosenbrock", steps=40, seeds=1, lr_grid=[1e-3, 1e-2], sharpness=True,
                     expect=expect, progress=False, out=str(tmp_path))
    assert [s.lr for s in result.summaries] == [1e-3, 1e-2]  # sgd diverges at 1e-2 on Rosenbrock
    assert {(c.variant, c.lr) for c in result.controls} == {("sgd", 1e-2), ("adam", 1e-3)}
    ats = [(v.expectation.split(" on ")[1], v.at) for v in result.verdicts]
    assert ats == [("sharpness", "at their own lr: 0.01 vs 0.001"), ("sharpness", "at shared lr 0.001"),
                   ("sharpness", "at shared lr 0.01"), ("metric", "at their own lr: 0.01 vs 0.001"),
                   ("metric", "at shared lr 0.001"), ("metric", "at shared lr 0.01"),
                   ("final loss", "at their own lr: 0.01 vs 0.001")]
    # at the shared rate 0.001, adam's figure is its control run's, sgd's its main run's
    adam_at_low = next(c for c in result.controls if c.variant == "adam")
    sgd = result.summaries[0]
    assert result.verdicts[1].detail.startswith(f"{adam_at_low.sharpness[0]:.4g} vs {sgd.sharpness[0]:.4g}")
    # sgd at 0.01 diverges: no figure to judge by, and the verdict says so
    assert result.verdicts[2].verdict == "inconclusive" and "diverged" in result.verdicts[2].detail
    with open(tmp_path / "runs.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["variant"], r["lr"]) for r in rows if r["control"] == "1"} == {("sgd", "0.01"), ("adam", "0.001")}
    text = (tmp_path / "report.md").read_text()
    assert "at a shared learning rate" in text and "(at shared lr 0.001)" in text


def test_a_verdict_that_changes_with_the_rate_gets_a_note():
    verdicts = [Verdict("a better than b on sharpness", "at their own lr: 0.03 vs 0.01", "reproduced", ""),
                Verdict("a better than b on sharpness", "at shared lr 0.01", "not reproduced", ""),
                Verdict("a better than b on final loss", "at their own lr: 0.03 vs 0.01", "reproduced", "")]
    [note] = lr_dependence(verdicts)
    assert note.startswith("'a better than b on sharpness' is reproduced at their own lr: 0.03 vs 0.01; "
                           "not reproduced at shared lr 0.01")


def _spiky_run(variant, seed, bumps):
    losses = [3.0 - 0.01 * t + (0.004 if t % 2 else -0.004) for t in range(60)]
    for step, size in bumps:
        losses[step] += size
    return Run(variant, seed, 0.1, losses=losses, **{c: [1.0] * 60 for c in CLOCKS}, evals=[], per_step=STEP)


def test_loss_spikes_are_counted_against_one_threshold_and_judged():
    task = tasks.get("char_lm")
    adam = summarise(task, "adam", 0.1, [_spiky_run("adam", s, [(20, 0.5), (40, 0.4)]) for s in range(3)])
    deo = summarise(task, "deo(adam)", 0.1, [_spiky_run("deo(adam)", s, []) for s in range(3)])
    report.with_spikes([adam, deo])
    assert adam.spike_threshold == deo.spike_threshold
    assert adam.spike_count == (2.0, 0.0) and deo.spike_count == (0.0, 0.0)
    assert adam.spike_largest[0] == pytest.approx(0.5 - 0.01 - 0.008, abs=1e-9)  # step 19 sat 0.004 high
    header, _, adam_row, deo_row = report.table(task, [adam, deo]).splitlines()
    assert "loss spikes" in header and "2 ± 0; " in adam_row and "0 ± 0; " in deo_row
    from gradspec.compare import judge
    verdict = judge({"better": "deo(adam)", "than": "adam", "on": "spikes"}, {"adam": adam, "deo(adam)": deo}, task)
    assert verdict.verdict == "reproduced"
    reverse = judge({"better": "adam", "than": "deo(adam)", "on": "spikes"}, {"adam": adam, "deo(adam)": deo}, task)
    assert reverse.verdict == "not reproduced"
