"""gradspec under torch.distributed: 2 CPU processes (gloo), float64. The eager checks share
one pair of processes (started once, by a module fixture); the compiled check and the
torchrun example start their own.

Every stdlib spec trains 20 steps under FSDP2 (``fully_shard``, shards of uneven and empty
size), and the specs whose step differs under DDP (DDP_SPECS) under DDP, and must match one
process stepping on the full batch to 1e-10;
exact-HVP specs are refused under FSDP2 with a clear error. A checkpoint saved through
torch.distributed.checkpoint under FSDP2 resumes bit for bit, and a non-finite gradient in
one rank's shard is seen by every rank. The checks themselves are in distributed_worker.py.
"""
import json
import os
import socket
import tempfile

import filelock
import pytest
import torch.multiprocessing as mp

import distributed_worker
from distributed_worker import DDP_SPECS, HVP_SPECS, SHAPED_SPECS, SPECS

pytestmark = pytest.mark.skipif(not __import__("torch").distributed.is_available(),
                                reason="torch built without torch.distributed")

COMPILED = ["lamb", "muon", "sgd_metric", "clip_grad_norm(adam)", "deo(adam)", "adam"]
CHECKPOINTED = ["lamb", "deo(adam)", "sophia_g", "muon", "sgd_log_metric"]


def _spawn(checks: dict) -> tuple[set, Exception | None]:
    """Run ``checks`` ({name: (check, args)}) in one pair of processes; the names of those that
    passed on both ranks, and the error that stopped the rest (None if all passed)."""
    with tempfile.TemporaryDirectory() as folder:
        rendezvous = "file://" + os.path.join(folder, "rendezvous")  # a file: no port to race for
        passed_folder = os.path.join(folder, "passed")
        os.mkdir(passed_folder)
        triples = [(name, check, args) for name, (check, args) in checks.items()]
        try:
            mp.spawn(distributed_worker.main, args=(2, rendezvous, triples, passed_folder), nprocs=2, join=True)
            error = None
        except Exception as raised:  # spawn's ProcessRaisedException carries the rank's traceback
            error = raised
        return set(os.listdir(passed_folder)), error


EAGER_CHECKS = {
    "parity-ddp": ("check_parity", ("ddp", "eager", DDP_SPECS)),
    "parity-fsdp": ("check_parity", ("fsdp", "eager", list(SPECS))),
    "checkpoint": ("check_checkpoint", ("eager", CHECKPOINTED)),
    "nonfinite": ("check_nonfinite", ("eager",)),
}


@pytest.fixture(scope="session")
def eager_checks(tmp_path_factory, worker_id):
    """The eager checks, run once per test session for the tests below, in one process group.
    Their xdist_group keeps them on one worker under ``--dist loadgroup`` (the project's
    default; tests/conftest.py works around pytest-dev/pytest-xdist#1386). Under another
    distribution the first worker that needs them runs them and leaves the outcome in the
    session's shared folder, and a worker that comes later waits for it and reads it."""
    if worker_id == "master":  # no xdist
        return _spawn(EAGER_CHECKS)
    outcome = tmp_path_factory.getbasetemp().parent / "distributed-eager-checks.json"
    with filelock.FileLock(f"{outcome}.lock"):
        if not outcome.is_file():
            passed, error = _spawn(EAGER_CHECKS)
            outcome.write_text(json.dumps({"passed": sorted(passed), "error": None if error is None else str(error)}))
        saved = json.loads(outcome.read_text())
    return set(saved["passed"]), saved["error"]


def _assert_passed(outcome, name):
    passed, error = outcome
    assert name in passed, f"{name} failed or did not run:\n{error}"


# one xdist worker runs them all where pytest-xdist can (see eager_checks)
together = pytest.mark.xdist_group("distributed")


@together
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_every_stdlib_spec_matches_one_process(mode, eager_checks):
    _assert_passed(eager_checks, f"parity-{mode}")


@pytest.mark.compiled
def test_compiled_sharded_steps_match_one_process():
    """The collectives are inside the compiled graph (reductions, Muon's gather). Under DDP
    the compiled step is the single-process one, which test_stdlib_parity covers."""
    _assert_passed(_spawn({"compiled": ("check_parity", ("fsdp", "compiled", COMPILED))}), "compiled")


@together
def test_fsdp_checkpoint_resumes_bit_for_bit(eager_checks):
    _assert_passed(eager_checks, "checkpoint")


@together
def test_a_nonfinite_shard_is_seen_by_every_rank(eager_checks):
    _assert_passed(eager_checks, "nonfinite")


def test_the_spec_lists_cover_the_stdlib():
    import gradspec
    names = {n.split("(")[0] for n in SPECS}
    assert names >= set(gradspec.stdlib.names()) - {"e"}  # e is covered by eadam, esgd, alto
    assert HVP_SPECS <= set(SPECS) and SHAPED_SPECS <= set(SPECS)
    probing = {n for n in SPECS if "probe every" in gradspec.load(n).source.text}
    assert probing and HVP_SPECS <= probing <= set(DDP_SPECS) <= set(SPECS)


def test_the_fsdp_example_runs_under_torchrun():
    import pathlib
    import subprocess
    import sys
    root = pathlib.Path(__file__).resolve().parents[1]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(port), str(root / "examples" / "fsdp_train.py"),
                             "--spec", "deo(adam)", "--steps", "20"],
                            capture_output=True, text=True, timeout=600, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming in a fresh model and optimizer" in result.stdout
    assert "step   20" in result.stdout and "deo(adam) under fsdp on 2 processes" in result.stdout
