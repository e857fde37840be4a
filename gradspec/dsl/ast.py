"""The syntax tree of a spec: what the user wrote, with source spans, before names are resolved.

Nodes are plain frozen dataclasses. Expressions keep their span so that every later pass
(name resolution, type and scope inference, constraint checks) can point back at the text.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Union

from .errors import Source, Span

# ---- expressions ------------------------------------------------------------------------


@dataclass(frozen=True)
class Num:
    value: float | int
    span: Span | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Bool:
    value: bool
    span: Span | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Name:
    """``m`` (old value), ``m'`` (next value), ``base.m`` / ``base.m'`` inside an adaptor."""

    name: str
    primed: bool = False
    qualifier: str | None = None
    span: Span | None = field(default=None, compare=False)

    def __str__(self) -> str:
        q = f"{self.qualifier}." if self.qualifier else ""
        prime = "'" if self.primed else ""
        return f"{q}{self.name}{prime}"


@dataclass(frozen=True)
class Call:
    func: str
    args: tuple
    span: Span | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Reduce:
    """``tensor.norm(x)`` (one value per parameter tensor) or ``global.sum(x)`` (one per group)."""

    scope: str
    func: str
    args: tuple
    span: Span | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Measure:
    """``tensor.numel``, ``tensor.rows``, ``tensor.cols`` (per tensor) or ``global.numel`` (per
    group): a size read off the parameters' shapes."""

    scope: str
    what: str
    span: Span | None = field(default=None, compare=False)


@dataclass(frozen=True)
class BinOp:
    op: str
    left: "Expr"
    right: "Expr"
    span: Span | None = field(default=None, compare=False)


@dataclass(frozen=True)
class UnOp:
    op: str  # "-" or "not"
    operand: "Expr"
    span: Span | None = field(default=None, compare=False)


Expr = Union[Num, Bool, Name, Call, Reduce, Measure, BinOp, UnOp]


def subexpressions(expr):
    """``expr`` and every expression inside it, depth first."""
    yield expr
    for child in (getattr(expr, "left", None), getattr(expr, "right", None), getattr(expr, "operand", None)):
        if child is not None:
            yield from subexpressions(child)
    for child in getattr(expr, "args", ()):
        yield from subexpressions(child)


def names_in(expr):
    """Every Name in an expression, depth first."""
    return (e for e in subexpressions(expr) if isinstance(e, Name))

# ---- hyperparameter constraints ---------------------------------------------------------


@dataclass(frozen=True)
class Bound:
    """``> 0``, ``>= 0``, ``!= 0`` ..."""

    op: str
    value: float

    def holds(self, x: float) -> bool:
        return {
            ">": x > self.value, ">=": x >= self.value, "<": x < self.value,
            "<=": x <= self.value, "==": x == self.value, "!=": x != self.value,
        }[self.op]

    def describe(self, name: str) -> str:
        return f"{name} {self.op} {_fmt(self.value)}"


@dataclass(frozen=True)
class Interval:
    """``in [0, 1)``: closed or open at either end."""

    low: float
    high: float
    low_closed: bool
    high_closed: bool

    def holds(self, x: float) -> bool:
        above = x >= self.low if self.low_closed else x > self.low
        below = x <= self.high if self.high_closed else x < self.high
        return above and below

    @property
    def is_empty(self) -> bool:
        return self.low > self.high or (self.low == self.high and not (self.low_closed and self.high_closed))

    def describe(self, name: str) -> str:
        lo = "[" if self.low_closed else "("
        hi = "]" if self.high_closed else ")"
        return f"{name} in {lo}{_fmt(self.low)}, {_fmt(self.high)}{hi}"


def _fmt(x: float) -> str:
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(x)


Constraint = Union[Bound, Interval]

# ---- statements --------------------------------------------------------------------------


@dataclass(frozen=True)
class Hyper:
    name: str
    default: bool | int | float
    constraint: Constraint | None = None
    doc: str | None = None
    span: Span | None = field(default=None, compare=False)

    @property
    def kind(self) -> str:
        """``bool``, ``int`` or ``real``: booleans are compile-time switches, numbers are data."""
        if isinstance(self.default, bool):
            return "bool"
        return "int" if isinstance(self.default, int) else "real"

    def check(self, value) -> str | None:
        """Why ``value`` is not allowed for this hyperparameter, or None if it is."""
        if self.kind == "bool":
            return None if isinstance(value, bool) else f"{self.name} must be true or false"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:  # tensors (a 0-d lr) and numpy scalars
                value = float(value)
            except (TypeError, ValueError):
                return f"{self.name} must be a number, got {type(value).__name__}"
        if self.kind == "int":
            if not (isinstance(value, int) or (math.isfinite(value) and float(value).is_integer())):
                return f"{self.name} must be an integer, got {value}"
            if abs(int(value)) >= 2 ** 63:  # sizes, counts and step arithmetic are 64-bit integers
                return f"{self.name} must be below 2^63 in size, got {value:.6g}"
        if math.isnan(value):
            return f"{self.name} must not be NaN"
        if self.constraint is not None and not self.constraint.holds(value):
            return f"{self.name} = {value} breaks the constraint {self.constraint.describe(self.name)}"
        return None


@dataclass(frozen=True)
class State:
    """``state m = 0``: a moment carried between steps, shaped like its parameter;
    ``state s: global = 0``: one value per parameter group (an EMA of a global norm, say);
    ``state U: subspace(k) = 0``: k directions shaped like the parameters (``rank`` names k)."""

    name: str
    init: Expr
    span: Span | None = field(default=None, compare=False)
    scope: str = "element"
    rank: str | None = None
    dims: tuple | None = None  # "shaped": (d0, d1), each "rows", "cols", an int or an int hyperparameter
    # a base's per-element state under an adaptor that gives the base a gradient and a parameter of
    # their own (GaLore's projected space): the name of the definition that replaces ``grad``; the
    # state takes that definition's shape where it is not the parameter's (compiler/ir.py)
    space: str | None = None


@dataclass(frozen=True)
class Define:
    """``d = expr`` (a local definition) or, with ``primed``, ``m' = expr`` (a next value)."""

    name: str
    expr: Expr
    primed: bool = False
    span: Span | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Override:
    """``base.grad = expr`` inside an adaptor: replace what the base spec sees as ``grad``."""

    qualifier: str
    name: str
    expr: Expr
    span: Span | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Require:
    """``require not nesterov or momentum > 0 "message"``: a constraint across hyperparameters."""

    cond: Expr
    message: str | None = None
    span: Span | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Law:
    """``law ...``: a claim about the spec that ``gradspec check`` proves or refutes.

    ``kind`` is ``equals`` (``target`` is a SpecCall, or the resolved base Spec of an adaptor),
    ``invariant`` (``mappings`` pairs names with substitutions), ``fixed_point`` (zero gradient
    and initial states leave everything unchanged) or ``holds`` (``target`` is a condition).
    ``bindings`` are the ``at name = value`` settings, ``given`` an assumed condition.
    """

    kind: str
    target: object = None
    mappings: tuple = ()
    bindings: tuple = ()
    given: "Expr | None" = None
    message: str | None = None
    span: Span | None = field(default=None, compare=False)


@dataclass(frozen=True)
class If:
    """``if cond { ... } else { ... }`` with a condition on hyperparameters, fixed at compile time."""

    cond: Expr
    then: tuple
    otherwise: tuple = ()
    span: Span | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Probe:
    """``probe every k { ... }``: statements that run only at steps 1, k + 1, 2k + 1, ...,
    where they may evaluate the model again (``grad_at``, ``hvp``, ...). A state whose next
    value is set inside keeps its value on the other steps. ``every`` is an int
    hyperparameter's name or a number."""

    every: str | int
    items: tuple
    span: Span | None = field(default=None, compare=False)
    model: bool = True  # False: ``every k { }``, periodic work that evaluates nothing (no closure)


@dataclass(frozen=True)
class Repeat:
    """``repeat k { ... }``: the body's statements k times within one step. A definition ``X``
    made outside is the start of a loop variable the body advances with ``X' = ...``; inside, ``X``
    is the current iterate, and after the block ``X'`` is the last. ``count`` is an int
    hyperparameter's name or a number, fixed when the step is compiled."""

    count: str | int
    items: tuple
    span: Span | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Blocks(Repeat):
    """``blocks B { ... }``: the body once per block of each tensor's matrix view, blocks of at
    most B rows and B columns (the last row and column of blocks shorter), as Distributed
    Shampoo cuts a large matrix. Inside, ``rows`` and ``cols`` are the block's, ``tensor.f``
    reduces over the block and a shaped state is one per block; a value made outside is read
    block by block, and an elementwise value made inside is read outside reassembled. A
    Repeat whose copies run side by side over the blocks rather than one after another, so
    every walker that descends into a repeat's body descends into this one; ``count`` holds
    B (an int hyperparameter's name or a number), also named ``size``."""

    @property
    def size(self) -> str | int:
        return self.count


@dataclass(frozen=True)
class Import:
    path: str
    alias: str
    span: Span | None = field(default=None, compare=False)


Item = Union[Hyper, State, Define, Override, Require, Law, If, Probe, Repeat, Blocks, Import]

# ---- specs and spec expressions -----------------------------------------------------------


@dataclass(frozen=True)
class SpecCall:
    """``adam``, ``adam(beta2 = 0.95)``, ``clip_grad_norm(adam, max_norm = 1)``."""

    name: str
    args: tuple = ()  # SpecCall
    overrides: tuple = ()  # (name, value, span)
    span: Span | None = field(default=None, compare=False)

    def __str__(self) -> str:
        parts = [str(a) for a in self.args]
        parts += [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v, _ in self.overrides]
        return self.name + (f"({', '.join(parts)})" if parts else "")


@dataclass(frozen=True)
class SpecAST:
    """One parsed spec file.

    ``kind`` is ``optimizer`` (a full method), ``adaptor`` (a method that takes a base method,
    named ``base_param`` in its body) or ``variant`` (``optimizer nadam = adam(...)``).
    """

    kind: str
    name: str
    items: tuple
    source: Source
    doc: str | None = None
    base_param: str | None = None
    variant: SpecCall | None = None
    span: Span | None = field(default=None, compare=False)

    def walk(self):
        """Every item, descending into both branches of ``if`` blocks."""
        def go(items):
            for item in items:
                yield item
                if isinstance(item, If):
                    yield from go(item.then)
                    yield from go(item.otherwise)
                elif isinstance(item, (Probe, Repeat)):
                    yield from go(item.items)
        yield from go(self.items)
