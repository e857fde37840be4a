"""Shape-aware specs and groups.* reductions under torch.distributed: 2 CPU processes (gloo),
float64, STEPS steps against one process stepping on the whole batch, to 1e-10.

Under FSDP2 each process holds its rows of every matrix (a vector's part of its entries): row
reductions stay local, column and whole-tensor reductions are all-reduced, products and
decompositions gather their operands whole (compiler/sharded.py). Under DDP the step is the
single-process one. Prodigy with two groups checks that a groups.* total is whole over the shards
before the groups are added. A torch.distributed.checkpoint of the sharded states resumes bit for
bit. The checks are in distributed_shapes_worker.py; the eager ones run in the pair of processes
that tests/test_distributed.py's use (tests/distributed_checks.py), where the FSDP2 parity of
every stdlib spec already runs the shape-aware stdlib specs.
"""
import pytest

from distributed_checks import assert_passed

pytestmark = [pytest.mark.skipif(not __import__("torch").distributed.is_available(),
                                 reason="torch built without torch.distributed")]

# one xdist worker runs every test that reads the eager checks (see tests/distributed_checks.py)
together = pytest.mark.xdist_group("distributed")


@together
@pytest.mark.parametrize("check", ["shapes-fsdp", "shapes-state", "shapes-checkpoint"])
def test_shape_aware_and_groups_specs_match_one_process(check, distributed_eager_checks):
    assert_passed(distributed_eager_checks, check)


@pytest.mark.compiled
@pytest.mark.xdist_group("distributed_compiled")
def test_compiled_sharded_shape_aware_steps_match_one_process(distributed_compiled_checks):
    """The all-reduces and gathers inside the compiled graph."""
    assert_passed(distributed_compiled_checks, "shapes-compiled")
