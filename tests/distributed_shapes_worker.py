"""The processes behind tests/test_distributed_shapes.py: shape-aware specs (axis reductions,
states shaped unlike the parameter, matrix algebra) and groups.* reductions under DDP and FSDP2,
each ``check_*`` run on every rank of a 2-process gloo group (CPU, float64).

The model, data and training loop are tests/distributed_worker.py's: the batch is split in rank
order, so one process stepping on the whole batch is the reference, and FSDP2 cuts the model
unevenly (a 7-row matrix as 4 + 3 rows, a 3-row one as 2 + 1, a vector of 7 as 4 + 3, a
(1,)-parameter whose part on rank 1 is empty). tests/distributed_worker.py's ``main`` runs
these checks ("distributed_shapes_worker.check_parity"), in the process group of its own.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist

import gradspec
from distributed_worker import STEPS, Model, close, full, mine, shard, shared, train

# every shape-aware stdlib spec, with what each exercises under FSDP2
SHAPED = {
    "adafactor": {},  # per-row state (local), per-column state and tensor means (all-reduced)
    "gc(sgd)": {"lr": 0.05},  # row means: local
    "agc(adam)": {},  # row norms (local) and a vector's whole norm (all-reduced)
    "shampoo": {"lr": 0.01},  # L (rows x rows) kept cut by rows and gathered for G G^T and its root
    # Distributed Shampoo's blocks (4 x 4, 4 x 2, 3 x 4, 3 x 2 of the 7 x 6 matrix), cut from the
    # gathered tensors, each process keeping every block's statistics; grafted to Adam per block
    "shampoo(max_preconditioner_dim = 4, graft = true, beta1 = 0.9)": {"lr": 0.01},
    "muon(ns_bfloat16 = false)": {},  # the iteration written in the language: gathered, as the kernel gathers
    "muon_adamw": {},  # the iteration on matrices, AdamW on vectors
}


def _groups(model, spec: str):
    """Two groups, the vectors exempt from weight decay, for prodigy (groups.* reductions)."""
    params = list(model.parameters())
    if spec != "prodigy":
        return params
    return [{"params": [p for p in params if p.dim() >= 2]},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def _optimizer(model, spec: str, backend: str, hyper: dict, process_group="auto"):
    return gradspec.Optimizer(_groups(model, spec), spec, backend=backend, seed=3, process_group=process_group,
                              **hyper)


def _reference(spec: str, hyper: dict, backend: str) -> torch.Tensor:
    model = Model().double()
    train(model, _optimizer(model, spec, backend, hyper, process_group=None), slice(None), STEPS)
    return full(model)


def check_parity(mode: str, backend: str, specs: dict):
    """Each spec for STEPS steps under ``mode`` ("ddp" or "fsdp") against one process."""
    from torch.nn.parallel import DistributedDataParallel
    failures = []
    expected_by_spec = shared({("shaped", spec, backend): functools.partial(_reference, spec, hyper, backend)
                               for spec, hyper in specs.items()})
    for spec, hyper in specs.items():
        model = Model().double()
        wrapped = DistributedDataParallel(model) if mode == "ddp" else shard(model)
        opt = _optimizer(wrapped, spec, backend, hyper)
        train(wrapped, opt, mine(), STEPS)
        got = full(model)
        try:
            close(got, expected_by_spec["shaped", spec, backend], f"{spec} under {mode} ({backend})")
            assert not torch.equal(got, full(Model().double())), f"{spec} did not train"
        except AssertionError as error:
            failures.append(str(error))
    assert not failures, "\n".join(failures)


def check_sharded_state(backend: str):
    """Under FSDP2 each process keeps its rows of a per-row state and the whole of a per-column
    one, and optimizer.state shows both as DTensors of the whole shape (adafactor's R and C on
    the 7 x 6 matrix); gathered, they are one process's states."""
    model = shard(Model().double())
    opt = gradspec.Optimizer(model.parameters(), "adafactor", backend=backend)
    train(model, opt, mine(), 3)
    reference_model = Model().double()
    reference = gradspec.Optimizer(reference_model.parameters(), "adafactor", backend=backend, process_group=None)
    train(reference_model, reference, slice(None), 3)
    weight, reference_weight = model.first.weight, reference_model.first.weight
    for name, local_rows in (("R", [4, 3][dist.get_rank()]), ("C", 6)):
        state = opt.state[weight][name]
        assert tuple(state.shape) == tuple(reference.state[reference_weight][name].shape), name
        assert state.to_local().shape[0] == local_rows, (name, state.to_local().shape)
        close(state.full_tensor(), reference.state[reference_weight][name], f"state {name}")
