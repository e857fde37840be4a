"""gradspec under torch.distributed: 2 CPU processes (gloo), float64, started by each test.

Every stdlib spec trains 20 steps under DDP and under FSDP2 (``fully_shard``, shards of
uneven and empty size) and must match one process stepping on the full batch to 1e-10;
exact-HVP specs are refused under FSDP2 with a clear error. A checkpoint saved through
torch.distributed.checkpoint under FSDP2 resumes bit for bit, and a non-finite gradient in
one rank's shard is seen by every rank. The checks themselves are in distributed_worker.py.
"""
import os
import socket
import tempfile

import pytest
import torch.multiprocessing as mp

import distributed_worker
from distributed_worker import HVP_SPECS, SPECS

pytestmark = pytest.mark.skipif(not __import__("torch").distributed.is_available(),
                                reason="torch built without torch.distributed")

COMPILED = ["lamb", "muon", "sgd_metric", "clip_grad_norm(adam)", "deo(adam)", "adam"]
CHECKPOINTED = ["lamb", "deo(adam)", "sophia_g", "muon", "sgd_log_metric"]


def _spawn(check: str, *args):
    with tempfile.TemporaryDirectory() as folder:  # a file rendezvous: no port to race for
        rendezvous = "file://" + os.path.join(folder, "rendezvous")
        mp.spawn(distributed_worker.main, args=(2, rendezvous, check, args), nprocs=2, join=True)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_every_stdlib_spec_matches_one_process(mode):
    _spawn("check_parity", mode, "eager", list(SPECS))


@pytest.mark.compiled
def test_compiled_sharded_steps_match_one_process():
    """The collectives are inside the compiled graph (reductions, Muon's gather). Under DDP
    the compiled step is the single-process one, which test_stdlib_parity covers."""
    _spawn("check_parity", "fsdp", "compiled", COMPILED)


def test_fsdp_checkpoint_resumes_bit_for_bit():
    _spawn("check_checkpoint", "eager", CHECKPOINTED)


def test_a_nonfinite_shard_is_seen_by_every_rank():
    _spawn("check_nonfinite", "eager")


def test_the_spec_lists_cover_the_stdlib():
    import gradspec
    names = {n.split("(")[0] for n in SPECS}
    assert names >= set(gradspec.stdlib.names()) - {"e"}  # e is covered by eadam, esgd, alto
    assert HVP_SPECS <= set(SPECS)


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
