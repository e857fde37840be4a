"""A spec's equations in LaTeX, one per statement, in the notation of optimizer papers:
m' is m_t, m is m_{t-1}, grad is g_t, param' is theta_t, lr is eta.

It should read like the paper's algorithm box, so it is printed from the spec as written,
not from SymPy's canonical form: ``param - lr * direction`` stays
``\\theta_{t-1} - \\eta \\cdot direction`` where SymPy would sort the terms. Every branch
appears: a name both branches of an ``if`` define is one equation with cases, a statement
in one branch only carries its condition. A name the paper's notation already uses for an
input (a definition ``g`` beside the gradient ``g_t``) gets a tilde, so that two different
quantities never print as one symbol. Only calls with no short notation of their own
(reductions, matrix functions, probes) are printed by SymPy.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import sympy

from ..compiler.ir import Program
from ..dsl import ast, printer
from .laws import walk
from .translate import _MATRIX_FUNCTIONS, OPS, Aspect, ElementSymbol, MatMul, Orthogonalize, number, reduction

MATRIX_CLASSES = {"orthogonalize": Orthogonalize, "aspect": Aspect}


def _notation(name: str, template: str):
    """An opaque function printed as ``template`` (with {0}, {1} for its arguments)."""
    def latex(self, printer):
        return template.format(*(printer._print(a) for a in self.args))
    return type(name, (sympy.Function,), {"_latex": latex})


PROBE_NOTATION = {
    "grad_at": _notation("GradAtLatex", r"\nabla L\left({0}\right)"),
    "hvp": _notation("HvpLatex", r"H_{{t}} {0}"),
    "randn": _notation("RandnLatex", r"u \sim \mathcal{{N}}(0, I)"),
    "gauss_newton": _notation("GaussNewtonLatex", r"B \, \hat{{g}}_{{t}} \odot \hat{{g}}_{{t}}"),
    "hessian_eigvecs": _notation("EigvecsLatex", r"\operatorname{{top}}_{{{0}}}\operatorname{{eig}}(H_{{t}})"),
    "onto": _notation("OntoLatex", r"{{{1}}} {{{1}}}^{{\top}} {0}"),
}

_GREEK = {"lr": r"\eta", "eps": r"\epsilon", "xi": r"\xi"}
_INPUTS = {"grad": "g_{t}", "param": r"\theta_{t-1}", "step": "t", "loss": "L_{t}"}
_INPUT_LETTERS = {"grad": "g", "param": r"\theta", "step": "t", "loss": "L", **_GREEK}


@dataclass
class Notation:
    """How each name of one spec prints: the time indices of states and inputs, and a tilde
    on a name that would print like an input the spec reads. ``names`` and ``shown`` are the
    symbols handed to SymPy for the calls it prints."""

    states: set
    tilded: set
    names: dict = field(default_factory=dict)
    shown: dict = field(default_factory=dict)

    @classmethod
    def of(cls, spec) -> "Notation":
        items = [item for _, item in walk(spec.items)]
        states = {i.name for i in items if isinstance(i, ast.State)}
        declared = states | {i.name for i in items if isinstance(i, ast.Define)} | set(spec.hypers)
        read = {n.name for i in items for e in _expressions(i) for n in ast.names_in(e)}
        taken = {letter for name, letter in _INPUT_LETTERS.items() if name in read or name in spec.hypers}
        tilded = {n for n in declared if n not in _INPUT_LETTERS and _symbol(n) in taken}
        return cls(states, tilded)

    def display(self, name: str, primed: bool) -> str:
        """The LaTeX name of a spec name: states and the parameter get time indices."""
        if name == "param":
            return r"\theta_{t}" if primed else _INPUTS["param"]
        if name in _INPUTS:
            return _INPUTS[name]
        base = _symbol(name)
        if name in self.tilded:
            base = r"\tilde{" + base + "}"
        if name in self.states:
            return f"{base}_{{t}}" if primed else f"{base}_{{t-1}}"
        return base


def _expressions(item) -> list:
    return [e for e in (getattr(item, "init", None), getattr(item, "expr", None), getattr(item, "cond", None))
            if e is not None]


def _symbol(name: str) -> str:
    r"""beta1 -> \beta_{1}, mhat -> \hat{m}, e.a -> a^{(e)}, direction -> \mathrm{direction}."""
    if "." in name:
        owner, rest = name.split(".", 1)
        return f"{_symbol(rest)}^{{({owner.replace('_', chr(92) + '_')})}}"
    if name in _GREEK:
        return _GREEK[name]
    if name.endswith("hat") and len(name) > 3:
        return r"\hat{" + _symbol(name[:-3]) + "}"
    letters = name.rstrip("0123456789")
    if len(letters) == 1 or letters in _GREEK_LETTERS:
        return sympy.latex(sympy.Symbol(name))
    return r"\mathrm{" + name.replace("_", r"\_") + "}"


_GREEK_LETTERS = {"alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "kappa", "lambda",
                  "mu", "nu", "rho", "sigma", "tau", "phi", "chi", "psi", "omega"}


# ---- expressions, in the order written ------------------------------------------------------

_RELATIONS = {"==": "=", "!=": r"\neq", "<": "<", "<=": r"\leq", ">": ">", ">=": r"\geq",
              "and": r"\wedge", "or": r"\vee", "%": r"\bmod"}
_CALLS = {"sqrt": r"\sqrt{{{0}}}", "rsqrt": r"\frac{{1}}{{\sqrt{{{0}}}}}", "abs": r"\left|{0}\right|",
          "max": r"\max\left({0}, {1}\right)", "min": r"\min\left({0}, {1}\right)",
          "exp": r"\exp\left({0}\right)", "log": r"\log\left({0}\right)",
          "sign": r"\operatorname{{sign}}\left({0}\right)"}
_ATOM = 9  # a name, number, call or fraction: never parenthesised


def expression(e, notation: Notation, parent: int = 0) -> str:
    """``e`` in LaTeX with its terms and factors in the order written, parenthesised where
    its precedence is below ``parent``'s (the DSL printer's precedence)."""
    text, level = _expression(e, notation)
    return rf"\left({text}\right)" if level < parent else text


def _expression(e, notation: Notation) -> tuple[str, int]:
    if isinstance(e, ast.Num):
        return _number(e.value), _ATOM
    if isinstance(e, ast.Bool):
        return (r"\mathrm{true}" if e.value else r"\mathrm{false}"), _ATOM
    if isinstance(e, ast.Name):
        return notation.display(e.name, e.primed), _ATOM
    if isinstance(e, ast.UnOp):
        level = printer._PRECEDENCE["neg" if e.op == "-" else "not"]
        return ("-" if e.op == "-" else r"\neg ") + expression(e.operand, notation, level), level
    if isinstance(e, ast.BinOp):
        return _binary(e, notation)
    if isinstance(e, ast.Call) and e.func in _CALLS:
        return _CALLS[e.func].format(*(expression(a, notation) for a in e.args)), _ATOM
    if isinstance(e, ast.Call) and e.func in ("clamp", "lerp", "where", "atan2"):
        args = ", ".join(expression(a, notation) for a in e.args)
        return rf"\operatorname{{{e.func}}}\left({args}\right)", _ATOM
    value = sympy.latex(_sympy(e, notation), symbol_names=notation.shown, mul_symbol=None)
    return value, _ATOM


def _binary(e: ast.BinOp, notation: Notation) -> tuple[str, int]:
    level = printer._PRECEDENCE[e.op]
    if e.op == "/":
        return rf"\frac{{{expression(e.left, notation)}}}{{{expression(e.right, notation)}}}", _ATOM
    if e.op == "^":
        base = expression(e.left, notation, _ATOM + (not isinstance(e.left, (ast.Name, ast.Num, ast.Call))))
        return f"{base}^{{{expression(e.right, notation)}}}", level
    left = expression(e.left, notation, level)
    right = expression(e.right, notation, level + 1)  # left-associative: a - (b - c) keeps its brackets
    if e.op in ("*", "@"):
        # juxtaposed words and numbers run together (eta direction, 2 3): a dot between them
        spaced = re.search(r"(\\mathrm\{[^{}]*\}|[0-9])$", left) or re.match(r"\\mathrm|[0-9]", right)
        return f"{left} {chr(92) + 'cdot ' if spaced else ''}{right}", level
    return f"{left} {_RELATIONS.get(e.op, e.op)} {right}", level


def _number(value) -> str:
    """0.9 as 0.9, 1e-8 as 10^{-8}, 3e-4 as 3 \\cdot 10^{-4}, as a paper writes them."""
    if isinstance(value, int) or float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    text = printer._number(value)
    if "e" not in text:
        return text
    mantissa, exponent = text.split("e")
    power = f"10^{{{int(exponent)}}}"
    return power if mantissa in ("1", "1.0") else rf"{mantissa} \cdot {power}"


def _sympy(expr, notation: Notation):
    """An AST expression as SymPy, with each name a symbol; ``notation.shown`` maps each
    symbol to its LaTeX, for sympy.latex's symbol_names."""
    if isinstance(expr, ast.Num):
        return number(expr.value)
    if isinstance(expr, ast.Bool):
        return sympy.true if expr.value else sympy.false
    if isinstance(expr, ast.Name):
        key = str(expr)
        if key not in notation.names:
            notation.names[key] = ElementSymbol(f"n{len(notation.names)}")  # nothing factors out of a reduction
            notation.shown[notation.names[key]] = notation.display(expr.name, expr.primed)
        return notation.names[key]
    recurse = [_sympy(a, notation) for a in getattr(expr, "args", ())]
    if isinstance(expr, ast.UnOp):
        inner = _sympy(expr.operand, notation)
        return -inner if expr.op == "-" else sympy.Not(inner)
    if isinstance(expr, ast.BinOp):
        a, b = _sympy(expr.left, notation), _sympy(expr.right, notation)
        if expr.op == "@":
            return MatMul(a, b)
        op = {"+": "add", "-": "sub", "*": "mul", "/": "div", "%": "mod", "^": "pow", "==": "eq", "!=": "ne",
              "<": "lt", "<=": "le", ">": "gt", ">=": "ge", "and": "and", "or": "or"}[expr.op]
        return OPS[op](a, b)
    if isinstance(expr, ast.Measure):
        return sympy.Symbol(rf"\operatorname{{{expr.what}}}_{{\mathrm{{{expr.scope}}}}}")
    if isinstance(expr, ast.Reduce):
        if expr.func in MATRIX_CLASSES:
            return MATRIX_CLASSES[expr.func](recurse[0])
        return reduction(expr.scope, expr.func)(*recurse)
    if expr.func == "eye":
        return sympy.Symbol("I")
    if expr.func in _MATRIX_FUNCTIONS:
        return _MATRIX_FUNCTIONS[expr.func](*recurse)
    if expr.func in PROBE_NOTATION:
        return PROBE_NOTATION[expr.func](*(recurse if expr.func != "hessian_eigvecs" else recurse[:1]))
    return OPS[expr.func](*recurse)


# ---- statements, every branch ------------------------------------------------------------------

def equations(program: Program) -> list[str]:
    """``["m_{t} &= \\beta_{1} m_{t-1} + ...", ...]``: every statement of the spec in source
    order, under any setting of its switches; the update last, as the spec writes it."""
    notation = Notation.of(program.spec)
    return _statements([item for _, item in program.spec.items], notation, "")


def _statements(items, notation: Notation, note: str) -> list[str]:
    lines = []
    for item in items:
        if isinstance(item, ast.State):
            left = notation.display(item.name, False).replace("_{t-1}", "_{0}")
            lines.append(f"{left} &= {expression(item.init, notation)}{note}")
        elif isinstance(item, ast.Define):
            lines.append(f"{_left(item, notation)} &= {expression(item.expr, notation)}{note}")
        elif isinstance(item, ast.If):
            lines += _branches(item, notation, note)
        elif isinstance(item, ast.Probe):
            every = _every(item.every, notation)
            what = rf"\text{{(probe, every }} {every} \text{{ steps)}}" if item.model else \
                rf"\text{{(every }} {every} \text{{ steps)}}"
            lines += _statements(item.items, notation, f"{note} \\quad {what}")
        elif isinstance(item, ast.Blocks):
            size = _every(item.size, notation)
            lines += _statements(_per_block(item.items), notation,
                                 rf"{note} \quad \text{{(per block of at most }} {size} \times {size} \text{{)}}")
        elif isinstance(item, ast.Repeat):
            count = _every(item.count, notation)
            lines += _statements(item.items, notation, rf"{note} \quad \text{{(repeated }} {count} \text{{ times)}}")
    return lines


def _per_block(items) -> tuple:
    """A blocks body with its ``tensor.f`` reductions shown as what they are there, one value
    per block (the subscript "block")."""
    def expr(e):
        if isinstance(e, ast.Reduce):
            scope = "block" if e.scope == "tensor" else e.scope
            return dataclasses.replace(e, scope=scope, args=tuple(expr(a) for a in e.args))
        if isinstance(e, ast.BinOp):
            return dataclasses.replace(e, left=expr(e.left), right=expr(e.right))
        if isinstance(e, ast.UnOp):
            return dataclasses.replace(e, operand=expr(e.operand))
        if isinstance(e, ast.Call):
            return dataclasses.replace(e, args=tuple(expr(a) for a in e.args))
        return e

    def item(i):
        if isinstance(i, ast.State):
            return dataclasses.replace(i, init=expr(i.init))
        if isinstance(i, ast.Define):
            return dataclasses.replace(i, expr=expr(i.expr))
        if isinstance(i, ast.If):
            return dataclasses.replace(i, then=tuple(map(item, i.then)), otherwise=tuple(map(item, i.otherwise)))
        if isinstance(i, (ast.Probe, ast.Repeat)):
            return dataclasses.replace(i, items=tuple(map(item, i.items)))
        return i
    return tuple(map(item, items))


def _left(item: ast.Define, notation: Notation) -> str:
    return notation.display(item.name, item.primed)


def _every(count, notation: Notation) -> str:
    return notation.display(count, False) if isinstance(count, str) else str(count)


def _branches(item: ast.If, notation: Notation, note: str) -> list[str]:
    """A name both branches define as one equation with cases; the rest with its condition."""
    condition = expression(item.cond, notation)
    def defined(items):
        return {(i.name, i.primed): i for i in items if isinstance(i, ast.Define)}
    then, otherwise = defined(item.then), defined(item.otherwise)
    lines = []
    for inner in item.then:
        key = (getattr(inner, "name", None), getattr(inner, "primed", None))
        if isinstance(inner, ast.Define) and key in otherwise:
            cases = (rf"{expression(inner.expr, notation)} & \text{{if }} {condition} \\ "
                     rf"{expression(otherwise[key].expr, notation)} & \text{{otherwise}}")
            lines.append(rf"{_left(inner, notation)} &= \begin{{cases}} {cases} \end{{cases}}{note}")
        else:
            lines += _statements([inner], notation, rf"{note} \quad \text{{if }} {condition}")
    rest = [inner for inner in item.otherwise
            if not (isinstance(inner, ast.Define) and (inner.name, inner.primed) in then)]
    return lines + _statements(rest, notation, rf"{note} \quad \text{{if }} {_negated(item.cond, notation)}")


_NEGATED = {"==": "!=", "!=": "==", "<": ">=", "<=": ">", ">": "<=", ">=": "<"}


def _negated(cond, notation: Notation) -> str:
    """``momentum = 0`` for ``not momentum != 0``; ``\neg amsgrad`` for a switch."""
    if isinstance(cond, ast.BinOp) and cond.op in _NEGATED:
        return expression(ast.BinOp(_NEGATED[cond.op], cond.left, cond.right), notation)
    if isinstance(cond, ast.UnOp) and cond.op == "not":
        return expression(cond.operand, notation)
    return expression(ast.UnOp("not", cond), notation)


def render(program: Program) -> str:
    return "\\begin{aligned}\n" + " \\\\\n".join(equations(program)) + "\n\\end{aligned}"
