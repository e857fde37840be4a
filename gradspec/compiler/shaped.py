"""The lowering of shape-aware steps: axis reductions, matrix algebra within a tensor, states
shaped unlike the parameter, and specs that treat matrices and vectors differently.

Such a step needs each tensor's matrix view (first dimension x the rest; a vector is one row).
A bucket's tensors are cut into *segments*, maximal runs of consecutive tensors with one matrix
shape and one shape class; every per-tensor value of a segment is one batch (count, a, b):
an element value (count, rows, cols), a per-tensor value (count, 1, 1), ``row.mean(x)``
(count, rows, 1), Shampoo's L (count, rows, rows). Elementwise arithmetic is then torch's own
broadcasting, ``@`` a batched matrix product, and a decomposition one batched call per segment,
so the traced graph grows with the number of segments (distinct shapes, when the bucket lays
equal shapes out together), never with the number of tensors.

A state shaped unlike the parameter is still one flat buffer per bucket, laid out tensor by
tensor in its own shape (:func:`state_layouts`); a segment's part of it is one view.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from .ir import COLS, ROWS, Node, Program, dims_of
from .lowerer import BucketShape, _is_python, _Lowerer, accumulated_sum, compute_dtype, state_input
from .newton_schulz import newton_schulz


@dataclass(frozen=True)
class Segment:
    """A run of ``count`` consecutive tensors of one matrix shape and class, starting at tensor
    ``first`` and at element ``offset`` of the bucket."""

    first: int
    count: int
    offset: int
    rows: int
    cols: int
    shape_class: str  # "matrix" or "vector"

    def size(self, dim) -> int:
        return self.rows if dim == ROWS else self.cols if dim == COLS else int(dim)

    def batch(self, dims) -> tuple:
        """The (count, a, b) shape of a value with per-tensor shape ``dims`` here."""
        return (self.count, self.size(dims[0]), self.size(dims[1]))


@dataclass(frozen=True)
class StateLayout:
    """Where a state shaped unlike the parameter keeps each tensor's part of its flat buffer, and
    the shape ``optimizer.state[p]`` shows it in: (rows,) for a row vector, (cols,) for a column
    vector, () for ': tensor', (a, b) for a matrix; (0,) where the tensor's class has no such
    state."""

    shapes: tuple  # per tensor
    offsets: tuple  # per tensor, and the end

    @property
    def numel(self) -> int:
        return self.offsets[-1]


def segments(shape: BucketShape) -> list[Segment]:
    """The bucket's segments, in order (see the module docstring)."""
    if shape.sharding:
        raise NotImplementedError("a shape-aware spec (axis reductions, matrix algebra, shaped states) does not "
                                  "run on sharded parameters (FSDP) yet: each tensor's matrix must be whole on "
                                  "one process")
    out, offset = [], 0
    full = shape.full_shapes or [(shape.numel // max(shape.ntensors, 1),)] * shape.ntensors
    for i, ((rows, cols), tensor_shape) in enumerate(zip(shape.matrix_shapes(), full)):
        cls = "matrix" if len(tensor_shape) >= 2 else "vector"
        last = out[-1] if out else None
        if last and (last.rows, last.cols, last.shape_class) == (rows, cols, cls):
            out[-1] = Segment(last.first, last.count + 1, last.offset, rows, cols, cls)
        else:
            out.append(Segment(i, 1, offset, rows, cols, cls))
        offset += rows * cols
    return out


def class_program(program: Program, shape_class: str) -> Program:
    return program.by_class[shape_class] if program.by_class else program


def state_layouts(program: Program, shape: BucketShape) -> dict[str, StateLayout]:
    """The layout of every state of ``program`` that is not simply one value per element of
    every tensor: shaped unlike the parameter, or kept by one shape class only."""
    classes = program.classes
    out = {}
    tensor_shapes = shape.shapes or [(shape.numel // max(shape.ntensors, 1),)] * shape.ntensors
    for name in program.state_names:
        if name not in (program.state_dims or {}) and all(name in p.state_names for p in classes):
            continue
        shapes = []
        for seg in segments(shape):
            own = class_program(program, seg.shape_class)
            dims = (own.state_dims or {}).get(name)
            for i in range(seg.first, seg.first + seg.count):
                shapes.append((0,) if name not in own.state_names else
                              tuple(tensor_shapes[i]) if dims is None else _shown(seg, dims))
        offsets = [0]
        for s in shapes:
            offsets.append(offsets[-1] + int(torch.Size(s).numel()))
        out[name] = StateLayout(tuple(shapes), tuple(offsets))
    return out


def _shown(seg: Segment, dims) -> tuple:
    """How ``optimizer.state[p]`` shows a state of shape ``dims``: a vector as a vector, a
    per-tensor value as a 0-d tensor."""
    _, a, b = seg.batch(dims)
    if dims == (1, 1):
        return ()
    if dims[1] == 1:
        return (a,)
    if dims[0] == 1:
        return (b,)
    return (a, b)


class ShapedLowerer(_Lowerer):
    """Emits FX nodes per (node, bucket, segment) for per-tensor values, and as the plain
    lowerer does for values per step or group."""

    def __init__(self, graph: fx.Graph, placeholders: dict, buckets: list[BucketShape], program: Program):
        super().__init__(graph, placeholders, buckets, program)
        if program.probes:
            raise NotImplementedError("model probes in a shape-aware spec are not lowered yet")
        self.program = program
        self.segments = [segments(b) for b in buckets]
        self.layouts = [state_layouts(program, b) for b in buckets]

    # ---- values
    def value(self, node: Node, bucket: int, broadcast_to=None, segment: Segment | None = None):
        if dims_of(node) is None:  # one value per step or group
            key = (id(node), bucket if node.uses_step else None)
            if key not in self.memo:
                self.memo[key] = self._emit_shared(node, bucket)
            return self.memo[key]
        if segment is None:
            raise ValueError("a per-tensor value is lowered per segment")  # pragma: no cover - internal
        key = (id(node), bucket, segment.first)
        if key not in self.memo:
            self.memo[key] = self._emit_segment(node, bucket, segment)
        return self.memo[key]

    def _emit_shared(self, node: Node, bucket: int):
        if node.op == "reduce":
            return self._global_reduce(node)
        if node.op == "measure":
            return float(sum(sum(b.full_numels()) for b in self.buckets))
        if node.op == "state":
            return self.global_state(node.attr)
        if node.op in ("const", "hyper", "input"):
            return self._emit(node, bucket)
        return self._elementwise(node, [self.value(a, bucket) for a in node.args])

    def _view(self, flat, segment: Segment, dims, offset: int):
        count, a, b = segment.batch(dims)
        piece = self.call(operator.getitem, flat, slice(offset, offset + count * a * b))
        return self.graph.call_method("view", (piece, count, a, b))

    def _emit_segment(self, node: Node, bucket: int, seg: Segment):
        op = node.op
        if op == "input":
            return self._view(self.load(self.ph[f"b{bucket}_{node.attr}"], bucket), seg, dims_of(node), seg.offset)
        if op == "state":
            buffer = self.load(self.ph[_state_input(bucket, node.attr)], bucket, state=True)
            layout = self.layouts[bucket].get(node.attr)
            offset = seg.offset if layout is None else layout.offsets[seg.first]
            return self._view(buffer, seg, dims_of(node), offset)
        if op == "measure":
            return float({"numel": seg.rows * seg.cols, "rows": seg.rows, "cols": seg.cols}[node.attr.what])
        if op == "reduce":
            return self._segment_reduce(node, bucket, seg)
        if op == "matrix":
            return self._matrix_segment(node, bucket, seg)
        if op == "eye":
            n = seg.size(node.attr.size)
            like = self.ph[f"b{bucket}_param"]
            return self.call(torch.eye, n, dtype=compute_dtype(self.buckets[bucket].dtype),
                             device=self.graph_device(like))
        args = [self.value(a, bucket, segment=seg) for a in node.args]
        if op == "matmul":
            return self.call(torch.matmul, *args)
        if op == "transpose":
            return self.call(torch.transpose, args[0], -2, -1)
        if op == "trace":
            diagonal = self.call(torch.diagonal, args[0], 0, -2, -1)
            return self.call(torch.unsqueeze, self.call(torch.sum, diagonal, -1, keepdim=True), -1)
        if op in ("eigvecs", "eigvals", "inv_root"):
            return self._eigen(op, args)
        if op == "qr":
            return self.call(operator.getitem, self.call(torch.linalg.qr, args[0]), 0)
        if op in ("svd_left", "svd_right"):
            return self.call(singular_vectors, args[0], seg.size(node.attr.size), op == "svd_left")
        return self._elementwise(node, args)

    def _elementwise(self, node: Node, args: list):
        return self.apply(node.op, args)

    def _eigen(self, op, args):
        pair = self.call(torch.linalg.eigh, args[0])  # ascending; the language's order is descending
        values = self.call(torch.flip, self.call(operator.getitem, pair, 0), (-1,))
        vectors = self.call(torch.flip, self.call(operator.getitem, pair, 1), (-1,))
        if op == "eigvecs":
            return vectors
        if op == "eigvals":
            return self.call(torch.unsqueeze, values, -2)
        power, floor = args[1], args[2]
        floored = self._minmax("max", values, floor)
        scaled = self.call(torch.pow, floored, self.call(operator.neg, self.call(operator.truediv, 1.0, power)))
        weighted = self.call(operator.mul, vectors, self.call(torch.unsqueeze, scaled, -2))
        return self.call(torch.matmul, weighted, self.call(torch.transpose, vectors, -2, -1))

    def _matrix_segment(self, node: Node, bucket: int, seg: Segment):
        shape = self.buckets[bucket]
        if node.attr.func == "aspect":
            full = (shape.full_shapes or [()] * shape.ntensors)[seg.first]
            return full[-2] / full[-1] if len(full) >= 2 and full[-1] else 1.0
        x = self.value(node.args[0], bucket, segment=seg)
        if node.attr.low_precision:
            return self.call(torch.Tensor.to, self.call(newton_schulz, self.call(torch.Tensor.to, x, torch.bfloat16)),
                             compute_dtype(shape.dtype))
        return self.call(newton_schulz, x)

    # ---- reductions
    def _reduced(self, func, node, bucket, seg):
        """The argument of a reduction, squared for norm, multiplied for dot, in compute dtype."""
        args = [self.value(a, bucket, segment=seg) for a in node.args]
        x = args[0]
        if func == "norm":
            x = self.call(operator.mul, x, x)
        elif func == "dot":
            x = self.call(operator.mul, x, args[1])
        return x

    def _segment_reduce(self, node: Node, bucket: int, seg: Segment):
        func, scope = node.attr.func, node.attr.scope
        x = self._full(self._reduced(func, node, bucket, seg), seg, _arg_dims(node))
        axes = {"tensor": (-2, -1), "row": (-1,), "col": (-2,)}[scope]
        dtype = compute_dtype(self.buckets[bucket].dtype)
        extreme = {"max": torch.amax, "min": torch.amin}.get(func)
        if extreme:
            return self.call(extreme, x, axes, keepdim=True)
        total = self.call(accumulated_keepdim, x, axes, dtype)
        if func == "norm":
            return self.call(torch.sqrt, total)
        if func == "mean":
            _, a, b = seg.batch(_arg_dims(node))
            return self.call(operator.truediv, total, float({"tensor": a * b, "row": b, "col": a}[scope]))
        return total

    def _global_reduce(self, node: Node):
        func = node.attr.func
        combine = {"max": torch.maximum, "min": torch.minimum}.get(func, operator.add)
        total, count = None, 0
        for i in range(len(self.buckets)):
            for seg in self.segments[i]:
                x = self._full(self._reduced(func, node, i, seg), seg, _arg_dims(node))
                part = self.call({"max": torch.amax, "min": torch.amin}[func], x) if func in ("max", "min") else \
                    self.call(accumulated_sum, x, (), compute_dtype(self.buckets[i].dtype))
                total = part if total is None else self.call(combine, total, part)
                count += seg.count * seg.batch(_arg_dims(node))[1] * seg.batch(_arg_dims(node))[2]
        if func == "norm":
            total = self.call(torch.sqrt, total)
        if func == "mean":
            total = self.call(operator.truediv, total, float(count))
        return total

    def _full(self, value, seg: Segment, dims):
        """``value`` as a (count, a, b) tensor (a number or a stretched value made whole)."""
        if _is_python(value):
            value = self.call(torch.tensor, float(value), dtype=torch.float64)
        return self.call(torch.Tensor.expand, value, seg.batch(dims))

    # ---- writing
    def next_flat(self, name: str, bucket: int, old):
        """A state's (or, for "param", the parameter's) next value over the bucket, flat; None
        where every class keeps it as it is."""
        programs = [class_program(self.program, seg.shape_class) for seg in self.segments[bucket]]
        if all(name not in p.next or (p.next[name].op == "state" and p.next[name].attr == name) for p in programs):
            return None
        pieces = []
        layout = self.layouts[bucket].get(name)
        for seg in self.segments[bucket]:
            program = class_program(self.program, seg.shape_class)
            if name != "param" and name not in program.state_names:
                continue  # this class keeps no such state: no room in the buffer
            node = program.next[name]
            dims = (program.state_dims or {}).get(name, (ROWS, COLS)) if name != "param" else (ROWS, COLS)
            if node.op == "state" and node.attr == name:
                offset = seg.offset if layout is None else layout.offsets[seg.first]
                value = self._view(old, seg, dims, offset)
            else:
                value = self._full(self.value(node, bucket, segment=seg) if dims_of(node) is not None else
                                   self.value(node, bucket), seg, dims)
            pieces.append(self.call(torch.reshape, value, (-1,)))
        if not pieces:
            return old
        return pieces[0] if len(pieces) == 1 else self.call(torch.cat, pieces)


    def initial_flat(self, name: str):
        """A state's initial value over bucket 0 (the init graph's one bucket), flat."""
        pieces = []
        for seg in self.segments[0]:
            program = class_program(self.program, seg.shape_class)
            if name not in program.state_names:
                continue
            node = program.init[name]
            dims = (program.state_dims or {}).get(name, (ROWS, COLS))
            value = self.value(node, 0, segment=seg) if dims_of(node) is not None else self.value(node, 0)
            full = self._full(value, seg, dims)
            pieces.append(self.call(torch.reshape, self.call(torch.Tensor.to, full, compute_dtype(self.buckets[0].dtype)),
                                    (-1,)))
        if not pieces:
            return self.call(torch.zeros, 0)
        return pieces[0] if len(pieces) == 1 else self.call(torch.cat, pieces)


def _arg_dims(node: Node) -> tuple:
    from .ir import broadcast_dims
    return broadcast_dims([dims_of(a) for a in node.args])


def _state_input(bucket: int, name: str) -> str:
    return state_input(bucket, name)


def accumulated_keepdim(x: torch.Tensor, dims: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A sum over ``dims`` kept as size-1 axes, accumulated as :func:`accumulated_sum` does."""
    accumulate = torch.float32 if x.device.type == "mps" else torch.float64
    return torch.sum(x, dims, keepdim=True, dtype=accumulate).to(dtype)


def singular_vectors(m: torch.Tensor, r: int, left: bool) -> torch.Tensor:
    """The top-r left (rows x r) or right (cols x r) singular vectors of each matrix of a batch,
    with zero columns past min(rows, cols)."""
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    basis = u[..., :r] if left else vh.mT[..., :r]
    missing = r - basis.shape[-1]
    if missing > 0:
        basis = torch.nn.functional.pad(basis, (0, missing))
    return basis
