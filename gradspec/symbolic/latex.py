"""A spec's equations in LaTeX, one per statement, in the notation of optimizer papers:
m' is m_t, m is m_{t-1}, grad is g_t, param' is theta_t, lr is eta."""
from __future__ import annotations

import sympy

from ..compiler.ir import Program
from ..dsl import ast
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


def display(name: str, primed: bool, program: Program) -> str:
    """The LaTeX name of a spec name: states and the parameter get time indices."""
    if name == "param":
        return r"\theta_{t}" if primed else _INPUTS["param"]
    if name in _INPUTS:
        return _INPUTS[name]
    base = _symbol(name)
    if name in program.init:
        return f"{base}_{{t}}" if primed else f"{base}_{{t-1}}"
    return base


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


def _sympy(expr, program: Program, names: dict, shown: dict):
    """An AST expression as SymPy, with each name a symbol; ``shown`` maps each symbol to its
    LaTeX (what ``display`` says), for sympy.latex's symbol_names."""
    if isinstance(expr, ast.Num):
        return number(expr.value)
    if isinstance(expr, ast.Bool):
        return sympy.true if expr.value else sympy.false
    if isinstance(expr, ast.Name):
        key = str(expr)
        if key not in names:
            names[key] = ElementSymbol(f"n{len(names)}")  # nothing factors out of a reduction
            shown[names[key]] = display(expr.name, expr.primed, program)
        return names[key]
    recurse = [_sympy(a, program, names, shown) for a in getattr(expr, "args", ())]
    if isinstance(expr, ast.UnOp):
        inner = _sympy(expr.operand, program, names, shown)
        return -inner if expr.op == "-" else sympy.Not(inner)
    if isinstance(expr, ast.BinOp):
        a, b = _sympy(expr.left, program, names, shown), _sympy(expr.right, program, names, shown)
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


def equations(program: Program) -> list[str]:
    """``["m_{t} = \\beta_{1} m_{t-1} + ...", ...]``: the active statements, then the update."""
    lines, names, shown = [], {}, {}
    for _, item in program.statements:
        left = display(item.name, getattr(item, "primed", False), program)
        if isinstance(item, ast.State):
            left = display(item.name, False, program).replace("_{t-1}", "_{0}")
            right = item.init
        else:
            right = item.expr
        value = sympy.latex(_sympy(right, program, names, shown), symbol_names=shown, mul_symbol=None)
        if id(item) in program.context.probe_items:
            value += r" \quad \text{(probe)}"
        lines.append(f"{left} &= {value}")
    return lines


def render(program: Program) -> str:
    return "\\begin{aligned}\n" + " \\\\\n".join(equations(program)) + "\n\\end{aligned}"
