"""The lowering of ``blocks B { ... }``: a spec's body once per block of each tensor's matrix
view, computed as batched work over the blocks of one shape.

A tensor's matrix view (rows x cols) is cut into blocks of at most B x B: row blocks of B from
the top, the last one shorter, and column blocks of B from the left, likewise (Distributed
Shampoo's blocking). A tensor shape gives at most four block shapes (B x B, B x c, r x B,
r x c). Every block of one shape and shape class in a bucket, whichever tensor it comes from,
is one batch (count, a, b), a :class:`TileSegment`, which the shaped lowerer treats as it treats
a run of equal-shape tensors: inside it ``rows`` and ``cols`` are the block's and a
``tensor.f`` reduction is one value per block. So the body's products and decompositions are
one batched call per block shape, and the step's graph grows with the number of block shapes
of the bucket, never with the number of tensors or blocks.

``tile(x)`` gathers x's blocks into the batches; ``untile(y)`` puts each block's values back in
its place. A state declared inside a block keeps, in the tensor's part of its flat buffer, the
values of the tensor's blocks piece after piece (the B x B blocks, then the right edge, the
bottom edge and the corner), each piece's blocks in row-major order, so a tensor whose blocks
all have one shape reads and writes its state as one view.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from .ir import COLS, ROWS, dims_of
from .lowerer import _is_python, compute_dtype, state_input


@dataclass(frozen=True)
class Piece:
    """The blocks of one shape in each tensor of a segment (a run of equal-shape tensors, see
    compiler/shaped.py): ``row_blocks`` x ``col_blocks`` blocks of ``rows`` x ``cols`` per tensor,
    from (row_start, col_start) of its matrix. ``row_part`` and ``col_part`` say which band it is
    (0: the full blocks, 1: the shorter last one), to put the pieces back together."""

    segment: object  # shaped.Segment
    row_start: int
    row_blocks: int
    rows: int
    col_start: int
    col_blocks: int
    cols: int
    row_part: int
    col_part: int

    @property
    def per_tensor(self) -> int:
        return self.row_blocks * self.col_blocks

    @property
    def count(self) -> int:
        return self.segment.count * self.per_tensor

    @property
    def whole(self) -> bool:
        """One block per tensor, the whole matrix: its blocks are the tensors' values as they are."""
        return self.per_tensor == 1 and (self.rows, self.cols) == (self.segment.rows, self.segment.cols)


@dataclass(frozen=True)
class TileSegment:
    """Every block of one shape (rows x cols) and shape class in a bucket, cut at block size
    ``block``: ``count`` blocks, batched as (count, rows, cols). It has a segment's interface
    (size, batch), so the shaped lowerer computes a block's values as it does a tensor's."""

    block: int
    rows: int
    cols: int
    shape_class: tuple  # the segment's (Segment.shape_class)
    pieces: tuple  # Piece, in bucket order
    starts: tuple  # where each piece's blocks begin in the batch, and the end

    @property
    def count(self) -> int:
        return self.starts[-1]

    def size(self, dim) -> int:
        return self.rows if dim == ROWS else self.cols if dim == COLS else int(dim)

    def batch(self, dims) -> tuple:
        return (self.count, self.size(dims[0]), self.size(dims[1]))


class BlockPlan:
    """A bucket's blocks at one block size: the tile segments, and for each segment of the bucket
    its pieces in its tensors' block order, as (tile segment, index of the piece there)."""

    def __init__(self, segments: list, block: int):
        groups: dict = {}
        for seg in segments:
            for piece in _pieces(seg, block):
                groups.setdefault((piece.rows, piece.cols, seg.shape_class), []).append(piece)
        self.tiles = []
        self.by_segment: dict = {seg: [] for seg in segments}
        for (rows, cols, shape_class), pieces in groups.items():
            starts = [0]
            for piece in pieces:
                starts.append(starts[-1] + piece.count)
            tile = TileSegment(block, rows, cols, shape_class, tuple(pieces), tuple(starts))
            self.tiles.append(tile)
            for k, piece in enumerate(pieces):
                self.by_segment[piece.segment].append((tile, k))
        for entries in self.by_segment.values():  # the tensor's own order: bands top to bottom, left to right
            entries.sort(key=lambda entry: (entry[0].pieces[entry[1]].row_part, entry[0].pieces[entry[1]].col_part))


def _pieces(seg, block: int) -> list:
    """The pieces of a segment's tensors, in their block order (main, right, bottom, corner)."""
    def bands(length):
        full, rest = divmod(length, block)
        return ([(0, full, block, 0)] if full else []) + ([(full * block, 1, rest, 1)] if rest else [])
    return [Piece(seg, r0, nr, a, c0, nc, b, rp, cp)
            for r0, nr, a, rp in bands(seg.rows) for c0, nc, b, cp in bands(seg.cols)]


def _sizes(piece_or_tile, dims) -> tuple:
    """A per-block shape (``dims``, in the block's rows and cols) at a block of this shape."""
    return tuple(piece_or_tile.rows if d == ROWS else piece_or_tile.cols if d == COLS else int(d) for d in dims)


def state_shape(seg, block: int, dims) -> tuple[tuple, int]:
    """How ``optimizer.state[p]`` shows a per-block state of per-block shape ``dims`` for a tensor
    of segment ``seg``, and its number of values: a tensor that is one block shows the block's
    shape (a vector as a vector, a per-block value as a 0-d tensor), one whose blocks all have one
    shape shows (blocks, shape), any other the flat run of its blocks' values."""
    pieces = _pieces(seg, block)
    shapes = [_sizes(piece, dims) for piece in pieces]
    numel = sum(piece.per_tensor * a * b for piece, (a, b) in zip(pieces, shapes))
    if len(pieces) != 1:
        return (numel,), numel
    a, b = shapes[0]
    shown = () if (a, b) == (1, 1) and dims == (1, 1) else (a,) if dims[1] == 1 else (b,) if dims[0] == 1 else (a, b)
    return (shown if pieces[0].per_tensor == 1 else (pieces[0].per_tensor, *shown)), numel


class BlockLowering:
    """What the shaped lowerer does for blocks (a mixin of compiler/shaped.py's ShapedLowerer,
    which provides value, call, _full, load, segments, layouts and the program)."""

    def block_plan(self, bucket: int, block: int) -> BlockPlan:
        plans = self.__dict__.setdefault("_block_plans", {})
        if (bucket, block) not in plans:
            plans[(bucket, block)] = BlockPlan(self.segments[bucket], block)
        return plans[(bucket, block)]

    @property
    def block_states(self) -> dict:
        return self.program.state_blocks or {}

    # ---- crossing a block's edge
    def tile_value(self, node, bucket: int, tile: TileSegment):
        """``tile(x)`` over a tile segment: the blocks of x, gathered from their tensors."""
        x, dims = node.args[0], dims_of(node.args[0])
        parts = []
        for piece in tile.pieces:
            value = self.value(x, bucket, segment=piece.segment)
            number = _is_python(value)  # a size read outside (tensor.rows): one number per tensor
            value = self._full(value, piece.segment, dims)
            if number:
                value = self.call(torch.Tensor.to, value, compute_dtype(self.buckets[bucket].dtype))
            parts.append(self._cut(value, piece, dims))
        return parts[0] if len(parts) == 1 else self.call(torch.cat, parts, 0)

    def _cut(self, x, piece: Piece, dims):
        """One piece's blocks of a segment's value x of per-tensor shape ``dims``, as (blocks, a, b);
        a per-tensor or per-row value gives each block its part, stretched no further."""
        if piece.whole:
            return x
        count, nr, nc = piece.segment.count, piece.row_blocks, piece.col_blocks
        a = piece.rows if dims[0] == ROWS else 1
        b = piece.cols if dims[1] == COLS else 1
        width = piece.segment.cols if dims[1] == COLS else 1
        if dims[0] == ROWS:
            x = self.call(operator.getitem, x, (slice(None), slice(piece.row_start, piece.row_start + nr * a)))
            x = self.graph.call_method("reshape", (x, (count, nr, a, width)))
        else:
            x = self.graph.call_method("reshape", (x, (count, 1, 1, width)))
        if dims[1] == COLS:
            x = self.call(operator.getitem, x, (Ellipsis, slice(piece.col_start, piece.col_start + nc * b)))
            x = self.graph.call_method("reshape", (x, (count, x_rows(dims, nr), a, nc, b)))
        else:
            x = self.graph.call_method("reshape", (x, (count, x_rows(dims, nr), a, 1, 1)))
        x = self.graph.call_method("expand", (x, (count, nr, a, nc, b)))
        x = self.graph.call_method("permute", (x, (0, 1, 3, 2, 4)))
        return self.graph.call_method("reshape", (x, (count * nr * nc, a, b)))

    def untile_value(self, node, bucket: int, seg):
        """``untile(y)`` over a segment: each of its tensors' blocks of y, put back in place."""
        y = node.args[0]
        bands: dict = {}
        for tile, k in self.block_plan(bucket, node.attr.size).by_segment[seg]:
            piece = tile.pieces[k]
            value = self._full(self.value(y, bucket, segment=tile), tile, (ROWS, COLS))
            if len(tile.pieces) > 1:
                value = self.call(operator.getitem, value, slice(tile.starts[k], tile.starts[k + 1]))
            if not piece.whole:
                count, nr, nc, a, b = piece.segment.count, piece.row_blocks, piece.col_blocks, piece.rows, piece.cols
                value = self.graph.call_method("reshape", (value, (count, nr, nc, a, b)))
                value = self.graph.call_method("permute", (value, (0, 1, 3, 2, 4)))
                value = self.graph.call_method("reshape", (value, (count, nr * a, nc * b)))
            bands.setdefault(piece.row_part, []).append(value)
        if not bands:  # a tensor with no elements
            return self.call(torch.zeros, (seg.count, seg.rows, seg.cols),
                             dtype=compute_dtype(self.buckets[bucket].dtype),
                             device=self.graph_device(self.ph[f"b{bucket}_param"]))
        rows = [band[0] if len(band) == 1 else self.call(torch.cat, band, 2) for band in bands.values()]
        return rows[0] if len(rows) == 1 else self.call(torch.cat, rows, 1)

    # ---- states kept per block
    def _state_spans(self, bucket: int, name: str, seg, dims) -> list:
        """(tile segment, piece index, offset in the tensor's part, length per tensor, per-block
        shape) of each piece of a segment's tensors, for a per-block state of shape ``dims``."""
        out, offset = [], 0
        for tile, k in self.block_plan(bucket, self.block_states[name].size).by_segment[seg]:
            piece = tile.pieces[k]
            shape = _sizes(piece, dims)
            length = piece.per_tensor * shape[0] * shape[1]
            out.append((tile, k, offset, length, shape))
            offset += length
        return out

    def block_state_value(self, node, bucket: int, tile: TileSegment):
        """A per-block state over a tile segment: views of its buffer, where one piece fills each
        tensor's part; gathered otherwise."""
        name, dims = node.attr, dims_of(node)
        buffer = self.load(self.ph[state_input(bucket, name)], bucket, state=True)
        layout = self.layouts[bucket][name]
        parts = []
        for k, piece in enumerate(tile.pieces):
            seg = piece.segment
            start, end = layout.offsets[seg.first], layout.offsets[seg.first + seg.count]
            spans = self._state_spans(bucket, name, seg, dims)
            _, _, offset, length, (a, b) = next(s for s in spans if s[0] == tile and s[1] == k)
            part = self.call(operator.getitem, buffer, slice(start, end))
            if length * seg.count != end - start:  # other pieces share each tensor's part
                part = self.graph.call_method("reshape", (part, (seg.count, (end - start) // seg.count)))
                part = self.call(operator.getitem, part, (slice(None), slice(offset, offset + length)))
            parts.append(self.graph.call_method("reshape", (part, (piece.count, a, b))))
        return parts[0] if len(parts) == 1 else self.call(torch.cat, parts, 0)

    def block_next_flat(self, name: str, bucket: int, old, programs_of):
        """A per-block state's next value over the bucket, flat in its layout; None where every
        class keeps it. ``programs_of(seg)`` is the program of a segment's shape class."""
        kept = [programs_of(seg).next.get(name) for seg in self.segments[bucket]]
        if all(node is None or (node.op == "state" and node.attr == name) for node in kept):
            return None
        return self._block_flat(name, bucket, programs_of, lambda program: program.next[name], old)

    def block_initial_flat(self, name: str, programs_of):
        return self._block_flat(name, 0, programs_of, lambda program: program.init[name], None)

    def _block_flat(self, name, bucket, programs_of, node_of, old):
        layout = self.layouts[bucket][name]
        dtype = compute_dtype(self.buckets[bucket].dtype)
        pieces = []
        for seg in self.segments[bucket]:
            program = programs_of(seg)
            if name not in program.state_names:
                continue  # this class keeps no such state: no room in the buffer
            node, dims = node_of(program), program.state_dims[name]
            if old is not None and node.op == "state" and node.attr == name:
                start, end = layout.offsets[seg.first], layout.offsets[seg.first + seg.count]
                pieces.append(self.call(operator.getitem, old, slice(start, end)))
                continue
            columns = []
            for tile, k, _, length, _ in self._state_spans(bucket, name, seg, dims):
                value = self.value(node, bucket, segment=tile) if dims_of(node) is not None else \
                    self.value(node, bucket)
                value = self._full(value, tile, dims)
                if len(tile.pieces) > 1:
                    value = self.call(operator.getitem, value, slice(tile.starts[k], tile.starts[k + 1]))
                columns.append(self.graph.call_method("reshape", (value, (seg.count, length))))
            if not columns:  # tensors with no elements have no blocks, and no room in the buffer
                continue
            joined = columns[0] if len(columns) == 1 else self.call(torch.cat, columns, 1)
            pieces.append(self.graph.call_method("reshape", (self.call(torch.Tensor.to, joined, dtype), (-1,))))
        if not pieces:
            return old if old is not None else self.call(torch.zeros, 0)
        return pieces[0] if len(pieces) == 1 else self.call(torch.cat, pieces)


def x_rows(dims, row_blocks: int) -> int:
    """The row-block axis of a value being cut: the blocks' count for a per-row value, 1 (to be
    stretched) for one with a single row."""
    return row_blocks if dims[0] == ROWS else 1
