"""The one-method-per-op lowerer: IR nodes to ``torch.fx`` nodes over a bucket's flat buffers,
with what every lowering shares (the bucket's shape, the graphs' input names, the dtype a
step computes in). ``lower.py`` builds a step's graphs with it; ``shaped.py`` extends it for
specs that see tensors as matrices. Kept apart so that the two lowerings both stand on it and
neither imports the other back.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from .collectives import Sharding, all_reduce
from .ir import Node, Program, Scope
from .newton_schulz import operator_args


LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class BucketShape:
    """What the graph needs to know about a bucket: sizes are baked into the graph."""

    numel: int
    ntensors: int
    dtype: torch.dtype
    shapes: tuple = ()  # each tensor's shape, for per-tensor matrix functions
    state_dtype: torch.dtype | None = None  # the states' dtype when not the parameters' (bfloat16 states)
    sharding: Sharding | None = None  # FSDP2: the tensors are local shards of larger ones

    @property
    def full_shapes(self) -> tuple:
        """Each tensor's shape as the model sees it: the global shape of a sharded tensor."""
        return self.sharding.global_shapes if self.sharding else self.shapes

    def runs(self) -> list:
        """(offset, size, count) of each run of consecutive equal-size tensors."""
        sizes = [int(torch.Size(s).numel()) for s in self.shapes] if self.shapes else \
            [self.numel // self.ntensors] * self.ntensors
        runs, offset = [], 0
        for size in sizes:
            if runs and runs[-1][1] == size and runs[-1][0] + runs[-1][1] * runs[-1][2] == offset:
                runs[-1] = (runs[-1][0], size, runs[-1][2] + 1)
            else:
                runs.append((offset, size, 1))
            offset += size
        return runs

    def matrix_shapes(self) -> list:
        """(rows, columns) of each (full) tensor viewed as a matrix; equal 1-D slices if unknown."""
        shapes = self.full_shapes or [(self.numel // self.ntensors,)] * self.ntensors
        return [(s[0], int(torch.Size(s).numel()) // s[0] if s[0] else 0) if len(s) >= 2 else (1, s[0] if s else 1)
                for s in shapes]

    def normal_layout(self) -> tuple:
        """What bucket_normal needs to draw this bucket's Gaussian vector: each tensor's full
        size, and the slice of it held here (None when not sharded)."""
        ranges = tuple(map(self.sharding.local_range, range(self.ntensors))) if self.sharding else None
        return tuple(self.full_numels()), ranges

    def full_numels(self) -> list:
        shapes = self.full_shapes or [(self.numel // self.ntensors,)] * self.ntensors
        return [int(torch.Size(s).numel()) for s in shapes]


def _ident(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def state_input(bucket: int, name: str) -> str:
    """The main graph's input (and, functional, output key) for a per-element state."""
    return f"b{bucket}_state_{_ident(name)}"


def global_input(name: str) -> str:
    """The main graph's input (and, functional, output key) for a ``state s: global``."""
    return f"global_{_ident(name)}"


def _is_python(value) -> bool:
    return isinstance(value, (bool, int, float))


class _Lowerer:
    """Emits FX nodes for IR nodes, once per (node, bucket) — or once per group for nodes that
    do not depend on a bucket (hyperparameter arithmetic, global reductions)."""

    def __init__(self, graph: fx.Graph, placeholders: dict, buckets: list[BucketShape], program: Program):
        self.graph = graph
        self.ph = placeholders
        self.buckets = buckets
        self.program = program
        self.probe_index = {id(node): j for j, node in enumerate(program.probes)}
        self.memo: dict = {}
        self.ok = None  # all gradients finite, under nonfinite="skip"
        self._steps: dict = {}

    def call(self, fn, *args, **kwargs) -> fx.Node:
        return self.graph.call_function(fn, args, kwargs)

    def next_flat(self, name: str, bucket: int, old):
        """The next value of a state (or "param") over the bucket; None where it is kept (m' = m)."""
        node = self.program.next[name]
        if node.op == "state" and node.attr == name:
            return None
        return self.value(node, bucket, broadcast_to=Scope.ELEMENT)

    def next_pieces(self, name: str, bucket: int, old):
        """The step's write to the bucket's buffer in parts (compiler/shaped.py); None: one flat
        write of :meth:`next_flat`, as over a flat bucket every loop is one axis anyway."""
        return None

    def load(self, placeholder, bucket: int, state: bool = False):
        """A buffer in its compute dtype: half-precision buffers (parameters, or states kept in
        bfloat16) are computed in float32."""
        shape = self.buckets[bucket]
        if ((shape.state_dtype or shape.dtype) if state else shape.dtype) in LOW_PRECISION:
            key = ("upcast", placeholder.name)
            if key not in self.memo:
                self.memo[key] = self.graph.call_method("float", (placeholder,))
            return self.memo[key]
        return placeholder

    def step(self, bucket: int):
        """This step's t for a bucket: the stored count plus one (plus zero on a skipped step,
        which only the count written back sees: everything else a skipped step computes is
        discarded)."""
        if bucket not in self._steps:
            stored = self.graph.call_method("reshape", (self.ph[f"b{bucket}_step"], ()))
            increment = 1 if self.ok is None else self.ok
            self._steps[bucket] = self.call(operator.add, stored, increment)
        return self._steps[bucket]

    def global_state(self, name: str):
        """A ``state s: global``, kept as a 1-element buffer (see the note on 0-d inputs)."""
        key = ("global", name)
        if key not in self.memo:
            self.memo[key] = self.graph.call_method("reshape", (self.ph[global_input(name)], ()))
        return self.memo[key]

    def all_finite(self):
        flags = [self.call(torch.all, self.call(torch.isfinite, self.ph[f"b{i}_grad"]))
                 for i in range(len(self.buckets))]
        result = flags[0]
        for flag in flags[1:]:
            result = self.call(torch.logical_and, result, flag)
        if self.sharding:  # a non-finite gradient in any shard skips the step on every rank
            result = self.call(operator.gt, self.collective(self.call(torch.Tensor.to, result, torch.float32), "min"), 0)
        return result

    @property
    def sharding(self):
        """The shard group of the step's buckets (one per parameter group), or None."""
        return self.buckets[0].sharding

    def collective(self, value, op: str):
        """``value`` reduced over the shard group: a partial sum, max or min made whole."""
        if not self.sharding:
            return value
        return self.call(all_reduce, value, op, self.sharding.group_name)

    def value(self, node: Node, bucket: int, broadcast_to: Scope | None = None):
        """The FX value (or Python constant) of ``node`` in ``bucket``."""
        key = (id(node), bucket if (node.scope >= Scope.TENSOR or node.uses_step) else None)
        if key not in self.memo:
            self.memo[key] = self._emit(node, bucket)
        result = self.memo[key]
        if broadcast_to == Scope.ELEMENT and node.scope == Scope.TENSOR:
            result = self._per_element(result, bucket)
        return result

    def _per_element(self, per_tensor, bucket):
        """Each tensor's value repeated over its elements: a broadcast along each run's rows."""
        key = ("broadcast", id(per_tensor), bucket)
        if key not in self.memo:
            pieces, first = [], 0
            for _, size, count in self.buckets[bucket].runs():
                rows = self.call(operator.getitem, per_tensor, slice(first, first + count))
                rows = self.graph.call_method("view", (rows, count, 1))
                pieces.append(self.graph.call_method("reshape", (self.graph.call_method("expand", (rows, count, size)), -1)))
                first += count
            self.memo[key] = pieces[0] if len(pieces) == 1 else self.call(torch.cat, pieces)
        return self.memo[key]

    def _args(self, node: Node, bucket: int):
        """Arguments lowered and broadcast to the node's scope."""
        target = Scope.ELEMENT if node.scope == Scope.ELEMENT else None
        return [self.value(a, bucket, broadcast_to=target) for a in node.args]

    def _emit(self, node: Node, bucket: int):
        op = node.op
        if op == "const":
            return node.attr
        if op == "hyper":
            return self.ph[f"hyper_{node.attr}"]
        if op == "input":
            if node.attr == "step":
                return self.step(bucket)
            if node.attr == "loss":
                return self.ph["loss"]
            return self.load(self.ph[f"b{bucket}_{node.attr}"], bucket)
        if op == "state":
            if node.scope == Scope.GLOBAL:
                return self.global_state(node.attr)
            return self.load(self.ph[state_input(bucket, node.attr)], bucket, state=True)
        if op == "reduce":
            return self._reduce(node, bucket)
        if op == "matrix":
            return self._matrix(node, bucket)
        if op == "measure":
            return self._measure(node, bucket)
        if op == "probe":
            if node.attr.func == "randn" and "generator" in self.ph:  # an initial value
                param = self.ph[f"b{bucket}_param"]
                shape = self.buckets[bucket]
                return self.call(bucket_normal, self.ph["generator"], *shape.normal_layout(),
                                 compute_dtype(shape.dtype), self.graph_device(param))
            return self.load(self.ph[f"b{bucket}_probe_{self.probe_index[id(node)]}"], bucket)
        if op == "onto":
            return self._onto(node, bucket)
        return self.apply(op, self._args(node, bucket))

    def apply(self, op, args: list):
        """An elementwise operation (of the IR's arithmetic and functions) on lowered values."""
        if args and all(_is_python(a) for a in args):  # constants folding could not settle, e.g. rsqrt(4)
            args[0] = self.call(torch.tensor, float(args[0]), dtype=torch.float64)
        if op in _BINARY:
            return self.call(_BINARY[op], *args)
        if op in _UNARY:
            return self.call(_UNARY[op], *args)
        if op in ("min", "max"):
            return self._minmax(op, *args)
        if op == "clamp":
            x, lo, hi = args
            return self._minmax("min", self._minmax("max", x, lo), hi)
        if op == "lerp":
            a, b, w = args
            return self.call(operator.add, a, self.call(operator.mul, w, self.call(operator.sub, b, a)))
        if op == "where":
            return self.call(torch.where, *args)
        if op == "atan2":
            a, b = (self.call(torch.as_tensor, x) if _is_python(x) else x for x in args)
            return self.call(torch.atan2, a, b)
        raise NotImplementedError(f"no lowering for {op}")  # pragma: no cover - IR is closed

    def _onto(self, node: Node, bucket: int):
        """U U^T v: the coefficients U^T v summed over the buckets, then combined per bucket."""
        key = ("coefficients", id(node))
        if key not in self.memo:
            total = None
            for i in range(len(self.buckets)):
                v = self.value(node.args[0], i, broadcast_to=Scope.ELEMENT)
                part = self.call(torch.mv, self.value(node.args[1], i), v)
                total = part if total is None else self.call(operator.add, total, part)
            self.memo[key] = self.collective(total, "sum")
        return self.call(torch.matmul, self.memo[key], self.value(node.args[1], bucket))

    def _minmax(self, op, a, b):
        if _is_python(a):
            a, b = b, a
        if _is_python(b):
            return self.call(torch.clamp, a, **({"max": b} if op == "min" else {"min": b}))
        return self.call(torch.minimum if op == "min" else torch.maximum, a, b)

    def _reduce(self, node: Node, bucket: int):
        scope, func = node.attr.scope, node.attr.func
        combine = {"max": "max", "min": "min"}.get(func, "sum")
        if scope == "groups":  # pragma: no cover - the step reads the total as an input (lower._read_totals)
            raise RuntimeError("internal: a groups.* reduction lowered without its total")
        if scope == "global":
            partials = [self._reduce_part(func, node, i, per_tensor=False) for i in range(len(self.buckets))]
            total = partials[0]
            for p in partials[1:]:
                total = self.call({"max": torch.maximum, "min": torch.minimum}.get(func, operator.add), total, p)
            total = self.collective(total, combine)
            if func == "norm":
                total = self.call(torch.sqrt, total)
            if func == "mean":
                total = self.call(operator.truediv, total, float(sum(sum(b.full_numels()) for b in self.buckets)))
            return total
        result = self.collective(self._reduce_part(func, node, bucket, per_tensor=True), combine)
        if func == "norm":
            result = self.call(torch.sqrt, result)
        if func == "mean":
            sizes = self.call(torch.tensor, [float(n) for n in self.buckets[bucket].full_numels()],
                              dtype=compute_dtype(self.buckets[bucket].dtype), device=self.graph_device(result))
            result = self.call(operator.truediv, result, sizes)
        return result

    def groups_partial(self, node: Node):
        """This group's part of a groups.* reduction: its sum (of squares, for norm; of products,
        for dot; also for mean), max or min over every bucket, whole over the shard group."""
        func = node.attr.func
        parts = [self._reduce_part(func, node, i, per_tensor=False) for i in range(len(self.buckets))]
        total = parts[0]
        for part in parts[1:]:
            total = self.call({"max": torch.maximum, "min": torch.minimum}.get(func, operator.add), total, part)
        return self.collective(total, {"max": "max", "min": "min"}.get(func, "sum"))

    def groups_count(self, node: Node) -> float:
        """How many elements this group's part of a groups.* value covers (a mean's divisor)."""
        return float(sum(sum(b.full_numels()) for b in self.buckets))

    def _reduce_part(self, func, node, bucket, per_tensor):
        """sum (also of a mean), sum of squares (norm), dot, max or min over a bucket, whole or
        per tensor: the part this process holds, which a sharded bucket all-reduces."""
        args = [self.value(a, bucket, broadcast_to=Scope.ELEMENT) for a in node.args]
        x = args[0]
        if func == "norm":
            x = self.call(operator.mul, x, x)
        elif func == "dot":
            x = self.call(operator.mul, x, args[1])
        extreme = {"max": torch.amax, "min": torch.amin}.get(func)
        shape = self.buckets[bucket]
        dtype = compute_dtype(shape.dtype)
        if not per_tensor:
            if extreme and shape.numel == 0:  # an empty bucket or shard: the identity
                return self.call(torch.tensor, reduction_identity(func), dtype=torch.float64)
            return self.call(extreme, x) if extreme else self._sum(x, dtype)
        # a row reduction per run of equal-size tensors: segment_reduce took 30 ms per 10M
        # elements on our CPU against 1.3 ms (and index_add serialised on atomics on CUDA)
        x = self.call(torch.Tensor.to, x, dtype)
        pieces = []
        for offset, size, count in shape.runs():
            if size == 0:  # an empty shard: the reduction's identity
                pieces.append(self.call(torch.full, (count,), reduction_identity(func), dtype=dtype, device=self.graph_device(x)))
                continue
            rows = self.call(operator.getitem, x, slice(offset, offset + size * count))
            rows = self.graph.call_method("view", (rows, count, size))
            pieces.append(self.call(extreme, rows, -1) if extreme else self._sum(rows, dtype, -1))
        return pieces[0] if len(pieces) == 1 else self.call(torch.cat, pieces)

    def _sum(self, x, dtype, *dims):
        return self.call(accumulated_sum, x, dims, dtype)

    def _matrix(self, node: Node, bucket: int):
        shape = self.buckets[bucket]
        x = self.value(node.args[0], bucket, broadcast_to=Scope.ELEMENT)
        if node.attr.func == "aspect":
            ratios = [s[-2] / s[-1] if len(s) >= 2 and s[-1] else 1.0
                      for s in (shape.full_shapes or [()] * shape.ntensors)]
            return self.call(torch.tensor, ratios, dtype=compute_dtype(shape.dtype), device=self.graph_device(x))
        sharded = shape.sharding.gather_args() if shape.sharding else None
        return self.call(torch.ops.gradspec.orthogonalize.default, x,
                         *operator_args(tuple(shape.matrix_shapes()), node.attr.low_precision, sharded))

    def _measure(self, node: Node, bucket: int):
        """tensor.numel (and rows, cols) per tensor, global.numel: sizes baked into the graph."""
        if node.attr.scope == "groups":  # pragma: no cover - an input, as a groups.* reduction
            raise RuntimeError("internal: groups.numel lowered without its total")
        if node.attr.scope == "global":
            return float(sum(sum(b.full_numels()) for b in self.buckets))
        shape = self.buckets[bucket]
        pick = {"numel": lambda r, c: r * c, "rows": lambda r, c: r, "cols": lambda r, c: c}[node.attr.what]
        sizes = [float(pick(r, c)) for r, c in shape.matrix_shapes()]
        return self.call(torch.tensor, sizes, dtype=compute_dtype(shape.dtype),
                         device=self.graph_device(self.ph[f"b{bucket}_param"]))

    def graph_device(self, like):
        return self.graph.call_function(getattr, (like, "device"))


def accumulated_sum(x: torch.Tensor, dims: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A sum accumulated in float64 (float32 on MPS, which has no float64), rounded once to
    ``dtype``: within one rounding of the exact value, where Inductor's float32 cascade was
    2e-7 off, and cheaper, since the cascade makes a CPU reduction pass compute-bound
    (docs/design.md). The device is fixed in a compiled graph, so the choice is traced away."""
    accumulate = torch.float32 if x.device.type == "mps" else torch.float64
    return torch.sum(x, *dims, dtype=accumulate).to(dtype)


def reduction_identity(func: str) -> float:
    """A reduction's value over no element: -inf for max, inf for min, 0 for the sums."""
    return {"max": -math.inf, "min": math.inf}.get(func, 0.0)


def bucket_normal(generator: torch.Generator, numels: tuple, ranges: tuple | None, dtype, device) -> torch.Tensor:
    """A Gaussian vector over a bucket, drawn tensor by tensor at each tensor's full size
    (``numels``) and, for a sharded bucket, sliced to the ``ranges`` held here: every layout
    draws the numbers one process would."""
    pieces = []
    for i, numel in enumerate(numels):
        full = torch.randn(numel, generator=generator, dtype=dtype, device=generator.device)
        pieces.append(full if ranges is None else full[ranges[i][0]:ranges[i][1]])
    return torch.cat(pieces).to(device) if pieces else torch.zeros(0, dtype=dtype, device=device)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a step computes in: float32 for half-precision buffers, else their own."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


_BINARY = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv,
    "pow": torch.pow, "mod": torch.remainder,
    "eq": operator.eq, "ne": operator.ne, "lt": operator.lt, "le": operator.le, "gt": operator.gt,
    "ge": operator.ge, "and": torch.logical_and, "or": torch.logical_or,
}
_UNARY = {
    "neg": operator.neg, "not": torch.logical_not, "sqrt": torch.sqrt, "rsqrt": torch.rsqrt,
    "exp": torch.exp, "log": torch.log, "abs": torch.abs, "sign": torch.sign,
}
