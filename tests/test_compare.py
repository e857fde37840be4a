"""gradspec compare: deterministic seeded runs, the learning-rate grid, the summaries and their
verdicts, the files it writes, comparison files and user tasks, and the built-in tasks."""
import math
import textwrap

import pytest

import gradspec.tasks as tasks
from gradspec.compare import compare, judge, load_file, run_file
from gradspec.compare.report import summarise
from gradspec.compare.runner import CLOCKS, Run, pick_lr, train


def test_a_run_is_deterministic_given_its_seed_and_seeds_differ():
    task = tasks.get("digits")
    a = train(task, "adam", seed=1, steps=15, lr=1e-2)
    b = train(task, "adam", seed=1, steps=15, lr=1e-2)
    c = train(task, "adam", seed=2, steps=15, lr=1e-2)
    assert a.losses == b.losses and a.final == b.final
    assert a.losses != c.losses
    # probes draw from the optimizer's generator, seeded by the run's seed
    d = train(task, "deo(adam)", seed=1, steps=12, lr=1e-2)
    e = train(task, "deo(adam)", seed=1, steps=12, lr=1e-2)
    assert d.losses == e.losses
    assert d.per_step["closure_calls"] == pytest.approx(1 + 2 / 12)  # rotations at t = 1 and 11


@pytest.mark.parametrize("name", ["digits", "char_lm", "modular_addition", "saddle", "beale", "rosenbrock",
                                  "himmelblau", "ackley", "rastrigin"])
def test_every_built_in_task_trains(name):
    task = tasks.get(name)
    run = train(task, "adam", seed=0, steps=25, lr=1e-2 if task.surface == {} else 1e-2)
    assert len(run.losses) == 25 and all(math.isfinite(x) for x in run.losses)
    if name != "saddle":  # the saddle sits still until the escape starts
        assert min(run.losses[-5:]) < run.losses[0]
    assert task.metric in run.final and math.isfinite(run.final["validation"])
    assert all("validation" in metrics for _, metrics in run.evals) and run.evals[-1][0] == 25
    seconds = run.cumulative_seconds("step_ms")
    assert seconds[0] == 0 and seconds[-1] > 0  # the first step (compilation) is not timed


def test_the_lr_grid_picks_the_validation_best_and_scores_divergence_as_infinite():
    task = tasks.get("rosenbrock")
    for vmap in (True, False):
        grid = pick_lr(task, "sgd", [1e-4, 1e-3, 0.5], steps=200, backend="eager", device="cpu", vmap=vmap)
        assert grid.vmapped == vmap
        assert grid.scores[0.5] == math.inf  # plain SGD at lr 0.5 diverges on Rosenbrock
        assert grid.lr == 1e-3 and grid.scores[1e-3] < grid.scores[1e-4]


def _timed(ms):
    return {clock: list(ms) for clock in CLOCKS}


def test_summaries_and_time_to_target():
    task = tasks.get("saddle")
    runs = [Run("x", s, 0.1, losses=[0.0, -0.005, -0.0097, -0.0099], **_timed([900, 100, 100, 100]),
                evals=[(4, {"eval_loss": -0.0099, "validation": -0.0099})],
                per_step={"closure_calls": 1, "gradients": 1, "hvps": 0})
            for s in range(2)]
    runs.append(Run("x", 2, 0.1, losses=[0.0, -0.001, -0.002, -0.003], **_timed([900, 100, 100, 100]),
                    evals=[(4, {"eval_loss": -0.003, "validation": -0.003})],
                    per_step={"closure_calls": 1, "gradients": 1, "hvps": 0}))
    s = summarise(task, "x", 0.1, runs)
    # steps to target x the mean ms of a timed step (the untimed first step's 900 ms left out)
    assert s.reached == 2 and s.steps_to_target == 3 and s.seconds_to_target == pytest.approx(0.3)
    assert s.final_loss[0] == pytest.approx((-0.0099 * 2 - 0.003) / 3)
    assert s.ms_per_step == pytest.approx(100)


def _summary(variant, values, task):
    runs = [Run(variant, i, None, losses=[v], **_timed([1.0]), evals=[(1, {task.metric: v, "validation": 0.0})],
                per_step={"closure_calls": 1, "gradients": 1, "hvps": 0}) for i, v in enumerate(values)]
    return summarise(task, variant, None, runs)


def test_verdicts_need_a_margin_beyond_the_seeds_spread():
    task = tasks.get("digits")  # accuracy: higher is better
    by = {"a": _summary("a", [0.95, 0.96, 0.97], task), "b": _summary("b", [0.90, 0.91, 0.92], task),
          "c": _summary("c", [0.93, 0.96, 0.99], task)}
    assert judge({"better": "a", "than": "b", "on": "metric"}, by, task).verdict == "reproduced"
    assert judge({"better": "b", "than": "a", "on": "metric"}, by, task).verdict == "not reproduced"
    assert judge({"better": "c", "than": "a", "on": "metric"}, by, task).verdict == "inconclusive"
    # lower is better for the training loss
    assert judge({"better": "b", "than": "a", "on": "final_loss"}, by, task).verdict == "reproduced"


def test_compare_writes_its_table_csv_plots_and_report(tmp_path):
    result = compare(["sgd", "adam"], "beale", steps=60, seeds=2, lr=0.01, out=str(tmp_path), progress=False,
                     expect=[{"better": "adam", "than": "sgd", "on": "final_loss"}])
    assert [s.variant for s in result.summaries] == ["sgd", "adam"]
    table = result.table()
    assert "| `adam` | 0.01 |" in table and "steps to loss 1e-07" in table
    written = ["runs.csv", "evals.csv", "loss_vs_step.png", "loss_vs_time.png", "trajectories.png", "report.md"]
    assert result.files == written
    for name in written:
        assert (tmp_path / name).stat().st_size > 0
    rows = (tmp_path / "runs.csv").read_text().splitlines()
    assert rows[0] == ("variant,seed,lr,control,step,loss,seconds,cpu_seconds,step_ms,step_cpu_ms,optimizer_ms,"
                       "optimizer_cpu_ms") and len(rows) == 1 + 2 * 2 * 60
    report = (tmp_path / "report.md").read_text()
    assert "gradspec compare sgd adam --task beale --steps 60 --seeds 2 --lr 0.01" in report
    assert "adam better than sgd on final loss" in report


def test_comparison_files_are_checked_and_run(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(textwrap.dedent('''
        title = "t"
        task = "rosenbrock"
        variants = ["sgd", "adam"]
        steps = 30
        seeds = 1
        lr = 0.001
        [[expect]]
        better = "adam"
        than = "sgd"
        on = "final_loss"
    '''))
    result = run_file(str(path), progress=False)
    assert result.settings["command"] == f"gradspec compare {path}" and len(result.verdicts) == 1
    bad = tmp_path / "bad.toml"
    bad.write_text('task = "rosenbrock"\nvariants = ["sgd"]\nstep = 3\n')
    with pytest.raises(ValueError, match=r"unknown keys \['step'\]"):
        load_file(str(bad))
    bad.write_text('task = "rosenbrock"\nvariants = ["sgd"]\n[[expect]]\nbetter = "adam"\nthan = "sgd"\non = "x"\n')
    with pytest.raises(ValueError, match="expect"):
        load_file(str(bad))


def test_every_shipped_comparison_file_is_valid():
    import glob
    import gradspec
    files = sorted(glob.glob("specs/compare/*.toml"))
    assert len(files) >= 8
    for path in files:
        data = load_file(path)
        tasks.get(data["task"])
        for variant in data["variants"]:
            gradspec.load(variant)


def test_a_user_task_from_a_python_file(tmp_path):
    module = tmp_path / "mytask.py"
    module.write_text(textwrap.dedent('''
        import torch
        import gradspec.tasks as tasks

        @tasks.register("quadratic_bowl", steps=20, target=1e-3)
        def bowl(seed, device):
            """A quadratic bowl."""
            x = torch.nn.Parameter(torch.full((3,), 1.0 + seed, dtype=torch.float64))
            value = lambda: (x * x).sum()
            return tasks.Problem([x], lambda step: (value(), None), lambda: {"eval_loss": float(value())},
                                 lambda: float(value()), value)
    '''))
    task = tasks.get(f"{module}:bowl")
    assert task.name == "quadratic_bowl" and task.steps == 20
    result = compare(["sgd"], task, seeds=2, lr=0.25, progress=False)
    assert result.summaries[0].final_loss[0] < 1e-3
    with pytest.raises(ValueError, match="unknown task 'digitz'; did you mean 'digits'"):
        tasks.get("digitz")


def test_the_cli_compares_and_reports_errors(tmp_path, capsys):
    """In this process: what a separate process adds (no traceback, exit codes through
    sys.exit) is tests/test_hardening_inputs.py's subject."""
    from gradspec.cli import main
    assert main(["compare", "sgd", "adam", "--task", "himmelblau", "--steps", "40", "--seeds", "1", "--lr", "0.01",
                 "--quiet", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| `sgd` | 0.01 |" in out and (tmp_path / "report.md").exists()
    assert (f"wrote runs.csv, evals.csv, loss_vs_step.png, loss_vs_time.png, trajectories.png and report.md "
            f"under {tmp_path}") in out
    assert main(["compare", "sgd", "--quiet"]) == 2
    assert "--task is required" in capsys.readouterr().err
    assert main(["compare", "adm", "--task", "beale", "--quiet"]) == 1
    assert "unknown spec 'adm'" in capsys.readouterr().err


def test_the_results_page_is_generated_from_comparison_files(tmp_path):
    from gradspec.compare import write_results
    for name, better in (("one", "adam"), ("two", "sgd")):
        (tmp_path / f"{name}.toml").write_text(textwrap.dedent(f'''
            title = "comparison {name}"
            claim = "{better} wins"
            task = "rosenbrock"
            variants = ["sgd", "adam"]
            steps = 40
            seeds = 1
            lr = 0.001
            [[expect]]
            better = "{better}"
            than = "{'sgd' if better == 'adam' else 'adam'}"
            on = "final_loss"
        '''))
    results = tmp_path / "docs" / "results.md"
    results.parent.mkdir()
    write_results([str(tmp_path / "one.toml"), str(tmp_path / "two.toml")], str(results), progress=False)
    text = results.read_text()
    assert "## comparison one" in text and "## comparison two" in text
    # at lr 1e-3 for 40 steps on Rosenbrock, plain SGD is ahead of Adam (0.856 vs 0.924)
    assert "| one | adam better than sgd on final loss | at shared lr 0.001 | **not reproduced** |" in text
    assert "| two | sgd better than adam on final loss | at shared lr 0.001 | **reproduced** |" in text
    assert (tmp_path / "docs" / "results" / "one" / "trajectories.png").exists()
    assert "](results/one/loss_vs_step.png)" in text
