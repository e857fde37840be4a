"""``gradspec diff A B``: where two specs' update rules differ, in terms of the maths.

Both specs are translated with shared symbols (a hyperparameter, state or input with the
same name is the same symbol). For each next value they both define, the two expressions are
proven equal, or walked in parallel down to the smallest subexpressions that differ; then
each shared hyperparameter is tried as the explanation: a value of it in B (solved for, in
terms of A's symbols) that makes the two equal, or a value (0, 1) at which they agree.
This is how "my Adam drifts from torch's Adam" bugs read: eps added in another place.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy

from ..compiler.ir import build
from ..dsl.resolve import Spec
from .laws import is_zero, search, split_roots, state_signs
from .translate import Translator, outputs, varies_per_element
from ..recursion import deep


@dataclass
class Difference:
    output: str  # "param'", "m'", ...
    equal: bool
    a: sympy.Expr | None = None  # the smallest differing subexpressions
    b: sympy.Expr | None = None
    explanations: list = field(default_factory=list)

    def render(self, name_a: str, name_b: str) -> str:
        if self.equal:
            return f"{self.output}: equal (SymPy reduces the difference to 0)"
        lines = [f"{self.output} differs:", f"  in {name_a}: {self.a}", f"  in {name_b}: {self.b}"]
        lines += [f"  {e}" for e in self.explanations]
        return "\n".join(lines)


@deep
def diff(a: Spec, b: Spec) -> tuple[list[Difference], list[str]]:
    """The differences of every shared output, and the outputs only one spec has."""
    pa, pb = build(a), build(b)
    signs_a, signs_b = state_signs(pa), state_signs(pb)
    agreed = {n: sign for n, sign in signs_a.items() if signs_b.get(n, sign) == sign}  # one symbol per name
    ta = Translator(pa, None, agreed)
    symbols = {n: ta.symbols[n] for n in b.hypers if n in ta.symbols}
    tb = Translator(pb, symbols, {n: sign for n, sign in signs_b.items() if n not in pa.init or agreed.get(n) == sign})
    oa, ob = outputs(pa, ta), outputs(pb, tb)
    only = [f"{k} only in {a.name}" for k in oa if k not in ob] + [f"{k} only in {b.name}" for k in ob if k not in oa]
    return [_compare(name, oa[name], ob[name], set(symbols.values())) for name in oa if name in ob], only


def _is_zero(e) -> bool:
    """Proven 0. A random point where it is not 0 settles most cases in microseconds, before
    the symbolic proof the laws use."""
    if e == 0:
        return True
    if e.has(sympy.zoo, sympy.nan):  # undefined (beta1 = 1 in 1 / (1 - beta1^t)): not 0, and simplify takes seconds
        return False
    if search((e,), {}, lambda value: abs(value[0]) / (1 + abs(value[0]))) is not None:
        return False
    return is_zero(e)


def _compare(name, x, y, shared) -> Difference:
    if _is_zero(x - y):
        return Difference(name, True)
    sub_x, sub_y = _smallest_difference(x, y)
    out = Difference(name, False, sub_x, sub_y)
    for h in sorted(shared & (x.free_symbols | y.free_symbols), key=lambda s: s.name):
        value = _solve_for(h, x, y)
        if value is not None and not varies_per_element(value) and value not in (h, 0):
            factor = sympy.simplify(value / h)
            note = f": a factor {factor} on {h}" if h not in factor.free_symbols else ""
            out.explanations.append(f"equal when {h} in the second is {value}{note}")
        for value in (0, 1):
            if h.is_positive and value == 0:
                continue
            same = x.subs(h, value)
            if any(s.name == "grad" for s in same.free_symbols) and _is_zero(same - y.subs(h, value)):
                out.explanations.append(f"equal when {h} = {value}")
    return out


def _solve_for(h, x, y):
    """The value of ``h`` in ``y`` (in terms of x's symbols) that makes ``y`` equal ``x``.

    Roots of quotients are split (see ``split_roots``) and every root, power and function is made an opaque
    symbol, so that what is left is a rational equation SymPy solves in milliseconds; on the
    raw expressions ``solve`` can take minutes."""
    unknown, atoms = sympy.Dummy(h.name), {}

    def opaque(e):
        return e.replace(lambda s: (s.is_Pow and not s.exp.is_Integer) or s.is_Function,
                         lambda s: atoms.setdefault(s, sympy.Dummy()))
    left, right = opaque(split_roots(x)), opaque(split_roots(y).subs(h, unknown))
    if unknown not in right.free_symbols:
        return None
    try:
        solutions = sympy.solve(sympy.Eq(left, right), unknown, rational=False, simplify=False, check=False)
    except (NotImplementedError, TypeError, ValueError):
        return None
    back = {d: a for a, d in atoms.items()}
    for solution in solutions:
        solution = sympy.factor(sympy.cancel(solution))  # a rational function of the atoms: fast
        for _ in range(len(back) + 1):  # atoms may sit inside atoms
            solution = solution.subs(back)
        if any(isinstance(s, sympy.Dummy) for s in solution.free_symbols) or sympy.count_ops(solution) > 150:
            continue
        solution = sympy.simplify(solution)
        if sympy.count_ops(solution) < 30:  # a long formula would explain nothing
            return solution
    return None


def _smallest_difference(x, y):
    """Walk both trees while they have the same shape and differ in exactly one argument."""
    while x.func == y.func and len(x.args) == len(y.args) and x.args:
        differing = [(p, q) for p, q in zip(x.args, y.args) if p != q]
        if len(differing) != 1:
            break
        x, y = differing[0]
    return x, y
