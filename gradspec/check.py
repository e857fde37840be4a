"""``gradspec.check``: everything that can be known about a spec before its first step.

Resolution and the IR builder find syntax, name, type and scope errors; the symbolic checker
adds the hyperparameters' domains, numerical safety under every setting of the switches, and
the spec's laws. Errors raise :class:`SpecError`; warnings (a constant that underflows in a
half-precision dtype) are returned by :func:`diagnose` and printed by ``gradspec check``.
"""
from __future__ import annotations

import functools
import itertools

from .compiler.ir import build
from .dsl.errors import Diagnostic, SpecError
from .dsl.resolve import Spec, apply_adaptor, load
from .symbolic import domains, laws, safety
from .recursion import deep


@deep
def check(spec: Spec | str, dtype=None) -> Spec:
    """Every check; raises SpecError with all errors, returns the resolved spec when sound."""
    spec = load(spec) if isinstance(spec, str) else spec
    errors = [d for d in diagnose(spec, dtype) if d.severity == "error"]
    if errors:
        raise SpecError(errors)
    return spec


@deep
def diagnose(spec: Spec | str, dtype=None, prove_laws: bool = True) -> list[Diagnostic]:
    """All diagnostics of ``spec``, errors and warnings, in source order. Adaptors are checked
    applied to ``sgd``, the simplest base; a spec is built under every setting of its boolean
    switches, so that an error in a branch not taken by default is found too; a spec with
    probes is also built as at a step where every probe runs."""
    try:
        spec = load(spec) if isinstance(spec, str) else spec
        base = load("sgd") if spec.kind == "adaptor" else None
        target = apply_adaptor(spec, base) if base is not None else spec
    except SpecError as error:
        return error.diagnostics
    found = domains.diagnostics(target)
    switches = [n for n, h in target.hypers.items() if h.kind == "bool"]
    default = None
    for values in itertools.product((False, True), repeat=len(switches)):
        setting = {**target.hyper_defaults, **dict(zip(switches, values))}
        try:
            program = build(target, setting)
        except SpecError as error:  # a require failing is a setting, not a bug
            found += [d for d in error.diagnostics if d.code != "GS043"]
            continue
        found += safety.diagnostics(program)
        found += _other_branches(target, setting, program)
        if program.probe_periods:  # the steps where every probe runs, too
            probing = frozenset(range(len(program.probe_periods)))
            try:
                probed = build(target, setting, probing=probing)
            except SpecError as error:
                found += [d for d in error.diagnostics if d.code != "GS043"]
            else:
                found += safety.diagnostics(probed)
                found += _other_branches(target, setting, probed, probing=probing)
        if all(setting[n] == target.hypers[n].default for n in switches):
            default = program
    if default is not None and not any(d.severity == "error" for d in found):
        if prove_laws:
            pinned = base.hyper_defaults if base is not None else None
            found += laws.check_laws(default, pinned)
        if dtype is not None:
            found += domains.underflow(default, dtype)
    return _unique(found)


@deep  # hashing a deep spec's statements recurses too
@functools.lru_cache(maxsize=256)
def safety_checked(spec: Spec) -> None:
    """The checks an optimizer runs once per spec, at construction: everything but the laws
    (proving them is `gradspec check`'s job); raises SpecError."""
    errors = [d for d in diagnose(spec, prove_laws=False) if d.severity == "error"]
    if errors:
        raise SpecError(errors)


def _other_branches(spec, setting, program, limit: int = 6, probing=frozenset()) -> list[Diagnostic]:
    """Build and check the branches of numeric ``if`` conditions (``if momentum > 0``) that
    these values do not take, each with its condition assumed (momentum > 0 inside)."""
    indices = [index for index, _, _ in program.assumed][:limit]
    found = []
    for pattern in itertools.product((False, True), repeat=len(indices)):
        forced = dict(zip(indices, pattern))
        if all(program.switches[i] == taken for i, taken in forced.items()):
            continue
        try:
            other = build(spec, setting, forced, probing)
        except SpecError as error:
            found += [d for d in error.diagnostics if d.code != "GS043"]
            continue
        found += safety.diagnostics(other)
    return found


def _unique(diagnostics):
    seen, out = set(), []
    for d in diagnostics:
        key = (d.code, d.message, d.line, d.column, d.source.filename if d.source else None)
        if key not in seen:
            seen.add(key)
            out.append(d)
    return sorted(out, key=lambda d: (d.source.filename if d.source else "", d.line or 0, d.column or 0))
