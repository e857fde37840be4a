"""SymPy simplification feeding the FX lowering: common subexpressions and constant folding
across statements, beyond what IR interning sees (``2 * x * 3`` is ``6 * x``; ``lr * a - lr * b``
shares ``lr``; a term that cancels disappears).

The next values are translated to SymPy, passed through ``sympy.cse`` (which also folds
rational constants), and rebuilt as IR with the same builder rules. The rewritten program is
used only when it has fewer nodes than the original: SymPy's canonical forms are not always
cheaper to compute (it writes x / y as x * y^-1, which we lower back to a division).

The rewrite is pure: its result depends only on the program (its nodes, and the declared
kinds and constraints of the hyperparameters it reads, which are SymPy's assumptions). So it
runs once per program content, whatever the number of optimizers or processes: the verdict
is memoised in the process and kept on disk, as JSON in the private cache folder
(gradspec/cache.py), under a hash of that content. Its cost is bounded by a count of work,
not by a clock, so the compiled arithmetic never depends on the machine's load.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

import sympy
from sympy.core.relational import Relational
from sympy.functions.elementary.piecewise import ExprCondPair
from sympy.logic.boolalg import BooleanAtom

from ..cache import trusted_file, write_private
from ..compiler.ir import Builder, MatrixCall, Node, Op, ProbeCall, Program, Reduction, Scope
from .translate import STEP, ElementSymbol, TooLarge, Translator, _Reduction, outputs

WORK_BUDGET = 1_000
"""The most SymPy operations (``count_ops`` of the next values) the rewrite takes on. Past it
the program is compiled as written: the rewrite is an optimisation, and ``sympy.cse`` grows
faster than linearly (a probing deo(adam, amsgrad = true) step, 1,442 operations, ran past
3 s). Every stdlib program and adaptor application at its defaults counts at most 401
(lookahead(alto), 0.6 s); see docs/design.md for the measurement."""

FORMAT = 1
"""The on-disk verdict's format; part of the key, with SymPy's version."""

_MEMO: dict = {}


def simplified(program: Program) -> Program:
    """``program`` with SymPy-simplified next values, or ``program`` itself if that is not
    smaller, if a value has no IR form, or if it needs more than WORK_BUDGET operations."""
    key = content_key(program)
    verdict = _MEMO.get(key)
    if verdict is None:
        verdict = _load(key)
    if verdict is None:
        verdict = _decide(program)
        write_private(f"simplify-{key}.json", json.dumps(verdict))
    _MEMO[key] = verdict
    if verdict["kept"]:
        return program
    return dataclasses.replace(program, next=_nodes_from(verdict))


def _decide(program: Program) -> dict:
    """The rewrite's verdict: ``{"kept": true}``, or the rewritten next values as JSON."""
    if any(n.op == "reduce" and n.attr.scope == "groups" for n in program.nodes()):
        return {"kept": True}  # a rebuilt groups.f would lose the site that sums it across groups
    try:
        # the translation stops (TooLarge) before a tree count_ops could not walk in time
        translate = Translator(program, tree_limit=10 * WORK_BUDGET)
        exprs = outputs(program, translate)
        # first the cheap refusal: count_ops walks the expressions as trees, which a matrix
        # iteration makes exponentially large (muon_adamw: 670,000 operations, 200 nodes)
        if not _has_ir_form(exprs.values(), _leaf_symbols(program, translate)):
            return {"kept": True}
        if sum(sympy.count_ops(e) for e in exprs.values()) > WORK_BUDGET:
            return {"kept": True}
        candidate = rewritten(program)
    except (RecursionError, TooLarge):  # a very deep or very large program: compiled as written
        return {"kept": True}
    if candidate is None or len(candidate.nodes()) >= len(program.nodes()):
        return {"kept": True}
    return {"kept": False, **_nodes_to_json(candidate)}


def content_key(program: Program) -> str:
    """A hash of everything the rewrite reads: the next values' nodes in order, and each
    hyperparameter's kind and constraint (its SymPy assumptions)."""
    nodes = _nodes_to_json(program)
    hypers = {name: [h.kind, repr(h.constraint)] for name, h in program.spec.hypers.items()}
    text = json.dumps([FORMAT, sympy.__version__, nodes, hypers], sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _nodes_to_json(program: Program) -> dict:
    """The next values as a node list (arguments first) and, per state, its root's index."""
    order = []
    index: dict = {}
    call_sites: dict = {}
    for node in program.nodes(initial=False):
        index[id(node)] = len(order)
        attr = list(node.attr) if isinstance(node.attr, tuple) else node.attr
        if node.op == "probe":  # a probe's call site is an object's id: numbered in order instead
            attr[1] = call_sites.setdefault(attr[1], len(call_sites))
        order.append([node.op, [index[id(a)] for a in node.args], attr, node.type, int(node.scope)])
    return {"nodes": order, "next": {name: index[id(node)] for name, node in program.next.items()}}


def _nodes_from(verdict: dict) -> dict:
    """The next values of a stored verdict, rebuilt with a fresh builder as the rewrite made
    them."""
    builder = Builder()
    made: list = []
    for op, args, attr, type_, scope in verdict["nodes"]:
        if isinstance(attr, list):
            attr = _RECORDS[Op(op)](*attr)
        made.append(builder.node(op, tuple(made[i] for i in args), attr, type_, Scope(scope)))
    return {name: made[i] for name, i in verdict["next"].items()}


_RECORDS = {Op.REDUCE: Reduction, Op.MATRIX: MatrixCall, Op.PROBE: ProbeCall}


def _load(key: str) -> dict | None:
    """A verdict stored by an earlier process, if the file is ours and well formed."""
    path = trusted_file(f"simplify-{key}.json")
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            verdict = json.load(handle)
        if verdict.get("kept") is True:
            return verdict
        _nodes_from(verdict)  # well formed: every index points back, every field has its type
        return verdict
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None


def rewritten(program: Program) -> Program | None:
    """The SymPy-simplified program, whatever its size; None if a value has no IR form."""
    translate = Translator(program)
    exprs = outputs(program, translate)
    if not _has_ir_form(exprs.values(), _leaf_symbols(program, translate)):
        return None  # decided before sympy.cse, which on a matrix iteration ran for minutes
    names = list(exprs)
    # the shared subexpressions are named by element symbols, so that a reduction never
    # mistakes one for a constant factor and pulls it out of the sum
    fresh = sympy.numbered_symbols("cse", cls=ElementSymbol, real=True)
    replacements, reduced = sympy.cse([exprs[n] for n in names], symbols=fresh, optimizations="basic")
    rebuild = _Rebuild(program, translate)
    try:
        for symbol, value in replacements:
            rebuild.bound[symbol] = rebuild(value)
        nexts = {name[:-1]: rebuild(value) for name, value in zip(names, reduced)}
    except _NoIRForm:
        return None
    return dataclasses.replace(program, next=nexts)


class _NoIRForm(Exception):
    pass


_REBUILT_TYPES = (sympy.Add, sympy.Mul, sympy.Pow, _Reduction, sympy.Piecewise, ExprCondPair, sympy.Max,
                  sympy.Min, Relational, sympy.And, sympy.Or, sympy.Not, sympy.Abs, sympy.sign, sympy.exp,
                  sympy.log, sympy.Mod, sympy.Rational, sympy.Float, BooleanAtom)
"""What _Rebuild turns back into IR, given suitable arguments."""


def _leaf_symbols(program: Program, translate: Translator) -> set:
    """The SymPy symbols that _Rebuild maps back to IR leaves."""
    return {translate(n) for n in program.nodes() if n.op in ("hyper", "state", "input", "free")} | {STEP}


def _has_ir_form(exprs, leaves: set) -> bool:
    """False if a subexpression is of a kind _Rebuild never turns into IR (a matrix product,
    an opaque probe value, infinity). ``sympy.cse`` keeps every such subexpression (it only
    names repeated ones), so the rewrite would fail after it: this answers the same before
    it, visiting each distinct subexpression once rather than walking the tree."""
    seen: set = set()
    stack = list(exprs)
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if e in leaves:
            continue
        if not isinstance(e, _REBUILT_TYPES):
            return False
        stack.extend(e.args)
    return True


class _Rebuild:
    """SymPy back to IR nodes, sharing the original program's leaves."""

    def __init__(self, program: Program, translate: Translator):
        self.b = Builder()
        self.bound: dict = {}
        self.leaves = {}
        for node in program.nodes():
            if node.op in ("hyper", "state", "input", "free"):
                self.leaves[translate(node)] = self.b.node(node.op, (), node.attr, "real", node.scope)
        self.leaves[STEP] = self.b.node("input", (), "step", "real", Scope.SCALAR)

    def __call__(self, e) -> Node:
        b = self.b
        if e in self.bound:
            return self.bound[e]
        if e in self.leaves:
            return self.leaves[e]
        if e is sympy.true or e is sympy.false:
            return b.const(bool(e))
        if e.is_Number:
            if not (e.is_Rational or e.is_Float):
                raise _NoIRForm(e)
            return b.const(float(e))
        if isinstance(e, sympy.Add):
            positive = [t for t in e.args if not _negated(t)]
            negative = [-t for t in e.args if _negated(t)]
            total = self._chain("add", positive) if positive else None
            for t in negative:
                total = b.op("sub", total, self(t)) if total is not None else b.op("neg", self(t))
            return total
        if isinstance(e, sympy.Mul):
            if e.args[0] == -1:
                return b.op("neg", self(sympy.Mul(*e.args[1:])))
            num = [f for f in e.args if not (f.is_Pow and f.exp.is_negative)]
            den = [1 / f for f in e.args if f.is_Pow and f.exp.is_negative]
            top = self._chain("mul", num) if num else b.const(1.0)
            return b.op("div", top, self._chain("mul", den)) if den else top
        if isinstance(e, sympy.Pow):
            base, exp = e.args
            if exp == sympy.Rational(1, 2):
                return b.op("sqrt", self(base))
            if exp == sympy.Rational(-1, 2):
                return b.op("rsqrt", self(base))
            if exp.is_negative and exp.is_Number:
                return b.op("div", b.const(1.0), self(base ** -exp))
            return b.op("pow", self(base), self(exp))
        if isinstance(e, _Reduction):
            args = tuple(self(a) for a in e.args)
            if any(a.scope != Scope.ELEMENT for a in args):  # tensor.sum(1): keep the spec's form
                raise _NoIRForm(e)
            scope = Scope.GLOBAL if e.scope == "global" else Scope.TENSOR
            return b.node("reduce", args, Reduction(e.scope, e.what), "real", scope)
        if isinstance(e, sympy.Piecewise):
            (value, cond), rest = e.args[0], e.args[1:]
            otherwise = self(sympy.Piecewise(*rest)) if rest and rest[0].cond is not sympy.true else \
                self(rest[0].expr) if rest else None
            if otherwise is None:
                raise _NoIRForm(e)
            return b.op("where", self(cond), self(value), otherwise)
        if isinstance(e, (sympy.Max, sympy.Min)):
            return self._chain("max" if isinstance(e, sympy.Max) else "min", e.args)
        if isinstance(e, Relational):
            op = {sympy.Eq: "eq", sympy.Ne: "ne", sympy.Lt: "lt", sympy.Le: "le", sympy.Gt: "gt",
                  sympy.Ge: "ge"}[type(e)]
            return b.op(op, self(e.lhs), self(e.rhs))
        simple = {sympy.And: "and", sympy.Or: "or"}
        if type(e) in simple:
            return self._chain(simple[type(e)], e.args)
        unary = {sympy.Not: "not", sympy.Abs: "abs", sympy.sign: "sign", sympy.exp: "exp", sympy.log: "log"}
        if type(e) in unary:
            return b.op(unary[type(e)], self(e.args[0]))
        if isinstance(e, sympy.Mod):
            return b.op("mod", self(e.args[0]), self(e.args[1]))
        raise _NoIRForm(e)

    def _chain(self, op, terms):
        nodes = [self(t) for t in terms]
        result = nodes[0]
        for n in nodes[1:]:
            result = self.b.op(op, result, n)
        return result


def _negated(term) -> bool:
    return term.could_extract_minus_sign() and not term.is_Number or (term.is_Number and term < 0)
