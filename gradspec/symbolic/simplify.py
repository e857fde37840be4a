"""SymPy simplification feeding the FX lowering: common subexpressions and constant folding
across statements, beyond what IR interning sees (``2 * x * 3`` is ``6 * x``; ``lr * a - lr * b``
shares ``lr``; a term that cancels disappears).

The next values are translated to SymPy, passed through ``sympy.cse`` (which also folds
rational constants), and rebuilt as IR with the same builder rules. The rewritten program is
used only when it has fewer nodes than the original: SymPy's canonical forms are not always
cheaper to compute (it writes x / y as x * y^-1, which we lower back to a division).
"""
from __future__ import annotations

import dataclasses
import signal
import threading

import sympy
from sympy.core.relational import Relational

from ..compiler.ir import Builder, Node, Program, Scope
from .translate import STEP, ElementSymbol, Translator, _Reduction, outputs


BUDGET_SECONDS = 3.0
"""SymPy can take minutes on some compositions (deo(lamb): a global projection inside
per-tensor norms inside a where); the rewrite is an optimisation, so past this budget the
program is compiled as written."""


class _OverBudget(Exception):
    pass


def simplified(program: Program) -> Program:
    """``program`` with SymPy-simplified next values, or ``program`` itself if that is not
    smaller, if a value has no IR form, or if SymPy needs more than BUDGET_SECONDS."""
    try:
        candidate = _within_budget(rewritten, program)
    except RecursionError:  # a very deep program: compiled as written
        return program
    return candidate if candidate is not None and len(candidate.nodes()) < len(program.nodes()) else program


def _within_budget(fn, *args):
    """fn(*args), or None once BUDGET_SECONDS have passed (a SIGALRM timer: only in the main
    thread of a Unix process; elsewhere fn runs unbounded)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        return fn(*args)

    def stop(signum, frame):
        raise _OverBudget

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, BUDGET_SECONDS)
    try:
        return fn(*args)
    except _OverBudget:
        return None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def rewritten(program: Program) -> Program | None:
    """The SymPy-simplified program, whatever its size; None if a value has no IR form."""
    translate = Translator(program)
    exprs = outputs(program, translate)
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
            return b.node("reduce", args, (e.scope, e.what), "real", scope)
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
