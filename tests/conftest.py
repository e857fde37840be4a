"""The ``compiled`` marker is checked, not trusted.

``pytest -m "not compiled"`` is the fast suite (README). It stays fast only if every test
that compiles carries the marker, and gradspec compiles where a reader may not expect it:
``gradspec.Optimizer``'s default backend is "compiled". So:

* a test parametrized with ``backend="compiled"`` gets the marker here, for that case only;
* in a test without the marker, ``torch.compile`` raises at once with a message naming the
  marker, and gradspec's cache of compiled steps starts empty, so a step compiled by an
  earlier marked test cannot hide the compile (the test would then fail only when run
  alone, or in the fast suite).

This guards the test process only: a child process (a CLI run, torchrun, mp.spawn) is not
watched, so a test that starts one with the compiled backend is marked by hand.
"""
import gc
import os
import shutil
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the child processes tests start

# One gradspec cache folder per test session (gradspec/cache.py), made here in the controlling
# process and inherited by pytest-xdist's workers and every process a test starts: the tests
# meet a cold cache, as on a fresh CI machine, whatever this machine's ~/.cache holds, and the
# session's processes share what one of them learns (a safety check, a SymPy rewrite).
_SESSION_CACHE = None
if "GRADSPEC_CACHE_DIR" not in os.environ:
    _SESSION_CACHE = os.environ["GRADSPEC_CACHE_DIR"] = tempfile.mkdtemp(prefix="gradspec-tests-")

import pytest
import torch

from gradspec.compiler import backends

# One intra-op thread. The tests' tensors are tiny, and two OpenMP threads on a busy 2-core
# machine (pytest-xdist's two workers, or anything else running) spin-wait for each other:
# 200 steps of a 6-16-3 MLP took 6.9 s of CPU with two threads, 0.19 s with one.
torch.set_num_threads(1)

MISSING_MARKER = (
    "this test runs torch.compile (gradspec's 'compiled' backend, which gradspec.Optimizer "
    "uses by default) but is not marked @pytest.mark.compiled: mark it, or pass backend='eager'")


@pytest.hookimpl(tryfirst=True)  # before -m selects on the markers
def pytest_collection_modifyitems(items):
    for item in items:
        params = getattr(item, "callspec", None)
        if params is not None and params.params.get("backend") == "compiled":
            item.add_marker(pytest.mark.compiled)


class _GroupsForXdist:
    """``--dist loadgroup`` (CI, and this project's addopts) sends the tests of one
    ``xdist_group`` to one worker. pytest-xdist 3.8 marks them by appending ``@group`` to
    ``item._nodeid``, which pytest 9.2 no longer reads (an item's id is ``item._id``), so the
    groups were silently ignored (pytest-dev/pytest-xdist#1386): the distributed checks'
    fixture then made a second worker wait for the first, and the probe-parity can-fail tests
    ran their eager runs again. This copies the mark to where pytest 9.2 reads ids from."""

    @pytest.hookimpl(trylast=True)  # after pytest-xdist's own hook has tagged the items
    def pytest_collection_modifyitems(self, items):
        try:
            from _pytest.nodeid import NodeId
        except ImportError:  # an older pytest reads item._nodeid itself
            return
        for item in items:
            tagged = item.__dict__.get("_nodeid")
            if isinstance(tagged, str) and tagged != item.nodeid and isinstance(getattr(item, "_id", None), NodeId):
                item._id = NodeId.parse(tagged)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """After each test, collect its garbage and freeze what is left (gc.freeze).

    A test process holds a large, long-lived heap (torch, SymPy and Lark with their caches,
    every test module), and Python's full collections walk all of it: they took a fifth of
    the CPU of a run of test_optimizer, test_symbolic and test_integrations, more with the
    Trainer's own gc.collect() calls. Frozen objects are skipped by the collector and still
    freed by reference counting; the test's own garbage is collected first, so no test leaves
    a cycle behind, and each test starts with an almost empty young heap."""
    result = yield
    gc.collect()
    gc.freeze()
    return result


def pytest_configure(config):
    config.pluginmanager.register(_GroupsForXdist(), "gradspec-xdist-groups")


def pytest_unconfigure(config):
    if _SESSION_CACHE is not None:  # the process that made it: the controller, or a run without xdist
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


def _refuse_to_compile(*args, **kwargs):
    raise RuntimeError(MISSING_MARKER)


@pytest.fixture(autouse=True)
def _compiling_needs_the_marker(request, monkeypatch):
    if request.node.get_closest_marker("compiled") is not None:
        return
    monkeypatch.setattr(torch, "compile", _refuse_to_compile)
    # raising=False: if the cache is renamed, the torch.compile guard alone still holds
    monkeypatch.setattr(backends, "_CACHE", {}, raising=False)


@pytest.fixture(scope="session")
def distributed_eager_checks(tmp_path_factory, worker_id):
    """The eager checks of tests/test_distributed.py and tests/test_distributed_shapes.py, run
    once per session in one pair of processes (tests/distributed_checks.py)."""
    import distributed_checks
    return distributed_checks.outcome_once(distributed_checks.EAGER_CHECKS, tmp_path_factory, worker_id)


@pytest.fixture(scope="session")
def distributed_compiled_checks(tmp_path_factory, worker_id):
    """Their compiled checks, likewise in another pair of processes."""
    import distributed_checks
    return distributed_checks.outcome_once(distributed_checks.COMPILED_CHECKS, tmp_path_factory, worker_id)
