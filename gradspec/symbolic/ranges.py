"""Interval analysis: the range of every IR node, and the operations that may be undefined.

A range is an interval whose ends may be open, so that "eps > 0" and "eps >= 0" differ. The
leaves get their ranges from the hyperparameters' constraints, from what the runtime feeds
(the step is an integer >= 1; a gradient can be anything) and, for states, from invariants
found by iterating each state's next value from its initial value to a fixpoint (v starts
at 0 and its next value is a convex combination of v and grad^2, so v >= 0). Each division,
root, logarithm, fractional power and remainder is then safe if its operand's range says so.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import sympy

from ..compiler.ir import Node, Program, Scope
from ..dsl import ast
from .matrices import definiteness

INF = math.inf


@dataclass(frozen=True)
class Range:
    lo: float = -INF
    hi: float = INF
    lo_closed: bool = False
    hi_closed: bool = False
    integer: bool = False

    @staticmethod
    def point(x: float) -> "Range":
        return Range(x, x, True, True, float(x).is_integer())

    def contains(self, x: float) -> bool:
        above = self.lo < x or (self.lo == x and self.lo_closed)
        below = x < self.hi or (x == self.hi and self.hi_closed)
        return above and below

    @property
    def is_point(self) -> bool:
        return self.lo == self.hi and self.lo_closed and self.hi_closed

    @property
    def nonnegative(self) -> bool:
        return self.lo >= 0

    @property
    def positive(self) -> bool:
        return self.lo > 0 or (self.lo == 0 and not self.lo_closed)

    def hull(self, other: "Range") -> "Range":
        lo, lo_closed = _pick(self.lo, self.lo_closed, other.lo, other.lo_closed, min)
        hi, hi_closed = _pick(self.hi, self.hi_closed, other.hi, other.hi_closed, max)
        return Range(lo, hi, lo_closed, hi_closed, self.integer and other.integer)

    def describe(self) -> str:
        if self.lo == -INF and self.hi == INF:
            return "any real number"
        if self.is_point:
            return f"exactly {_fmt(self.lo)}"
        if self.hi == INF:
            return f"{'>=' if self.lo_closed else '>'} {_fmt(self.lo)}"
        if self.lo == -INF:
            return f"{'<=' if self.hi_closed else '<'} {_fmt(self.hi)}"
        return f"in {'[' if self.lo_closed else '('}{_fmt(self.lo)}, {_fmt(self.hi)}{']' if self.hi_closed else ')'}"


ANY = Range()


def _pick(a, a_closed, b, b_closed, better, tie_needs_both=False):
    """The better of two interval ends. On a tie the end is attained if either side attains
    it (a union), or, with ``tie_needs_both``, only if both do (max's lower end: max(x, y)
    with y > 0 is > 0 even where x can be 0; an intersection)."""
    if a == b:
        return a, (a_closed and b_closed) if tie_needs_both else (a_closed or b_closed)
    return (a, a_closed) if better(a, b) == a else (b, b_closed)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


def _corners(f, a: Range, b: Range, attained=None) -> Range:
    """The range of f over a box, from its corners: right for f monotone in each argument."""
    values = []
    for x, xc in ((a.lo, a.lo_closed), (a.hi, a.hi_closed)):
        for y, yc in ((b.lo, b.lo_closed), (b.hi, b.hi_closed)):
            v = f(x, y)
            if math.isnan(v):
                return ANY
            closed = (xc and yc) or (attained is not None and attained(x, xc, y, yc))
            values.append((v, closed and math.isfinite(v)))
    lo = min(v for v, _ in values)
    hi = max(v for v, _ in values)
    return Range(lo, hi, any(c for v, c in values if v == lo), any(c for v, c in values if v == hi))


def _mul(x, y):
    return 0.0 if x == 0 or y == 0 else x * y


@functools.lru_cache(maxsize=4096)  # pure, and asked for the same pair of ranges over and over
def _mul_range(a: Range, b: Range) -> Range:
    # a closed 0 times anything is attained: 0 * (0, inf) = 0 for any element of the other side
    zero = lambda x, xc, y, yc: (x == 0 and xc) or (y == 0 and yc)  # noqa: E731
    r = _corners(_mul, a, b, zero)
    return replace(r, integer=a.integer and b.integer)


def _add_range(a: Range, b: Range) -> Range:
    return Range(a.lo + b.lo, a.hi + b.hi, a.lo_closed and b.lo_closed, a.hi_closed and b.hi_closed,
                 a.integer and b.integer)


def _neg(a: Range) -> Range:
    return Range(-a.hi, -a.lo, a.hi_closed, a.lo_closed, a.integer)


def _reciprocal(a: Range) -> Range:  # a excludes 0, so it lies on one side of it
    def inv(x, zero):
        return 0.0 if math.isinf(x) else (zero if x == 0 else 1 / x)
    lo, hi = inv(a.hi, -INF), inv(a.lo, INF)
    return Range(lo, hi, a.hi_closed and math.isfinite(a.hi) and math.isfinite(lo),
                 a.lo_closed and math.isfinite(a.lo) and math.isfinite(hi))


def _pow_value(x, y):
    try:
        if x == 0 and y < 0:
            return INF
        return math.pow(x, y)
    except OverflowError:
        return INF
    except ValueError:
        return math.nan


def _monotone(f, a: Range) -> Range:
    lo, hi = f(a.lo), f(a.hi)
    return Range(lo, hi, a.lo_closed and math.isfinite(lo), a.hi_closed and math.isfinite(hi))


@dataclass(frozen=True)
class Unsafe:
    """An operation that may be undefined: ``what`` names the problem, ``operand`` its node."""

    node: Node
    operand: Node
    problem: str  # "may be 0", "may be negative", ...


class Analysis:
    """Ranges of every node of ``program`` (states by fixpoint) and the unsafe operations."""

    def __init__(self, program: Program, hyper_ranges: dict | None = None, facts: tuple = ()):
        """``facts``: ((node, range), ...) known everywhere in the step, as the conditions of
        the ``if`` branches the program took."""
        self.program = program
        self.facts = tuple(facts)
        self.hyper_ranges = {name: constraint_range(h) for name, h in program.spec.hypers.items()}
        self.hyper_ranges.update(hyper_ranges or {})
        self.state_ranges: dict = {}
        self.unsafe: list = []
        self._collect = False
        self._facts = ()
        self._memo: dict = {}
        self._heights: dict = {}  # id(node) -> its height (see _height)
        self._factor_counts: dict = {}  # id(node) -> a product's factors (see _factors)
        self._translators: dict = {}  # one per set of state signs: translating is the cost of _signed
        self._sign_verdicts: dict = {}
        if not self._fixpoint():  # the last round's ranges and findings are not the final ones
            self._memo, self.unsafe = {}, []
        for root in list(program.next.values()) + list(program.init.values()):
            self.range(root, self.facts)

    def _fixpoint(self) -> bool:
        """The states' ranges; True if the last round ran with them, so that what it found
        (ranges in the memo, unsafe operations) holds and need not be found again."""
        names = [n for n in self.program.init if self.program.init[n] is not None]
        current = {}
        for name in names:
            self._memo = {}
            current[name] = self.range(self.program.init[name], self.facts)
        self._collect = True
        for round_ in range(6):
            self.state_ranges = dict(current)
            self._memo, self.unsafe = {}, []
            changed = False
            for name in names:
                nxt = self.program.next.get(name)
                widened = current[name].hull(self.range(nxt, self.facts)) if nxt is not None else ANY
                if round_ >= 3 and widened != current[name]:  # widen what still moves
                    widened = Range(-INF if widened.lo < current[name].lo else widened.lo,
                                    INF if widened.hi > current[name].hi else widened.hi,
                                    widened.lo_closed, widened.hi_closed)
                changed |= widened != current[name]
                current[name] = widened
            if not changed:
                self.state_ranges = current
                return True
        self.state_ranges = {name: ANY for name in names}
        return False

    def range(self, node: Node, facts: tuple = ()) -> Range | None:
        """The range of a real node (None for a condition); ``facts`` narrow nodes inside a
        branch of ``where``: ((node, range), ...)."""
        if facts:  # a fact on a node above this one cannot narrow anything below it
            facts = tuple(f for f in facts if self._height(f[0]) <= self._height(node))
        key = (id(node), facts)
        found = self._memo.get(key)
        if found is None:
            found = self._range(node, facts)
            for fact_node, fact_range in facts:
                if fact_node is node:
                    found = intersect(found, fact_range)
            self._memo[key] = found
        return found

    def _height(self, node: Node) -> int:
        """The longest path from ``node`` down to a leaf: a node's descendants are all lower, so
        the facts that ``where`` branches gather about nodes higher than it are dropped before
        its range is looked up. Without that, n nested ``where``s memoised every node under
        each of 2^n sets of facts."""
        found = self._heights.get(id(node))
        if found is None:
            found = self._heights[id(node)] = 1 + max(map(self._height, node.args), default=-1)
        return found

    # ---- relations the intervals cannot see: v > grad^2 makes v - (1 - beta2) grad^2 >= 0
    def _signed(self, node: Node, r: Range, difference) -> Range:
        """``r`` narrowed to >= 0 (or > 0) where SymPy proves ``node`` so once the relation
        ``difference`` = (x, y, kind), x - y of that kind, is made a fresh symbol."""
        if difference is None or r.nonnegative or node.type != "real":
            return r
        signs = {n: "positive" if sr.positive else "nonnegative" for n, sr in self.state_ranges.items()
                 if sr.nonnegative}
        x, y, kind, cases = difference
        key = (id(node), id(x), id(y), kind, tuple((id(n), v) for n, v in cases), tuple(signs.items()))
        if key not in self._sign_verdicts:  # each fixpoint round asks again
            self._sign_verdicts[key] = self._sign_verdict(node, difference, signs)
        verdict = self._sign_verdicts[key]
        if verdict is None:
            return r
        return intersect(r, Range(0, INF, verdict == "nonnegative", False))

    def _sign_verdict(self, node: Node, difference, signs: dict) -> str | None:
        """"positive" or "nonnegative" where SymPy proves ``node`` so (see :meth:`_signed`)."""
        from .translate import Translator, change_of_variables  # translate needs no ranges
        translate = self._translators.get(tuple(signs.items()))
        if translate is None:
            translate = self._translators[tuple(signs.items())] = Translator(self.program, None, signs)
        x, y, kind, cases = difference
        expr = translate(node)
        for sign_node, value in cases:
            target = translate(sign_node)
            expr = expr.replace(lambda e: e == target, lambda e: sympy.Integer(value))
        change = change_of_variables(translate(x) - translate(y), kind, sure=True)
        if not change:
            return None
        try:
            expr = sympy.expand(expr.xreplace(change))
        except (TypeError, ValueError, ArithmeticError):
            return None
        if expr.is_positive:
            return "positive"
        return "nonnegative" if expr.is_nonnegative else None

    def _sign_cases(self, node: Node, facts) -> Range | None:
        """A sum with a term ``... * sign(d) * ...`` (Yogi's v - (1 - beta2) sign(v - g^2) g^2)
        as the hull of its three cases: d > 0 with sign(d) = 1, d < 0 with -1, d = 0 with 0."""
        signs = [f for a in node.args for f, _ in self._factors(a).values() if f.op == "sign"]
        if not signs or any(n is signs[0] for n, _ in facts):
            return None
        sign_node = signs[0]
        d = sign_node.args[0]
        zero = self.program.context.b.const(0) if self.program.context is not None else None
        if zero is None or d.is_const:
            return None
        result = None
        for value, op in ((1, "gt"), (-1, "lt"), (0, "eq")):
            case = facts + ((sign_node, Range.point(value)),) + _comparison_facts(op, d, zero, self, facts)
            r = self.range(node, case)
            if value:
                kind = (d, zero, "positive", ((sign_node, value),)) if value > 0 else \
                    (zero, d, "positive", ((sign_node, value),))
                r = self._signed(node, r, kind)
            result = r if result is None else result.hull(r)
        return result

    def _flag(self, node, operand, problem):
        if self._collect and not any(u.node is node and u.problem == problem for u in self.unsafe):
            self.unsafe.append(Unsafe(node, operand, problem))

    def _range(self, node: Node, facts) -> Range | None:
        op, attr = node.op, node.attr
        if node.type == "bool":
            for a in node.args:
                if a.type == "real":
                    self.range(a, facts)
                elif a.op in ("and", "or", "not") or a.args:
                    self.range(a, facts)
            return None
        if op == "const":
            return Range.point(attr)
        if op == "hyper":
            return self.hyper_ranges.get(attr, ANY)
        if op == "state":
            return self.state_ranges.get(attr, ANY)
        if op == "input":
            return Range(1, INF, True, False, True) if attr == "step" else ANY
        if op == "free":
            return ANY
        if op == "where":
            cond, a, b = node.args
            self.range(cond, facts)
            yes, no = branch_facts(cond, self, facts)
            ra, rb = self.range(a, facts + yes), self.range(b, facts + no)
            if ra is None:
                return None
            if cond.op in _NEGATE and not any(x.is_const for x in cond.args):
                ra = self._signed(a, ra, _difference(cond.op, cond.args))
                rb = self._signed(b, rb, _difference(_NEGATE[cond.op], cond.args))
            return ra.hull(rb)
        if op in ("add", "sub") and node.type == "real":
            split = self._sign_cases(node, facts)
            if split is not None:
                return split
        if op in _MIXING:  # a fact about this element says nothing about the others it mixes in
            facts = tuple((n, r) for n, r in facts if n.scope <= _MIXING[op](node))
        args = [self.range(a, facts) for a in node.args]
        self._facts = facts
        return getattr(self, "_" + op)(node, *args) if op != "reduce" else self._reduce(node, *args)

    # ---- arithmetic
    def _add(self, node, a, b):
        return _add_range(a, b)

    def _sub(self, node, a, b):
        return _add_range(a, _neg(b))

    def _neg(self, node, a):
        return _neg(a)

    def _mul(self, node, a, b):
        """A product as its factors with multiplicities, so (1 - beta2) * grad * grad is known
        to be >= 0: grad appears twice."""
        facts = self._facts
        result = Range.point(1)
        for f, count in self._factors(node).values():
            r = self.range(f, facts)
            if count // 2:
                result = _mul_range(result, _nonnegative_power(self._square(r), count // 2))
            if count % 2:
                result = _mul_range(result, r)
        return result

    def _factors(self, node: Node) -> dict:
        """The factors of a product with their multiplicities, {id: (factor, count)}: a * (b * a)
        has a twice and b once. Counted over the product's graph, not its tree, which doubles
        with each link of d' = d * d."""
        found = self._factor_counts.get(id(node))
        if found is None:
            if node.op != "mul":
                found = {id(node): (node, 1)}
            else:
                found = {}
                for a in node.args:
                    for key, (f, count) in self._factors(a).items():
                        found[key] = (f, found.get(key, (f, 0))[1] + count)
            self._factor_counts[id(node)] = found
        return found

    def _square(self, a):
        m = _mul_range(a, a)
        if a.contains(0):
            return Range(0, m.hi, True, m.hi_closed)
        return _monotone(lambda x: x * x, Range(min(abs(a.lo), abs(a.hi)), max(abs(a.lo), abs(a.hi)),
                                                 a.lo_closed if abs(a.lo) < abs(a.hi) else a.hi_closed,
                                                 a.hi_closed if abs(a.lo) < abs(a.hi) else a.lo_closed))

    def _div(self, node, a, b):
        if b.contains(0):
            self._flag(node, node.args[1], "may be 0")
            return ANY
        return _mul_range(a, _reciprocal(b))

    def _mod(self, node, a, b):
        if b.contains(0):
            self._flag(node, node.args[1], "may be 0")
            return ANY
        # in floating point the remainder can round up to the divisor itself:
        # torch.remainder(-1e-20, 1) is 1.0, so the far end is closed
        if b.positive:
            return Range(0, b.hi, True, math.isfinite(b.hi), a.integer and b.integer)
        return Range(b.lo, 0, math.isfinite(b.lo), True)

    def _pow(self, node, a, b):
        if b.is_point and b.integer:
            n = int(b.lo)
            if n == 2:
                return self._square(a)
            if n < 0 and a.contains(0):
                self._flag(node, node.args[0], "may be 0 under a negative power")
                return ANY
            if a.nonnegative:
                return _corners(_pow_value, a, b)
            if n % 2 and n > 0:
                return _monotone(lambda x: _pow_value(x, n), a)
            if n % 2 == 0 and n > 0:  # an even power of a signed value is |x|^n
                return _monotone(lambda x: _pow_value(x, n), self._abs(node, a))
            return ANY
        if not a.nonnegative and not b.integer:
            self._flag(node, node.args[0], "may be negative under a fractional power")
            return ANY
        if b.lo < 0 and a.contains(0):
            self._flag(node, node.args[0], "may be 0 under a negative power")
            return ANY
        if not a.nonnegative:  # an integer power of a signed base
            return ANY
        one = lambda x, xc, y, yc: (x == 1 and xc) or (y == 0 and yc)  # noqa: E731
        return _corners(_pow_value, a, b, one)

    # ---- functions
    def _sqrt(self, node, a):
        if not a.nonnegative:
            self._flag(node, node.args[0], "may be negative")
            return Range(0, INF, True, False)
        return _monotone(math.sqrt, a)

    def _rsqrt(self, node, a):
        if not a.positive:
            self._flag(node, node.args[0], "may be 0" if a.nonnegative else "may be 0 or negative")
            return Range(0, INF, False, False)
        return _reciprocal(_monotone(math.sqrt, a))

    def _log(self, node, a):
        if not a.positive:
            self._flag(node, node.args[0], "may be 0" if a.nonnegative else "may be 0 or negative")
            return ANY
        return _monotone(lambda x: -INF if x == 0 else (INF if math.isinf(x) else math.log(x)), a)

    def _exp(self, node, a):
        return _monotone(lambda x: 0.0 if x == -INF else (INF if x > 709 else math.exp(x)), a)

    def _abs(self, node, a):
        if a.nonnegative:
            return a
        if a.hi <= 0:
            return _neg(a)
        top = max(-a.lo, a.hi)
        attained = (a.hi == top and a.hi_closed) or (-a.lo == top and a.lo_closed)
        return Range(0, top, True, attained and math.isfinite(top))

    def _sign(self, node, a):
        lo = 1 if a.positive else (0 if a.nonnegative else -1)
        hi = -1 if a.hi < 0 or (a.hi == 0 and not a.hi_closed) else (0 if a.hi <= 0 else 1)
        return Range(lo, hi, True, True, True)

    def _max(self, node, a, b):
        lo, lo_closed = _pick(a.lo, a.lo_closed, b.lo, b.lo_closed, max, tie_needs_both=True)
        hi, hi_closed = _pick(a.hi, a.hi_closed, b.hi, b.hi_closed, max)
        return Range(lo, hi, lo_closed, hi_closed)

    def _min(self, node, a, b):
        lo, lo_closed = _pick(a.lo, a.lo_closed, b.lo, b.lo_closed, min)
        hi, hi_closed = _pick(a.hi, a.hi_closed, b.hi, b.hi_closed, min, tie_needs_both=True)
        return Range(lo, hi, lo_closed, hi_closed)

    def _clamp(self, node, x, lo, hi):
        return self._min(node, self._max(node, x, lo), hi)

    def _lerp(self, node, a, b, w):
        if w.lo >= 0 and w.hi <= 1:  # (1 - w) a + w b: between a and b, strictly inside where w is
            return _add_range(_mul_range(_add_range(Range.point(1), _neg(w)), a), _mul_range(w, b))
        return _add_range(a, _mul_range(w, _add_range(b, _neg(a))))

    def _matrix(self, node, x):
        if node.attr.func == "aspect":
            return Range(0, INF, False, False)
        return ANY  # Newton-Schulz output: singular values near [0.5, 1.5], entries unbounded a priori

    def _atan2(self, node, y, x):
        return Range(-math.pi, math.pi, True, True)

    def _measure(self, node):
        return Range(1, INF, True, False, True)

    def _tile(self, node, x):  # blocks B { }: the same values, seen block by block and back
        return x

    def _untile(self, node, y):
        return y

    # ---- matrix algebra: ranges of entries, with the definiteness facts of matrices.py
    def _matmul(self, node, a, b):
        return ANY

    def _transpose(self, node, a):
        return a

    def _eye(self, node):
        return Range(0, 1, True, True, True)

    def _trace(self, node, a):
        return Range(0, INF, True, False) if self.definiteness(node.args[0]) else ANY

    def _eigvecs(self, node, a):
        return Range(-1, 1, True, True)

    def _eigvals(self, node, a):
        found = self.definiteness(node.args[0])
        return Range(0, INF, found == "psd", False) if found else ANY

    def _inv_root(self, node, a, power, floor):
        """A^(-1/p) needs p != 0 and positive eigenvalues: A proven positive definite, or a
        positive floor."""
        if power.contains(0):
            self._flag(node, node.args[1], "is 0" if power.lo == power.hi == 0 else "may be 0")
        if self._collect and not (self.definiteness(node.args[0]) == "pd" or floor.lo > 0 or
                                  (floor.lo == 0 and not floor.lo_closed)):
            self.unsafe.append(Unsafe(node, node.args[0], "may be singular"))
        return ANY

    def _qr(self, node, a):
        return Range(-1, 1, True, True)

    def _svd_left(self, node, a):
        return Range(-1, 1, True, True)

    _svd_right = _svd_left

    def _descending(self, node, a):
        return Range(0, 1, True, True, True)  # a permutation matrix: zeros and ones

    def definiteness(self, node):
        return definiteness(node, self.program, lambda n: self.range(n, self._facts))

    def _probe(self, node, *args):
        return Range(0, INF, True, False) if node.attr.func == "gauss_newton" else ANY

    def _onto(self, node, v, subspace):
        return ANY

    def _reduce(self, node, *args):
        func = node.attr.func
        a = args[0]
        if func in ("max", "min", "mean"):
            return replace(a, integer=False)
        if func == "norm":
            return Range(0, INF, not a.positive, False)
        if func == "dot":
            if node.args[0] is node.args[1]:
                return Range(0, INF, True, False)
            a = _mul_range(args[0], args[1])
        if a.nonnegative:  # a sum of nonnegative terms
            return Range(0 if not a.positive else 0, INF, not a.positive, False)
        if a.hi <= 0:
            return Range(-INF, 0, False, True)
        return ANY


def _difference(op: str, args) -> tuple | None:
    """``x op y`` as (a, b, kind): a - b is positive or nonnegative."""
    x, y = args
    return {"gt": (x, y, "positive", ()), "ge": (x, y, "nonnegative", ()),
            "lt": (y, x, "positive", ()), "le": (y, x, "nonnegative", ())}.get(op)


def _nonnegative_power(r: Range, count: int) -> Range:
    """``r`` (of nonnegative numbers) to the power ``count``, by repeated squaring: a product of
    nonnegative ranges multiplies their ends, so this equals ``count`` products in a row."""
    result = Range.point(1)
    while count:
        if count & 1:
            result = _mul_range(result, r)
        r = _mul_range(r, r)
        count >>= 1
    return result


def intersect(r: Range | None, fact: Range) -> Range | None:
    if r is None:
        return None
    lo, lo_closed = _pick(r.lo, r.lo_closed, fact.lo, fact.lo_closed, max, tie_needs_both=True)
    hi, hi_closed = _pick(r.hi, r.hi_closed, fact.hi, fact.hi_closed, min, tie_needs_both=True)
    if r.lo == fact.lo:
        lo_closed = r.lo_closed and fact.lo_closed
    if r.hi == fact.hi:
        hi_closed = r.hi_closed and fact.hi_closed
    return Range(lo, hi, lo_closed, hi_closed, r.integer)


_MIXING = {  # operations that combine many elements, and the widest scope a fact may have to cross them
    "reduce": lambda node: Scope.TENSOR if node.attr.scope in ("row", "col") else node.scope,
    "onto": lambda node: Scope.GLOBAL, "matrix": lambda node: Scope.TENSOR,
    **{op: (lambda node: Scope.TENSOR) for op in ("matmul", "transpose", "trace", "eigvecs", "eigvals", "inv_root",
                                                   "qr", "svd_left", "svd_right", "descending")},
}
_NEGATE = {"gt": "le", "ge": "lt", "lt": "ge", "le": "gt", "eq": "ne", "ne": "eq"}
_FLIP = {"gt": "lt", "ge": "le", "lt": "gt", "le": "ge", "eq": "eq", "ne": "ne"}


def branch_facts(cond: Node, analysis: "Analysis", facts) -> tuple[tuple, tuple]:
    """What ``where(cond, a, b)`` knows in each branch (torch.where evaluates both branches,
    but only the chosen one's value is used): for ``x > c``, x > c's lower end and c < x's
    upper end in the first, and the negation in the second; the difference x - c is
    positive there (negative or 0 in the second); and each fact is carried down into the
    operands it is built from (rho_t = rho_inf - s with s >= 0 and rho_t > 5 give rho_inf >
    5). ``a and b`` knows both in the first branch, ``a or b`` the negation of both in the
    second, ``not a`` swaps the branches."""
    if cond.op == "not":
        yes, no = branch_facts(cond.args[0], analysis, facts)
        return no, yes
    if cond.op in ("and", "or"):
        (yes_a, no_a), (yes_b, no_b) = (branch_facts(a, analysis, facts) for a in cond.args)
        return (yes_a + yes_b, ()) if cond.op == "and" else ((), no_a + no_b)
    if cond.op not in _NEGATE or len(cond.args) != 2:
        return (), ()
    return (_comparison_facts(cond.op, *cond.args, analysis, facts),
            _comparison_facts(_NEGATE[cond.op], *cond.args, analysis, facts))


def _comparison_facts(op: str, x: Node, c: Node, analysis: "Analysis", facts) -> tuple:
    """The facts ``x op c`` implies, derived facts included."""
    rx, rc = analysis.range(x, facts), analysis.range(c, facts)
    if rx is None or rc is None:
        return ()
    found = [(x, _side(op, rx, rc)), (c, _side(_FLIP[op], rc, rx))]
    if op != "eq" and op != "ne" and not (x.is_const or c.is_const) and analysis.program.context is not None:
        difference = analysis.program.context.b.op("sub", x, c)  # the node x - c, as the spec writes it
        found.append((difference, _side(op, Range(), Range.point(0))))
    out = []
    for node, fact in found:
        if fact is not None and not node.is_const:
            out += [(node, fact)] + _carried(node, fact, analysis, facts, depth=6)
    return tuple(out)


def _side(op: str, rx: Range, rc: Range) -> Range | None:
    """Where x lies if ``x op c`` holds, c anywhere in ``rc``; None if that says nothing."""
    if op in ("gt", "ge"):  # x > c >= rc.lo
        return Range(rc.lo, INF, op == "ge" and rc.lo_closed, False) if rc.lo > -INF else None
    if op in ("lt", "le"):
        return Range(-INF, rc.hi, False, op == "le" and rc.hi_closed) if rc.hi < INF else None
    if op == "eq":
        return rc
    if rc.is_point and rx.lo == rc.lo:  # x != c at x's lower end: the end is open
        return replace(rx, lo_closed=False)
    if rc.is_point and rx.hi == rc.lo:
        return replace(rx, hi_closed=False)
    return None


def _carried(node: Node, fact: Range, analysis: "Analysis", facts, depth: int) -> list:
    """Facts on the operands of ``node`` implied by ``fact`` on node: a + b in R puts a in
    R - range(b); a * b with b > 0 puts a in R / range(b); and so on down the tree."""
    if depth == 0 or node.op not in ("add", "sub", "neg", "mul", "div"):
        return []
    args = node.args
    ranges = [analysis.range(a, facts) for a in args]
    if any(r is None for r in ranges):
        return []
    derived = []
    if node.op == "add":
        derived = [(args[0], _add_range(fact, _neg(ranges[1]))), (args[1], _add_range(fact, _neg(ranges[0])))]
    elif node.op == "sub":
        derived = [(args[0], _add_range(fact, ranges[1])), (args[1], _add_range(ranges[0], _neg(fact)))]
    elif node.op == "neg":
        derived = [(args[0], _neg(fact))]
    elif node.op == "mul":
        derived = [(a, _mul_range(fact, _reciprocal(other))) for a, other in ((args[0], ranges[1]), (args[1], ranges[0]))
                   if not other.contains(0)]
    elif node.op == "div":
        derived = [(args[0], _mul_range(fact, ranges[1]))]
        if not fact.contains(0):
            derived.append((args[1], _mul_range(ranges[0], _reciprocal(fact))))
    out = []
    for arg, narrowed in derived:
        if arg.is_const or not _informative(narrowed):
            continue
        current = analysis.range(arg, facts)
        tighter = intersect(current, narrowed)
        if tighter == current:
            continue
        out += [(arg, narrowed)] + _carried(arg, tighter, analysis, facts, depth - 1)
    return out


def _informative(r: Range) -> bool:
    return not (math.isnan(r.lo) or math.isnan(r.hi)) and (r.lo > -INF or r.hi < INF)


def constraint_range(hyper: ast.Hyper) -> Range:
    """What a hyperparameter's constraint allows, as a range."""
    integer = hyper.kind == "int"
    c = hyper.constraint
    if isinstance(c, ast.Interval):
        return Range(c.low, c.high, c.low_closed, c.high_closed, integer)
    if isinstance(c, ast.Bound):
        if c.op in (">", ">="):
            return Range(c.value, INF, c.op == ">=", False, integer)
        if c.op in ("<", "<="):
            return Range(-INF, c.value, False, c.op == "<=", integer)
        if c.op == "==":
            return Range.point(c.value)
    return Range(integer=integer)
