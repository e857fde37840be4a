"""Muon's orthogonalisation, ``tensor.orthogonalize``: the quintic Newton-Schulz iteration
on every tensor of a flat bucket, registered as one custom operator.

Inductor treats a custom operator as an opaque call, so a compiled step keeps one graph with
no break, and does not unroll and compile the iteration for every distinct tensor shape.
Unrolled, the compile grew with the number of shapes (several seconds each on our CPU, and
minutes for a convolutional network's weights) while the step gained nothing: the work is in
the batched matrix products, which both forms hand to the same BLAS calls. ``baddbmm``
folds the iteration's scalings into those calls, so the eager form needs no extra passes.
"""
from __future__ import annotations

import torch

from .collectives import gather_full
from .ir import NEWTON_SCHULZ, NEWTON_SCHULZ_STEPS



def newton_schulz(x: torch.Tensor) -> torch.Tensor:
    """The iteration on a batch of matrices (k, rows, columns): normalised by the Frobenius
    norm (+ 1e-7), worked in the wide orientation, five quintic steps."""
    a, b, c = NEWTON_SCHULZ
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + 1e-7)
    for _ in range(NEWTON_SCHULZ_STEPS):
        gram = x @ x.mT
        polynomial = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A^2
        x = torch.baddbmm(x, polynomial, x, beta=a)  # a X + (b A + c A^2) X
    return x.mT if tall else x


@torch.library.custom_op("gradspec::orthogonalize", mutates_args=())
def _orthogonalize(flat: torch.Tensor, shapes: list[int], bf16: bool, numels: list[int], ranges: list[int],
                   slots: list[int], world: int, group_name: str) -> torch.Tensor:
    """Each tensor of a flat bucket, seen as its (rows, columns) matrix, orthogonalised.
    Tensors of one shape go through the iteration together as a batch. A sharded bucket
    gathers every full matrix, runs the iteration on each rank (the same numbers
    everywhere) and keeps its own part. Arguments: see :func:`operator_args` (``world`` = 0
    for a bucket held whole)."""
    pairs = list(zip(shapes[0::2], shapes[1::2]))
    if world == 0:
        held = [(0, rows * cols) for rows, cols in pairs]
        full = None
    else:
        held = list(zip(ranges[0::2], ranges[1::2]))
        full = gather_full(flat, tuple(numels), tuple(held), tuple(slots), world, group_name)
    starts = [0]  # where each tensor's held part sits in the flat bucket
    for start, stop in held:
        starts.append(starts[-1] + stop - start)
    out = torch.empty_like(flat)
    by_shape: dict = {}
    for i, shape in enumerate(pairs):
        by_shape.setdefault(shape, []).append(i)
    for (rows, cols), members in by_shape.items():
        first, last = members[0], members[-1]
        whole = full is None and members == list(range(first, last + 1))  # one run: a view, no stack
        if whole:
            x = flat[starts[first]:starts[last + 1]].view(len(members), rows, cols)
        else:
            x = torch.stack([(full[i] if full is not None else flat[starts[i]:starts[i + 1]]).view(rows, cols)
                             for i in members])
        x = newton_schulz(x.to(torch.bfloat16) if bf16 else x)
        if whole:  # copy_ converts back to the bucket's dtype on the way
            out[starts[first]:starts[last + 1]].view(len(members), rows, cols).copy_(x)
            continue
        for i, result in zip(members, x.unbind()):
            start, stop = held[i]
            out[starts[i]:starts[i + 1]].copy_(result.reshape(-1)[start:stop])
    return out


@_orthogonalize.register_fake
def _(flat, shapes, bf16, numels, ranges, slots, world, group_name):
    return torch.empty_like(flat)


def operator_args(shapes: tuple, bf16: bool, sharded: tuple | None = None) -> tuple:
    """The arguments of ``torch.ops.gradspec.orthogonalize`` after the flat bucket, for tensors
    seen as (rows, columns) matrices (``shapes``), in bfloat16 when ``bf16`` else in the
    bucket's dtype; ``sharded``: Sharding.gather_args of a sharded bucket. Plain lists, so
    the step's FX graph holds the operator call itself."""
    numels, ranges, slots, world, group = sharded if sharded is not None else ((), (), (), 0, "")
    return ([n for shape in shapes for n in shape], bf16, list(numels), [n for held in ranges for n in held],
            list(slots), world, group)
