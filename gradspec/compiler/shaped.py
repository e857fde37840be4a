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
tensor in its own shape (:func:`whole_state_layouts`); a segment's part of it is one view.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from .ir import BLOCK, COLS, ROWS, Node, Program, dims_of
from .lowerer import BucketShape, _is_python, _Lowerer, accumulated_sum, compute_dtype, reduction_identity, \
    state_input
from .newton_schulz import newton_schulz
from .blocks import BlockLowering, TileSegment, state_shape


@dataclass(frozen=True)
class Segment:
    """A run of ``count`` consecutive tensors of one matrix shape and class, starting at tensor
    ``first`` and at element ``offset`` of the bucket."""

    first: int
    count: int
    offset: int
    rows: int
    cols: int
    shape_class: tuple  # ("matrix" | "vector", its answers to the spec's shape conditions): Program.class_of
    # FSDP2 (compiler/sharded.py): which size is cut over the shard group (rows for a matrix, cols
    # for a vector, None when not sharded), and this process's part of it (start, length)
    cut: str | None = None
    start: int = 0
    local: int = 0

    def size(self, dim) -> int:
        return self.rows if dim == ROWS else self.cols if dim == COLS else int(dim)

    def batch(self, dims) -> tuple:
        """The (count, a, b) shape of a value with per-tensor shape ``dims`` here."""
        return (self.count, self.size(dims[0]), self.size(dims[1]))


@dataclass(frozen=True)
class WritePiece:
    """Part of a step's write to a bucket's buffer: ``size`` (count, a, b) numbers from
    ``offset``, their next ``value`` (None where the step keeps them) and their ``previous``
    one (a view of the buffer, in compute dtype)."""

    offset: int
    size: tuple
    value: fx.Node | None
    previous: fx.Node


@dataclass(frozen=True)
class StateLayout:
    """Where a state shaped unlike the parameter keeps each tensor's part of its flat buffer, and
    the shape ``optimizer.state[p]`` shows it in: (rows,) for a row vector, (cols,) for a column
    vector, () for ': tensor', (a, b) for a matrix; (0,) where the tensor's class has no such
    state."""

    shapes: tuple  # per tensor
    offsets: tuple  # per tensor, and the end
    # FSDP2 (compiler/sharded.py): per tensor, the state's whole shape and whether its first
    # dimension is cut over the shard group as the parameter's is (else every process keeps it whole)
    global_shapes: tuple = ()
    cut: tuple = ()

    @property
    def numel(self) -> int:
        return self.offsets[-1]


def segments(shape: BucketShape, program: Program | None = None) -> list[Segment]:
    """The bucket's segments, in order (see the module docstring): a segment ends where the
    matrix shape or the class ``program`` gives a tensor changes."""
    out, offset = [], 0
    full = shape.full_shapes or [(shape.numel // max(shape.ntensors, 1),)] * shape.ntensors
    for i, ((rows, cols), tensor_shape) in enumerate(zip(shape.matrix_shapes(), full)):
        matrix = len(tensor_shape) >= 2
        cls = program.class_of(matrix, rows, cols) if program is not None else ("matrix" if matrix else "vector",)
        cut, (start, local) = None, (0, 0)
        if shape.sharding is not None and tensor_shape:  # FSDP2 cuts dim 0: a matrix's rows, a vector's cols
            cut, (start, local) = ROWS if matrix else COLS, shape.sharding.rows(i)
        last = out[-1] if out else None
        if last and (last.rows, last.cols, last.shape_class) == (rows, cols, cls):
            out[-1] = Segment(last.first, last.count + 1, last.offset, rows, cols, cls, cut, start, local)
        else:
            out.append(Segment(i, 1, offset, rows, cols, cls, cut, start, local))
        offset += int(torch.Size(shape.shapes[i]).numel()) if shape.sharding is not None else rows * cols
    return out


def class_program(program: Program, shape_class: tuple) -> Program:
    return program.by_class[shape_class] if program.by_class else program


def whole_state_layouts(program: Program, shape: BucketShape) -> dict[str, StateLayout]:
    """The layout of every state of ``program`` that is not simply one value per element of
    every tensor: shaped unlike the parameter, or kept by one shape class only; each tensor
    whole (a sharded bucket's part is :func:`gradspec.compiler.sharded.state_layouts`)."""
    classes = program.classes
    out = {}
    tensor_shapes = shape.shapes or [(shape.numel // max(shape.ntensors, 1),)] * shape.ntensors
    for name in program.state_names:
        if name not in (program.state_dims or {}) and all(name in p.state_names for p in classes):
            continue
        shapes = []
        block = (program.state_blocks or {}).get(name)  # a state per block (compiler/blocks.py)
        for seg in segments(shape, program):
            own = class_program(program, seg.shape_class)
            dims = (own.state_dims or {}).get(name)
            for i in range(seg.first, seg.first + seg.count):
                shapes.append((0,) if name not in own.state_names else
                              tuple(tensor_shapes[i]) if dims is None else
                              state_shape(seg, block.size, dims)[0] if block is not None else _shown(seg, dims))
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


class ShapedLowerer(BlockLowering, _Lowerer):
    """Emits FX nodes per (node, bucket, segment) for per-tensor values, and as the plain
    lowerer does for values per step or group."""

    layouts_of = staticmethod(whole_state_layouts)  # each tensor whole

    def __init__(self, graph: fx.Graph, placeholders: dict, buckets: list[BucketShape], program: Program):
        super().__init__(graph, placeholders, buckets, program)
        if any(p.attr.func != "randn" for c in program.classes for p in c.probes):  # pragma: no cover
            raise NotImplementedError("internal: a model probe in a shape-aware spec (GS069 refuses it)")
        self.program = program
        self.segments = [segments(b, program) for b in buckets]
        self.layouts = [self.layouts_of(program, b) for b in buckets]

    # ---- values
    def value(self, node: Node, bucket: int, broadcast_to=None, segment: Segment | None = None):
        if dims_of(node) is None:  # one value per step or group
            key = (id(node), bucket if node.uses_step else None)
            if key not in self.memo:
                self.memo[key] = self._emit_shared(node, bucket)
            return self.memo[key]
        if segment is None:
            raise ValueError("a per-tensor value is lowered per segment")  # pragma: no cover - internal
        key = (id(node), bucket, segment)  # a run of tensors, or of blocks (a TileSegment)
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
        if op == "tile":
            return self.tile_value(node, bucket, seg)
        if op == "untile":
            return self.untile_value(node, bucket, seg)
        if op == "state" and node.attr in self.block_states:
            return self.block_state_value(node, bucket, seg)
        if op == "input":
            return self._view(self.load(self.ph[f"b{bucket}_{node.attr}"], bucket), seg, dims_of(node), seg.offset)
        if op == "state":
            buffer = self.load(self.ph[_state_input(bucket, node.attr)], bucket, state=True)
            layout = self.layouts[bucket].get(node.attr)
            offset = seg.offset if layout is None else layout.offsets[seg.first]
            return self._view(buffer, seg, dims_of(node), offset)
        if op == "measure":
            return float({"numel": seg.rows * seg.cols, "rows": seg.rows, "cols": seg.cols}[node.attr.what])
        if op == "probe":  # randn(): the bucket's draw, as the elementwise lowering makes it, viewed
            key = (id(node), bucket, None)
            if key not in self.memo:
                self.memo[key] = self._emit(node, bucket)
            return self._view(self.memo[key], seg, dims_of(node), seg.offset)
        if op == "reduce":
            return self._segment_reduce(node, bucket, seg)
        if op == "matrix":
            return self._matrix_segment(node, bucket, seg)
        if op == "eye":
            n = seg.size(node.attr.size)
            like = self.ph[f"b{bucket}_param"]
            return self.call(torch.eye, n, dtype=compute_dtype(self.buckets[bucket].dtype),
                             device=self.graph_device(like))
        if op == "matmul":
            reordered = self._reordered(node, bucket, seg)
            if reordered is not None:
                return reordered
        if op in _ALIGNED_OPERANDS:
            args = [self._matrix_operand(a, bucket, seg) for a in node.args]
        else:
            args = [self.value(a, bucket, segment=seg) for a in node.args]
        if op == "matmul":
            return self.call(torch.matmul, *args) if seg.count > 1 else self.call(single_product, *args)
        if op == "descending":
            return self.call(descending_permutation, self._full(args[0], seg, dims_of(node.args[0])))
        if op == "transpose":
            return self.call(torch.transpose, args[0], -2, -1)
        if op == "trace":
            diagonal = self.call(torch.diagonal, args[0], 0, -2, -1)
            return self.call(torch.unsqueeze, self.call(torch.sum, diagonal, -1, keepdim=True), -1)
        if op in ("eigvecs", "eigvals", "inv_root"):
            return self._eigen(op, args)
        if op == "qr":
            return self.call(orthonormal_factor, args[0], node.attr is not None)
        if op in ("svd_left", "svd_right"):
            return self.call(singular_vectors, args[0], seg.size(node.attr.size), op == "svd_left")
        return self._elementwise(node, [self._stretched(a, v, node, seg) for a, v in zip(node.args, args)])

    def _stretched(self, arg: Node, value, node: Node, seg: Segment):
        """An operand that elementwise arithmetic stretches over a larger shape (a per-row,
        per-column or per-tensor value meeting the gradient), computed once: Inductor inlines
        a pointwise producer into each consumer, so ``rsqrt(R')`` would be recomputed for every
        element of the matrix it scales (Adafactor's step took 4x its memory time from that).
        Values read from memory (states, inputs, reductions) are left as they are."""
        dims, own = dims_of(node), dims_of(arg)
        if (own is None or dims is None or not isinstance(value, fx.Node)
                or arg.op in ("input", "state", "reduce", "const", "hyper", "measure")):
            return value
        _, a, b = seg.batch(own)
        _, rows, cols = seg.batch(dims)
        return self.call(computed_once, value) if a * b < rows * cols else value

    def _elementwise(self, node: Node, args: list):
        return self.apply(node.op, args)

    def _matrix_operand(self, node: Node, bucket: int, seg: Segment):
        """An operand of a product or a decomposition: a gradient, parameter or state (or its
        transpose) as a tensor of its own where its view of the bucket's buffer is not 64-byte
        aligned. MKL rounds a product differently at such an address, and the eigenvectors
        of a rank-deficient statistic (SOAP's first basis) turn those last bits into
        different bases; a copy makes the numbers those of the same product on p.grad."""
        leaf = node.args[0] if node.op == "transpose" else node
        if leaf.op not in ("input", "state"):
            return self.value(node, bucket, segment=seg)
        key = ("standalone", id(leaf), bucket, seg)
        if key not in self.memo:
            self.memo[key] = self.call(standalone, self.value(leaf, bucket, segment=seg))
        own = self.memo[key]
        return self.call(torch.transpose, own, -2, -1) if node.op == "transpose" else own

    def _reordered(self, node: Node, bucket: int, seg: Segment):
        """A product with a permutation ``descending(d)`` (or its transpose) as the gather it is:
        the same numbers as the 0/1 product, without its n^3 multiplications; None for any
        other product."""
        for side, other in ((1, 0), (0, 1)):
            found = _permutation(node.args[side])
            if found is None:
                continue
            d, transposed = found
            x = self._full(self.value(node.args[other], bucket, segment=seg), seg, dims_of(node.args[other]))
            order = self._full(self.value(d, bucket, segment=seg), seg, dims_of(d))
            # X @ P picks X's columns in the order, P^T @ X its rows; P^T and P undo them
            inverse = transposed if side == 1 else not transposed
            return self.call(reorder, x, order, -1 if side == 1 else -2, inverse)
        return None

    def _eigen(self, op, args):
        pair = self.call(symmetric_eigen, args[0])  # ascending; the language's order is descending
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
        if node.attr.func == "aspect" and isinstance(seg, TileSegment):  # a block's own rows / cols
            return seg.rows / seg.cols if seg.shape_class[0] == "matrix" and seg.cols else 1.0
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
        axes = {"tensor": (-2, -1), BLOCK: (-2, -1), "row": (-1,), "col": (-2,)}[scope]
        dtype = compute_dtype(self.buckets[bucket].dtype)
        extreme = {"max": torch.amax, "min": torch.amin}.get(func)
        if extreme:
            count, a, b = seg.batch(_arg_dims(node))
            if {"row": b, "col": a}.get(scope, a * b) == 0:  # over no element: the identity
                return self.call(torch.full, (count, a if scope == "row" else 1, b if scope == "col" else 1),
                                 reduction_identity(func), dtype=dtype,
                                 device=self.graph_device(self.ph[f"b{bucket}_param"]))
            return self.call(extreme, x, axes, keepdim=True)
        total = self.call(accumulated_keepdim, x, axes, dtype)
        if func == "norm":
            return self.call(torch.sqrt, total)
        if func == "mean":
            _, a, b = seg.batch(_arg_dims(node))
            return self.call(operator.truediv, total, float({"tensor": a * b, BLOCK: a * b, "row": b, "col": a}[scope]))
        return total

    def groups_partial(self, node: Node):
        return self._global_partial(node)

    def groups_count(self, node: Node) -> float:
        return float(sum(_elements(seg, node) for segs in self.segments for seg in segs))

    def _global_partial(self, node: Node):
        """The group's sum (of squares, products), max or min of a reduction's argument."""
        func = node.attr.func
        combine = {"max": torch.maximum, "min": torch.minimum}.get(func, operator.add)
        total = None
        for i in range(len(self.buckets)):
            for seg in self.segments[i]:
                if _elements(seg, node) == 0:
                    continue  # no element: nothing to add, no extreme to take
                x = self._full(self._reduced(func, node, i, seg), seg, _arg_dims(node))
                part = self.call({"max": torch.amax, "min": torch.amin}[func], x) if func in ("max", "min") else \
                    self.call(accumulated_sum, x, (), compute_dtype(self.buckets[i].dtype))
                total = part if total is None else self.call(combine, total, part)
        if total is None:  # a group of empty tensors
            return self.call(torch.tensor, reduction_identity(func), dtype=compute_dtype(self.buckets[0].dtype))
        return total

    def _global_reduce(self, node: Node):
        func = node.attr.func
        total, count = self._global_partial(node), self.groups_count(node)
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
        if name in self.block_states:
            return self.block_next_flat(name, bucket, old, lambda seg: class_program(self.program, seg.shape_class))
        pieces = self._next_pieces(name, bucket, old)
        if pieces is None:
            return None
        flat = [self.call(torch.reshape, p.previous if p.value is None else p.value, (-1,)) for p in pieces]
        if not flat:
            return old
        return flat[0] if len(flat) == 1 else self.call(torch.cat, flat)

    def next_pieces(self, name: str, bucket: int, old) -> list[WritePiece] | None:
        """The pieces of the bucket's buffer that a step writes, each (count, a, b) as its
        segment computes it: written through a strided view of the buffer, the write's loop
        runs over those three axes, where a flat write made Inductor index the per-row and
        per-column values by division and modulo in a loop it could not vectorise (Adafactor's
        step: 27 ms, 6x its memory time, at 10M parameters). Kept pieces are not written."""
        if name in self.block_states:
            return None
        pieces = self._next_pieces(name, bucket, old)
        return None if pieces is None else [p for p in pieces if p.value is not None]

    def _next_pieces(self, name: str, bucket: int, old) -> list[WritePiece] | None:
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
            offset = seg.offset if layout is None else layout.offsets[seg.first]
            previous = self._view(self.load(old, bucket, state=name != "param"), seg, dims, offset)
            kept = node.op == "state" and node.attr == name
            value = None if kept else self._full(self.value(node, bucket, segment=seg) if dims_of(node) is not None
                                                 else self.value(node, bucket), seg, dims)
            pieces.append(WritePiece(offset, seg.batch(dims), value, previous))
        return pieces

    def initial_flat(self, name: str):
        """A state's initial value over bucket 0 (the init graph's one bucket), flat."""
        if name in self.block_states:
            return self.block_initial_flat(name, lambda seg: class_program(self.program, seg.shape_class))
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


def _elements(seg: Segment, node: Node) -> int:
    """How many elements a reduction's argument has over the tensors of ``seg``."""
    count, a, b = seg.batch(_arg_dims(node))
    return count * a * b


def _state_input(bucket: int, name: str) -> str:
    return state_input(bucket, name)


def accumulated_keepdim(x: torch.Tensor, dims: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A sum over ``dims`` kept as size-1 axes, accumulated as :func:`accumulated_sum` does."""
    accumulate = torch.float32 if x.device.type == "mps" else torch.float64
    return torch.sum(x, dims, keepdim=True, dtype=accumulate).to(dtype)


_ALIGNED_OPERANDS = {"matmul", "eigvecs", "eigvals", "inv_root", "qr", "svd_left", "svd_right"}


def standalone(x: torch.Tensor) -> torch.Tensor:
    """``x`` at a 64-byte aligned address, as a freshly allocated tensor is (see
    ShapedLowerer._matrix_operand): a copy where it is not, and always while compiling, where
    the address is not known (the copy then fuses into the kernel that produces the operand)."""
    if torch.compiler.is_compiling() or x.data_ptr() % 64:
        return x.clone(memory_format=torch.contiguous_format)
    return x


def computed_once(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself, as a view that Inductor can take only of a tensor held in memory: its
    producer is then computed into a buffer once instead of inlined into every consumer."""
    return torch.as_strided(x, x.shape, x.stride())


def single_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The product of a batch of one matrix on each side, as a 2-D product (MKL's batched
    kernel rounds some shapes differently from its 2-D one, which p.grad @ p.grad.mT uses)."""
    return torch.matmul(a.squeeze(0), b.squeeze(0)).unsqueeze(0)


def _permutation(node: Node):
    """(d, transposed) when ``node`` is descending(d) or its transpose, else None."""
    if node.op == "descending":
        return node.args[0], False
    if node.op == "transpose" and node.args[0].op == "descending":
        return node.args[0].args[0], True
    return None


def _descending_order(d: torch.Tensor) -> torch.Tensor:
    """The indices that sort each vector of a (count, 1, n) or (count, n, 1) batch descending."""
    return torch.argsort(d.flatten(-2), dim=-1, descending=True)


def descending_permutation(d: torch.Tensor) -> torch.Tensor:
    """The (count, n, n) permutations P with P[i, j] = 1 where i is the j-th largest entry of d:
    d @ P is d sorted descending."""
    order = _descending_order(d)
    if order.shape[-1] == 0:  # a vector of no entries: the empty permutation (one_hot cannot size it)
        return d.new_zeros((*order.shape[:-1], 0, 0))
    return torch.nn.functional.one_hot(order, order.shape[-1]).mT.to(d.dtype)


def reorder(x: torch.Tensor, d: torch.Tensor, axis: int, inverse: bool) -> torch.Tensor:
    """x @ descending(d) (axis -1), transpose(descending(d)) @ x (axis -2), or, with
    ``inverse``, the products with the other factor (which undo them), by indexing."""
    order = _descending_order(d)
    if inverse:
        order = torch.argsort(order, dim=-1)
    index = order.unsqueeze(-2) if axis == -1 else order.unsqueeze(-1)
    return torch.gather(x, axis, index.expand(x.shape))


def orthonormal_factor(m: torch.Tensor, float32: bool) -> torch.Tensor:
    """The orthonormal factor of each matrix, shaped like it: Q of the reduced M = QR (orthonormal
    columns) when it is tall or square, Q of M = LQ (orthonormal rows) when it is wide, where the
    QR's Q would be rows x rows. With ``float32``, computed in float32 and cast back
    (pytorch-optimizer's SOAP refresh does so whatever the parameters' dtype)."""
    if m.shape[-2] < m.shape[-1]:
        return orthonormal_factor(m.mT, float32).mT
    if float32 and m.dtype != torch.float32:
        return torch.linalg.qr(m.to(torch.float32)).Q.to(m.dtype)
    return torch.linalg.qr(m).Q


def _finite_matrices(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which matrices of a batch are finite (as (count, 1, 1)), and the batch with the others
    zeroed. LAPACK's eigh and SVD raise on a NaN instead of returning one, which would turn a
    step that ``nonfinite="skip"`` discards into an exception; their results for those
    matrices are made NaN instead (:func:`_nan_where_not`), as every other operation's are."""
    finite = torch.isfinite(m).all(-1, keepdim=True).all(-2, keepdim=True)
    return finite, torch.where(finite, m, torch.zeros((), dtype=m.dtype, device=m.device))


def _nan_where_not(finite: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.where(finite, x, torch.full((), float("nan"), dtype=x.dtype, device=x.device))


def symmetric_eigen(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` of each symmetric matrix of a batch (ascending), NaN for a
    matrix that is not finite."""
    finite, safe = _finite_matrices(m)
    values, vectors = torch.linalg.eigh(safe)
    return _nan_where_not(finite.squeeze(-1), values), _nan_where_not(finite, vectors)


def singular_vectors(m: torch.Tensor, r: int, left: bool) -> torch.Tensor:
    """The top-r left (rows x r) or right (cols x r) singular vectors of each matrix of a batch,
    with zero columns past min(rows, cols); NaN for a matrix that is not finite."""
    finite, safe = _finite_matrices(m)
    u, _, vh = torch.linalg.svd(safe, full_matrices=False)
    u, vh = _nan_where_not(finite, u), _nan_where_not(finite, vh)
    basis = u[..., :r] if left else vh.mT[..., :r]
    missing = r - basis.shape[-1]
    if missing > 0:
        basis = torch.nn.functional.pad(basis, (0, missing))
    return basis
