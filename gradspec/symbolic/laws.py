"""Laws: claims a spec makes about itself, proven with SymPy or refuted by a counterexample.

* ``law equals OTHER at h = v, ...``: the same next values (the update and every state both
  specs keep) for every value of the hyperparameters they share;
* ``law invariant x -> e(x), ... given k > 0``: substituting the inputs and states as mapped
  maps every next value the same way (scale invariance of Adam: grad -> k grad, m -> k m,
  v -> k^2 v leaves param' unchanged);
* ``law fixed_point``: at zero gradient, with every state at its initial value, nothing moves;
* ``law <condition>``: a condition on the spec's values that always holds.

``at`` fixes hyperparameters (switches too); ``given`` assumes a condition: a Piecewise
branch whose condition it decides is taken, and a compound expression it declares positive,
nonnegative or nonzero is replaced by a symbol that is. A state whose initial value its next
value keeps (S at xi = 0) is replaced by that constant.
"""
from __future__ import annotations

import math
import random

import sympy
from sympy.core.relational import Relational

from ..compiler.ir import Program, build
from ..dsl import ast
from ..dsl.errors import Diagnostic, SpecError
from .ranges import Analysis, constraint_range
from .translate import STEP, ElementSymbol, Translator, _Reduction, number, outputs

SAMPLES = 48


class _Refuted(Exception):
    def __init__(self, message, hint=None):
        super().__init__(message)
        self.hint = hint


def check_laws(program: Program, pinned: dict | None = None) -> list[Diagnostic]:
    """Prove every law of ``program``; ``pinned`` hyperparameters are held at the given values
    (an adaptor's laws are checked on sgd at its defaults)."""
    out = []
    for source, law in program.laws:
        try:
            _prove(program, source, law, pinned or {})
        except _Refuted as refuted:
            out.append(Diagnostic("GS081", f"law refuted: {refuted}", source, law.span, refuted.hint))
        except _Unproven as unproven:
            out.append(Diagnostic("GS082", f"law not proven: {unproven}", source, law.span,
                                  f"it held at {SAMPLES} random points, but SymPy could not prove it; "
                                  "state it in simpler terms"))
        except SpecError as error:
            out.extend(error.diagnostics)
    return out


class _Unproven(Exception):
    pass


def _prove(program: Program, source, law: ast.Law, pinned: dict) -> None:
    spec = program.spec
    bools, numbers = {}, {k: v for k, v in pinned.items() if not isinstance(v, bool)}
    other = law.target.get() if law.kind == "equals" else None
    for name, value, span in law.bindings:
        owner = spec.hypers.get(name) or (other.hypers.get(name) if other else None)
        if owner is None:
            raise SpecError(Diagnostic("GS080", f"the law sets '{name}', which is not a hyperparameter", source, span,
                                       f"hyperparameters: {', '.join(spec.hypers)}"))
        (bools if owner.kind == "bool" else numbers)[name] = value
    if bools:
        program = build(spec, {**spec.hyper_defaults, **{k: v for k, v in bools.items() if k in spec.hypers}})
    translate = Translator(program, {k: number(v) for k, v in numbers.items() if k in spec.hypers},
                           state_signs(program))
    given = _given(program, source, law, translate)
    analysis = Analysis(program)
    bounds = {**{n: constraint_range(h) for n, h in spec.hypers.items()}, **analysis.state_ranges}
    mine_outputs = outputs(program, translate)
    constants = _constant_states(program, translate, mine_outputs)
    mine = given({k: v.subs(constants) for k, v in mine_outputs.items()})

    if law.kind == "equals":
        settings = {n: h.default for n, h in other.hypers.items()}
        settings.update({k: v for k, v in bools.items() if k in other.hypers})
        theirs_program = build(other, settings)
        shared = {n: translate.symbols[n] for n in other.hypers if n in spec.hypers}
        shared.update({n: number(v) for n, v in numbers.items() if n in other.hypers})
        for n, h in other.hypers.items():  # what only the other spec has stays at its default
            shared.setdefault(n, number(h.default) if h.kind != "bool" else None)
        theirs_t = Translator(theirs_program, {k: v for k, v in shared.items() if v is not None},
                              state_signs(theirs_program))
        theirs_outputs = outputs(theirs_program, theirs_t)
        theirs_constants = _constant_states(theirs_program, theirs_t, theirs_outputs)
        theirs = given({k: v.subs(theirs_constants) for k, v in theirs_outputs.items()})
        for name in mine:
            if name in theirs:
                _equal(mine[name], theirs[name], f"{name} differs from {other.name}'s", law, bounds)
        return
    if law.kind == "invariant":
        mapping = {}
        for name, expr in law.mappings:
            mapping[_symbol_of(program, name, translate, source, law)] = translate(program.law_expr(source, expr, True))
        mapping = {k: given(v) for k, v in mapping.items()}
        for name, value in mine.items():
            x = _symbol_of(program, name[:-1], translate, source, law)
            moved = value.subs(mapping, simultaneous=True)
            expected = mapping[x].subs(x, value) if x in mapping else value
            _equal(moved, expected, f"{name} does not transform as the substitution says", law, bounds)
        return
    if law.kind == "fixed_point":
        rest = {ElementSymbol("grad", real=True): sympy.Integer(0)}
        for name in program.init:
            rest[translate.state(name)] = translate(program.init[name]).subs(ElementSymbol("grad", real=True), 0)
        for name, value in mine.items():
            x = _symbol_of(program, name[:-1], translate, source, law)
            expected = rest.get(x, x) if name != "param'" else ElementSymbol("param", real=True)
            _equal(value.subs(rest, simultaneous=True), expected, f"{name} moves at zero gradient", law, bounds)
        return
    node = program.law_expr(source, law.target, True)
    if not law.bindings and not law.given and _bounded(node, analysis):
        return
    claim = given(translate(node).subs(constants))
    _holds(claim, law, bounds)


def _bounded(node, analysis) -> bool:
    """``x >= c`` (or >, <=, <) proven by the range analysis of x."""
    if node.op not in ("ge", "gt", "le", "lt") or not node.args[1].is_const:
        return False
    r, c = analysis.range(node.args[0]), node.args[1].attr
    if r is None:
        return False
    return {"ge": r.lo >= c,
            "gt": r.lo > c or (r.lo == c and not r.lo_closed),
            "le": r.hi <= c, "lt": r.hi < c or (r.hi == c and not r.hi_closed)}[node.op]


def state_signs(program) -> dict:
    """``{"v": "nonnegative", ...}``: the signs the range analysis proved for the states."""
    ranges = Analysis(program).state_ranges
    return {n: "positive" if r.positive else "nonnegative" for n, r in ranges.items() if r.nonnegative}


def _symbol_of(program, name, translate, source, law):
    if name in program.init:
        return translate.state(name)
    if name in ("grad", "param"):
        return ElementSymbol(name, real=True)
    if name == "step":
        return STEP
    if name in translate.symbols:
        return translate.symbols[name]
    if name == "loss":
        return sympy.Symbol("loss", real=True)
    raise SpecError(Diagnostic("GS080", f"the law maps '{name}', which is not a state, input or hyperparameter",
                               source, law.span, None))


def _given(program, source, law, translate):
    """A function applying the law's ``given`` to an expression (or a dict of them)."""
    if law.given is None:
        return lambda e: e
    fact = translate(program.law_expr(source, law.given, True))
    facts = list(fact.args) if isinstance(fact, sympy.And) else [fact]
    decided, replacements = {}, {}
    for f in facts:
        if not isinstance(f, Relational):
            continue
        decided[f.canonical] = sympy.true
        decided[f.negated.canonical] = sympy.false
        kind = {sympy.StrictGreaterThan: "positive", sympy.GreaterThan: "nonnegative",
                sympy.StrictLessThan: "negative", sympy.Unequality: "nonzero"}.get(type(f))
        if kind and f.rhs == 0:
            replacements.update(_change_of_variables(f.lhs, kind))

    def apply(e):
        if isinstance(e, dict):
            return {k: apply(v) for k, v in e.items()}
        e = e.replace(lambda x: isinstance(x, Relational) and x.canonical in decided,
                      lambda x: decided[x.canonical])
        return e.subs(replacements) if replacements else e
    return apply


def _change_of_variables(expr, kind: str) -> dict:
    """A substitution after which ``expr`` is a fresh symbol with the assumption ``kind``
    (positive, nonzero, ...): a symbol is replaced by one that carries it; a compound
    expression linear in one of its symbols has that symbol solved for."""
    fresh = sympy.Symbol(expr.name if expr.is_Symbol else "c", real=True, **{kind: True})
    if expr.is_Symbol:
        return {expr: fresh}
    candidates = sorted(expr.free_symbols, key=lambda s: (not isinstance(s, ElementSymbol), s.name))
    for var in candidates:
        coeff = sympy.diff(expr, var)
        rest = sympy.expand(expr - coeff * var)
        if coeff.is_zero or var in coeff.free_symbols or var in rest.free_symbols:
            continue
        return {var: (fresh - rest) / coeff}
    return {}


def _constant_states(program, translate, outs: dict) -> dict:
    """The states that provably keep a constant initial value (S = 0 when xi = 0), as a
    substitution: their next value, with all of them at their constants, is that constant."""
    constants = {}
    for name, node in program.init.items():
        if node is not None and node.is_const:
            constants[translate.state(name)] = number(node.attr)
    while True:
        kept = {s: c for s, c in constants.items()
                if sympy.simplify(outs[f"{s.name}'"].subs(constants) - c) == 0}
        if kept == constants:
            return constants
        constants = kept


def _equal(a, b, what, law, bounds):
    if a == b:
        return
    counterexample = _search((a, b), bounds, lambda pair: abs(pair[0] - pair[1]) / (1 + abs(pair[0]) + abs(pair[1])))
    if counterexample is not None:
        values, (x, y) = counterexample
        raise _Refuted(f"{what}; at {_show(values)} one side is {x:.6g} and the other {y:.6g}", _hint(law))
    diff = a - b
    for attempt in (sympy.cancel, lambda e: sympy.cancel(split_roots(e)),
                    lambda e: sympy.simplify(sympy.piecewise_fold(e))):
        if attempt(diff) == 0:
            return
    raise _Unproven(what)


def split_roots(e):
    """sqrt(v / c) as sqrt(v) / sqrt(c): sound here, because laws are proven only after the
    safety check has shown every root's argument nonnegative."""
    return sympy.powdenest(sympy.expand_power_base(e, force=True), force=True)


def _holds(claim, law, bounds):
    if claim is sympy.true:
        return
    if isinstance(claim, sympy.Eq):
        return _equal(claim.lhs, claim.rhs, f"{claim.lhs} == {claim.rhs} is not an identity", law, bounds)
    found = _search((claim,), bounds, lambda value: 0.0 if value[0] else 1.0)
    if found is not None:
        raise _Refuted(f"the claim is false at {_show(found[0])}", _hint(law))
    if sympy.simplify(claim) is sympy.true:
        return
    raise _Unproven(str(claim))


def _hint(law):
    return "check the 'at' and 'given' clauses, or the spec: a refuted law is a bug in one of them"


# ---- counterexamples: random points that respect every symbol's assumptions -------------------

def _search(exprs, bounds, gap):
    """A random point where ``gap`` of the expressions' values is above 1e-9, or None."""
    exprs = [e.replace(lambda x: isinstance(x, _Reduction), _one_element) for e in exprs]
    symbols = sorted(set().union(*(e.free_symbols for e in exprs)), key=lambda s: s.name)
    function = sympy.lambdify(symbols, exprs, modules=[_MATH, "math"])
    rng = random.Random(0)
    for _ in range(SAMPLES):
        values = {s: _sample(s, rng, bounds.get(s.name)) for s in symbols}
        try:
            result = function(*[float(v) for v in values.values()])
            size = gap(result)
        except (TypeError, ValueError, ZeroDivisionError, ArithmeticError):
            continue  # undefined here (a root of a negative number): try another point
        if size > 1e-9:
            return values, result
    return None


_MATH = {"sign": lambda x: float((x > 0) - (x < 0)), "Abs": abs, "Max": max, "Min": min,
         "Mod": lambda a, b: a % b}


def _sample(symbol, rng, bound):
    """A short rational in ``bound`` (a Range) that respects the symbol's assumptions."""
    if symbol == STEP:
        return rng.randint(1, 40)
    lo, hi = (bound.lo, bound.hi) if bound is not None else (-math.inf, math.inf)
    if symbol.is_positive or symbol.is_nonnegative:
        lo = max(lo, 0)
    elif symbol.is_negative:
        hi = min(hi, 0)
    if symbol.is_integer:
        low = int(max(lo, -9)) if lo > -math.inf else -9
        return rng.randint(low if low > lo or bound is None or bound.lo_closed else low + 1, low + 9)
    if math.isinf(lo) and math.isinf(hi):
        lo, hi = -2, 2
    elif math.isinf(hi):
        hi = lo + 2
    elif math.isinf(lo):
        lo = hi - 2
    for _ in range(20):
        x = sympy.Rational(rng.randint(1, 99), 100) * (hi - lo) + lo
        x = sympy.Rational(str(round(float(x), 3)))
        if x != 0 or not (symbol.is_nonzero or symbol.is_positive or symbol.is_negative):
            if lo < x < hi or (bound is None and lo <= x <= hi):
                return x
    return sympy.Rational(str(lo))  # a range of one point (a state that stays 0)


def _one_element(reduction):
    """A reduction over a tensor of one element: a concrete instance of any group."""
    a = reduction.args
    return {"sum": a[0], "mean": a[0], "max": a[0], "min": a[0], "norm": sympy.Abs(a[0]),
            "dot": a[0] * a[-1]}[reduction.what]


def _show(values) -> str:
    return ", ".join(f"{s.name} = {v}" for s, v in list(values.items())[:8])
