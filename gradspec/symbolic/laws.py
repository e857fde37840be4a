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

import dataclasses
import functools
import math
import random

import sympy
from sympy.core.relational import Relational
from sympy.printing.pycode import PythonCodePrinter

from ..compiler.ir import NEWTON_SCHULZ, NEWTON_SCHULZ_STEPS, Program, build
from ..dsl import ast
from ..dsl.errors import Diagnostic, SpecError
from .matrices import one_element
from .ranges import Analysis, Range, constraint_range
from .translate import (STEP, ElementSymbol, Translator, _Reduction, change_of_variables, number, outputs, replaced,
                        substitute)

SAMPLES = 48


# Substitutions use xreplace (as translate.substitute, which visits a shared subexpression
# once), never subs(simultaneous=True): the latter passes through plain Dummy symbols, and a
# reduction rebuilt around a Dummy takes it for a constant and pulls it out of the sum
# (norm(k * g) became |k * g| * norm(1)), which once proved a false law.


class _Refuted(Exception):
    def __init__(self, message, hint=None):
        super().__init__(message)
        self.hint = hint


def check_law(program: Program, index: int, pinned: dict | None = None) -> list[Diagnostic]:
    """Prove law number ``index`` of ``program`` at the program's switches (those the law
    sets with ``at`` excepted): GS081 with a counterexample, GS082 if it is not proven."""
    source, law = program.laws[index]
    try:
        _prove(program, source, law, pinned or {})
    except _Refuted as refuted:
        return [Diagnostic("GS081", f"law refuted: {refuted}", source, law.span, refuted.hint)]
    except _Unproven as unproven:
        return [Diagnostic("GS082", f"law not proven: {unproven}", source, law.span,
                           f"it held at {SAMPLES} random points, but SymPy could not prove it; "
                           "state it in simpler terms")]
    except SpecError as error:
        return list(error.diagnostics)
    except (TypeError, ValueError, ArithmeticError, RecursionError) as error:  # SymPy gave up
        return [Diagnostic("GS082", f"law not proven: SymPy could not evaluate it ({error})", source,
                           law.span, "an expression in it may be undefined (0 / 0) where the law looks")]
    return []


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
        if (owner.kind == "bool") != isinstance(value, bool):
            raise SpecError(Diagnostic("GS080", f"the law sets '{name}' to {str(value).lower()}, but it is "
                                                f"{'a switch' if owner.kind == 'bool' else 'a number'}", source, span,
                                       "use true or false for a switch, a number otherwise"))
        (bools if owner.kind == "bool" else numbers)[name] = value
    if bools:  # the law's switches, the program's for the rest
        program = build(spec, {**program.context.values, **{k: v for k, v in bools.items() if k in spec.hypers}})
    # the state invariants hold for the values the law sets, which may lie outside the
    # constraints (eps = 0): recompute them there
    points = {k: Range.point(v) for k, v in numbers.items() if k in spec.hypers}
    analysis = Analysis(program, points)
    translate = Translator(program, {k: number(v) for k, v in numbers.items() if k in spec.hypers},
                           _signs(analysis))
    given = _Given(program, source, law, translate)
    bounds = {**{n: constraint_range(h) for n, h in spec.hypers.items()}, **points, **analysis.state_ranges}
    mine_outputs = outputs(program, translate)
    # a fixed point puts every state at its initial value anyway
    constants = _constant_states(program, translate, mine_outputs) if law.kind != "fixed_point" else {}
    mine = {k: substitute(v, constants) for k, v in mine_outputs.items()}

    def equal(a, b, what):
        _equal(given(a), given(b), what, law, bounds, given.facts)

    if law.kind == "equals":
        # a switch both specs have is set alike in both: adamw with amsgrad is adam with amsgrad
        settings = {n: program.context.values.get(n, h.default) if h.kind == "bool" and n in spec.hypers
                    else h.default for n, h in other.hypers.items()}
        settings.update({k: v for k, v in bools.items() if k in other.hypers})
        theirs_program = build(other, settings)
        shared = {n: translate.symbols[n] for n in other.hypers if n in spec.hypers}
        shared.update({n: number(v) for n, v in numbers.items() if n in other.hypers})
        for n, h in other.hypers.items():  # what only the other spec has stays at its default
            shared.setdefault(n, number(h.default) if h.kind != "bool" else None)
        theirs_t = Translator(theirs_program, {k: v for k, v in shared.items() if v is not None},
                              translate.state_signs)  # the same state is the same symbol
        theirs_outputs = outputs(theirs_program, theirs_t)
        theirs_constants = _constant_states(theirs_program, theirs_t, theirs_outputs)
        for name, value in mine.items():
            if name in theirs_outputs:
                equal(value, substitute(theirs_outputs[name], theirs_constants), f"{name} differs from {other.name}'s")
        for name, node in program.init.items():
            theirs_init = theirs_program.init.get(name)
            if node is not None and theirs_init is not None:
                equal(translate(node), theirs_t(theirs_init), f"the initial value of {name} differs from {other.name}'s")
        return
    if law.kind == "invariant":
        # a state the spec keeps only under other switches (adam's vmax without amsgrad) is
        # mapped where it exists
        inactive = _declared_states(spec) - set(program.init)
        mapping = {_symbol_of(program, name, translate, source, law): translate(program.law_expr(source, expr, True))
                   for name, expr in law.mappings if name not in inactive}
        for name, value in mine.items():
            x = _symbol_of(program, name[:-1], translate, source, law)
            moved = substitute(value, mapping)
            expected = substitute(mapping[x], {x: value}) if x in mapping else value
            equal(moved, expected, f"{name} does not transform as the substitution says")
        return
    if law.kind == "fixed_point":
        base = _base_statements(spec, source)
        if base is None:
            _fixed_point(program, translate, mine, equal, source, law)
            return
        # an adaptor's law: at a fixed point of its base, the adaptor is at one. The base
        # sees what it sees at its own fixed point (a zero gradient) ...
        zero = {ElementSymbol("grad", real=True): sympy.Integer(0)}
        zero.update({translate.state(n): substitute(translate(node), zero) for n, node in program.init.items()})
        for name, expected in _what_the_base_sees(spec, source, base):
            seen = substitute(translate(program.law_expr(source, ast.Name(name))), zero)
            expected = substitute(translate(program.law_expr(source, expected)), zero)
            equal(seen, expected, f"at zero gradient the base sees {name.split('.', 1)[1]} = {seen}, "
                                  f"not {expected} as at its own fixed point")
        # ... so its update and states stay put, and then so must the adaptor's
        still = build(_base_at_rest(spec, source), program.context.values, probing=program.probing)
        still_translate = Translator(still, translate.symbols, translate.state_signs)
        _fixed_point(still, still_translate, outputs(still, still_translate), equal, source, law)
        return
    node = program.law_expr(source, law.target, True)
    if node.type != "bool":
        raise SpecError(Diagnostic("GS046", "a law states a condition, and this is a number", source,
                                   law.target.span, "compare it, as in abs(direction) == 1"))
    if not law.bindings and not law.given and _bounded(node, analysis):
        return
    _holds(given(substitute(translate(node), constants)), law, bounds, given.facts)


def _fixed_point(program, translate, mine, equal, source, law) -> None:
    """At zero gradient, with every state at its initial value, nothing moves."""
    grad = ElementSymbol("grad", real=True)
    rest = {grad: sympy.Integer(0)}
    for name in program.init:
        rest[translate.state(name)] = substitute(translate(program.init[name]), {grad: sympy.Integer(0)})
    for name, value in mine.items():
        x = _symbol_of(program, name[:-1], translate, source, law)
        expected = rest.get(x, x) if name != "param'" else ElementSymbol("param", real=True)
        equal(substitute(value, rest), expected, f"{name} moves at zero gradient")


# ---- an adaptor's laws, relative to its base ------------------------------------------------
# An adaptor applied to a base is one flat spec (see dsl.resolve): the adaptor's statements
# come from the adaptor's file, the base's from the base's. The base's update is the local
# '<adaptor>.base_update' when the adaptor defines param', and 'base.X = e' is the local
# '<adaptor>.X'.


def walk(items):
    """``(source, item)`` pairs of a spec's body, with the items nested in ``if`` and probe
    blocks."""
    for src, item in items:
        yield src, item
        if isinstance(item, ast.If):
            yield from walk([(src, i) for i in item.then + item.otherwise])
        elif isinstance(item, (ast.Probe, ast.Repeat)):
            yield from walk([(src, i) for i in item.items])


def _base_statements(spec, source) -> list | None:
    """The base's statements when the law at ``source`` belongs to an adaptor applied to
    a base (its file contributes statements, and another file does too); else None."""
    statements = [(src, i) for src, i in walk(spec.items) if isinstance(i, (ast.State, ast.Define))]
    base = [i for src, i in statements if src != source]
    if not base or len(base) == len(statements):
        return None
    return base


def _what_the_base_sees(spec, source, base) -> list:
    """``(local, expected)`` for each input or definition of the base that the adaptor
    replaces (``base.grad = ...`` is the local '<adaptor>.grad'), with what the base sees
    there at its own fixed point: a zero gradient, the parameter and step themselves, its
    own definition of a replaced local. An adaptor that replaces both the gradient and the
    parameter runs the base in a space of its own (GaLore's projection), where the base's
    parameter is whatever the adaptor gives it: the base is at rest there at any parameter."""
    base_locals = {i.name for i in base if isinstance(i, ast.Define) and not i.primed}
    replaced_inputs = {item.name.split(".", 1)[1] for src, item in walk(spec.items)
                       if src == source and isinstance(item, ast.Define) and not item.primed and "." in item.name}
    projected = {"grad", "param"} <= replaced_inputs
    out = []
    for src, item in walk(spec.items):
        if src != source or not isinstance(item, ast.Define) or item.primed or "." not in item.name:
            continue
        replaced = item.name.split(".", 1)[1]
        if replaced == "param" and projected:
            continue
        if replaced == "grad":
            out.append((item.name, ast.Num(0)))
        elif replaced in ("param", "step", "loss") or replaced in base_locals:
            out.append((item.name, ast.Name(replaced)))
    return out


def _base_at_rest(spec, source):
    """``spec`` with its base at a fixed point: the base's update is the parameter it sees (the
    adaptor's ``base.param`` where it gives one) and each of its states keeps its value; the
    adaptor's statements are as written. The base may itself be an adaptor over a base (the
    law is lookahead's, over galore(adam)): what a layer gives its base is looked up in every
    layer, so an inner base at rest keeps the projected shape its adaptor gives it."""
    given = {item.name for _, item in walk(spec.items) if isinstance(item, ast.Define) and not item.primed}

    def still(item):
        if isinstance(item, ast.Define) and item.primed:
            return dataclasses.replace(item, expr=ast.Name(item.name, span=item.span))
        if isinstance(item, ast.Define) and item.name.endswith(".base_update"):
            prefix = item.name.removesuffix("base_update")
            if prefix + "param" not in given:
                return dataclasses.replace(item, expr=ast.Name("param", span=item.span))
            # the parameter the base sees, in the shape of the gradient it sees (a projected space's)
            shaped = ast.BinOp("+", ast.Name(prefix + "param", span=item.span),
                               ast.BinOp("*", ast.Num(0), ast.Name(prefix + "grad", span=item.span), item.span)
                               if prefix + "grad" in given else ast.Num(0), item.span)
            return dataclasses.replace(item, expr=shaped)
        if isinstance(item, ast.If):
            return dataclasses.replace(item, then=tuple(map(still, item.then)), otherwise=tuple(map(still, item.otherwise)))
        if isinstance(item, (ast.Probe, ast.Repeat)):
            return dataclasses.replace(item, items=tuple(map(still, item.items)))
        return item
    items = tuple((src, item if src == source else still(item)) for src, item in spec.items)
    return dataclasses.replace(spec, items=items)


def _declared_states(spec) -> set:
    """Every state the spec declares, under any setting of its switches."""
    return {i.name for _, i in walk(spec.items) if isinstance(i, ast.State)}


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
    return _signs(Analysis(program))


def _signs(analysis) -> dict:
    return {n: "positive" if r.positive else "nonnegative" for n, r in analysis.state_ranges.items()
            if r.nonnegative}


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


class _Given:
    """A law's ``given``, applied to an expression. A ``where`` whose condition it decides
    takes that branch; ``X > c`` (>=, <, !=) becomes a change of variables after which
    ``X - c`` is a fresh symbol with that property; ``S == e`` for a state or input S puts e
    in its place (``Q_L == eye(rows)`` holds a basis at the identity); the facts it could not
    encode so are kept, and the counterexample search only samples points where they hold.
    The parts of ``a and b`` are built one by one: a fact on a rows x rows matrix and one on
    a cols x cols matrix are two facts, not an elementwise conjunction of unequal shapes."""

    def __init__(self, program, source, law, translate):
        self.decided, self.replacements, self.facts = {}, {}, []
        if law.given is None:
            return
        parts = [translate(program.law_expr(source, part, True)) for part in _conjuncts(law.given)]
        for f in [f for fact in parts for f in (fact.args if isinstance(fact, sympy.And) else [fact])]:
            if not isinstance(f, Relational):
                self.facts.append(f)
                continue
            self.decided[f.canonical] = sympy.true
            self.decided[f.negated.canonical] = sympy.false
            held = _held(f, program, translate)
            if held is not None and held[0] not in self.replacements:
                self.replacements[held[0]] = held[1]
                continue
            kind = {sympy.StrictGreaterThan: "positive", sympy.GreaterThan: "nonnegative",
                    sympy.StrictLessThan: "negative", sympy.Unequality: "nonzero"}.get(type(f))
            change = change_of_variables(f.lhs - f.rhs, kind) if kind else {}
            if change and not set(change) & set(self.replacements):
                self.replacements.update(change)
            else:
                self.facts.append(f)

    def __call__(self, e):
        e = replaced(e, lambda x: isinstance(x, Relational) and x.canonical in self.decided,
                     lambda x: self.decided[x.canonical])
        return substitute(e, self.replacements) if self.replacements else e


def _conjuncts(expr) -> list:
    """The parts of ``a and b and ...`` as written."""
    if isinstance(expr, ast.BinOp) and expr.op == "and":
        return _conjuncts(expr.left) + _conjuncts(expr.right)
    return [expr]


def _held(fact, program, translate):
    """(symbol, value) for ``S == value`` (either way round) where S is a state or an input of
    the spec and the value does not read S; else None."""
    if not isinstance(fact, sympy.Eq):
        return None
    leaves = {translate.state(n) for n in program.init} | {STEP, ElementSymbol("grad", real=True),
                                                           ElementSymbol("param", real=True)}
    for symbol, value in ((fact.lhs, fact.rhs), (fact.rhs, fact.lhs)):
        if symbol in leaves and symbol not in value.free_symbols:
            return symbol, value
    return None


def _constant_states(program, translate, outs: dict) -> dict:
    """The states that provably keep a constant initial value (S = 0 when xi = 0), as a
    substitution: their next value, with all of them at their constants, is that constant."""
    constants = {}
    for name, node in program.init.items():
        if node is not None and node.is_const:
            constants[translate.state(name)] = number(node.attr)
    def stays(s, c):
        change = substitute(outs[f"{s.name}'"], constants) - c
        if change == 0:
            return True
        # a random point where it moves settles most states in microseconds; simplify
        # can take seconds
        moved = search((change,), {}, lambda value: abs(value[0]) / (1 + abs(value[0])))
        return moved is None and sympy.simplify(change) == 0

    while True:
        kept = {s: c for s, c in constants.items() if stays(s, c)}
        if kept == constants:
            return constants
        constants = kept


def _equal(a, b, what, law, bounds, facts=()):
    if a == b:
        return
    counterexample = search((a, b), bounds, lambda pair: abs(pair[0] - pair[1]) / (1 + abs(pair[0]) + abs(pair[1])),
                             facts)
    if counterexample is not None:
        values, (x, y) = counterexample
        where = f"at {_show(values)}" if values else "everywhere"
        raise _Refuted(f"{what}; {where} one side is {x:.6g} and the other {y:.6g}", _hint(law))
    if not is_zero(a - b):
        raise _Unproven(what)


def is_zero(e) -> bool:
    """Proven 0: piecewise differences branch by branch, then cancel, cancel with roots of
    quotients split, and simplify only where it is cheap (it can run for minutes)."""
    e = sympy.piecewise_fold(_normal_conditions(_positive_factors_out(e)))
    if isinstance(e, sympy.Piecewise):
        return all(is_zero(piece.expr) for piece in e.args)
    for attempt in (sympy.cancel, lambda x: sympy.cancel(split_roots(x))):
        if attempt(e) == 0:
            return True
    return sympy.count_ops(e) < 120 and sympy.simplify(e) == 0


def _positive_factors_out(e):
    """max(k^2 a, k^2 b) as k^2 max(a, b) where k^2 > 0 (min too), so that a rescaled max
    cancels against the max it came from (AMSGrad's v_max under grad -> k grad)."""
    def out(f):
        nonzero = [sympy.factor_terms(a) for a in f.args if a != 0]
        if not nonzero:
            return f
        common = set(sympy.Mul.make_args(nonzero[0]))
        for a in nonzero[1:]:
            common &= set(sympy.Mul.make_args(a))
        factor = sympy.Mul(*[c for c in common if c.is_positive and c != 1])
        if factor == 1:
            return f
        return factor * f.func(*[sympy.cancel(a / factor) for a in f.args])
    return replaced(e, lambda x: isinstance(x, (sympy.Max, sympy.Min)), out)


def _normal_conditions(e):
    """Conditions with positive factors dropped (k * |r| > 0 is |r| > 0 for k > 0), so the
    branches of two piecewise expressions line up."""
    def normal(rel):
        lhs = rel.lhs - rel.rhs
        if not isinstance(lhs, sympy.Mul):
            return rel
        kept, flip = [], False
        for f in lhs.args:
            if f.is_positive:
                continue
            if f.is_negative:
                flip = not flip
                continue
            kept.append(f)
        if len(kept) == len(lhs.args):
            return rel
        rel_type = type(rel)
        if flip:
            rel_type = {sympy.StrictGreaterThan: sympy.StrictLessThan, sympy.StrictLessThan: sympy.StrictGreaterThan,
                        sympy.GreaterThan: sympy.LessThan, sympy.LessThan: sympy.GreaterThan}.get(rel_type, rel_type)
        return rel_type(sympy.Mul(*kept), 0)
    return replaced(e, lambda x: isinstance(x, Relational), normal)


def split_roots(e):
    """sqrt(n / d) as sqrt(n) / sqrt(d). For principal square roots this holds wherever
    n / d >= 0 and d != 0, which the safety check has proven for every root in the spec
    (if both are negative, the two factors of i cancel). Roots of products are left alone:
    sqrt(a * b) is not sqrt(a) * sqrt(b) when both are negative."""
    def split(root):
        numerator, denominator = sympy.fraction(sympy.together(root.base))
        return sympy.Pow(numerator, root.exp) / sympy.Pow(denominator, root.exp)
    return replaced(e, lambda x: x.is_Pow and x.exp in (sympy.S.Half, -sympy.S.Half)
                    and sympy.fraction(sympy.together(x.base))[1] != 1, split)


def _holds(claim, law, bounds, facts=()):
    if claim is sympy.true:
        return
    if isinstance(claim, sympy.Eq):
        return _equal(claim.lhs, claim.rhs, f"{claim.lhs} == {claim.rhs} is not an identity", law, bounds, facts)
    found = search((claim,), bounds, lambda value: 0.0 if value[0] else 1.0, facts)
    if found is not None:
        where = _show(found[0])  # nothing when the claim reads no value at all (m' != m')
        raise _Refuted(f"the claim is false at {where}" if where else "the claim is false whatever the values",
                       _hint(law))
    if sympy.simplify(claim) is sympy.true:
        return
    raise _Unproven(str(claim))


def _hint(law):
    return "check the 'at' and 'given' clauses, or the spec: a refuted law is a bug in one of them"


# ---- counterexamples: random points that respect every symbol's assumptions -------------------

def search(exprs, bounds, gap, facts=()):
    """A random point, where every fact holds, at which ``gap`` of the expressions' values
    is above 1e-9; or None."""
    exprs = [one_element(replaced(e, lambda x: isinstance(x, _Reduction), _one_element)) for e in exprs]
    facts = [one_element(replaced(f, lambda x: isinstance(x, _Reduction), _one_element)) for f in facts]
    symbols = sorted(set().union(*(e.free_symbols for e in exprs + facts)), key=lambda s: s.name)
    try:
        function = _numeric(tuple(symbols), tuple(exprs))
        holds = _numeric(tuple(symbols), tuple(facts)) if facts else None
    except (AttributeError, TypeError, NotImplementedError):
        # matrix algebra (a MatMul) has no scalar function to sample: no counterexample is
        # sought, and the caller's symbolic proof alone decides
        return None
    rng = random.Random(0)
    boundaries = _boundaries(exprs)
    for index in range(SAMPLES * (4 if facts else 1) + (SAMPLES if boundaries else 0)):
        values = {s: _sample(s, rng, bounds.get(s.name)) for s in symbols}
        if index >= SAMPLES * (4 if facts else 1):  # then on the edges where branches meet
            for s, candidates in boundaries.items():
                value = rng.choice(candidates)
                if rng.random() < 0.7 and _allowed(s, value, bounds.get(s.name)):
                    values[s] = value
        try:
            point = [float(v) for v in values.values()]
            if holds is not None and not all(holds(*point)):
                continue
            result = function(*point)
            size = gap(result)
        except (TypeError, ValueError, ZeroDivisionError, ArithmeticError):
            continue  # undefined here (a root of a negative number): try another point
        if size > 1e-9:
            return values, result
    return None


@functools.lru_cache(maxsize=512)  # a state's change is searched again in each round of _constant_states
def _numeric(symbols: tuple, exprs: tuple):
    """``exprs`` as a Python function of ``symbols`` (floats), by lambdify.

    The arguments are named by position (``_x0``, ``_x1``, ...) in the printed code: a symbol
    named like a function (a hyperparameter called exp) must not shadow it, and two symbols
    of one name (different assumptions) must stay two arguments. lambdify's own ``dummify``
    does that by substituting a Dummy for each symbol in turn, rebuilding the expression
    once per symbol; rebuilding runs SymPy's Max and Min simplification again each time
    (37 s of checking deo(prodigy)). Printing the names costs nothing."""
    names = {s: f"_x{i}" for i, s in enumerate(symbols)}
    arguments = [sympy.Symbol(name) for name in names.values()]
    return sympy.lambdify(arguments, list(exprs), modules=[_MATH, "math"], printer=_PositionalPrinter(names))


class _PositionalPrinter(PythonCodePrinter):
    """lambdify's printer for ``modules=[_MATH, "math"]``, printing each argument symbol as
    the name of its position."""

    def __init__(self, names: dict):
        super().__init__({"fully_qualified_modules": False, "inline": True, "allow_unknown_functions": True,
                          "user_functions": {name: name for name in _MATH}})
        self._names = names

    def _print_Symbol(self, symbol, **kwargs):
        name = self._names.get(symbol)
        return name if name is not None else super()._print_Symbol(symbol, **kwargs)


def _boundaries(exprs) -> dict:
    """``{symbol: [values]}``: where a branch of the expressions changes, for the conditions
    (``grad == 0.37``, ``grad > 0``), kinks (abs, max, min) and jumps (sign) linear in one
    symbol. Random points never land there, and a difference only there is still a
    difference: ``where(grad == 0.37, ...)`` must not pass for a proof."""
    edges = []
    for e in exprs:
        for atom in e.atoms(Relational):
            edges.append(atom.lhs - atom.rhs)
        for atom in e.atoms(sympy.sign, sympy.Abs):
            edges.append(atom.args[0])
        for atom in e.atoms(sympy.Max, sympy.Min):
            edges += [a - b for a, b in zip(atom.args, atom.args[1:])]
    out: dict = {}
    for edge in edges:
        if not isinstance(edge, sympy.Expr) or len(edge.free_symbols) != 1:
            continue
        (symbol,) = edge.free_symbols
        slope = sympy.diff(edge, symbol)
        if not slope.is_number or slope == 0:
            continue
        root = -(edge - slope * symbol) / slope
        if root.is_Rational and root not in out.setdefault(symbol, []):
            out[symbol].append(root)
    return {s: values for s, values in out.items() if values}


def _allowed(symbol, value, bound) -> bool:
    """``value`` respects the symbol's assumptions and its range."""
    if (symbol.is_positive and value <= 0) or (symbol.is_nonnegative and value < 0) or \
            (symbol.is_negative and value >= 0) or (symbol.is_nonzero and value == 0) or \
            (symbol.is_integer and not value.is_integer):
        return False
    return bound is None or bound.contains(float(value))


def _newton_schulz_1x1(x: float) -> float:
    """tensor.orthogonalize of a one-element tensor, as the runtime computes it."""
    a, b, c = NEWTON_SCHULZ
    x = x / (abs(x) + 1e-7)
    for _ in range(NEWTON_SCHULZ_STEPS):
        gram = x * x
        x = a * x + (b * gram + c * gram * gram) * x
    return x


_MATH = {"sign": lambda x: float((x > 0) - (x < 0)), "Abs": abs, "Max": max, "Min": min,
         "Mod": lambda a, b: a % b, "Orthogonalize": _newton_schulz_1x1,
         # on a one-element tensor a nonzero direction spans everything: U U^T v = v
         "Onto": lambda v, u: v if u != 0 else 0.0, "GradAt": lambda x: 0.37 * x * x - 0.2,
         "HessianVector": lambda v: 1.3 * v}


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
        low = math.ceil(max(lo, -9))
        if bound is not None and low == lo and not bound.lo_closed:
            low += 1
        high = math.floor(min(hi, low + 9))
        if bound is not None and high == hi and not bound.hi_closed:
            high -= 1
        return rng.randint(low, max(low, high))
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
    middle = (sympy.Rational(str(lo)) + sympy.Rational(str(hi))) / 2  # a narrow or one-point range
    return middle


def _one_element(reduction):
    """A reduction over a tensor of one element: a concrete instance of any group."""
    a = reduction.args
    return {"sum": a[0], "mean": a[0], "max": a[0], "min": a[0], "norm": sympy.Abs(a[0]),
            "dot": a[0] * a[-1]}[reduction.what]


def _show(values) -> str:
    return ", ".join(f"{s.name} = {v}" for s, v in list(values.items())[:8])
