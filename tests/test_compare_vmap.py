"""The learning-rate grid of ``gradspec compare`` as one vmapped run: it picks the rate the
sequential grid picks with the same scores, and falls back to the sequential grid, saying why,
for a spec or a task it cannot run."""
import functools
import math

import pytest
import torch

import gradspec.tasks as tasks
from gradspec.compare import compare, report, runner
from gradspec.compare.runner import pick_lr
from gradspec.tasks.learning import digits

# digits in float64: the vmapped and the sequential grid then agree to rounding of 1e-16 per
# operation, so a tolerance of 1e-10 on the validation loss leaves no room for a real difference
DIGITS64 = tasks.Task("digits64", functools.partial(digits, dtype=torch.float64))
GRID = [1e-3, 1e-2, 3e-2]


def _sequential(task, variant, steps):
    grid = pick_lr(task, variant, GRID, steps, "eager", "cpu", vmap=False)
    assert not grid.vmapped and "vmap=False" in grid.sequential_because
    return grid


def _no_sequential_runs(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the vmapped grid trained a run of its own")
    monkeypatch.setattr(runner, "train", refuse)


@pytest.mark.parametrize("variant", ["adam", "lion"])
def test_the_vmapped_grid_equals_the_sequential_grid(variant, monkeypatch):
    sequential = _sequential(DIGITS64, variant, 8)
    _no_sequential_runs(monkeypatch)
    vmapped = pick_lr(DIGITS64, variant, GRID, 8, "eager", "cpu")
    assert vmapped.vmapped and vmapped.how() == "one vmapped run over the 3 learning rates"
    assert vmapped.lr == sequential.lr
    assert len(set(sequential.scores.values())) == 3  # the rates differ, so agreeing is not trivial
    for lr in GRID:
        assert math.isfinite(sequential.scores[lr])
        assert vmapped.scores[lr] == pytest.approx(sequential.scores[lr], rel=1e-10, abs=0)


def test_a_spec_that_needs_the_models_logits_trains_one_rate_at_a_time():
    sequential = _sequential(tasks.get("digits"), "sophia_g", 4)
    fallback = pick_lr(tasks.get("digits"), "sophia_g", GRID, 4, "eager", "cpu")
    assert not fallback.vmapped and "sophia_g probes the model" in fallback.sequential_because
    assert fallback.scores == sequential.scores and fallback.lr == sequential.lr


def test_a_task_without_a_pure_loss_trains_one_rate_at_a_time():
    def bowl(seed, device):
        x = torch.nn.Parameter(torch.full((3,), 1.0, dtype=torch.float64))
        value = lambda: (x * x).sum()  # noqa: E731
        return tasks.Problem([x], lambda step: (value(), None), lambda: {"eval_loss": float(value().detach())},
                             lambda: float(value().detach()), value)

    grid = pick_lr(tasks.Task("bowl", bowl), "sgd", [0.1, 0.4], 5, "eager", "cpu")
    assert not grid.vmapped and "gives no pure loss" in grid.sequential_because
    assert grid.lr == 0.4 and grid.scores[0.4] == pytest.approx(3 * 0.2 ** 10)  # x <- 0.2 x per step


def _report(comparison) -> str:
    return report.markdown(comparison.task, comparison.summaries, comparison.settings, [], comparison.grids, [])


def test_the_report_says_how_each_grid_was_trained():
    text = _report(compare(["sgd", "deo(sgd)"], "beale", steps=5, seeds=1, lr_grid=[1e-3, 1e-2], progress=False))
    assert "- `sgd`: 0.001: " in text and "trained as one vmapped run over the 2 learning rates" in text
    assert "- `deo(sgd)`: 0.001: " in text and "trained as one run per learning rate (deo(sgd) probes" in text
    text = _report(compare(["sgd"], "beale", steps=5, seeds=1, lr_grid=[1e-3, 1e-2], progress=False, vmap=False))
    assert "--no-vmap" in text and "one run per learning rate (turned off" in text


def test_the_command_line_turns_vmap_off(tmp_path):
    from gradspec.cli import main
    for flag, expected in (([], "one vmapped run"), (["--no-vmap"], "one run per learning rate")):
        out = tmp_path / ("off" if flag else "on")
        code = main(["compare", "sgd", "--task", "rosenbrock", "--steps", "3", "--seeds", "1",
                     "--lr-grid", "0.001", "0.002", "--out", str(out), *flag])
        assert code == 0 and expected in (out / "report.md").read_text()
