"""A sweep's runs trained in parallel, in local worker processes (``--workers``) or as Ray tasks
(``--ray``), give the results of training them one after another: the CSVs agree in every
column but the timings."""
import csv
import textwrap

import pytest

from gradspec.cli import main
from gradspec.compare import compare
from gradspec.compare.report import TIMING_COLUMNS

# a small MLP on random data, from a file: the workers load it by its path, as they would a user's
TASK = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    import gradspec.tasks as tasks

    @tasks.register("tiny_mlp", steps=12, metric="accuracy", higher_is_better=True, eval_every=4)
    def tiny_mlp(seed, device):
        """A 16-32-4 MLP on 384 random points labelled by a fixed random MLP."""
        data = torch.Generator().manual_seed(0)
        x = torch.randn(384, 16, generator=data)
        y = (x @ torch.randn(16, 4, generator=data)).argmax(-1)
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))

        def batch(step):
            rows = torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(seed * 1000 + step))
            return x[rows], y[rows]
        loss, pure = tasks.module_losses(model, batch, F.cross_entropy)

        @torch.no_grad()
        def evaluate():
            logits = model(x[320:])
            return {"eval_loss": float(F.cross_entropy(logits, y[320:])),
                    "accuracy": float((logits.argmax(-1) == y[320:]).double().mean())}
        validate = lambda: float(F.cross_entropy(model(x[256:320]), y[256:320]).detach())
        return tasks.Problem(list(model.parameters()), loss, evaluate, validate,
                             lambda: F.cross_entropy(model(x[:256]), y[:256]), pure=pure)
''')


@pytest.fixture
def sweep(tmp_path):
    """Every kind of job: grids (a vmapped one, and a probe spec's one run per rate), main runs,
    and the control runs of an expectation on sharpness judged at a shared rate."""
    (tmp_path / "tiny.py").write_text(TASK)
    return dict(variants=["sgd", "adam", "deo(adam)"], task=f"{tmp_path / 'tiny.py'}:tiny_mlp", seeds=2,
                lr_grid=[1e-2, 3e-1], sharpness=True, expect=[{"better": "adam", "than": "sgd", "on": "sharpness"}],
                progress=False)


def _without_timings(path) -> list:
    with open(path) as handle:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(handle)]


def _assert_same(sequential, parallel, folder_a, folder_b):
    assert {v: g.scores for v, g in sequential.grids.items()} == {v: g.scores for v, g in parallel.grids.items()}
    assert len(sequential.controls) == 2 and sequential.verdicts == parallel.verdicts
    for name in ("runs.csv", "evals.csv"):
        rows = _without_timings(folder_a / name)
        assert len(rows) >= 30 and rows == _without_timings(folder_b / name)


def test_worker_processes_give_the_sequential_results(tmp_path, sweep):
    sequential = compare(**sweep, out=str(tmp_path / "one"))
    parallel = compare(**sweep, out=str(tmp_path / "two"), workers=2)
    assert parallel.settings["executed"] == "2 at a time in local worker processes"
    assert "2 at a time in local worker processes, 1 torch thread(s) each" in (tmp_path / "two" / "report.md").read_text()
    _assert_same(sequential, parallel, tmp_path / "one", tmp_path / "two")


def test_a_ray_cluster_gives_the_sequential_results(tmp_path, sweep):
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    sequential = compare(**sweep, out=str(tmp_path / "one"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = compare(**sweep, out=str(tmp_path / "ray"), ray="auto")
        assert ray.is_initialized()  # a session the caller started is left running
    finally:
        ray.shutdown()
    _assert_same(sequential, on_ray, tmp_path / "one", tmp_path / "ray")


def test_the_command_line_refuses_no_workers(capsys):
    assert main(["compare", "sgd", "--task", "beale", "--steps", "2", "--workers", "0", "--quiet"]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err
