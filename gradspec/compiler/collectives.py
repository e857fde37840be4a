"""What a compiled step knows of torch.distributed: how a bucket's tensors are cut over a
shard group (:class:`Sharding`, part of what a step is specialised to) and the functional
collectives the lowering puts into the graph, which Dynamo traces without a graph break.

They belong to the compiler, not the runtime: the runtime decides *whether* a group is
sharded (``runtime/distributed.py``), the compiler only emits these ops.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sharding:
    """How each tensor of a bucket is cut along dim 0 over a shard group (hashable: it is
    part of what a compiled step is specialised to)."""

    group_name: str
    rank: int  # this process's coordinate in the shard group
    world: int
    global_shapes: tuple  # each tensor's full shape, in bucket order

    def rows(self, index: int) -> tuple[int, int]:
        """(first row, row count) of tensor ``index`` held here: torch.chunk's split, as FSDP2
        and DTensor's Shard(0) cut it (chunks of ceil(rows / world), the last ones short or
        empty)."""
        rows = self.global_shapes[index][0] if self.global_shapes[index] else 1
        chunk = -(-rows // self.world)
        first = min(self.rank * chunk, rows)
        return first, max(0, min(chunk, rows - first))

    def row_size(self, index: int) -> int:
        shape = self.global_shapes[index]
        return int(torch.Size(shape[1:]).numel()) if shape else 1

    def slot(self, index: int) -> int:
        """Elements in a full chunk of tensor ``index``: what every rank pads its part to."""
        rows = self.global_shapes[index][0] if self.global_shapes[index] else 1
        return -(-rows // self.world) * self.row_size(index)

    def gather_args(self) -> tuple:
        """What :func:`gather_full` needs besides the flat buffer, as plain values (FX graphs
        take literals, not objects)."""
        count = len(self.global_shapes)
        return (tuple(int(torch.Size(s).numel()) for s in self.global_shapes),
                tuple(map(self.local_range, range(count))), tuple(map(self.slot, range(count))),
                self.world, self.group_name)

    def local_range(self, index: int) -> tuple[int, int]:
        """The slice of the tensor's flattened full value held here."""
        first, count = self.rows(index)
        size = self.row_size(index)
        return first * size, (first + count) * size



# ---- collectives inside a compiled step (functional: traced by Dynamo, no graph break)

def all_reduce(tensor: torch.Tensor, op: str, group_name: str) -> torch.Tensor:
    """``op`` ("sum", "max", "min") of ``tensor`` over the shard group."""
    functional = torch.ops._c10d_functional
    return functional.wait_tensor(functional.all_reduce(tensor.contiguous(), op, group_name))


def gather_full(flat: torch.Tensor, numels: tuple, ranges: tuple, slots: tuple, world: int,
                group_name: str) -> list:
    """Every tensor of a sharded bucket in full (flat, ``numels`` long), from one all-gather.
    ``ranges``: the slice of each flattened full tensor held here; ``slots``: each tensor's
    chunk in elements, to which every rank pads its slice."""
    pieces, offset = [], 0
    for (start, stop), slot in zip(ranges, slots):
        mine = flat[offset:offset + stop - start]
        offset += stop - start
        if stop - start < slot:
            mine = torch.cat([mine, mine.new_zeros(slot - (stop - start))])
        pieces.append(mine)
    functional = torch.ops._c10d_functional
    gathered = functional.wait_tensor(functional.all_gather_into_tensor(torch.cat(pieces), world, group_name))
    gathered = gathered.view(world, -1)
    out, first = [], 0
    for slot, numel in zip(slots, numels):
        out.append(gathered[:, first:first + slot].reshape(-1)[:numel])
        first += slot
    return out


def gather_along(part: torch.Tensor, dim: int, size: int, chunk: int, world: int, group_name: str) -> torch.Tensor:
    """A tensor made whole along ``dim`` from every process's ``part`` of it, cut as
    :meth:`Sharding.rows` cuts (chunks of ``chunk``, the last ones short or empty): one
    all-gather of the parts padded to ``chunk``. The short chunks are the last, so the whole
    tensor is the first ``size`` entries of the gathered ones."""
    moved = part.movedim(dim, 0)
    if moved.shape[0] < chunk:
        moved = torch.cat([moved, moved.new_zeros((chunk - moved.shape[0], *moved.shape[1:]))])
    functional = torch.ops._c10d_functional
    gathered = functional.wait_tensor(functional.all_gather_into_tensor(moved.contiguous(), world, group_name))
    return gathered[:size].movedim(0, dim)
