"""Typed IR: a spec specialised to its compile-time switches, as a DAG of interned nodes.

Each node knows its **type** (``real`` or ``bool``) and its **scope**, which decides cost and
how it is computed over flat buffers:

* ``SCALAR``: hyperparameters, the step and the loss, and arithmetic on them (0-d tensors);
* ``GLOBAL``: one value per parameter group, from a ``global.*`` reduction;
* ``TENSOR``: one value per parameter tensor, from a ``tensor.*`` reduction;
* ``ELEMENT``: shaped like the parameter (gradient, parameter, states).

Nodes are interned by the :class:`Builder`, so equal subexpressions are one node (common
subexpressions are shared for free) and constant subtrees are folded as they are built.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import math
import operator
from dataclasses import dataclass
from typing import NamedTuple

from ..dsl import ast, printer
from ..dsl.errors import Collector, Diagnostic, SpecError, did_you_mean
from ..dsl.resolve import INPUTS, Spec
from ..recursion import deep


class Scope(enum.IntEnum):
    SCALAR = 0
    GLOBAL = 1
    TENSOR = 2
    ELEMENT = 3
    SHAPED = 4  # per tensor, in a shape of its own: a row or column vector, a matrix such as L (rows x rows)


ROWS, COLS = "rows", "cols"
ELEMENT_DIMS = (ROWS, COLS)
"""A per-tensor value's shape is a pair of sizes, each ``rows`` or ``cols`` of the tensor's matrix
view (first dimension x the rest; a vector is one row) or a whole number: an element value is
(rows, cols), a per-tensor value (1, 1), ``row.mean(x)`` (rows, 1), Shampoo's L (rows, rows)."""


class ShapeMismatch(Exception):
    """Two shapes that cannot meet; the IR builder turns it into GS067 at the expression."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


def show_dims(dims) -> str:
    return "scalar" if dims is None else f"({dims[0]}, {dims[1]})"


def dims_of(node) -> tuple | None:
    """The per-tensor shape of a node, None for one value per step or group."""
    if node.dims is not None:
        return node.dims
    return {Scope.TENSOR: (1, 1), Scope.ELEMENT: ELEMENT_DIMS}.get(node.scope)


def broadcast_dims(shapes) -> tuple | None:
    """The shape elementwise arithmetic gives: sizes of 1 stretch, equal sizes meet, others are a
    ShapeMismatch."""
    shapes = [d for d in shapes if d is not None]
    if not shapes:
        return None
    out = []
    for axis in (0, 1):
        sizes = {d[axis] for d in shapes} - {1}
        if len(sizes) > 1:
            raise ShapeMismatch(f"shapes {' and '.join(show_dims(d) for d in dict.fromkeys(shapes))} do not match "
                                f"elementwise", "arithmetic between per-tensor values needs equal sizes or sizes of 1; "
                                                "for a matrix product write A @ B")
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


def scope_of_dims(dims) -> Scope:
    if dims == (1, 1):
        return Scope.TENSOR
    return Scope.ELEMENT if dims == ELEMENT_DIMS else Scope.SHAPED


# name -> arity
FUNCTIONS = {
    "sqrt": 1, "rsqrt": 1, "exp": 1, "log": 1, "abs": 1, "sign": 1,
    "min": 2, "max": 2, "clamp": 3, "lerp": 3, "where": 3, "atan2": 2,
}
CONSTANTS = {"inf": math.inf}
"""Names for numbers that have no literal in expressions; a spec's own name of the same
spelling wins."""
LINEAR = {"transpose": 1, "eye": 1, "trace": 1, "eigvecs": 1, "eigvals": 1, "inv_root": (2, 3), "qr": (1, 2),
          "svd_left": 2, "svd_right": 2, "descending": 1}
"""Matrix algebra within a tensor: ``transpose(A)``; ``eye(n)`` (n is rows, cols or a whole
number); ``trace(A)``; for a symmetric A, ``eigvecs(A)`` (columns, eigenvalues descending) and
``eigvals(A)`` (a row, descending); ``inv_root(A, p, floor)``, A^(-1/p) from the eigenvalues
floored at ``floor`` (0 if left out); ``qr(M)``, the orthonormal factor (M's shape: of M = QR if tall, M = LQ if wide),
``qr(M, f32)`` with a switch f32 computed in float32 when true (pytorch-optimizer's SOAP does so
for every dtype); ``svd_left(M, r)`` / ``svd_right(M, r)``, the top-r left (rows x r) / right
(cols x r) singular vectors, zero columns past min(rows, cols); ``descending(d)`` for a row or
column vector d of n entries, the n x n permutation P with ``d @ P`` sorted descending, so that
``M @ P`` orders M's columns and ``transpose(P) @ M`` its rows by d (a 0/1 product: exact).
The product is the operator ``@``."""
AXES = ("row", "col")
BLOCK = "block"
"""The scope of ``tensor.f(x)`` written inside ``blocks B { }``: one value per block."""
"""``row.f(x)`` reduces each row of x (one value per row), ``col.f(x)`` each column."""
MEASURES = {"tensor": ("numel", "rows", "cols"), "global": ("numel",), "groups": ("numel",)}
GROUPS = "groups"
"""``groups.f(x)`` reduces over every parameter group of the optimizer (``global.f``: over one
group); ``groups.numel`` counts their elements. The runtime adds each group's part (see
compiler/lower.py). ``groups`` stays an ordinary name outside ``groups.f(...)``."""
SHAPE_CLASSES = ("matrix", "vector")
"""``if matrix { }``: a tensor of two or more dimensions; ``if vector { }``: one of at most one.
The step is specialised per class, as per switch."""
SIZES = (ROWS, COLS)
"""In an ``if`` condition, ``rows`` and ``cols`` are the sizes of each tensor's matrix view: a
condition that reads them (``if matrix and rows >= cols { }``) is a *shape condition*, decided per
tensor when the step is compiled. A tensor's class is the tuple of its answers, ``matrix`` or
``vector`` first (see :func:`build`)."""
REDUCTIONS = {"sum": 1, "mean": 1, "norm": 1, "dot": 2, "max": 1, "min": 1}
MATRIX = {"orthogonalize": 2, "aspect": 1}
"""Per-tensor functions of a tensor's shape: ``tensor.orthogonalize(x, bf16)`` runs Muon's
quintic Newton-Schulz iteration on each tensor viewed as a matrix (rows = first dimension)
and gives a value per element, ``bf16`` (a switch) picking the iteration's dtype;
``tensor.aspect(x)`` is size(-2) / size(-1) of each tensor's shape (1 for a vector)."""
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)  # Muon's quintic coefficients (Keller Jordan et al.)
NEWTON_SCHULZ_STEPS = 5
"""tensor.orthogonalize's iteration: the lowering runs it (compiler/newton_schulz.py), the law
prover evaluates its 1x1 case; here, where neither needs torch to read them."""
PROBES = {"grad_at": 1, "hvp": 1, "randn": 0, "gauss_newton": 0, "hessian_eigvecs": 2}
"""Functions that evaluate the model again, allowed only inside ``probe every k { }``:
``grad_at(x)`` is the gradient at parameters x (one closure call, same batch); ``hvp(v)`` the
exact Hessian-vector product H v (double backward); ``randn()`` a standard Gaussian per
element (also allowed in initial values); ``gauss_newton()`` the Gauss-Newton-Bartlett
diagonal B * grad(L^)^2 with labels sampled from the closure's logits; and
``hessian_eigvecs(k, iters)`` the top-k Hessian eigenvectors by ``iters`` Lanczos steps
with full reorthogonalisation, a subspace. ``onto(v, U)`` (anywhere) projects v onto a
subspace: U U^T v, U's columns orthonormal over the whole group."""
ARITH = {"+": "add", "-": "sub", "*": "mul", "/": "div", "%": "mod", "^": "pow", "@": "matmul"}
COMPARE = {"==": "eq", "!=": "ne", "<": "lt", "<=": "le", ">": "gt", ">=": "ge"}
LOGIC = {"and": "and", "or": "or"}

_FOLD = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "mod": operator.mod,  # as torch.remainder
    "eq": operator.eq, "ne": operator.ne, "lt": operator.lt, "le": operator.le,
    "gt": operator.gt, "ge": operator.ge, "and": lambda a, b: a and b, "or": lambda a, b: a or b,
    "neg": operator.neg, "not": operator.not_, "abs": abs, "min": min, "max": max,
    "exp": math.exp, "sign": lambda x: float((x > 0) - (x < 0)), "atan2": math.atan2,
}


class Op(enum.StrEnum):
    """What a node computes. Leaves (a constant, hyperparameter, input, state or a law's free
    symbol), the functions of FUNCTIONS and the operators, and the structured operations
    whose ``attr`` is one of the records below. A StrEnum: ``node.op == "add"`` reads as
    the spec's own word."""

    CONST = "const"
    HYPER = "hyper"
    INPUT = "input"
    STATE = "state"
    FREE = "free"
    REDUCE = "reduce"
    MATRIX = "matrix"
    PROBE = "probe"
    ONTO = "onto"
    TILE = "tile"  # blocks B { }: a value made outside read block by block (attr: Tiling)
    UNTILE = "untile"  # a block's value read outside, reassembled from the blocks (attr: Tiling)
    SIZE = "size"  # rows or cols in a shape condition, decided per tensor at compile time (attr: the name)
    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    DIV = "div"
    MOD = "mod"
    POW = "pow"
    NEG = "neg"
    EQ = "eq"
    NE = "ne"
    LT = "lt"
    LE = "le"
    GT = "gt"
    GE = "ge"
    AND = "and"
    OR = "or"
    NOT = "not"
    SQRT = "sqrt"
    RSQRT = "rsqrt"
    EXP = "exp"
    LOG = "log"
    ABS = "abs"
    SIGN = "sign"
    MIN = "min"
    MAX = "max"
    CLAMP = "clamp"
    LERP = "lerp"
    WHERE = "where"
    ATAN2 = "atan2"
    MEASURE = "measure"
    MATMUL = "matmul"
    TRANSPOSE = "transpose"
    EYE = "eye"
    TRACE = "trace"
    EIGVECS = "eigvecs"
    EIGVALS = "eigvals"
    INV_ROOT = "inv_root"
    QR = "qr"
    SVD_LEFT = "svd_left"
    SVD_RIGHT = "svd_right"
    DESCENDING = "descending"


class Kind(enum.StrEnum):
    """What a node's value is: a number per element, scalar or tensor (``real``), a truth value
    (``bool``), or k directions of a subspace (``subspace``)."""

    REAL = "real"
    BOOL = "bool"
    SUBSPACE = "subspace"


class Reduction(NamedTuple):
    """A ``reduce`` node's attr: ``tensor.norm(x)`` is Reduction("tensor", "norm")."""

    scope: str  # "tensor", "global", "row" or "col"
    func: str  # a key of REDUCTIONS


class GroupsReduction(NamedTuple):
    """A ``reduce`` node's attr for ``groups.f(x)``, over every parameter group: where the spec
    writes it ("file:line:col") is the same in every group's program, so the runtime adds each
    group's part to the right total (compiler/lower.py)."""

    scope: str  # "groups"
    func: str  # a key of REDUCTIONS
    site: str


class Measure(NamedTuple):
    """A ``measure`` node's attr: ``tensor.numel`` is Measure("tensor", "numel")."""

    scope: str  # "tensor" or "global"
    what: str  # "numel", "rows" or "cols"


class Sized(NamedTuple):
    """The attr of a matrix function with a size: ``eye(rows)``, ``svd_left(M, r)``."""

    size: object  # "rows", "cols" or an int


class Precision(NamedTuple):
    """The attr of a decomposition computed in a dtype of its own: ``qr(M, true)`` is
    Precision("float32"), cast there and back."""

    dtype: str  # "float32"


class Tiling(NamedTuple):
    """The attr of ``tile`` and ``untile``: each tensor's matrix view cut into blocks of at most
    ``size`` rows and ``size`` columns, row blocks of ``size`` from the top and column blocks from
    the left, the last of each shorter (Distributed Shampoo's blocking). A ``tile`` node is its
    argument block by block, a per-block value whose ``rows`` and ``cols`` are the block's; an
    ``untile`` node is a per-block value put back in its place in the tensor (compiler/blocks.py)."""

    size: int


class MatrixCall(NamedTuple):
    """A ``matrix`` node's attr: a per-tensor function of each tensor viewed as a matrix."""

    func: str  # "orthogonalize" or "aspect"
    low_precision: bool = False  # orthogonalize in bfloat16


class ProbeCall(NamedTuple):
    """A ``probe`` node's attr: which model evaluation, and where the spec calls it (two calls
    of grad_at at different points are two probes)."""

    func: str  # a key of PROBES
    site: int  # the identity of the call in the spec's syntax tree
    rank: int | None = None  # hessian_eigvecs: k directions
    iters: int | None = None  # hessian_eigvecs: Lanczos steps


@dataclass(eq=False)
class Node:
    """One operation. ``attr`` holds a constant's value, an input's, hyperparameter's or state's
    name, or the record of a structured operation (Reduction, MatrixCall, ProbeCall)."""

    op: Op
    args: tuple = ()
    attr: object = None
    type: Kind = Kind.REAL
    scope: Scope = Scope.SCALAR
    uses_step: bool = False  # depends on the step, so it differs between buckets
    dims: tuple | None = None  # per-tensor shape where it is not the scope's (see ELEMENT_DIMS)

    def __repr__(self) -> str:
        inner = ", ".join(repr(a) for a in self.args)
        attr = "" if self.attr is None else repr(self.attr) + (", " if inner else "")
        return f"{self.op}({attr}{inner})"

    @property
    def is_const(self) -> bool:
        return self.op == "const"


@dataclass
class Program:
    """A spec specialised to one setting of its switches.

    ``next`` maps each state (and ``param``) to its next value; ``init`` maps each state to
    its initial value, computed when a parameter first gets a gradient.
    """

    spec: Spec
    next: dict
    init: dict
    state_names: tuple  # per-element states, one buffer per bucket
    global_states: tuple  # ``state s: global``: one value per parameter group
    hypers_used: tuple  # names of numeric hyperparameters read at run time
    uses_loss: bool
    switches: tuple  # the values of every compile-time condition, in order
    laws: tuple = ()  # (source, ast.Law) of the active laws, for the symbolic checker
    origins: dict = None  # id(node) -> [(source, span), ...]: everywhere the node is written
    context: object = None  # the builder, to build a law's expressions in the spec's namespace
    statements: tuple = ()  # (source, State | Define) under these switches, in source order
    assumed: tuple = ()  # (index, condition node, taken): numeric ``if`` conditions, as facts
    probe_periods: tuple = ()  # each probe block's period: an int hyperparameter's name or an int
    probing: frozenset = frozenset()  # the indices of the probe blocks that run in this program
    state_ranks: dict = None  # subspace state -> its number of directions k
    state_dims: dict = None  # per-tensor state shaped unlike the parameter -> its shape ((1, 1): ': tensor')
    shape_class: tuple | None = None  # the class this program is for: ("matrix" | "vector", answers...)
    by_class: dict | None = None  # the class -> its Program, for a spec that reads the class
    state_blocks: dict = None  # state declared in a blocks B { } -> its Tiling: one per block, shaped per block
    size_tests: tuple = ()  # (condition node over rows and cols, answer) of each shape condition this class took

    def class_of(self, matrix: bool, rows: int, cols: int) -> tuple:
        """The class of a tensor whose matrix view is rows x cols: ``("matrix",)`` or ``("vector",)``
        followed by its answer to each shape condition (None where its path never asks), the key of
        ``by_class``; a spec that reads no class gives every tensor ``(kind,)``."""
        kind = "matrix" if matrix else "vector"
        if not self.by_class:
            return (kind,)
        for key, program in self.by_class.items():
            if key[0] == kind and all(size_answer(node, rows, cols) == taken for node, taken in program.size_tests):
                return key
        raise ValueError(f"no class of {self.spec.name} for a {rows} x {cols} {kind}")  # pragma: no cover

    @functools.cached_property
    def shaped(self) -> bool:
        """Whether the step needs each tensor's matrix shape (axis reductions, matrix algebra,
        states shaped unlike the parameter, shape classes, blocks): it is then lowered per run of
        equal-shape tensors, as (count, rows, cols) batches."""
        if self.by_class or self.state_dims or any(n.op in _BLOCK_OPS for n in self.nodes()):
            return True
        programs = [self]
        return any(n.scope == Scope.SHAPED or n.op in _SHAPED_OPS or (n.op == "reduce" and n.attr.scope in AXES)
                   or (n.op == "measure" and n.attr.what != "numel")
                   for p in programs for n in p.nodes())

    @property
    def classes(self) -> list:
        """The Program of each shape class the step distinguishes (itself when it does not)."""
        return list(self.by_class.values()) if self.by_class else [self]

    @functools.cached_property
    def probes(self) -> list:
        """The probe nodes (grad_at, hvp, ...) of the step, in an order where each comes after
        those its arguments need; a ``randn()`` initial value is drawn once, not here. Cached:
        a probing step asks for it every step, and a program never changes once built."""
        return [n for n in self.nodes(initial=False) if n.op == "probe"]

    def law_expr(self, source, expr, free_names=False):
        """``expr`` (a law's claim, given or substitution) as a node, built like the spec's own
        expressions; with ``free_names``, unknown names become free symbols (``k`` in k * grad)."""
        return self.context.extra_expr(source, expr, free_names)

    def nodes(self, initial: bool = True):
        """Every node reachable from the next values (and, with ``initial``, the initial
        values), each once, arguments before users."""
        seen, order = set(), []
        for root in list(self.next.values()) + (list(self.init.values()) if initial else []):
            stack = [(root, False)]  # no recursion: a program may be thousands of nodes deep
            while stack:
                node, expanded = stack.pop()
                if expanded:
                    order.append(node)
                elif id(node) not in seen:
                    seen.add(id(node))
                    stack.append((node, True))
                    stack.extend((a, False) for a in reversed(node.args))
        return order


_BLOCK_OPS = {"tile", "untile"}  # blocks B { }, lowered by compiler/blocks.py
_SHAPED_OPS = {"matmul", "transpose", "eye", "trace", "eigvecs", "eigvals", "inv_root", "qr", "svd_left", "svd_right",
               "descending"}


class Builder:
    """Builds and interns nodes, folding constants; knows the typing and scoping rules."""

    def __init__(self):
        self._interned: dict = {}

    def node(self, op, args=(), attr=None, type_="real", scope=None, dims=None) -> Node:
        """The interned node; ``dims`` gives a per-tensor shape other than its scope's (a matrix
        function's result, a shaped state). Without ``scope``, elementwise broadcasting of the
        arguments decides both (ShapeMismatch where they cannot meet)."""
        # the type is part of the key: False == 0.0 in Python, but not here
        key = (op, tuple(id(a) for a in args), type(attr), repr(attr) if isinstance(attr, float) else attr, dims)
        found = self._interned.get(key)
        if found is not None:
            return found
        if scope is None:
            scope = max((a.scope for a in args), default=Scope.SCALAR)
            if any(a.dims is not None for a in args):
                dims = broadcast_dims([dims_of(a) for a in args])
                scope = scope_of_dims(dims)
            elif scope >= Scope.TENSOR:
                broadcast_dims([dims_of(a) for a in args])
        if dims is not None:  # (1, 1) is per tensor, (rows, cols) per element: their scopes say so
            scope = scope_of_dims(dims)
            dims = dims if scope == Scope.SHAPED else None
        uses_step = (op == "input" and attr == "step") or any(a.uses_step for a in args)
        made = Node(Op(op), tuple(args), attr, Kind(type_), scope, uses_step, dims)
        self._interned[key] = made
        return made

    def const(self, value) -> Node:
        if isinstance(value, bool):
            return self.node("const", (), value, "bool")
        return self.node("const", (), float(value))

    def op(self, op, *args) -> Node:
        """An operation on real or bool nodes, constant-folded when every argument is constant."""
        type_ = "bool" if op in ("eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not") else "real"
        if op == "where":
            type_ = args[1].type
        if all(a.is_const for a in args):
            folded = _fold(op, [a.attr for a in args])
            if folded is not None:
                return self.const(folded)
        if op == "matmul":
            return self.matmul(*args)
        if op == "where" and args[0].is_const:
            return args[1] if args[0].attr else args[2]
        if op in ("and", "or") and any(a.is_const for a in args):
            const, other = (args[0], args[1]) if args[0].is_const else (args[1], args[0])
            if const.attr == (op == "and"):  # true and x, false or x
                return other
            return const
        return self.node(op, args, None, type_)


    def matmul(self, a: Node, b: Node) -> Node:
        """``a @ b`` of two per-tensor matrices whose inner sizes agree."""
        da, db = dims_of(a), dims_of(b)
        if da is None or db is None:
            raise ShapeMismatch("a matrix product needs a per-tensor matrix on each side, not a scalar",
                                "multiply by a scalar with *")
        if da[1] != db[0]:
            raise ShapeMismatch(f"the product of {show_dims(da)} and {show_dims(db)}: {da[1]} columns against "
                                f"{db[0]} rows", "transpose one side (transpose(A)), or check which side each "
                                                 "factor multiplies")
        if a.op == "eye":  # the identity is the unit of @: I A is A, exactly, and costs nothing
            return b
        if b.op == "eye":
            return a
        return self.node("matmul", (a, b), None, "real", Scope.SHAPED, (da[0], db[1]))

    def linear(self, func: str, args: list, size=None, precision=None) -> Node:
        """A matrix function of LINEAR on nodes (``size``: eye's n, svd's r; ``precision``: a
        Precision for qr), shape-checked."""
        if func == "eye":
            return self.node("eye", (), Sized(size), "real", Scope.SHAPED, (size, size))
        a = args[0]
        da = dims_of(a)
        if da is None:
            raise ShapeMismatch(f"{func} works on a per-tensor matrix, not a scalar", None)
        if func == "transpose":
            if a.op == "eye":
                return a
            return self.node("transpose", (a,), None, "real", Scope.SHAPED, (da[1], da[0]))
        if func == "descending":
            if 1 not in da or da == (1, 1):
                raise ShapeMismatch(f"descending orders the entries of a row or column vector, not of "
                                    f"{show_dims(da)}", "reduce to a vector first, as in col.sum(Q * (A @ Q)) "
                                                        "for the diagonal of transpose(Q) @ A @ Q")
            n = da[1] if da[0] == 1 else da[0]
            return self.node("descending", (a,), None, "real", Scope.SHAPED, (n, n))
        if func in ("svd_left", "svd_right"):
            return self.node(func, (a,), Sized(size), "real", Scope.SHAPED, (da[0] if func == "svd_left" else da[1], size))
        if func == "qr":
            return self.node("qr", (a,), precision, "real", Scope.SHAPED, da)
        if da[0] != da[1]:
            raise ShapeMismatch(f"{func} needs a square matrix, not {show_dims(da)}",
                                "a Gram matrix such as G @ transpose(G) is square")
        if func == "trace":
            return self.node("trace", (a,), None, "real", Scope.TENSOR)
        if func == "eigvals":
            return self.node("eigvals", (a,), None, "real", Scope.SHAPED, (1, da[0]))
        if func == "inv_root":
            for extra in args[1:]:
                if extra.scope > Scope.GLOBAL:
                    raise ShapeMismatch("inv_root's power and floor are numbers (one per step)", None)
            return self.node("inv_root", tuple(args) + ((self.const(0.0),) if len(args) == 2 else ()), None, "real",
                             Scope.SHAPED, da)
        return self.node(func, (a,), None, "real", Scope.SHAPED, da)  # eigvecs


def evaluate_scalar(node: Node, values: dict) -> float:
    """A value per step that reads only numbers and hyperparameters (a global state's initial
    value), at the hyperparameters ``values``."""
    if node.op == "const":
        return node.attr
    if node.op == "hyper":
        return float(values[node.attr])
    folded = _fold(node.op, [evaluate_scalar(a, values) for a in node.args])
    if folded is None:
        raise ValueError(f"cannot evaluate {node!r} before the first step")
    return folded


def size_answer(node: Node, rows: int, cols: int) -> bool:
    """A shape condition's answer for a tensor whose matrix view is rows x cols."""
    def value(n):
        if n.op == "const":
            return n.attr
        if n.op == "size":
            return rows if n.attr == ROWS else cols
        return _fold(n.op, [value(a) for a in n.args])
    return bool(value(node))


def _sized(node: Node) -> bool:
    """Whether a condition's node reads only numbers and sizes: a shape condition."""
    return all(n.op in ("const", "size") or n.op in _FOLD or n.op in ("div", "pow") for n in _subtree(node)) \
        and any(n.op == "size" for n in _subtree(node))


def _fold(op, values):
    try:
        if op in _FOLD:
            return _FOLD[op](*values)
        if op == "div":
            return values[0] / values[1]
        if op == "pow":
            try:
                result = float(values[0]) ** float(values[1])
            except OverflowError:  # as torch.pow computes it: an infinity of the base's sign
                return math.copysign(math.inf, float(values[0])) if float(values[1]) % 2 == 1 else math.inf
            return result if isinstance(result, float) else None  # (-8)^(1/3) is complex
        if op == "sqrt" and values[0] >= 0:
            return math.sqrt(values[0])
        if op == "log" and values[0] > 0:
            return math.log(values[0])
    except (ArithmeticError, ValueError):
        return None
    return None


@deep
def build(spec: Spec, hyper_values: dict | None = None, forced: dict | None = None,
          probing=frozenset()) -> Program:
    """Specialise ``spec`` to ``hyper_values`` (defaults where missing) and build its IR.

    ``probing`` holds the indices of the probe blocks that run at this step (a spec with
    probes has one program per set of probes due at a step); the others keep their states.

    A spec that reads the shape class (``if matrix { }``) gets one program per class, joined in
    ``by_class``, keyed by each class's answers (see :data:`SIZES`).

    ``forced`` maps the index of an ``if`` condition (in the order they are met) to the branch
    to take whatever the values say: the symbolic checker uses it to check the branches of a
    numeric condition (``if momentum > 0``) that the defaults do not take.

    Raises SpecError with every problem found: unknown names, type and scope errors, cycles
    between next values, states without a next value, a missing update.
    """
    if spec.kind == "adaptor":
        raise SpecError(_adaptor_alone(spec))
    values = {**spec.hyper_defaults, **(hyper_values or {})}
    forced, probing = forced or {}, frozenset(probing)
    first = _ProgramBuilder(spec, values, forced, probing, "matrix")
    primary = first.run()
    if not first.reads_class:
        primary.shape_class = None
        _refuse_shaped_model_probes(spec, primary)
        return primary
    # Every path through the shape conditions, depth first: a condition not fixed yet takes the
    # answer of a 1 x 1 matrix (the tensor laws are sampled on), then its other answer is explored.
    # The first program is that 1 x 1 matrix's class.
    found = []
    pending = [("matrix", {}), ("vector", {})]
    while pending:
        kind, fixed = pending.pop(0)
        builder = first if kind == "matrix" and not fixed else \
            _ProgramBuilder(spec, values, forced, probing, kind, first.b, fixed)
        program = primary if builder is first else builder.run()
        found.append((kind, builder.asked, program))
        if len(found) > MAX_SHAPE_CLASSES:
            src, span = next(reversed(builder.asked_at.values()), (None, None))
            raise SpecError(Diagnostic("GS069", f"the shape conditions split tensors into more than "
                                                f"{MAX_SHAPE_CLASSES} classes, each compiled on its own",
                                       src or spec.source, span, "decide on fewer sizes, or nest the conditions "
                                       "so that each one is asked only where it matters"))
        prefix = dict(fixed)
        for question, (_, taken, free) in builder.asked.items():
            if free:
                pending.append((kind, {**prefix, question: not taken}))
            prefix[question] = taken
    asked = sorted({question for _, answers, _ in found for question in answers})
    programs = {}
    for kind, answers, program in found:
        key = (kind, *(answers[q][1] if q in answers else None for q in asked))
        program.shape_class = key
        program.size_tests = tuple((node, taken) for node, taken, _ in answers.values())
        programs[key] = program
    return _refuse_shaped_model_probes(spec, _by_class(spec, programs))


def _refuse_shaped_model_probes(spec, program: Program) -> Program:
    """``program``, or GS069 where it evaluates the model (a probe other than ``randn()``) and
    also needs each tensor's matrix shape: a model probe's points and results are lowered as flat
    runs of elements only."""
    if not program.shaped:
        return program
    model = [(p, n) for p in program.classes for n in p.probes if n.attr.func != "randn"]
    if model:
        owner, node = model[0]
        src, span = ((owner.origins or {}).get(id(node)) or [(None, None)])[0]
        errors = Collector(spec.source)
        errors.error("GS069", f"{node.attr.func}(...) evaluates the model, which a shape-aware step (shape "
                              "conditions, row./col. reductions, matrix algebra, states shaped unlike the "
                              "parameter) cannot do", span,
                     "keep curvature probes in elementwise specs, or split the parameters into two groups "
                     "with two optimizers", src)
        errors.raise_if_any()
    return program


MAX_SHAPE_CLASSES = 64
"""The most shape classes a step may have: n independent shape conditions make 2^n of them,
each built, checked and compiled on its own (12 conditions took 11 s to check)."""


def _by_class(spec, programs: dict) -> Program:
    """One Program for a step that treats classes of tensors differently (matrices and vectors,
    tall and wide matrices): the union of the classes' states and hyperparameters, each class's own
    program in ``by_class``, the first class's values where they differ (the 1 x 1 matrix's, which
    the checker samples laws on). Values per group (global reductions and states) must not differ
    between the classes (GS069): they are one value over every tensor of the group."""
    classes = list(programs.values())
    primary = classes[0]
    errors = Collector(spec.source)
    for other in classes[1:]:
        for name in set(primary.global_states) | set(other.global_states):
            if primary.next.get(name) is not other.next.get(name):
                errors.error("GS069", f"global state '{name}' is computed differently for {_class_words(primary)} "
                                      f"and {_class_words(other)}", None,
                             "a per-group value is one value over every tensor: compute it outside "
                             "'if matrix { }' and shape conditions")
        # A reduction one class computes and the other does not is still one value over every
        # tensor where its argument reads nothing of the class (clip_grad_norm's norm of grad
        # under galore, whose vectors may not need it): the lowering takes it over every tensor.
        reductions = [{id(n): n for n in p.nodes() if n.scope == Scope.GLOBAL and n.op in ("reduce", "onto")}
                      for p in (primary, other)]
        differing = {key: n for mine, theirs in (reductions, reductions[::-1])
                     for key, n in mine.items() if key not in theirs and _reads_the_class(n)}
        if differing:
            located = [place for p in (primary, other) for n in p.nodes() if id(n) in differing
                       for place in (p.origins or {}).get(id(n), [])[:1]]
            src, span = located[0] if located else (None, None)
            errors.error("GS069", f"a global reduction reads a value that differs between {_class_words(primary)} "
                                  f"and {_class_words(other)}", span,
                         "reduce over the group outside 'if matrix { }' and shape conditions, from values every "
                         "class shares", src)
    _dedupe(errors)
    errors.raise_if_any()
    ordered = classes[::-1]  # the first class's values win
    merged = lambda field: {k: v for p in ordered for k, v in (getattr(p, field) or {}).items()}  # noqa: E731
    return dataclasses.replace(
        primary, state_names=tuple(dict.fromkeys(n for p in classes for n in p.state_names)),
        hypers_used=tuple(sorted({h for p in classes for h in p.hypers_used})),
        uses_loss=any(p.uses_loss for p in classes), next=merged("next"), init=merged("init"),
        state_ranks=merged("state_ranks"), state_dims=merged("state_dims"), shape_class=None, by_class=programs,
        state_blocks=merged("state_blocks"), size_tests=())


def _class_words(program: Program) -> str:
    """How a message names a class: "matrices", "vectors", "matrices (second shape condition false)"."""
    kind, *answers = program.shape_class
    words = "matrices" if kind == "matrix" else "vectors"
    told = [f"shape condition {i + 1} {'true' if a else 'false'}" for i, a in enumerate(answers) if a is not None]
    return f"{words} ({', '.join(told)})" if told else words


def _dedupe(errors: Collector) -> None:
    """One diagnostic per problem when several pairs of classes show it."""
    seen, kept = set(), []
    for d in errors.diagnostics:
        key = (d.code, d.span, d.message.split(" between ")[0])
        if key not in seen:
            seen.add(key)
            kept.append(d)
    errors.diagnostics[:] = kept


@deep
def build_probing(spec: Spec, hyper_values: dict | None = None) -> Program:
    """The program of a step where every probe of ``spec`` runs (the plain one if it has none):
    the whole method, for showing and checking."""
    plain = build(spec, hyper_values)
    if not plain.probe_periods:
        return plain
    return build(spec, hyper_values, probing=frozenset(range(len(plain.probe_periods))))


_FOLDABLE = set(_FOLD) | {"div", "pow", "sqrt", "log"}


def _reads_the_class(node: Node) -> bool:
    """Whether a value over the group reads something that exists per shape class: a state of
    the tensor, a matrix or axis operation, a size other than numel."""
    seen, stack = set(), list(node.args)
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if ((n.op == "state" and n.scope != Scope.GLOBAL) or n.scope == Scope.SHAPED or n.op in _SHAPED_OPS | _BLOCK_OPS
                or (n.op == "reduce" and n.attr.scope in AXES) or (n.op == "measure" and n.attr.what != "numel")):
            return True
        stack.extend(n.args)
    return False


def _subtree(node: Node) -> list:
    out, stack = [], [node]
    while stack:
        n = stack.pop()
        out.append(n)
        stack.extend(n.args)
    return out


def _adaptor_alone(spec):
    return Diagnostic("GS031", f"'{spec.name}' is an adaptor: it needs a base optimizer", spec.source,
                      None, f"use it as {spec.name}(adam) or with another base")


class _Loop:
    """One iteration of a ``repeat`` block being built: the loop variables' current values and
    the body's definitions, built on demand for this iteration."""

    def __init__(self, src, current: dict, body: dict, nexts: dict):
        self.src = src
        self.current = current  # loop variable -> its node in this iteration
        self.body = body  # definition name -> Define
        self.nexts = nexts  # loop variable -> Define of X' = ...
        self.built: dict = {}
        self.building: list = []


class _ProgramBuilder:
    def __init__(self, spec: Spec, values: dict, forced: dict | None = None, probing=frozenset(),
                 shape_class: str = "matrix", builder: Builder | None = None, answers: dict | None = None):
        self.shape_class = shape_class
        self.reads_class = False
        self.answers = answers or {}  # a shape condition (its node's text) -> the answer to take
        self.asked: dict = {}  # condition text -> (node, answer taken, free: not fixed by ``answers``), in order
        self.asked_at: dict = {}  # condition text -> (source, span) where it is first written
        self.loops: dict = {}  # loop variable -> (source, Repeat)
        self.loop_locals: set = set()  # definitions made inside repeat blocks
        self._loop_stack: list = []
        self.spec = spec
        self.values = values
        self.forced = forced or {}
        self.probing = probing
        self.probe_periods: list = []
        self.kept: dict = {}  # state -> (source, Define): its next value is in a probe not run now
        self.probe_locals: set = set()  # definitions inside probes not run now
        self.probe_items: set = set()  # ids of the definitions inside probes run now
        self.periodic_items: set = set()  # those of them inside ``every k { }``, which evaluates nothing
        self._in_probe = False
        self._in_periodic = False
        self._nonfinite_reported: set = set()  # the NaN and infinite constants already located
        self._initial = None  # (source, name, State) of the initial value being built
        self.assumed: list = []  # (index, condition node on numeric hyperparameters, branch taken)
        self.b = builder or Builder()
        self.errors = Collector(spec.source)
        self.locals: dict = {}  # name -> (source, Define)
        self.states: dict = {}  # name -> (source, State)
        self.nexts: dict = {}  # name -> (source, Define)
        self.switches: list = []
        self._memo: dict = {}
        self._building: list = []
        self.laws: list = []
        self.active: list = []
        self.origins: dict = {}
        self._free_names = False
        self.uses_loss = False
        self.hypers_used: set = set()
        self.blocks: list = []  # the Tiling of each blocks statement collected, in order
        self.item_block: dict = {}  # id of a statement inside a blocks statement -> (index of the block, Tiling)
        self._block = None  # (index, Tiling) of the block whose statement is being built; None outside
        self._in_law = False  # building a law's expression (extra_expr): it names states as they are kept

    # ---- collecting the active statements
    def run(self) -> Program:
        self._collect(self.spec.items)
        self._check_projected()
        self.errors.raise_if_any()  # a base that cannot run projected: nothing more to say about it
        for name, (src, state) in self.states.items():
            if name not in self.nexts and name not in self.kept:
                self.errors.error("GS040", f"state '{name}' has no next value", state.span,
                                  f"add {name}' = ... (write {name}' = {name} to keep it constant)", src)
        for name, (src, define) in list(self.nexts.items()) + list(self.kept.items()):
            if name != "param" and name not in self.states:
                hint = f"declare it with 'state {name} = 0'" if name not in self.locals else \
                    f"'{name}' is a definition; only states have next values"
                self.errors.error("GS041", f"'{name}' is not a state", define.span, hint, src)
        if "param" not in self.nexts:
            self.errors.error("GS042", f"'{self.spec.name}' defines no update",
                              None, "add param' = param - lr * ...")
        # build whatever is defined, so one run reports every error in the spec
        nexts = {name: self._next(name) for name in ["param", *self.states] if name in self.nexts or name in self.kept}
        inits = {name: self._init(name) for name in self.states}
        for name, node in nexts.items():  # parameters and states hold numbers, never conditions
            if node is not None and node.type == "bool":
                src, define = self.nexts.get(name) or self.kept[name]
                self.errors.error("GS050", f"the next value of '{name}' must be a number, not a condition",
                                  define.span, "write where(condition, 1, 0) for a 0/1 number", src)
        for name, node in inits.items():
            if node is not None and node.type == "bool":
                src, state = self.states[name]
                self.errors.error("GS050", f"state '{name}' must start at a number, not a condition",
                                  state.init.span, "write where(condition, 1, 0) for a 0/1 number", src)
        for name, located in self.locals.items():  # unused definitions are checked too
            self._definition(("local", name), located)
        for name, (src, state) in self.states.items():
            if state.scope != "global":
                continue
            init = inits.get(name)
            if init is not None and (init.scope != Scope.SCALAR or any(n.op not in ("const", "hyper") and n.op not in
                                                                       _FOLDABLE for n in _subtree(init))):
                self.errors.error("GS060", f"global state '{name}' must start at a number or a value of the "
                                           f"hyperparameters", state.init.span,
                                  f"write state {name}: global = 0, or = d0 for a hyperparameter d0", src)
            nxt = nexts.get(name)
            if nxt is not None and nxt.scope > Scope.GLOBAL:
                self.errors.error("GS061", f"the next value of global state '{name}' has one value per "
                                           f"{'tensor' if nxt.scope == Scope.TENSOR else 'element'}",
                                  self.nexts[name][1].span, "reduce it with global.sum(...) or similar", src)
        ranks = self._subspaces(nexts, inits)
        shaped = self._shaped_states(nexts, inits)
        blocked = self._block_states()
        self.errors.raise_if_any()
        element = tuple(n for n, (_, st) in self.states.items() if st.scope != "global")
        global_ = tuple(n for n, (_, st) in self.states.items() if st.scope == "global")
        return Program(self.spec, nexts, inits, element, global_, tuple(sorted(self.hypers_used)),
                       self.uses_loss, tuple(self.switches) + tuple(("blocks", t.size) for t in self.blocks),
                       tuple(self.laws), self.origins, self,
                       tuple(self.active), tuple(self.assumed), tuple(self.probe_periods),
                       self.probing, ranks, shaped, self.shape_class, state_blocks=blocked)

    def _shaped_states(self, nexts, inits) -> dict:
        """Each state shaped unlike the parameter, with its shape; its initial and next values
        must have that shape (a smaller one stretches: 0 fills a matrix), GS067 otherwise."""
        out = {}
        for name, (src, state) in self.states.items():
            dims = self._state_dims(name)
            if dims is None or dims == ELEMENT_DIMS:
                dims_check = ELEMENT_DIMS if state.scope == "element" else None
            else:
                out[name] = dims_check = dims
            if dims_check is None:
                continue
            for node, what, span in ((inits.get(name), "initial value", state.init.span),
                                     (nexts.get(name), "next value", (self.nexts.get(name) or (None, state))[1].span)):
                have = dims_of(node) if node is not None else None
                try:
                    fits = node is None or broadcast_dims([have, dims_check]) == dims_check
                except ShapeMismatch:
                    fits = False
                if not fits:
                    self.errors.error("GS067", f"the {what} of state '{name}' has shape {show_dims(have)}, but the "
                                               f"state is {show_dims(dims_check)}", span,
                                      "reduce it to the state's shape (row.mean, col.mean, tensor.sum) or declare "
                                      "the state with the value's shape", src)
        return out

    def _state_dims(self, name) -> tuple | None:
        """A state's declared per-tensor shape with sizes resolved: ': tensor' is (1, 1), an int
        hyperparameter is its value; None for per-element, global and subspace states. A base's
        per-element state in an adaptor's space (``State.space``) has the shape of the gradient
        the adaptor gives the base, where that is not the parameter's."""
        src, state = self.states[name]
        if state.scope == "tensor":
            return (1, 1)
        if state.scope == "element" and state.space is not None:
            dims = self._space_dims(state.space)
            return None if dims in (None, ELEMENT_DIMS) else dims
        if state.scope != "shaped":
            return None
        return tuple(self._size(src, d, state.span) for d in state.dims)

    def _space_dims(self, space: str) -> tuple | None:
        """The per-tensor shape of the gradient an adaptor gives its base (the definition
        ``space``) in this class; None when the class does not define it or it is being built."""
        if space not in self.locals or ("local", space) in self._building:
            return None
        node = self._definition(("local", space), self.locals[space])
        return dims_of(node) if node is not None else None

    def _projected(self) -> str | None:
        """The definition that replaces the gradient when this class runs the base in a space
        whose shape is not the parameter's (GaLore's projection), else None."""
        spaces = {st.space for _, st in self.states.values() if st.scope == "element" and st.space is not None}
        # a base without per-element states: 'base.grad = ' and 'base.param = ' (dsl/resolve.py)
        spaces |= {name for name in self.locals if name.endswith(".grad") and name[:-4] + "param" in self.locals}
        return next((sp for sp in sorted(spaces) if self._space_dims(sp) not in (None, ELEMENT_DIMS)), None)

    def _check_projected(self) -> None:
        """GS076, before anything is built: what a base does that cannot run in a projected space,
        each at its place. A state starting at the parameter, or a reduction of it (the base's
        parameter there is the adaptor's, zero for GaLore); a model probe (it evaluates the model
        at points shaped like the parameter); a statement that reads the tensor's shape (rows and
        cols are the parameter's, not the projected gradient's)."""
        space = self._projected()
        if space is None:
            return
        prefix = space.rsplit(".", 1)[0] + "."
        adaptor = prefix[:-1]
        hint = f"run {adaptor} over an elementwise optimizer such as adam, or this base without {adaptor}"
        parameter = {"param", prefix + "param"}
        # an adaptor's statements follow its base's (dsl/resolve.py): the base's sources come first
        own_source = self.locals[space][0]
        first_own = next(i for i, (src, _) in enumerate(self.spec.items) if src is own_source)
        base_sources = {id(src) for src, _ in self.spec.items[:first_own]}
        for src, top in self.spec.items:
            for item in _nested([top]):
                if isinstance(item, ast.Probe) and item.model:
                    self.errors.error("GS076", f"a model probe in a base that {adaptor} runs in a projected space: "
                                               f"it evaluates the model at points shaped like the parameter",
                                      item.span, hint, src)
                    break
                if isinstance(item, ast.If) and id(src) in base_sources and \
                        self._shape_words(item.cond, SHAPE_CLASSES + SIZES):
                    self.errors.error("GS076", f"a shape condition reads the parameter's shape, but {adaptor} runs "
                                               f"the base in a projected space, whose shape is not the parameter's",
                                      item.cond.span, hint, src)
        for src, item in self.active:
            if id(src) not in base_sources:
                continue  # the adaptor's own, or an adaptor's around it, which see the parameter
            if isinstance(item, ast.State) and item.space is not None and \
                    parameter & {n.name for n in ast.names_in(item.init)}:
                self.errors.error("GS076", f"state '{item.name}' starts at the parameter, but {adaptor} runs the "
                                           f"base in a projected space, where the parameter is its own",
                                  item.init.span, hint, src)
                continue
            found = _shape_aware(item, parameter)
            if found is not None:
                what, span = found
                self.errors.error("GS076", f"{what}, but {adaptor} runs the base in a projected space, whose shape "
                                           f"is not the parameter's and where the parameter is its own", span,
                                  hint, src)

    def _size(self, src, size, span):
        """``rows``, ``cols``, a whole number or an int hyperparameter's value, as a size; GS068
        (and 1, to go on) otherwise."""
        if size in (ROWS, COLS) or (isinstance(size, int) and size >= 1):
            return size
        hyper = self.spec.hypers.get(size) if isinstance(size, str) else None
        if hyper is not None and hyper.kind == "int" and int(self.values[size]) >= 1:
            return int(self.values[size])
        self.errors.error("GS068", f"a size is rows, cols, a whole number or an int hyperparameter >= 1, not "
                                   f"'{size}'", span, did_you_mean(str(size), [ROWS, COLS, *self.spec.hypers])
                          or "declare hyper r: int = 8 >= 1", src)
        return 1

    def _subspaces(self, nexts, inits) -> dict:
        """Each ``state U: subspace(k)``'s k, checked against its initial and next values."""
        ranks = {}
        for name, (src, state) in self.states.items():
            if state.scope != "subspace":
                continue
            hyper = self.spec.hypers.get(state.rank)
            if hyper is None or hyper.kind != "int" or int(self.values[state.rank]) < 1:
                self.errors.error("GS064", f"the rank of subspace '{name}' must be an int hyperparameter >= 1",
                                  state.span, f"hyper {state.rank}: int = 10 >= 1", src)
                continue
            ranks[name] = int(self.values[state.rank])
            init, nxt = inits.get(name), nexts.get(name)
            if init is not None and not (init.is_const and init.attr == 0):
                self.errors.error("GS064", f"subspace '{name}' starts empty: its initial value must be 0",
                                  state.init.span, f"state {name}: subspace({state.rank}) = 0", src)
            # kept between its probe's steps, never by a U' = U of its own: it would stay empty
            kept = nxt is not None and nxt.op == "state" and nxt.attr == name and name not in self.nexts
            found = nxt is not None and nxt.op == "probe" and nxt.type == "subspace" and nxt.attr.rank == ranks[name]
            if nxt is not None and not (kept or found):
                self.errors.error("GS064", f"the next value of subspace '{name}' must be "
                                           f"hessian_eigvecs({state.rank}, ...)", self.nexts[name][1].span, None, src)
        return ranks

    def extra_expr(self, src, expr, free_names=False):
        """Build one more expression after :meth:`run`; raise SpecError if it is unsound."""
        self.errors = Collector(self.spec.source)
        self._free_names = free_names
        self._in_law = True  # a law names states themselves, wherever they are kept: no block crossing
        try:
            node = self._expr(src, expr)
        finally:
            self._free_names = False
            self._in_law = False
        self.errors.raise_if_any()
        return node

    def _collect(self, items):
        for src, item in items:
            if isinstance(item, ast.If):
                block, self._block = self._block, self.item_block.get(id(item))  # where the condition is
                taken = self._condition(src, item.cond)
                self._block = block
                self._collect([(src, i) for i in (item.then if taken else item.otherwise)])
            elif isinstance(item, ast.Probe):
                self._probe(src, item)
            elif isinstance(item, ast.Blocks):
                self._blocks(src, item)
            elif isinstance(item, ast.Repeat):
                self._repeat(src, item)
            elif isinstance(item, ast.State):
                self.active.append((src, item))
                self._declare(self.states, item.name, src, item, "state")
            elif isinstance(item, ast.Define):
                self.active.append((src, item))
                self._declare(self.nexts if item.primed else self.locals, item.name, src, item,
                              "next value" if item.primed else "definition")
            elif isinstance(item, ast.Law):
                self.laws.append((src, item))
            elif isinstance(item, ast.Require):
                self._require(src, item)

    def _require(self, src, item: ast.Require) -> None:
        if not self._condition(src, item.cond, record=False):
            self.errors.error("GS043", item.message or "a requirement of the spec does not hold",
                              item.span, _describe_values(item.cond, self.values), src)

    # ---- blocks B { }: the body once per block of each tensor's matrix view (compiler/blocks.py)
    def _blocks(self, src, item: ast.Blocks):
        """A blocks statement: its statements are collected as any others, each marked with its
        block, so that building one reads the tensor's values block by block (_across)."""
        size = int(self.values[item.size]) if isinstance(item.size, str) else int(item.size)
        block = (len(self.blocks), Tiling(max(1, size)))
        self.blocks.append(block[1])
        for inner in _nested(item.items):
            self.item_block[id(inner)] = block
        self._collect([(src, i) for i in item.items])

    def _across(self, src, expr: ast.Name, node):
        """``node``, the value of the name ``expr``, as the statement being built sees it: a value
        made outside a blocks statement and read inside it is read block by block (``tile``); an
        elementwise value made inside and read outside is put back together (``untile``)."""
        if node is None or not self.blocks or dims_of(node) is None or self._in_law:
            return node
        return self._converted(node, self._home(expr), self._block, expr.span, src)

    def _home(self, expr: ast.Name):
        """The block (index, Tiling) where the name ``expr`` is made; None for the tensor's own."""
        name = expr.name
        loop = self._loop_stack[-1] if self._loop_stack else None
        if loop is not None and (name in (loop.nexts if expr.primed else {**loop.current, **loop.body})):
            return self._block  # a loop's own value, made where the loop is
        if expr.primed and name in self.loops and name not in self.states:
            located = self.loops[name]
        elif expr.primed:
            located = self.nexts.get(name) or self.kept.get(name)
        else:
            located = self.locals.get(name) or self.states.get(name)
        return self.item_block.get(id(located[1])) if located is not None else None

    def _converted(self, node, home, reader, span, src):
        """``node``, made in block ``home``, as block ``reader`` sees it (None: outside blocks)."""
        if node is None or home == reader or dims_of(node) is None:
            return node
        if home is not None and reader is not None:
            self.errors.error("GS075", "a value made in one blocks block is read in another", span,
                              "each blocks block reads the tensor's values and its own; carry the value out as "
                              "an elementwise value, or compute it in this block", src)
            return None
        dims = dims_of(node)
        if dims[0] not in (ROWS, 1) or dims[1] not in (COLS, 1) or node.type == Kind.SUBSPACE:
            if reader is not None:
                self.errors.error("GS075", f"a {show_dims(dims)} value made outside a blocks block cannot be read "
                                           f"inside it: a block reads the tensor's elementwise values block by "
                                           f"block", span, "make the value inside the block, from the block's own "
                                                           "values", src)
            else:
                self.errors.error("GS075", f"a {show_dims(dims)} value of a blocks block cannot be read outside "
                                           f"it: only values per element, per block row, column or block are put "
                                           f"back in place", span, "compute what you need from it inside the block, "
                                                                   "as an elementwise value", src)
            return None
        if reader is not None:
            return self.b.node("tile", (node,), reader[1], node.type, scope_of_dims(dims), dims)
        return self.b.node("untile", (node,), home[1], node.type, Scope.ELEMENT)

    def _block_states(self) -> dict:
        """Each state declared in a blocks block, with its Tiling; a state's next value is set
        in the block where the state is declared (GS075)."""
        out = {}
        for name, (src, state) in self.states.items():
            home = self.item_block.get(id(state))
            located = self.nexts.get(name) or self.kept.get(name)
            if located is not None and self.item_block.get(id(located[1])) != home:
                inside = "inside" if home is not None else "outside"
                self.errors.error("GS075", f"state '{name}' is declared {inside} a blocks block, but its next "
                                           f"value is set {'outside' if home is not None else 'inside'} it",
                                  located[1].span, "set a state's next value in the block where it is declared",
                                  located[0])
            if home is not None:
                out[name] = home[1]
        return out

    def _probe(self, src, probe: ast.Probe):
        """A probe block: collected as usual when it runs at this step; otherwise its states
        keep their values and its definitions are out of reach."""
        index = len(self.probe_periods)
        self.probe_periods.append(probe.every)
        if index in self.probing:
            before = len(self.active)
            self._collect([(src, i) for i in probe.items])
            collected = {id(item) for _, item in self.active[before:]}
            self.probe_items |= collected
            if not probe.model:
                self.periodic_items |= collected
            return
        for _, item in _defines(src, probe.items, self):
            if item.primed:
                self.kept[item.name] = (src, item)
            else:
                self.probe_locals.add(item.name)

    def _repeat(self, src, item: ast.Repeat):
        """A repeat block: its ``X' = ...`` statements make X a loop variable, built when ``X'``
        is read; its other definitions exist only inside it."""
        for _, define in _defines(src, item.items, self):
            if define.primed:
                if define.name in self.loops:
                    self.errors.error("GS044", f"loop variable '{define.name}' is advanced by two repeat blocks",
                                      define.span, "name the second loop's variable differently", src)
                self.loops[define.name] = (src, item)
            else:
                self.loop_locals.add(define.name)
        for _, require in _defines(src, item.items, self, ast.Require):  # a loop's body is the step's
            self._require(src, require)
        for inner in item.items:
            if isinstance(inner, ast.Repeat):
                self.errors.error("GS068", "repeat blocks do not nest", inner.span,
                                  "unroll the inner loop by hand, or use one loop with more steps", src)

    def _loop(self, name):
        """The values of every variable of ``name``'s repeat block after its last iteration."""
        src, item = self.loops[name]
        key = ("loop", id(item))
        if key in self._memo:
            return self._memo[key]
        count = self._count(src, item)
        body, nexts = {}, {}
        for _, define in _defines(src, item.items, self):
            (nexts if define.primed else body)[define.name] = define
        current = {}
        for var, define in nexts.items():
            if var not in self.locals:
                self.errors.error("GS068", f"'{var}' is advanced by a repeat block but has no start: define "
                                           f"{var} = ... outside the block", define.span,
                                  f"write {var} = <start> before 'repeat'; inside, {var} is the current iterate",
                                  src)
                self._memo[key] = None
                return None
            start = self._definition(("local", var), self.locals[var])
            current[var] = self._converted(start, self.item_block.get(id(self.locals[var][1])),
                                           self.item_block.get(id(item)), define.span, src)
        before = len(self.errors.diagnostics)
        block, self._block = self._block, self.item_block.get(id(item))  # the body runs where the loop is
        try:
            for _ in range(count):
                if any(v is None for v in current.values()) or len(self.errors.diagnostics) > before:
                    self._memo[key] = None
                    return None
                loop = _Loop(src, current, body, nexts)
                self._loop_stack.append(loop)
                try:
                    current = {var: self._loop_value(loop, var, primed=True) for var in nexts}
                finally:
                    self._loop_stack.pop()
        finally:
            self._block = block
        self._memo[key] = current
        return current

    def _count(self, src, item) -> int:
        count = item.count
        if isinstance(count, str):
            return max(1, int(self.values.get(count, 1)))
        return max(1, int(count))

    def _loop_value(self, loop: _Loop, name, primed=False):
        """A body definition (or, ``primed``, a loop variable's next iterate) in this iteration."""
        key = (name, primed)
        if key in loop.built:
            return loop.built[key]
        define = loop.nexts[name] if primed else loop.body[name]
        if key in loop.building:
            cycle = " -> ".join(f"{n}{chr(39) if p else ''}" for n, p in loop.building[loop.building.index(key):] + [key])
            self.errors.error("GS048", f"circular definition: {cycle}", define.span, None, loop.src)
            return None
        loop.building.append(key)
        node = self._expr(loop.src, define.expr)
        loop.building.pop()
        loop.built[key] = node
        return node

    def _declare(self, table, name, src, item, what):
        if name in table:
            self.errors.error("GS044", f"{what} '{name}' is defined twice", item.span,
                              "each name has one definition; use where(...) to choose between values", src)
        elif what == "definition" and (name in INPUTS or name in self.spec.hypers):
            self.errors.error("GS045", f"'{name}' is already {'an input' if name in INPUTS else 'a hyperparameter'}",
                              item.span, "choose another name", src)
        else:
            table[name] = (src, item)

    def _shape_words(self, expr, words) -> set:
        """The ``words`` (shape classes, sizes) that ``expr`` reads as such, not as a name of the
        spec's own."""
        names = {n.name for n in ast.names_in(expr) if n.qualifier is None}
        return names & set(words) - set(self.locals) - set(self.states) - set(self.spec.hypers)

    def _condition(self, src, expr, record=True) -> bool:
        if not record and self._shape_words(expr, SHAPE_CLASSES):
            self.errors.error("GS047", "a 'require' condition may use only hyperparameters, not the tensor's shape "
                                       "class", expr.span, "choose statements per class with 'if matrix' instead", src)
            return False
        node = self._expr(src, expr, static=True)
        if node is None:
            return False
        if node.type != "bool":
            self.errors.error("GS046", "a condition must be true or false", expr.span,
                              "compare it, as in momentum > 0", src)
            return False
        if not node.is_const and _sized(node):
            if not record:
                self.errors.error("GS047", "a 'require' condition may use only hyperparameters, not a tensor's "
                                           "sizes", expr.span, "choose statements per shape with 'if' instead", src)
                return False
            taken = self._size_answer(src, expr, node)
            self.switches.append(taken)
            return taken
        if not node.is_const:
            leaves = {n.op for n in _subtree(node) if not n.args}
            if leaves <= {"const"}:  # hyperparameters only, but a part of it has no value here
                self.errors.error("GS047", "the condition has no value at these hyperparameters: a part of it is "
                                           "undefined (a division by 0, a root or log of a negative number)",
                                  expr.span, f"{_describe_values(expr, self.values)}; write the condition so "
                                             "that it is defined for every allowed value", src)
            elif leaves <= {"const", "size"}:
                self.errors.error("GS047", "a shape condition combines rows and cols with +, -, *, / and ^ only",
                                  expr.span, "compare rows * rows > cols rather than sqrt(rows) > cols", src)
            else:
                self.errors.error("GS047", "an 'if' or 'require' condition may use only hyperparameters",
                                  expr.span, "use where(cond, a, b) for a condition on tensors or the step", src)
            return False
        taken = bool(node.attr)
        if record:
            taken = self.forced.get(len(self.switches), taken)
            self.switches.append(taken)
            numeric = {n.name for n in ast.names_in(expr)
                       if n.name in self.spec.hypers and self.spec.hypers[n.name].kind != "bool"}
            # the same condition over hyperparameter nodes: a fact inside the branch. One that
            # also reads the shape class (if matrix and lr > 0.1) has no such form, the class
            # being known only here: its branch goes without the fact, which is the safe side
            if numeric and not self._shape_words(expr, SHAPE_CLASSES + SIZES):
                self.assumed.append((len(self.switches) - 1, self._expr(src, expr), taken))
        return taken

    def _size_answer(self, src, expr, node) -> bool:
        """The answer this class takes to a shape condition (an ``if`` reading rows or cols): the
        one it was built for, else a 1 x 1 matrix's (and :func:`build` explores the other)."""
        if self._block is not None:
            self.errors.error("GS074", "a shape condition inside a blocks block: rows and cols there are a "
                                       "block's, which differ from block to block", expr.span,
                              "decide on the tensor's shape outside 'blocks'", src)
            return True
        try:
            sampled = size_answer(node, 1, 1)
            for rows, cols in ((0, 1), (1, 0), (0, 0)):  # tensors with no elements are asked too
                size_answer(node, rows, cols)
        except TypeError:  # a part that has no value (k / 0, 10^400, rows / cols of a (3, 0) tensor)
            self.errors.error("GS047", "a shape condition must have a value for every shape, tensors without "
                                       "elements included: a part of this one has none (a division by 0 or by a "
                                       "size that may be 0, a number too large)", expr.span,
                              "compare rows and cols with whole numbers and int hyperparameters, as rows > cols "
                              "rather than rows / cols > 1", src)
            return True
        index = repr(node)  # one question however many 'if's ask it, the same in every build
        self.reads_class = True
        if index in self.asked:
            return self.asked[index][1]
        free = index not in self.answers
        taken = sampled if free else self.answers[index]
        self.asked[index] = (node, taken, free)
        self.asked_at[index] = (src, expr.span)
        return taken

    def branch_taken(self, src, cond) -> bool:
        """Which branch an ``if`` inside a block that does not run now takes, without recording
        it as a switch: its hyperparameter condition's value, or this class's answer to a shape
        condition (the same as when the block runs)."""
        node = self._expr(src, cond, static=True)
        if node is None:
            return True
        if node.is_const:
            return bool(node.attr)
        return self._size_answer(src, cond, node) if _sized(node) else True

    # ---- building expressions
    def _next(self, name):
        if name in self.kept and name not in self.nexts:
            return self._state_node(name)
        return self._definition(("next", name), self.nexts[name])

    def _init(self, name):
        src, state = self.states[name]
        block, self._block = self._block, self.item_block.get(id(state))
        initial, self._initial = self._initial, (src, name, state)
        node = self._expr(src, state.init, in_init=True)
        self._block, self._initial = block, initial
        return node

    def _definition(self, key, located, in_init=False):
        memo_key = (key, in_init)  # an initial value builds a definition under other rules
        if memo_key in self._memo:
            return self._memo[memo_key]
        src, define = located
        if key in self._building:
            cycle = " -> ".join(_show_key(k) for k in self._building[self._building.index(key):] + [key])
            self.errors.error("GS048", f"circular definition: {cycle}", define.span,
                              "a next value may use old values (m) and other next values (v'), but not itself",
                              src)
            return None
        self._building.append(key)
        outer, self._in_probe = self._in_probe, id(define) in self.probe_items
        outer_periodic, self._in_periodic = self._in_periodic, id(define) in self.periodic_items
        loops, self._loop_stack = self._loop_stack, []  # a definition outside a loop sees no loop variable
        block, self._block = self._block, self.item_block.get(id(define))  # built where it is written
        node = self._expr(src, define.expr, in_init=in_init)
        self._block = block
        self._loop_stack = loops
        self._in_probe, self._in_periodic = outer, outer_periodic
        self._building.pop()
        self._memo[memo_key] = node
        return node

    def _expr(self, src, expr, static=False, in_init=False):
        """``expr`` as a node, or None after recording an error; remembers where each node was
        first written, so the symbolic checker can point at it."""
        self._in_init = in_init
        try:
            node = self._expr_node(src, expr, static, in_init)
        except ShapeMismatch as mismatch:
            self.errors.error("GS067", str(mismatch), expr.span, mismatch.hint, src)
            return None
        if node is not None and getattr(expr, "span", None) is not None:
            self.origins.setdefault(id(node), []).append((src, expr.span))
            if node.is_const and isinstance(node.attr, float) and not math.isfinite(node.attr):
                self._nonfinite_constant(src, expr, node)
        return node

    def _nonfinite_constant(self, src, expr, node) -> None:
        """GS072 for numbers that fold to NaN (inf - inf, 0 * inf), or to an infinity from
        finite ones (2^1024 overflows float64); an infinity written as inf is the writer's."""
        if id(node) in self._nonfinite_reported or isinstance(expr, ast.Num):
            return
        written_inf = any((isinstance(e, ast.Name) and e.name == "inf") or
                          (isinstance(e, ast.Num) and isinstance(e.value, float) and math.isinf(e.value))
                          for e in ast.subexpressions(expr))
        if math.isinf(node.attr) and written_inf:
            return
        self._nonfinite_reported.add(id(node))
        what = "is NaN" if math.isnan(node.attr) else "overflows float64 to an infinity"
        self.errors.error("GS072", f"this number {what}", expr.span,
                          "write inf where an infinity is meant; otherwise change the numbers", src)

    def _expr_node(self, src, expr, static, in_init):
        b = self.b
        recurse = lambda e: self._expr(src, e, static, in_init)  # noqa: E731
        if isinstance(expr, ast.Num):
            return b.const(expr.value)
        if isinstance(expr, ast.Bool):
            return b.const(expr.value)
        if isinstance(expr, ast.Name):
            return self._across(src, expr, self._name(src, expr, static, in_init))
        if isinstance(expr, ast.UnOp):
            arg = recurse(expr.operand)
            if arg is None:
                return None
            if expr.op == "-":
                return self._typed(src, expr, "neg", [arg], "real")
            return self._typed(src, expr, "not", [arg], "bool")
        if isinstance(expr, ast.BinOp):
            left, right = recurse(expr.left), recurse(expr.right)
            if left is None or right is None:
                return None
            if expr.op in ARITH:
                return self._typed(src, expr, ARITH[expr.op], [left, right], "real")
            if expr.op in COMPARE:
                return self._typed(src, expr, COMPARE[expr.op], [left, right], "real")
            return self._typed(src, expr, LOGIC[expr.op], [left, right], "bool")
        if isinstance(expr, ast.Call):
            return self._call(src, expr, recurse)
        if isinstance(expr, ast.Reduce):
            return self._reduce(src, expr, recurse, static)
        if isinstance(expr, ast.Measure):
            return self._measure(src, expr, static)
        raise TypeError(f"unknown expression {expr!r}")  # pragma: no cover - parser guarantees

    def _typed(self, src, expr, op, args, want):
        for a in args:
            if a.type != want:
                if want == "real":
                    hint = "a condition is not a number; use where(cond, 1, 0)"
                else:
                    hint = "compare numbers to get a condition, as in x > 0"
                self.errors.error("GS050", f"'{_op_text(expr)}' needs {'numbers' if want == 'real' else 'conditions'}",
                                  expr.span, hint, src)
                return None
        return self.b.op(op, *args)

    def _measure(self, src, expr: ast.Measure, static):
        if static:
            self.errors.error("GS047", "an 'if' or 'require' condition may use only hyperparameters",
                              expr.span, "branch on the shape class with 'if matrix { }'", src)
            return None
        if expr.what not in MEASURES[expr.scope]:
            self.errors.error("GS055", f"unknown size '{expr.scope}.{expr.what}'", expr.span,
                              f"sizes: {', '.join(f'{expr.scope}.{w}' for w in MEASURES[expr.scope])}", src)
            return None
        if expr.scope == GROUPS and (self._loop_stack or self._in_init):
            return self._groups_misplaced(src, expr, None)
        scope = Scope.GLOBAL if expr.scope in ("global", GROUPS) else Scope.TENSOR
        return self.b.node("measure", (), Measure(expr.scope, expr.what), "real", scope)

    def _linear(self, src, expr, recurse):
        """A matrix function (LINEAR): sizes (eye's n, svd's r) are read as sizes, not values."""
        arity = LINEAR[expr.func]
        counts = arity if isinstance(arity, tuple) else (arity,)
        if len(expr.args) not in counts:
            self.errors.error("GS052", f"{expr.func} takes {' or '.join(map(str, counts))} arguments, got "
                                       f"{len(expr.args)}", expr.span, None, src)
            return None
        sized = {"eye": 0, "svd_left": 1, "svd_right": 1}.get(expr.func)
        size = None
        if sized is not None:
            arg = expr.args[sized]
            word = arg.name if isinstance(arg, ast.Name) and not arg.primed and arg.qualifier is None else \
                int(arg.value) if isinstance(arg, ast.Num) and float(arg.value).is_integer() else printer.expr(arg)
            size = self._size(src, word, arg.span)
        args = [recurse(a) for i, a in enumerate(expr.args) if i != sized]
        if any(a is None for a in args):
            return None
        precision = None
        if expr.func == "qr" and len(args) == 2:  # qr(M, f32): a switch, as tensor.orthogonalize's bf16
            f32 = args.pop()
            if f32.type != "bool" or not f32.is_const:
                self.errors.error("GS062", "qr's second argument must be true or false, fixed when the step is "
                                           "compiled (true: the QR in float32)", expr.args[1].span,
                                  "use a switch: hyper qr_float32 = true", src)
                return None
            precision = Precision("float32") if f32.attr else None
        for a, text in zip(args, [a for i, a in enumerate(expr.args) if i != sized]):
            if a.type != "real":
                self.errors.error("GS050", f"{expr.func} needs numbers", text.span, None, src)
                return None
        return self.b.linear(expr.func, args, size, precision)

    def _call(self, src, expr, recurse):
        if expr.func in LINEAR:
            return self._linear(src, expr, recurse)
        if expr.func in PROBES:
            return self._probe_call(src, expr, recurse)
        if expr.func == "onto":
            return self._onto(src, expr, recurse)
        if expr.func not in FUNCTIONS:
            hint = did_you_mean(expr.func, FUNCTIONS)
            if expr.func in REDUCTIONS:
                hint = f"reductions need a scope: tensor.{expr.func}(...) or global.{expr.func}(...)"
            self.errors.error("GS051", f"unknown function '{expr.func}'", expr.span, hint, src)
            return None
        args = self._arguments(src, expr, expr.func, FUNCTIONS[expr.func], recurse)
        if args is None:
            return None
        if expr.func == "where":
            if args[0].type != "bool":
                self.errors.error("GS053", "where's first argument must be a condition", expr.args[0].span,
                                  "compare, as in where(x > 0, a, b)", src)
                return None
            if args[1].type != args[2].type:
                self.errors.error("GS054", "where's two branches must both be numbers or both conditions",
                                  expr.span, None, src)
                return None
            return self.b.op("where", *args)
        return self._typed(src, expr, expr.func, args, "real")

    def _probe_call(self, src, expr, recurse):
        func = expr.func
        if not (self._in_probe or (func == "randn" and self._in_init)):
            where = "inside a 'probe every k { }' block" + (" or in an initial value" if func == "randn" else "")
            self.errors.error("GS063", f"{func}(...) evaluates the model, so it may appear only {where}"
                              if func != "randn" else f"randn() may appear only {where}", expr.span,
                              "put the definition that uses it inside the probe block", src)
            return None
        if self._in_periodic and func != "randn":
            self.errors.error("GS063", f"{func}(...) evaluates the model, which an 'every k {{ }}' block does not do",
                              expr.span, "write 'probe every k { }' for periodic work that evaluates the model "
                              "(its steps then need step(closure))", src)
            return None
        if func == "hessian_eigvecs":
            return self._eigvecs(src, expr)
        args = self._arguments(src, expr, func, PROBES[func], recurse)
        if args is None:
            return None
        for a, text in zip(args, expr.args):
            if a.type != "real":
                self.errors.error("GS050", f"{func} needs numbers", text.span, None, src)
                return None
            if _groups_values(a):
                self.errors.error("GS077", f"{func}'s argument reads a groups.* value, which is known only after "
                                           "each group has reduced its part, after the probes ran", text.span,
                                  "evaluate at a point that reads global.* or a state instead", src)
                return None
        return self.b.node("probe", tuple(args), ProbeCall(func, id(expr)), "real", Scope.ELEMENT)

    def _eigvecs(self, src, expr):
        if len(expr.args) != 2:
            self.errors.error("GS052", f"hessian_eigvecs takes 2 arguments (k, iters), got {len(expr.args)}",
                              expr.span, None, src)
            return None
        sizes = []
        for arg in expr.args:
            hyper = self.spec.hypers.get(arg.name) if isinstance(arg, ast.Name) else None
            value = self.values[arg.name] if hyper is not None and hyper.kind == "int" else \
                arg.value if isinstance(arg, ast.Num) and float(arg.value).is_integer() else None
            if value is None or int(value) < 1:
                self.errors.error("GS064", "hessian_eigvecs's k and iters are whole numbers >= 1 fixed when the "
                                           "step is compiled", arg.span, "pass int hyperparameters, as in "
                                                                         "hessian_eigvecs(k, lanczos_steps)", src)
                return None
            sizes.append(int(value))
        k, iters = sizes
        if iters < k:
            self.errors.error("GS064", f"Lanczos needs at least k = {k} steps to find k eigenvectors, got {iters}",
                              expr.span, f"use iters >= {k} (2k + 10 is a common choice)", src)
            return None
        return self.b.node("probe", (), ProbeCall("hessian_eigvecs", id(expr), k, iters), "subspace",
                           Scope.ELEMENT)

    def _onto(self, src, expr, recurse):
        args = self._arguments(src, expr, "onto", 2, recurse)
        if args is None:
            return None
        v, subspace = args
        if subspace.type != "subspace":
            self.errors.error("GS065", "onto(v, U) projects onto a subspace: U must be a subspace state or "
                                       "hessian_eigvecs(...)", expr.args[1].span, None, src)
            return None
        if v.type != "real":
            self.errors.error("GS050", "onto needs numbers to project", expr.args[0].span, None, src)
            return None
        return self.b.node("onto", (v, subspace), None, "real", Scope.ELEMENT)

    def _arguments(self, src, expr, what, arity, recurse):
        """The call's arguments as nodes, or None after an arity or argument error."""
        if len(expr.args) != arity:
            self.errors.error("GS052", f"{what} takes {arity} argument{'s' if arity > 1 else ''}, "
                                       f"got {len(expr.args)}", expr.span, None, src)
            return None
        args = [recurse(a) for a in expr.args]
        return None if any(a is None for a in args) else args

    def _reduce(self, src, expr, recurse, static):
        if static:
            self.errors.error("GS047", "an 'if' or 'require' condition may use only hyperparameters",
                              expr.span, None, src)
            return None
        if expr.func in MATRIX and expr.scope == "tensor":
            return self._matrix(src, expr, recurse)
        if self._block is not None and expr.scope != "tensor":
            self.errors.error("GS074", f"inside a blocks block, reductions are tensor.f, over the block; "
                                       f"'{expr.scope}.{expr.func}' is not one", expr.span,
                              "reduce outside 'blocks' and read the result inside", src)
            return None
        if expr.scope not in ("tensor", "global", GROUPS, *AXES):
            self.errors.error("GS055", f"unknown reduction '{expr.scope}.{expr.func}'", expr.span,
                              "reductions are tensor.f, global.f (one value per tensor or group), groups.f (one "
                              "over every group), row.f and col.f (one per row or column of each tensor's matrix "
                              "view)", src)
            return None
        if expr.func not in REDUCTIONS:
            self.errors.error("GS055", f"unknown reduction '{expr.scope}.{expr.func}'", expr.span,
                              did_you_mean(expr.func, REDUCTIONS) or f"reductions: {', '.join(REDUCTIONS)}", src)
            return None
        args = self._arguments(src, expr, f"{expr.scope}.{expr.func}", REDUCTIONS[expr.func], recurse)
        if args is None:
            return None
        for a, text in zip(args, expr.args):
            if a.type != "real":
                self.errors.error("GS050", "a reduction needs numbers", text.span, None, src)
                return None
            if a.scope < Scope.ELEMENT:
                self.errors.error("GS056", f"{expr.scope}.{expr.func} reduces over a tensor's elements, but "
                                           f"this argument has one value per {_scope_word(a.scope)}",
                                  text.span, "reduce an elementwise expression such as grad or m'", src)
                return None
        dims = broadcast_dims([dims_of(a) for a in args])  # dot's two sides meet elementwise
        if expr.scope in ("global", GROUPS) and dims != ELEMENT_DIMS and self._projected() is not None:
            self.errors.error("GS076", f"{expr.scope}.{expr.func} of a value in a projected space: a value per "
                                       f"group sums the parameters' own values, and this one has shape "
                                       f"{show_dims(dims)}", expr.span,
                              "reduce a value shaped like the parameter, or run the adaptor over a base without "
                              "global reductions", src)
            return None
        attr = Reduction(expr.scope, expr.func)
        if expr.scope == GROUPS:
            inner = next((n for a in args for n in _groups_values(a)), None)
            if inner is not None or self._loop_stack or self._in_init:
                return self._groups_misplaced(src, expr, inner)
            site = f"{src.filename if src is not None else ''}:{expr.span.line}:{expr.span.column}" \
                if expr.span is not None else f"at{id(expr)}"
            return self.b.node("reduce", tuple(args), GroupsReduction(GROUPS, expr.func, site), "real", Scope.GLOBAL)
        if expr.scope == "global":
            return self.b.node("reduce", tuple(args), attr, "real", Scope.GLOBAL)
        if expr.scope == "tensor":
            if self._block is not None:  # over the block: a scope of its own, never taken for the tensor's
                attr = Reduction(BLOCK, expr.func)
            return self.b.node("reduce", tuple(args), attr, "real", Scope.TENSOR)
        reduced = (dims[0], 1) if expr.scope == "row" else (1, dims[1])
        return self.b.node("reduce", tuple(args), attr, "real", Scope.SHAPED, reduced)

    def _groups_misplaced(self, src, expr, inner):
        """GS077: a value over every group is known only once every group has reduced its part,
        so it cannot feed another groups.* reduction, start a state, or vary within a loop."""
        what = f"{expr.scope}.{getattr(expr, 'func', None) or expr.what}"
        if inner is not None:
            reason = "reduces a value that reads another groups.* value"
            hint = "keep the inner total in a global state and reduce with its old value: state s: global = 0, " \
                   "s' = groups.sum(...), then read s"
        elif self._loop_stack:
            reason = "is inside a repeat block"
            hint = "reduce before the loop, or after it from the loop variable's last value X'"
        else:
            reason = "is in an initial value"
            hint = "start the state at a number and set it in its next value"
        self.errors.error("GS077", f"{what} {reason}: a value over every parameter group is known only after "
                                   "each group has reduced its part", expr.span, hint, src)
        return None

    def _matrix(self, src, expr, recurse):
        args = self._arguments(src, expr, f"tensor.{expr.func}", MATRIX[expr.func], recurse)
        if args is None:
            return None
        x = args[0]
        if x.type != "real" or x.scope != Scope.ELEMENT:
            self.errors.error("GS056", f"tensor.{expr.func} works on a tensor's elements", expr.args[0].span,
                              "pass an elementwise value such as m'", src)
            return None
        if expr.func == "aspect":
            return self.b.node("matrix", (x,), MatrixCall("aspect"), "real", Scope.TENSOR)
        bf16 = args[1]
        if bf16.type != "bool" or not bf16.is_const:
            self.errors.error("GS062", f"tensor.{expr.func}'s second argument must be true or false, fixed "
                                       "when the step is compiled", expr.args[1].span,
                              "use a switch: hyper ns_bfloat16 = true", src)
            return None
        return self.b.node("matrix", (x,), MatrixCall(expr.func, bool(bf16.attr)), "real", Scope.ELEMENT)

    def _name(self, src, expr: ast.Name, static, in_init):
        name = expr.name
        if expr.qualifier == GROUPS and not expr.primed:  # groups.numel; GS055 for another size
            return self._measure(src, ast.Measure(GROUPS, name, expr.span), static)
        if expr.qualifier in AXES and not expr.primed:  # row.numel: an axis qualifies reductions only
            self.errors.error("GS055", f"unknown size '{expr}': '{expr.qualifier}.' qualifies a reduction, as in "
                                       f"{expr.qualifier}.mean(x)", expr.span,
                              "sizes: tensor.numel, tensor.rows, tensor.cols (a row has tensor.cols elements)", src)
            return None
        if expr.qualifier is not None:
            self.errors.error("GS057", f"'{expr}' reads a base spec, but this is not an adaptor", expr.span,
                              None, src)
            return None
        if self._loop_stack and expr.qualifier is None:
            loop = self._loop_stack[-1]
            if not expr.primed and name in loop.current:
                return loop.current[name]
            if not expr.primed and name in loop.body:
                return self._loop_value(loop, name)
            if expr.primed and name in loop.nexts:
                return self._loop_value(loop, name, primed=True)
        if expr.primed and expr.qualifier is None and name in self.loops and name not in self.states:
            values = self._loop(name)
            return None if values is None else values[name]
        if not expr.primed and name in self.loop_locals and name not in self.locals and name not in self.states:
            self.errors.error("GS068", f"'{name}' is defined inside a repeat block and exists only there",
                              expr.span, "carry what you need out in a loop variable: X' = ... inside, X' after", src)
            return None
        known = name in self.locals or name in self.states or name in self.spec.hypers or name in INPUTS
        if name in SHAPE_CLASSES and not known and not expr.primed:
            if not static:
                self.errors.error("GS047", f"'{name}' (the shape class) is known when the step is compiled: read "
                                           f"it in an 'if' condition", expr.span,
                                  f"if {name} {{ ... }} else {{ ... }}", src)
                return None
            self.reads_class = True
            return self.b.const(self.shape_class == name)
        if name in CONSTANTS and not known and not expr.primed:
            return self.b.const(CONSTANTS[name])
        if name in SIZES and static and not known and not expr.primed:  # a shape condition's size
            return self.b.node("size", (), name, "real", Scope.SCALAR)
        if static and (name in INPUTS or name in self.states or name in self.locals or expr.primed):
            self.errors.error("GS047", "an 'if' or 'require' condition may use only hyperparameters",
                              expr.span, f"'{name}' changes during training; use where(...) instead", src)
            return None
        if in_init and (expr.primed or name in self.states or name in ("step", "loss")):
            state_src, state_name, state = self._initial
            if src is not state_src:  # reached through another spec's definition: an adaptor's grad
                self.errors.error("GS058", f"state '{state_name}' starts at a value that another spec makes from "
                                           f"'{expr}' ({src.filename}:{expr.span.line}), which an initial value "
                                           f"cannot use", state.init.span,
                                  "start the state at 0, or run it under an adaptor whose gradient is made of "
                                  "grad, param and hyperparameters", state_src)
                return None
            self.errors.error("GS058", f"an initial value cannot use '{expr}'", expr.span,
                              "initial values may use grad, param, hyperparameters and definitions of them",
                              src)
            return None
        if expr.primed:
            if name in self.nexts:
                return self._definition(("next", name), self.nexts[name], in_init)
            if name in self.kept and name in self.states:
                return self._state_node(name)
            hint = f"'{name}' is not a state" if name not in self.states else f"define {name}' = ..."
            self.errors.error("GS059", f"'{name}' has no next value", expr.span, hint, src)
            return None
        if name in self.locals:
            return self._definition(("local", name), self.locals[name], in_init)
        if name in self.states:
            return self._state_node(name)
        if name in self.spec.hypers:
            hyper = self.spec.hypers[name]
            if hyper.kind == "bool" or static:
                return self.b.const(self.values[name])
            self.hypers_used.add(name)
            return self.b.node("hyper", (), name, "real", Scope.SCALAR)
        if name in INPUTS:
            if name == "loss":
                self.uses_loss = True
            scope = Scope.ELEMENT if name in ("grad", "param") else Scope.SCALAR
            return self.b.node("input", (), name, "real", scope)
        if self._free_names:
            return self.b.node("free", (), name, "real", Scope.SCALAR)
        if name in self.probe_locals:
            self.errors.error("GS066", f"'{name}' is defined inside a probe, which runs only every few steps",
                              expr.span, f"carry it in a state: state {name}_kept = 0, and inside the probe "
                                         f"{name}_kept' = {name}", src)
            return None
        visible = set(self.locals) | set(self.states) | set(self.spec.hypers) | set(INPUTS)
        self.errors.error("GS030", f"unknown name '{name}'", expr.span,
                          did_you_mean(name, visible) or "declare it as a hyperparameter, state or definition", src)
        return None


    def _state_node(self, name):
        state = self.states[name][1]
        if state.scope == "subspace":
            return self.b.node("state", (), name, "subspace", Scope.ELEMENT)
        dims = self._state_dims(name) if state.scope in ("tensor", "shaped", "element") else None
        if dims is not None:
            return self.b.node("state", (), name, "real", scope_of_dims(dims), dims)
        scope = Scope.GLOBAL if state.scope == "global" else Scope.ELEMENT
        return self.b.node("state", (), name, "real", scope)


_SHAPE_FUNCTIONS = set(LINEAR)


def _shape_aware(item, parameter: set) -> tuple | None:
    """(what it does, span) of the first part of a statement that cannot run in a projected space:
    a state shaped unlike its parameter, an axis reduction, matrix algebra, tensor.orthogonalize or
    tensor.aspect, a size such as tensor.rows (they read the tensor's shape), a probe function, a
    reduction of the parameter (one of the names ``parameter``); None for an elementwise statement."""
    if isinstance(item, ast.State) and item.scope in ("shaped", "subspace"):
        return f"state '{item.name}' is shaped by the tensor", item.span
    expr = item.init if isinstance(item, ast.State) else getattr(item, "expr", None)
    stack = [expr] if expr is not None else []
    while stack:
        e = stack.pop()
        if isinstance(e, ast.Reduce) and (e.scope in AXES or (e.scope == "tensor" and e.func in MATRIX)):
            return f"{e.scope}.{e.func} reads the tensor's shape", e.span
        if isinstance(e, ast.Reduce) and parameter & {n.name for a in e.args for n in ast.names_in(a)}:
            return f"{e.scope}.{e.func} reduces the parameter", e.span
        if isinstance(e, ast.Call) and (e.func in _SHAPE_FUNCTIONS or e.func in PROBES or e.func == "onto"):
            return f"{e.func}(...) reads the tensor's shape or the model", e.span
        if isinstance(e, ast.Measure):  # the parameters' sizes, not the projected values'
            return f"{e.scope}.{e.what} reads the tensor's shape", e.span
        if isinstance(e, ast.Name) and e.qualifier == GROUPS:
            return f"groups.{e.name} reads the parameters' sizes", e.span
        if isinstance(e, ast.BinOp) and e.op == "@":
            return "a matrix product reads the tensor's shape", e.span
        for child in (getattr(e, "left", None), getattr(e, "right", None), getattr(e, "operand", None)):
            if child is not None:
                stack.append(child)
        stack.extend(getattr(e, "args", ()))
    return None


def _groups_values(node: Node) -> list:
    """The groups.* values (reductions over every group, groups.numel) that ``node`` reads."""
    found, seen, stack = [], set(), [node]
    while stack:  # no recursion: a value may be thousands of nodes deep
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if n.attr is not None and getattr(n.attr, "scope", None) == GROUPS and n.op in ("reduce", "measure"):
            found.append(n)
        stack.extend(n.args)
    return found


def _nested(items):
    """Every statement in ``items`` and, at any depth, inside their ``if``, probe and loop bodies."""
    for item in items:
        yield item
        if isinstance(item, ast.If):
            yield from _nested(item.then + item.otherwise)
        elif isinstance(item, (ast.Probe, ast.Repeat)):
            yield from _nested(item.items)


def _defines(src, items, builder, kind=ast.Define):
    """The definitions (or other statements of ``kind``) of a probe or loop block under the
    current switches (its ``if`` conditions are hyperparameter switches, evaluated without
    recording them)."""
    for item in items:
        if isinstance(item, kind):
            yield src, item
        elif isinstance(item, ast.If):
            taken = builder.branch_taken(src, item.cond)
            yield from _defines(src, item.then if taken else item.otherwise, builder, kind)


def _show_key(key) -> str:
    kind, name = key
    return f"{name}'" if kind == "next" else name


def _scope_word(scope: Scope) -> str:
    return {Scope.SCALAR: "step (it is a scalar)", Scope.GLOBAL: "group", Scope.TENSOR: "tensor"}.get(scope, "element")


def _op_text(expr) -> str:
    if isinstance(expr, ast.BinOp):
        return expr.op
    if isinstance(expr, ast.UnOp):
        return expr.op
    return getattr(expr, "func", "?")


def _describe_values(expr, values) -> str | None:
    names = sorted({n.name for n in ast.names_in(expr) if n.name in values})
    return ("with " + ", ".join(f"{n} = {values[n]}" for n in names)) if names else None
