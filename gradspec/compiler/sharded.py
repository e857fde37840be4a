"""The shape-aware lowering on FSDP2's shards: each process holds a part of every tensor, cut
along dim 0, and computes the step on its part, exchanging only what a construct needs.

FSDP2 cuts dim 0, which is a matrix's rows and a vector's columns (a vector is one row of the
matrix view): that size is the segment's *cut* (:class:`~gradspec.compiler.shaped.Segment`).
Every per-tensor value the lowering makes is held in one of two forms, a :class:`Part`:

* **cut** along one axis of its (a, b) shape whose size is the cut: this process's slice there,
  the other axis whole. Gradients, parameters and per-element states are cut as FSDP2 cuts
  them; so is a state whose first size is the cut (Adafactor's per-row R, Shampoo's L: each
  process keeps its rows of it, as ``optimizer.state[p]`` shows through a DTensor);
* **whole**, the same on every process: a per-column state of a matrix, a per-tensor value,
  anything a full-matrix operation made.

The constructs then cost what they must:

| construct | on each process |
| --- | --- |
| elementwise arithmetic, ``row.f`` of a matrix | its own rows: nothing is exchanged (a whole operand is sliced to them) |
| ``col.f`` of a matrix, ``row.f`` of a vector, ``tensor.f``, ``global.f`` | reduces its part, then all-reduces the partials (sum, max or min) |
| products, transposes, decompositions, ``tensor.orthogonalize`` | all-gathers each cut operand whole (one padded all-gather per run of equal-shape tensors), computes the whole result, as Muon's iteration is computed, and keeps its own rows where the result is stored cut |
| a ``blocks B { }`` body (Distributed Shampoo's blocking) | computes on whole blocks, cut from the gathered tensors; every process keeps the per-block states whole |

A value over every group (``groups.*``) is reduced here as ``global.*`` is, so each group's part
is whole over the shard group before the runtime adds the groups.
"""
from __future__ import annotations

import operator
from typing import NamedTuple

import torch

from .collectives import all_reduce, gather_along
from .ir import ELEMENT_DIMS, Node, Program, dims_of
from .lowerer import _BINARY, _UNARY, BucketShape, _is_python, accumulated_sum, compute_dtype, state_input
from .shaped import (Segment, ShapedLowerer, StateLayout, _arg_dims, _shown, accumulated_keepdim, class_program,
                     segments, whole_state_layouts)

ELEMENTWISE = set(_BINARY) | set(_UNARY) | {"min", "max", "clamp", "lerp", "where", "atan2"}
"""Operations computed where their operands are: a cut operand stays cut."""
REDUCED_AXES = {"row": (1,), "col": (0,), "tensor": (0, 1)}
IDENTITY = {"max": float("-inf"), "min": float("inf")}
EXTREME = {"max": torch.amax, "min": torch.amin}


class Part(NamedTuple):
    """A lowered per-tensor value and the axis (0 or 1 of its (a, b) shape) along which it is
    this process's slice of the cut size, or None where it is whole."""

    value: object
    axis: int | None


def cut_axis(dims, seg: Segment) -> int | None:
    """The axis along which a stored value of shape ``dims`` is cut: its first size if that is
    the cut (a matrix's rows; Shampoo's L), else its second where it is a vector's columns (a
    vector's gradient, one row); None for a value every process keeps whole."""
    if seg.cut is None or dims is None:
        return None
    if dims[0] == seg.cut:
        return 0
    if dims[1] == seg.cut and seg.size(dims[0]) == 1:
        return 1
    return None


def local_batch(seg: Segment, dims, axis: int | None) -> tuple:
    """The (count, a, b) shape this process holds of a value of shape ``dims`` cut along ``axis``."""
    count, a, b = seg.batch(dims)
    if axis == 0:
        a = seg.local
    elif axis == 1:
        b = seg.local
    return count, a, b


def state_layouts(program: Program, shape: BucketShape) -> dict[str, StateLayout]:
    """The layouts of ``program``'s shaped states (:func:`~gradspec.compiler.shaped.whole_state_layouts`)
    as this process keeps them: whole for an unsharded bucket; for a sharded one, a state cut
    as :func:`cut_axis` says holds this process's slice of its first dimension, the others
    whole, each with its whole shape, for the DTensor that shows it."""
    layouts = whole_state_layouts(program, shape)
    if shape.sharding is None:
        return layouts
    out = {}
    full = shape.full_shapes
    for name, layout in layouts.items():
        if name in (getattr(program, "state_blocks", None) or {}):  # per block: every process keeps all
            out[name] = StateLayout(layout.shapes, layout.offsets, layout.shapes, (False,) * len(layout.shapes))
            continue
        shapes, whole, cut = [], [], []
        for seg in segments(shape, program):
            own = class_program(program, seg.shape_class)
            dims = (own.state_dims or {}).get(name)
            for i in range(seg.first, seg.first + seg.count):
                if name not in own.state_names:
                    shapes.append((0,)), whole.append((0,)), cut.append(False)
                elif dims is None:  # one value per element, for one shape class: cut as the parameter
                    shapes.append(tuple(shape.shapes[i])), whole.append(tuple(full[i])), cut.append(True)
                else:
                    shown = _shown(seg, dims)
                    axis = cut_axis(dims, seg)
                    shapes.append(shown if axis is None else (seg.local, *shown[1:]))
                    whole.append(shown), cut.append(axis is not None)
        offsets = [0]
        for s in shapes:
            offsets.append(offsets[-1] + int(torch.Size(s).numel()))
        out[name] = StateLayout(tuple(shapes), tuple(offsets), tuple(whole), tuple(cut))
    return out


class ShardedLowerer(ShapedLowerer):
    """The shaped lowerer over a sharded bucket (see the module docstring): per-tensor values
    are :class:`Part` s; operations the shaped lowerer knows that need a whole matrix run on
    operands gathered whole."""

    layouts_of = staticmethod(state_layouts)  # this process's part of each tensor

    def __init__(self, graph, placeholders: dict, buckets: list, program: Program):
        super().__init__(graph, placeholders, buckets, program)
        self.group_name = buckets[0].sharding.group_name
        self.world = buckets[0].sharding.world
        self._gathering = False  # lowering an operation that needs its operands whole

    # ---- values
    def value(self, node: Node, bucket: int, broadcast_to=None, segment: Segment | None = None):
        if dims_of(node) is None:  # one value per step or group
            return ShapedLowerer.value(self, node, bucket)
        if not isinstance(segment, Segment):  # a block of a ``blocks B { }`` body: computed whole
            gathering, self._gathering = self._gathering, True
            try:
                return ShapedLowerer.value(self, node, bucket, segment=segment)
            finally:
                self._gathering = gathering
        part = self.part(node, bucket, segment)
        return self._whole(node, part, bucket, segment) if self._gathering else part.value

    def part(self, node: Node, bucket: int, seg: Segment) -> Part:
        """``node``'s value on this process's part of the segment's tensors."""
        if dims_of(node) is None:
            return Part(ShapedLowerer.value(self, node, bucket), None)
        key = ("part", id(node), bucket, seg.first)
        if key not in self.memo:
            gathering, self._gathering = self._gathering, False
            try:
                self.memo[key] = self._emit_part(node, bucket, seg)
            finally:
                self._gathering = gathering
        return self.memo[key]

    def _emit_part(self, node: Node, bucket: int, seg: Segment) -> Part:
        op, dims = node.op, dims_of(node)
        if op == "input":
            axis = cut_axis(dims, seg)
            flat = self.load(self.ph[f"b{bucket}_{node.attr}"], bucket)
            return Part(self._local_view(flat, seg, dims, seg.offset, axis), axis)
        if op == "state":
            axis = cut_axis(dims, seg)
            buffer = self.load(self.ph[state_input(bucket, node.attr)], bucket, state=True)
            layout = self.layouts[bucket].get(node.attr)
            offset = seg.offset if layout is None else layout.offsets[seg.first]
            return Part(self._local_view(buffer, seg, dims, offset, axis), axis)
        if op == "reduce" and node.attr.scope in REDUCED_AXES:
            return self._reduce_part(node, bucket, seg)
        if op in ELEMENTWISE:
            parts = [self.part(a, bucket, seg) for a in node.args]
            axis = next((p.axis for p in parts if p.axis is not None), None)
            args = [self._aligned(p, dims_of(a), axis, seg) for p, a in zip(parts, node.args)]
            return Part(self.apply(op, args), axis)
        # a product, transpose, decomposition, ...: on every operand made whole (see value())
        self._gathering = True
        try:
            return Part(ShapedLowerer._emit_segment(self, node, bucket, seg), None)
        finally:
            self._gathering = False

    def _local_view(self, flat, seg: Segment, dims, offset: int, axis: int | None):
        count, a, b = local_batch(seg, dims, axis)
        piece = self.call(operator.getitem, flat, slice(offset, offset + count * a * b))
        return self.graph.call_method("view", (piece, count, a, b))

    def _whole(self, node: Node, part: Part, bucket: int, seg: Segment):
        """A part made whole: gathered from every process along its cut axis (once per value)."""
        if part.axis is None:
            return part.value
        key = ("whole", id(node), bucket, seg.first)
        if key not in self.memo:
            self.memo[key] = self._gather(part, seg)
        return self.memo[key]

    def _gather(self, part: Part, seg: Segment):
        size = seg.size(seg.cut)
        return self.call(gather_along, part.value, part.axis + 1, size, -(-size // self.world), self.world,
                         self.group_name)

    def _aligned(self, part: Part, dims, axis: int | None, seg: Segment):
        """``part``'s value laid out for an operation cut along ``axis`` (None: whole): gathered
        where it is cut elsewhere, sliced where it is whole along a cut ``axis``."""
        value = part.value
        if part.axis == axis or _is_python(value) or dims is None:
            return value
        if part.axis is not None:
            value = self._gather(part, seg)
        if axis is not None and dims[axis] == seg.cut:
            value = self.call(torch.narrow, value, axis + 1, seg.start, seg.local)
        return value

    def _expanded(self, value, seg: Segment, dims, axis: int | None):
        if _is_python(value):
            value = self.call(torch.tensor, float(value), dtype=torch.float64)
        return self.call(torch.Tensor.expand, value, local_batch(seg, dims, axis))

    # ---- reductions
    def _reduced_part(self, node: Node, bucket: int, seg: Segment) -> Part:
        """A reduction's argument on this process's part, squared for norm, multiplied for dot,
        stretched to its shape: (value, axis)."""
        func = node.attr.func
        parts = [self.part(a, bucket, seg) for a in node.args]
        axis = next((p.axis for p in parts if p.axis is not None), None)
        args = [self._aligned(p, dims_of(a), axis, seg) for p, a in zip(parts, node.args)]
        x = args[0]
        if func == "norm":
            x = self.call(operator.mul, x, x)
        elif func == "dot":
            x = self.call(operator.mul, x, args[1])
        return Part(self._expanded(x, seg, _arg_dims(node), axis), axis)

    def _reduce_part(self, node: Node, bucket: int, seg: Segment) -> Part:
        """``row.f``, ``col.f`` or ``tensor.f``: local where the reduced axes keep the cut, else a
        partial all-reduced over the shard group."""
        func, scope = node.attr.func, node.attr.scope
        x, axis = self._reduced_part(node, bucket, seg)
        axes = REDUCED_AXES[scope]
        crossing = axis is not None and axis in axes
        batch_axes = tuple(a + 1 for a in axes)
        dtype = compute_dtype(self.buckets[bucket].dtype)
        if func in EXTREME:
            if crossing and seg.local == 0:  # an empty part: the reduction's identity
                count, a, b = local_batch(seg, _arg_dims(node), axis)
                shape = (count, 1 if 0 in axes else a, 1 if 1 in axes else b)
                result = self.call(torch.full, shape, IDENTITY[func], dtype=dtype,
                                   device=self.graph_device(self.ph[f"b{bucket}_param"]))
            else:
                result = self.call(EXTREME[func], x, batch_axes, keepdim=True)
        else:
            result = self.call(accumulated_keepdim, x, batch_axes, dtype)
        if crossing:
            result = self.call(all_reduce, result, {"max": "max", "min": "min"}.get(func, "sum"), self.group_name)
        if func == "norm":
            result = self.call(torch.sqrt, result)
        if func == "mean":
            _, a, b = seg.batch(_arg_dims(node))
            result = self.call(operator.truediv, result, float({"tensor": a * b, "row": b, "col": a}[scope]))
        return Part(result, None if crossing else axis)

    def _global_partial(self, node: Node):
        """The group's sum (of squares, products), max or min of a reduction's argument, whole
        over the shard group: the cut parts all-reduced together, the whole ones added once."""
        func = node.attr.func
        combine = {"max": torch.maximum, "min": torch.minimum}.get(func, operator.add)
        totals = {True: None, False: None}  # cut, whole
        for i in range(len(self.buckets)):
            dtype = compute_dtype(self.buckets[i].dtype)
            for seg in self.segments[i]:
                x, axis = self._reduced_part(node, i, seg)
                if func in EXTREME:
                    part = self.call(torch.tensor, IDENTITY[func], dtype=dtype) if axis is not None and \
                        seg.local == 0 else self.call(EXTREME[func], x)
                else:
                    part = self.call(accumulated_sum, x, (), dtype)
                cut = axis is not None
                totals[cut] = part if totals[cut] is None else self.call(combine, totals[cut], part)
        total = totals[False]
        if totals[True] is not None:
            whole = self.call(all_reduce, totals[True], {"max": "max", "min": "min"}.get(func, "sum"),
                              self.group_name)
            total = whole if total is None else self.call(combine, total, whole)
        return total

    # ---- writing
    def next_pieces(self, name: str, bucket: int, old):
        return None  # this process's parts are cut unlike the segments' views: one flat write

    def next_flat(self, name: str, bucket: int, old):
        if name in getattr(self, "block_states", {}):  # kept whole by every process, computed on whole blocks
            return ShapedLowerer.next_flat(self, name, bucket, old)
        programs = [class_program(self.program, seg.shape_class) for seg in self.segments[bucket]]
        if all(name not in p.next or (p.next[name].op == "state" and p.next[name].attr == name) for p in programs):
            return None
        layout = self.layouts[bucket].get(name)
        pieces = []
        for seg in self.segments[bucket]:
            program = class_program(self.program, seg.shape_class)
            if name != "param" and name not in program.state_names:
                continue
            node = program.next[name]
            dims = (program.state_dims or {}).get(name, ELEMENT_DIMS) if name != "param" else ELEMENT_DIMS
            axis = cut_axis(dims, seg)
            if node.op == "state" and node.attr == name:
                offset = seg.offset if layout is None else layout.offsets[seg.first]
                value = self._local_view(old, seg, dims, offset, axis)
            else:
                value = self._stored(node, bucket, seg, dims, axis)
            pieces.append(self.call(torch.reshape, value, (-1,)))
        if not pieces:
            return old
        return pieces[0] if len(pieces) == 1 else self.call(torch.cat, pieces)

    def initial_flat(self, name: str):
        if name in getattr(self, "block_states", {}):
            return ShapedLowerer.initial_flat(self, name)
        pieces = []
        for seg in self.segments[0]:
            program = class_program(self.program, seg.shape_class)
            if name not in program.state_names:
                continue
            dims = (program.state_dims or {}).get(name, ELEMENT_DIMS)
            value = self._stored(program.init[name], 0, seg, dims, cut_axis(dims, seg))
            pieces.append(self.call(torch.reshape, self.call(torch.Tensor.to, value,
                                                             compute_dtype(self.buckets[0].dtype)), (-1,)))
        if not pieces:
            return self.call(torch.zeros, 0)
        return pieces[0] if len(pieces) == 1 else self.call(torch.cat, pieces)

    def _stored(self, node: Node, bucket: int, seg: Segment, dims, axis: int | None):
        """``node``'s value as a buffer of shape ``dims`` cut along ``axis`` stores it."""
        value = self._aligned(self.part(node, bucket, seg), dims_of(node), axis, seg)
        return self._expanded(value, seg, dims, axis)
