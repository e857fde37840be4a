"""Specs back to text: the flat body of a resolved spec (adaptors expanded) as gradspec source."""
from __future__ import annotations

from . import ast

_PRECEDENCE = {"or": 1, "and": 2, "not": 3, "==": 4, "!=": 4, "<": 4, "<=": 4, ">": 4, ">=": 4,
               "+": 5, "-": 5, "*": 6, "/": 6, "%": 6, "@": 6, "neg": 7, "^": 8}


def expr(e, parent: int = 0) -> str:
    if isinstance(e, ast.Num):
        return _number(e.value)
    if isinstance(e, ast.Bool):
        return "true" if e.value else "false"
    if isinstance(e, ast.Name):
        return str(e)
    if isinstance(e, ast.Call):
        return f"{e.func}({', '.join(expr(a) for a in e.args)})"
    if isinstance(e, ast.Reduce):
        return f"{e.scope}.{e.func}({', '.join(expr(a) for a in e.args)})"
    if isinstance(e, ast.Measure):
        return f"{e.scope}.{e.what}"
    if isinstance(e, ast.UnOp):
        level = _PRECEDENCE["neg" if e.op == "-" else "not"]
        text = ("-" if e.op == "-" else "not ") + expr(e.operand, level)
        return f"({text})" if level < parent else text
    level = _PRECEDENCE[e.op]
    right_level = level + (0 if e.op == "^" else 1)  # ^ is right-associative, the rest left
    left_level = level + (1 if e.op == "^" else 0)
    text = f"{expr(e.left, left_level)} {e.op} {expr(e.right, right_level)}"
    if e.op == "^":
        text = f"{expr(e.left, left_level)}^{expr(e.right, right_level)}"
    return f"({text})" if level < parent else text


def item(i, indent: str = "") -> list[str]:
    if isinstance(i, ast.Hyper):
        return [indent + hyper(i)]
    if isinstance(i, ast.State):
        scope = {"global": ": global", "tensor": ": tensor", "subspace": f": subspace({i.rank})",
                 "shaped": f": ({i.dims[0]}, {i.dims[1]})" if i.dims else ""}.get(i.scope, "")
        return [f"{indent}state {i.name}{scope} = {expr(i.init)}"]
    if isinstance(i, ast.Define):
        return [f"{indent}{i.name}{chr(39) if i.primed else ''} = {expr(i.expr)}"]
    if isinstance(i, ast.Override):
        return [f"{indent}{i.qualifier}.{i.name} = {expr(i.expr)}"]
    if isinstance(i, ast.Require):
        message = f' "{i.message}"' if i.message else ""
        return [f"{indent}require {expr(i.cond)}{message}"]
    if isinstance(i, ast.Law):
        return [indent + law(i)]
    if isinstance(i, ast.If):
        lines = [f"{indent}if {expr(i.cond)} {{"]
        for inner in i.then:
            lines += item(inner, indent + "    ")
        if i.otherwise:
            lines.append(f"{indent}}} else {{")
            for inner in i.otherwise:
                lines += item(inner, indent + "    ")
        return lines + [f"{indent}}}"]
    if isinstance(i, (ast.Probe, ast.Repeat)):
        opening = (f"blocks {i.size}" if isinstance(i, ast.Blocks) else
                   f"repeat {i.count}" if isinstance(i, ast.Repeat) else
                   f"probe every {i.every}" if i.model else f"every {i.every}")
        lines = [f"{indent}{opening} {{"]
        for inner in i.items:
            lines += item(inner, indent + "    ")
        return lines + [f"{indent}}}"]
    return []


def law(i: ast.Law) -> str:
    if i.kind == "equals":
        claim = f"equals {i.target}"
    elif i.kind == "invariant":
        claim = "invariant " + ", ".join(f"{name} -> {expr(e)}" for name, e in i.mappings)
    elif i.kind == "fixed_point":
        claim = "fixed_point"
    else:
        claim = expr(i.target)
    at = " at " + ", ".join(f"{n} = {_literal(v)}" for n, v, _ in i.bindings) if i.bindings else ""
    given = f" given {expr(i.given)}" if i.given is not None else ""
    message = f' "{i.message}"' if i.message else ""
    return f"law {claim}{at}{given}{message}"


def _literal(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else _number(value)


def hyper(h: ast.Hyper) -> str:
    value = ("true" if h.default else "false") if h.kind == "bool" else _number(h.default)
    kind = ": int" if h.kind == "int" else ""
    constraint = ""
    if h.constraint is not None:
        constraint = " " + h.constraint.describe(h.name)[len(h.name) + 1:]
    return f"hyper {h.name}{kind} = {value}{constraint}"


def spec(s) -> str:
    """A resolved spec as source text: docstring, header, hyperparameters, then its body."""
    lines = []
    if s.doc:
        lines += ['"""' + s.doc + '"""']
    if s.kind == "adaptor":
        lines.append(f"adaptor {s.name}({s.adaptor_ast.base_param})")
    else:
        lines.append(f"optimizer {s.name}")
    lines.append("")
    width = max((len(hyper(h)) for h in s.hypers.values()), default=0)
    for h in s.hypers.values():
        text = hyper(h)
        lines.append(text + (" " * (width - len(text)) + f"  # {h.doc}" if h.doc else ""))
    lines.append("")
    for _, i in s.items:
        lines += item(i)
    return "\n".join(lines)


def _number(value) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e6:
        return str(int(value))
    return repr(value)
