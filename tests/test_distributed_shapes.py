"""Shape-aware specs and groups.* reductions under torch.distributed: 2 CPU processes (gloo),
float64, 20 steps against one process stepping on the whole batch, to 1e-10.

Under FSDP2 each process holds its rows of every matrix (a vector's part of its entries): row
reductions stay local, column and whole-tensor reductions are all-reduced, products and
decompositions gather their operands whole (compiler/sharded.py). Under DDP the step is the
single-process one. Prodigy with two groups checks that a groups.* total is whole over the shards
before the groups are added. A torch.distributed.checkpoint of the sharded states resumes bit for
bit. The checks are in distributed_shapes_worker.py.
"""
import os
import tempfile

import pytest
import torch.multiprocessing as mp

import distributed_shapes_worker
from distributed_shapes_worker import SHAPED

pytestmark = [pytest.mark.skipif(not __import__("torch").distributed.is_available(),
                                 reason="torch built without torch.distributed"),
              pytest.mark.xdist_group("distributed_shapes")]  # one worker: the module's fixture starts once

GROUPS = {"prodigy": {"weight_decay": 0.1}}


def _spawn(checks: dict) -> tuple[set, Exception | None]:
    """Run ``checks`` ({name: (check, args)}) in one pair of processes; the names of those that
    passed on both ranks, and the error that stopped the rest."""
    with tempfile.TemporaryDirectory() as folder:
        rendezvous = "file://" + os.path.join(folder, "rendezvous")
        passed_folder = os.path.join(folder, "passed")
        os.mkdir(passed_folder)
        triples = [(name, check, args) for name, (check, args) in checks.items()]
        try:
            mp.spawn(distributed_shapes_worker.main, args=(2, rendezvous, triples, passed_folder), nprocs=2,
                     join=True)
            error = None
        except Exception as raised:  # spawn's ProcessRaisedException carries the rank's traceback
            error = raised
        return set(os.listdir(passed_folder)), error


# Under DDP every rank steps as one process does: tests/test_distributed.py checks every stdlib
# spec, the shape-aware ones included, under DDP and FSDP2; these add what only shapes bring.
CHECKS = {
    "fsdp": ("check_parity", ("fsdp", "eager", {**SHAPED, **GROUPS})),
    "state": ("check_sharded_state", ("eager",)),
    # per-row states saved as Shard(0) DTensors, per-column ones and matrices as Replicate
    "checkpoint": ("check_checkpoint", ("eager", ["adafactor", "shampoo"])),
}


@pytest.fixture(scope="module")
def eager_outcome():
    """The eager checks, in one process group for the module (starting processes costs more
    than most checks)."""
    return _spawn(CHECKS)


def _assert_passed(outcome, name):
    passed, error = outcome
    assert name in passed, f"{name} failed or did not run:\n{error}"


@pytest.mark.parametrize("check", list(CHECKS))
def test_shape_aware_and_groups_specs_match_one_process(check, eager_outcome):
    _assert_passed(eager_outcome, check)


@pytest.mark.compiled
def test_compiled_sharded_shape_aware_steps_match_one_process():
    """The all-reduces and gathers inside the compiled graph."""
    specs = {name: SHAPED[name] for name in ("adafactor", "shampoo")} | GROUPS
    _assert_passed(_spawn({"compiled": ("check_parity", ("fsdp", "compiled", specs))}), "compiled")
