"""Hyperparameter domains: requirements that no allowed value can meet, and constants that
vanish in a half-precision parameter or state dtype."""
from __future__ import annotations

import sympy

from ..compiler.ir import Program
from ..dsl import ast
from ..dsl.errors import Diagnostic
from .laws import walk
from .translate import hyper_symbol, number


def domain(hyper: ast.Hyper) -> sympy.Set:
    """The set of values a hyperparameter's constraint allows."""
    c = hyper.constraint
    reals = sympy.Integers if hyper.kind == "int" else sympy.Reals
    if isinstance(c, ast.Interval):
        return reals.intersect(sympy.Interval(number(c.low), number(c.high), not c.low_closed, not c.high_closed))
    if isinstance(c, ast.Bound):
        x = sympy.Symbol("x", real=True)
        rel = {">": sympy.Gt, ">=": sympy.Ge, "<": sympy.Lt, "<=": sympy.Le, "==": sympy.Eq,
               "!=": sympy.Ne}[c.op](x, number(c.value))
        return reals.intersect(sympy.solveset(rel, x, sympy.Reals))
    return reals


def diagnostics(spec) -> list[Diagnostic]:
    """A ``require`` on one numeric hyperparameter that no value in its domain satisfies,
    wherever it is written (inside ``if``, probe and ``repeat`` blocks too)."""
    out = []
    for source, item in walk(spec.items):
        if not isinstance(item, ast.Require):
            continue
        names = {n.name for n in ast.names_in(item.cond)}
        numeric = [n for n in names if n in spec.hypers and spec.hypers[n].kind != "bool"]
        if len(numeric) != 1 or names - set(spec.hypers):
            continue
        hyper = spec.hypers[numeric[0]]
        condition = _sympy_condition(item.cond, {hyper.name: hyper_symbol(hyper)})
        if condition is None:
            continue
        x = hyper_symbol(hyper)
        try:
            allowed = sympy.solveset(condition, x, domain(hyper))
        except (NotImplementedError, TypeError, ValueError):
            continue
        if allowed is sympy.S.EmptySet:
            out.append(Diagnostic("GS071", f"no value of {hyper.name} meets this requirement", source, item.span,
                                  f"{hyper.name} is declared {hyper.constraint.describe(hyper.name) if hyper.constraint else 'unconstrained'}"))
    return out


_REL = {"==": sympy.Eq, "!=": sympy.Ne, "<": sympy.Lt, "<=": sympy.Le, ">": sympy.Gt, ">=": sympy.Ge}
_ARITH = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
          "/": lambda a, b: a / b, "^": lambda a, b: a ** b}
_FUNCS = {"abs": sympy.Abs, "sqrt": sympy.sqrt, "exp": sympy.exp, "log": sympy.log, "min": sympy.Min,
          "max": sympy.Max}


def _sympy_condition(e, symbols):
    """A requirement's condition as SymPy; None where it uses what this pass does not model."""
    if isinstance(e, ast.Num):
        return number(e.value)
    if isinstance(e, ast.Bool):
        return sympy.true if e.value else sympy.false
    if isinstance(e, ast.Name):
        return symbols.get(e.name)
    if isinstance(e, ast.UnOp):
        inner = _sympy_condition(e.operand, symbols)
        return None if inner is None else (-inner if e.op == "-" else sympy.Not(inner))
    if isinstance(e, ast.BinOp):
        a, b = _sympy_condition(e.left, symbols), _sympy_condition(e.right, symbols)
        if a is None or b is None:
            return None
        if e.op in _REL:
            return _REL[e.op](a, b)
        if e.op in ("and", "or"):
            return (sympy.And if e.op == "and" else sympy.Or)(a, b)
        return _ARITH[e.op](a, b) if e.op in _ARITH else None
    if isinstance(e, ast.Call) and e.func in _FUNCS:
        args = [_sympy_condition(a, symbols) for a in e.args]
        if any(a is None for a in args) or len(args) != (1 if e.func in ("abs", "sqrt", "exp", "log") else 2):
            return None  # a wrong arity is the IR builder's error to report (GS052)
        return _FUNCS[e.func](*args)
    return None


def underflow(program: Program, dtype, values: dict | None = None) -> list[Diagnostic]:
    """Constants and hyperparameter values that become 0 in ``dtype`` (1e-8 in float16): the
    elementwise phase computes in the parameters' dtype, so such an eps silently vanishes."""
    import torch  # only here: checking a spec needs no torch
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if not dtype.is_floating_point or torch.finfo(dtype).bits > 16:
        return []
    values = {**program.spec.hyper_defaults, **(values or {})}
    out, seen = [], set()
    origins = program.origins or {}
    for node in program.nodes():
        if node.op == "const" and node.type == "real":
            value, what = node.attr, repr(node.attr)
        elif node.op == "hyper":
            value = values[node.attr]
            what = f"{node.attr} = {value!r}"
        else:
            continue
        if value == 0 or what in seen or torch.tensor(float(value), dtype=dtype).item() != 0:
            continue
        seen.add(what)
        source, span = origins.get(id(node), [(program.spec.source, None)])[0]
        if node.op == "hyper":
            span = program.spec.hypers[node.attr].span
        out.append(Diagnostic("GS090", f"{what} underflows to 0 in {str(dtype).replace('torch.', '')}", source, span,
                              "keep parameters and states in float32, or use a larger constant (eps = 1e-4 for float16)",
                              severity="warning"))
    return out
