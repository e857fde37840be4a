"""The SymPy rewrite runs once per program content: memoised in the process, kept on disk as
JSON in the private cache folder, bounded by a count of work and never by a signal. The safety
check that an optimizer's construction runs is kept there too, as the existence of a file."""
import importlib
import json
import os
import signal

import pytest
import torch

import gradspec
from gradspec.compiler.ir import build
from gradspec.symbolic import simplify
from test_symbolic import REDUNDANT  # a spec the rewrite shrinks


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("GRADSPEC_CACHE_DIR", str(folder))
    monkeypatch.setattr(simplify, "_MEMO", {})
    return folder


def _count_decisions(monkeypatch):
    calls = []
    real = simplify._decide
    monkeypatch.setattr(simplify, "_decide", lambda program: calls.append(1) or real(program))
    return calls


def _steps(spec, n=5):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(20, dtype=torch.float64))
    opt = gradspec.Optimizer([p], spec, backend="eager")
    for _ in range(n):
        p.grad = torch.randn_like(p)
        opt.step()
    return p.detach()


def test_a_second_optimizer_runs_no_sympy(fresh_cache, monkeypatch):
    calls = _count_decisions(monkeypatch)
    first = _steps("lamb")
    gradspec.Optimizer([torch.nn.Parameter(torch.zeros(3))], "deo(adam)")
    made = len(calls)
    assert made >= 2  # lamb's program, deo(adam)'s plain and probing programs
    second = _steps("lamb")
    gradspec.Optimizer([torch.nn.Parameter(torch.zeros(3))], "deo(adam)")
    assert len(calls) == made and torch.equal(first, second)


def test_the_verdict_is_kept_on_disk_and_restores_the_same_program(fresh_cache, monkeypatch):
    spec = gradspec.parse(REDUNDANT)
    program = build(spec)
    fresh = simplify.simplified(program)
    assert len(fresh.nodes()) < len(program.nodes())
    files = list(fresh_cache.glob("simplify-*.json"))
    assert len(files) == 1 and oct(files[0].stat().st_mode & 0o777) == "0o600"
    monkeypatch.setattr(simplify, "_MEMO", {})
    monkeypatch.setattr(simplify, "_decide", lambda program: pytest.fail("SymPy ran again"))
    restored = simplify.simplified(build(spec))
    assert [(n.op, n.attr) for n in restored.nodes()] == [(n.op, n.attr) for n in fresh.nodes()]


def test_a_damaged_or_foreign_verdict_is_ignored(fresh_cache, monkeypatch):
    spec = gradspec.parse(REDUNDANT)
    simplify.simplified(build(spec))
    (path,) = fresh_cache.glob("simplify-*.json")
    expected = _steps(spec)
    calls = _count_decisions(monkeypatch)
    for damage in ("{not json", json.dumps({"kept": False, "nodes": [["add", [5], None, "real", 3]], "next": {}})):
        path.write_text(damage)
        monkeypatch.setattr(simplify, "_MEMO", {})
        assert torch.equal(_steps(spec), expected)
    assert len(calls) == 2
    os.chmod(path, 0o666)  # writable by others: not read, whatever it holds
    path.write_text(json.dumps({"kept": True}))
    monkeypatch.setattr(simplify, "_MEMO", {})
    assert len(simplify.simplified(build(spec)).nodes()) < len(build(spec).nodes())
    assert len(calls) == 3


def test_a_program_past_the_work_budget_is_compiled_as_written(fresh_cache, monkeypatch):
    monkeypatch.setattr(simplify, "WORK_BUDGET", 3)
    program = build(gradspec.parse(REDUNDANT))
    assert simplify.simplified(program) is program


def test_no_signal_timer_is_touched(fresh_cache):
    """A user's own ITIMER_REAL survives building an optimizer (the old budget cancelled it)."""
    previous = signal.signal(signal.SIGALRM, lambda *_: None)
    try:
        signal.setitimer(signal.ITIMER_REAL, 100.0)
        _steps("lamb", 1)
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 0 < remaining <= 100.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---- the safety check's verdict ------------------------------------------------------------

def _forget_checks():
    """What a new process remembers: no verdict in memory (safety_checked's lru_cache, under
    the deep-recursion wrapper)."""
    importlib.import_module("gradspec.check").safety_checked.__wrapped__.cache_clear()


@pytest.fixture
def fresh_checks(fresh_cache, monkeypatch):
    """A new process's view: an empty cache folder and nothing remembered in memory. Counts the
    safety checks that run."""
    check = importlib.import_module("gradspec.check")  # gradspec.check is the function
    _forget_checks()
    calls = []
    real = check.diagnose
    monkeypatch.setattr(check, "diagnose", lambda *a, **k: calls.append(1) or real(*a, **k))
    yield calls
    _forget_checks()


def _construct(spec):
    return gradspec.Optimizer([torch.nn.Parameter(torch.zeros(3, 2))], spec, backend="eager")


def test_a_passed_safety_check_is_kept_on_disk_for_the_next_process(fresh_checks, fresh_cache):
    check = importlib.import_module("gradspec.check")  # gradspec.check is the function
    _construct("deo(adam)")
    (path,) = fresh_cache.glob("checked-*")
    assert oct(path.stat().st_mode & 0o777) == "0o600" and path.read_text() == ""
    _forget_checks()  # the next process
    _construct("deo(adam)")
    assert len(fresh_checks) == 1
    _construct("deo(adam, T = 7)")  # another spec: another verdict
    assert len(fresh_checks) == 2 and len(list(fresh_cache.glob("checked-*"))) == 2


def test_a_failed_check_is_not_kept_and_a_foreign_or_stale_verdict_is_not_trusted(fresh_checks, fresh_cache,
                                                                                 monkeypatch):
    check = importlib.import_module("gradspec.check")  # gradspec.check is the function
    unsafe = "optimizer unsafe\nhyper lr = 0.1 >= 0\nhyper eps = 0 >= 0\nparam' = param - lr * grad / eps\n"
    for _ in range(2):
        with pytest.raises(gradspec.SpecError, match="GS072"):
            _construct(unsafe)
    assert len(fresh_checks) == 2 and not list(fresh_cache.glob("checked-*"))
    _construct("lamb")
    (path,) = fresh_cache.glob("checked-*")
    os.chmod(path, 0o666)  # writable by others: as if absent
    _forget_checks()
    _construct("lamb")
    assert len(fresh_checks) == 4
    # another checker (its code changed) does not take this one's word
    monkeypatch.setattr(check, "code_fingerprint", lambda: "another checker")
    _forget_checks()
    _construct("lamb")
    assert len(fresh_checks) == 5
