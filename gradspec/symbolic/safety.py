"""Numerical safety: every division, root, logarithm, fractional power and remainder of a
spec proven defined from its constraints and derived state invariants, or a located error
that names the expression and the fact that is missing."""
from __future__ import annotations

import dataclasses

from ..compiler.ir import Program
from ..dsl.errors import Diagnostic
from .translate import Translator
from .ranges import INF, Analysis, Range, Unsafe, branch_facts, constraint_range, intersect

_WHAT = {"div": "the divisor", "mod": "the divisor", "sqrt": "the root's argument", "rsqrt": "rsqrt's argument",
         "log": "the logarithm's argument", "pow": "the base", "inv_root": "the root's power"}


def diagnostics(program: Program) -> list[Diagnostic]:
    """GS072 for every operation of ``program`` that may be undefined. Inside the branch of
    ``if c > 0.5``, c's range is narrowed accordingly (and so is every expression the
    condition bounds, as 1 - beta in ``if 1 - beta > 0``); a program whose branches no
    allowed value reaches (the constraint says c < 0.3) has nothing to report. A step that
    treats classes of tensors differently (``if matrix``, shape conditions) is checked class by
    class, each problem once."""
    if program.by_class:
        found, seen = [], set()
        for each in program.by_class.values():
            for d in diagnostics(each):
                key = (d.code, d.span, d.message)
                if key not in seen:
                    seen.add(key)
                    found.append(d)
        return found
    assumed = assumed_facts(program)
    if assumed is None:
        return []
    narrowed, facts = assumed
    analysis = Analysis(program, narrowed, facts)
    return [_diagnostic(program, analysis, u, narrowed, facts) for u in analysis.unsafe]


def assumed_facts(program: Program) -> tuple[dict, tuple] | None:
    """What the ``if`` conditions the program took say: the hyperparameters' ranges
    narrowed, and facts on the other expressions they bound; None if no value is left."""
    ranges = {name: constraint_range(h) for name, h in program.spec.hypers.items()}
    probe = Analysis(program) if program.assumed else None  # the loop below is its only reader
    facts = []
    for _, condition, taken in program.assumed:
        yes, no = branch_facts(condition, probe, ())
        for node, fact in (yes if taken else no):
            if node.op == "hyper":
                ranges[node.attr] = intersect(ranges[node.attr], fact)
            else:
                facts.append((node, fact))
    if any(r.lo > r.hi or (r.lo == r.hi and not (r.lo_closed and r.hi_closed)) for r in ranges.values()):
        return None
    return ranges, tuple(facts)


def _diagnostic(program: Program, analysis: Analysis, unsafe: Unsafe, narrowed: dict, facts: tuple) -> Diagnostic:
    origins = program.origins or {}
    source, span = origins.get(id(unsafe.node), [(program.spec.source, None)])[0]
    inner = [o for o in origins.get(id(unsafe.operand), []) if span is None or _within(o[1], span)]
    if inner:  # point at the operand, where the operation uses it
        source, span = inner[0]
        span = balanced(source, span)
        text = _excerpt(source, span)
    else:  # the operand was first written elsewhere (m' defined above): name it, point at the use
        text = str(Translator(program)(unsafe.operand))
    text = text or _WHAT.get(unsafe.node.op, "an operand")
    if unsafe.node.op == "inv_root" and unsafe.operand is unsafe.node.args[0]:
        return Diagnostic("GS073", f"{text} may be singular: it is not proven positive definite, so its inverse "
                                   f"root may not exist", source, span,
                          "add a positive multiple of the identity (L + eps * eye(rows), eps > 0) or give a positive "
                          "floor: inv_root(L, 4, eps)")
    reason, hint = _explain(program, analysis, unsafe, narrowed, facts)
    if unsafe.node.op == "inv_root":  # its power
        text = f"the root's power {text}"
        reason = "A^(-1/p) is undefined at p = 0" if unsafe.operand.op == "const" else reason
    return Diagnostic("GS072", f"{text} {unsafe.problem}: {reason}", source, span, hint)


def _within(inner, outer) -> bool:
    return (inner.line, inner.column) >= (outer.line, outer.column) and \
        (inner.end_line, inner.end_column) <= (outer.end_line, outer.end_column)


def balanced(source, span):
    """``span`` widened to the parentheses its text leaves open. The parser's span of an
    expression whose first (or last) operand is parenthesised starts inside that operand's
    parentheses: ``(a - 4) * (a - 2)`` is recorded from ``a - 4``, which quoted alone reads
    ``a - 4) * (a - 2``."""
    if source is None or span is None or span.line != span.end_line:
        return span
    line = source.line(span.line)
    start, end = span.column - 1, span.end_column - 1
    unopened = unclosed = 0
    for char in line[start:end]:
        if char == "(":
            unclosed += 1
        elif char == ")":
            if unclosed:
                unclosed -= 1
            else:
                unopened += 1
    while unopened and start > 0 and line[start - 1] in " \t(":
        start -= 1
        unopened -= line[start] == "("
    while unclosed and end < len(line) and line[end] in " \t)":
        end += 1
        unclosed -= line[end - 1] == ")"
    if unopened or unclosed:  # not a parenthesis problem after all: keep what the parser said
        return span
    return dataclasses.replace(span, column=start + 1, end_column=end + 1)


def _excerpt(source, span) -> str | None:
    if source is None or span is None or span.line != span.end_line:
        return None
    return source.line(span.line)[span.column - 1:span.end_column - 1]


def _subtree(node):
    seen, stack = {}, [node]
    while stack:
        n = stack.pop()
        if id(n) not in seen:
            seen[id(n)] = n
            stack.extend(n.args)
    return list(seen.values())


def _still_unsafe(program, unsafe, hyper_ranges, facts) -> bool:
    again = Analysis(program, hyper_ranges, facts)
    return any(u.node is unsafe.node and u.problem == unsafe.problem for u in again.unsafe)


def _explain(program: Program, analysis: Analysis, unsafe: Unsafe, narrowed: dict, facts: tuple) -> tuple[str, str]:
    """Find the missing fact: a hyperparameter whose constraint, made strict (or declared
    positive where it has none), makes the operation safe; else what the checker knows."""
    leaves = _subtree(unsafe.operand)
    hypers = sorted({n.attr for n in leaves if n.op == "hyper"})
    for name in hypers:
        for tighter, fix, reason in _tightenings(program.spec.hypers[name]):
            if not _still_unsafe(program, unsafe, {**narrowed, name: intersect(tighter, narrowed[name])}, facts):
                return reason, f"did you mean {fix}?"
    known = []
    for n in leaves:
        if n.op == "state":
            known.append(f"state {n.attr} is only known to be {analysis.state_ranges.get(n.attr, Range()).describe()}")
        elif n.op == "input" and n.attr in ("grad", "param", "loss"):
            known.append(f"{n.attr} may be any real number")
        elif n.op == "hyper":
            known.append(f"{n.attr} is {narrowed[n.attr].describe()}")
    reason = "; ".join(dict.fromkeys(known)) or "nothing bounds it away from the problem"
    if unsafe.node.op == "inv_root":
        hint = "A^(-1/p) needs p != 0: constrain the power, as p >= 1"
    elif unsafe.node.op in ("div", "rsqrt", "log", "mod") or "negative power" in unsafe.problem:
        hint = "add a positive constant (a hyperparameter eps > 0) or take max(..., eps)"
    else:
        hint = "clamp it first, as in sqrt(max(x, 0)), or constrain what it is built from"
    return reason, hint


def _tightenings(hyper):
    """Stricter constraints to try, each with how to write it and why the current one fails."""
    name, current = hyper.name, constraint_range(hyper)
    if hyper.constraint is None:
        yield Range(0, INF, False, False, current.integer), f"{name} > 0", \
            f"{name} has no constraint, so it may be 0 or negative"
        return
    described = hyper.constraint.describe(name)
    if current.lo_closed and current.lo == 0:
        yield dataclasses.replace(current, lo_closed=False), _strict(hyper), f"the constraint {described} allows {name} = 0"
    if current.hi_closed and current.hi < INF:
        fix = f"{name} in {'[' if current.lo_closed else '('}{_num(current.lo)}, {_num(current.hi)})" \
            if current.lo > -INF else f"{name} < {_num(current.hi)}"
        yield dataclasses.replace(current, hi_closed=False), fix, \
            f"the constraint {described} allows {name} = {_num(current.hi)}"


def _strict(hyper) -> str:
    c = hyper.constraint
    if hasattr(c, "op"):
        return f"{hyper.name} {c.op.replace('>=', '>')} {_num(c.value)}"
    return f"{hyper.name} in ({_num(c.low)}, {_num(c.high)}{']' if c.high_closed else ')'}"


def _num(x):
    return str(int(x)) if float(x).is_integer() else repr(x)
