"""How a parameter group is spread over processes, and the collectives a step needs.

gradspec runs inside torch.distributed rather than beside it:

* Under **DDP** every process holds every parameter and sees the all-reduced gradient, so
  the compiled step runs unchanged on each. Only gradients the optimizer computes itself
  (probes: ``grad_at``, ``hvp``, Sophia-G's sampled labels, Lanczos) bypass DDP's hooks;
  the closure driver averages those over the data-parallel group.
* Under **FSDP2** (``fully_shard``) parameters are DTensors sharded on dim 0. A bucket holds
  the local shards; elementwise work stays local, and every reduction (``tensor.*`` and
  ``global.*``, ``onto``'s coefficients, the non-finite check) is all-reduced over the shard
  group inside the compiled graph with functional collectives, so it is still one graph
  per bucket with no graph break. Muon's Newton-Schulz all-gathers each full matrix, runs
  it on every rank, and keeps the local rows; so do the matrix products and decompositions
  of shape-aware specs (compiler/sharded.py), whose row reductions stay local.

Random draws (``randn()``, Lanczos starts, sampled labels) are made at the full size on
every process from the same seeded generator and sliced, so a sharded run draws the numbers
a single process would.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..compiler.collectives import Sharding

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = Replicate = Shard = None


def is_sharded(tensor) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor):
    """The process's own part of a tensor: a DTensor's local shard, else the tensor."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def sharding_of(params: list) -> Sharding | None:
    """The sharding of a bucket's parameters (all DTensors or none), or None for plain ones.
    Only FSDP2's layout is supported: Shard(0) on one mesh dimension, Replicate elsewhere."""
    flags = {is_sharded(p) for p in params}
    if flags == {False}:
        return None
    if flags != {True}:
        raise ValueError("a parameter group mixes DTensor and plain parameters; give each kind its own group")
    mesh, placements = params[0].device_mesh, params[0].placements
    for p in params:
        if p.device_mesh != mesh or p.placements != placements:
            raise ValueError("the DTensor parameters of a group must share one mesh and placement, got "
                             f"{placements} and {p.placements}; give each its own group")
    shard_dims = [i for i, placement in enumerate(placements) if not placement.is_replicate()]
    if len(shard_dims) != 1 or placements[shard_dims[0]] != Shard(0):
        raise ValueError(f"gradspec supports DTensor parameters sharded on dim 0 along one mesh dimension "
                         f"(FSDP2's fully_shard, HSDP), got placements {placements}")
    dim = shard_dims[0]
    group = mesh.get_group(dim)
    return Sharding(group.group_name, mesh.get_local_rank(dim), mesh.size(dim), tuple(tuple(p.shape) for p in params))


def state_view(view: torch.Tensor, param, extra_leading: int = 0, shape: tuple | None = None,
               cut: bool = True):
    """A state's local view as the DTensor torch.distributed.checkpoint expects (same mesh and
    placements as the parameter; a subspace state's (k, *shape) is sharded one dim later). A
    state shaped unlike the parameter gives its whole ``shape``: ``cut`` along its first
    dimension as the parameter is (Adafactor's per-row R), else kept whole by every process
    (its per-column C: Replicate)."""
    if not is_sharded(param):
        return view
    if not cut:
        placements = tuple(Replicate() for _ in param.placements)
        return DTensor.from_local(view, param.device_mesh, placements, run_check=False, shape=view.shape,
                                  stride=view.stride())
    placements = tuple(Shard(p.dim + extra_leading) if isinstance(p, Shard) else p for p in param.placements)
    shape = tuple(view.shape[:extra_leading]) + tuple(param.shape if shape is None else shape)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(view, param.device_mesh, placements, run_check=False, shape=shape, stride=stride)


def data_parallel_group(process_group, params: list):
    """The group over which the closure driver averages gradients it computes itself:
    ``"auto"`` is the default group when torch.distributed runs more than one process and
    the parameters are plain (DDP); FSDP2 reduces its gradients in backward, so none."""
    if process_group != "auto":
        return process_group
    if any(is_sharded(p) for p in params):
        return None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def batch_group(data_parallel, sharded: bool):
    """The processes whose batches make one step's batch (their losses are averaged, and
    labels are sampled over their rows): the DDP group, or under FSDP2 every process (its
    mesh spans the job; HSDP's replicas hold other batches too)."""
    if sharded and dist.is_initialized():
        return dist.group.WORLD
    return data_parallel


# ---- collectives outside the compiled step (the closure driver, the checks before a step)

def shard_group(sharding: Sharding | None):
    """The process group a sharding's collectives run over, or None."""
    if sharding is None:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group
    return _resolve_process_group(sharding.group_name)


def average(tensors: list, group) -> list:
    """The mean of each tensor over ``group``, in one all-reduce."""
    if group is None or not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    out, start = [], 0
    for t in tensors:
        out.append(flat[start:start + t.numel()].view_as(t))
        start += t.numel()
    return out


def batch_offset(rows: int, group, device) -> tuple[int, int]:
    """(rows before this process, rows in all) of a batch split over ``group`` in rank order."""
    if group is None:
        return 0, rows
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, torch.tensor([rows], dtype=torch.int64, device=device), group=group)
    counts = [int(c.item()) for c in counts]
    return sum(counts[:dist.get_rank(group)]), sum(counts)


def any_process(flag: bool, group) -> bool:
    """Whether ``flag`` holds on any process of ``group`` (all of them learn the answer)."""
    if group is None:
        return flag
    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item())
