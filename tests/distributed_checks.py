"""The eager checks of tests/test_distributed.py and tests/test_distributed_shapes.py, run in
one pair of processes (2 CPU processes, gloo, float64) once per test session.

Starting two processes that import torch and gradspec costs more than most checks, and the
one-process references and the first construction of each spec are paid once per process:
so every eager check runs in one process group (distributed_worker.main), and the tests of
both modules read its outcome; the compiled checks, in another (Inductor's first compile in
a process costs as much again).
"""
from __future__ import annotations

import json
import os
import tempfile

import filelock
import torch.multiprocessing as mp

import distributed_worker
from distributed_shapes_worker import SHAPED
from distributed_worker import DDP_SPECS, HVP_SPECS, SPECS, UNDETERMINED_UNDER_FSDP

CHECKPOINTED = ["lamb", "deo(adam)", "sophia_g", "muon", "sgd_log_metric"]
SHAPED_CHECKPOINTED = ["adafactor", "shampoo"]  # per-row states as Shard(0) DTensors, the others Replicate
GROUPS = {"prodigy": {"weight_decay": 0.1}}  # two groups: a groups.* total is whole over the shards
# The shape-aware specs that the FSDP2 parity of every stdlib spec ("parity-fsdp") compares
# with the same hyperparameters (same model, steps and tolerance) are not run a second time.
COMPARED_UNDER_FSDP = {name: hyper for name, hyper in SPECS.items() if name not in HVP_SPECS | UNDETERMINED_UNDER_FSDP}
SHAPED_NOT_IN_PARITY = {name: hyper for name, hyper in SHAPED.items() if COMPARED_UNDER_FSDP.get(name) != hyper}

EAGER_CHECKS = {
    "parity-ddp": ("check_parity", ("ddp", "eager", DDP_SPECS)),
    "parity-fsdp": ("check_parity", ("fsdp", "eager", list(SPECS))),
    "checkpoint": ("check_checkpoint", ("eager", CHECKPOINTED)),
    "nonfinite": ("check_nonfinite", ("eager",)),
    "shapes-fsdp": ("distributed_shapes_worker.check_parity", ("fsdp", "eager", {**SHAPED_NOT_IN_PARITY, **GROUPS})),
    "shapes-state": ("distributed_shapes_worker.check_sharded_state", ("eager",)),
    "shapes-checkpoint": ("check_checkpoint", ("eager", SHAPED_CHECKPOINTED)),
}
# The collectives inside the compiled graph: reductions, Muon's gather, and the all-reduces and
# gathers of shape-aware specs. Under DDP the compiled step is the single-process one, which
# test_stdlib_parity covers.
COMPILED_CHECKS = {
    "compiled": ("check_parity", ("fsdp", "compiled", ["lamb", "muon", "sgd_metric", "clip_grad_norm(adam)",
                                                         "deo(adam)", "adam"])),
    "shapes-compiled": ("distributed_shapes_worker.check_parity",
                        ("fsdp", "compiled", {name: SHAPED[name] for name in ("adafactor", "shampoo")} | GROUPS)),
}


def spawn(checks: dict) -> tuple[set, Exception | None]:
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


def outcome_once(checks: dict, tmp_path_factory, worker_id: str) -> tuple[set, str | None]:
    """The outcome of ``checks`` (EAGER_CHECKS or COMPILED_CHECKS), run once per test session,
    for the session fixtures of tests/conftest.py. The tests that read it share an
    xdist_group, which keeps them on one worker under ``--dist loadgroup`` (the project's
    default; tests/conftest.py works around pytest-dev/pytest-xdist#1386). Under another
    distribution the first worker that needs them runs them and leaves the outcome in the
    session's shared folder, and a worker that comes later waits for it and reads it."""
    if worker_id == "master":  # no xdist
        passed, error = spawn(checks)
        return passed, None if error is None else str(error)
    name = "compiled" if checks is COMPILED_CHECKS else "eager"
    outcome = tmp_path_factory.getbasetemp().parent / f"distributed-{name}-checks.json"
    with filelock.FileLock(f"{outcome}.lock"):
        if not outcome.is_file():
            passed, error = spawn(checks)
            outcome.write_text(json.dumps({"passed": sorted(passed), "error": None if error is None else str(error)}))
        saved = json.loads(outcome.read_text())
    return set(saved["passed"]), saved["error"]


def assert_passed(outcome: tuple, name: str) -> None:
    passed, error = outcome
    assert name in passed, f"{name} failed or did not run:\n{error}"
