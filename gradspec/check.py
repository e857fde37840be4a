"""``gradspec.check``: everything that can be known about a spec before its first step.

Resolution and the IR builder find syntax, name, type and scope errors; the symbolic checker
adds the hyperparameters' domains, numerical safety under every setting of the switches, and
the spec's laws. Errors raise :class:`SpecError`; warnings (a constant that underflows in a
half-precision dtype) are returned by :func:`diagnose` and printed by ``gradspec check``.
:func:`examine` also says what became of each law, so that ``gradspec check`` can say what
it proved rather than only that nothing failed.

Only the switches the spec reads are enumerated: a boolean hyperparameter that no statement
names cannot change the program, so twenty unused ones cost nothing. A problem found under
several settings is reported once, saying under which settings it occurs when not under all.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import pathlib
from dataclasses import dataclass

from .cache import trusted_file, write_private
from .compiler.ir import build
from .dsl import ast, printer
from .dsl.errors import Diagnostic, SpecError
from .dsl.resolve import Spec, apply_adaptor, as_spec, load
from .symbolic import domains, laws, safety
from .recursion import deep


@deep
def check(spec: Spec | str, dtype=None) -> Spec:
    """Every check; raises SpecError with all errors, returns the resolved spec when sound."""
    spec = as_spec(spec)
    errors = [d for d in diagnose(spec, dtype) if d.severity == "error"]
    if errors:
        raise SpecError(errors)
    return spec


@dataclass
class _Run:
    """One setting of the switches the spec reads, and what checking it found."""

    values: tuple  # one bool per read switch, in the order of ``read_switches``
    setting: dict  # every hyperparameter's value
    found: list
    program: object = None  # the Program at this setting, if it built
    allowed: bool = True  # False where a ``require`` rules the setting out


@dataclass(frozen=True)
class LawOutcome:
    """What checking one law found, under every setting of the switches it leaves free:
    ``proved``; ``refuted`` (a counterexample, GS081); ``unproven`` (no counterexample at the
    random points, but no proof either: GS082); or ``invalid`` (the law names what the spec
    does not have)."""

    claim: str  # the law as written, without its message: "equals adam at weight_decay = 0"
    message: str | None  # the law's own words: "without decay, AdamW is Adam"
    status: str


@dataclass(frozen=True)
class Examined:
    """Everything checking found: the diagnostics, and each law's outcome in source order
    (empty when an error stopped the checker before the laws)."""

    diagnostics: list
    laws: list


@deep
def diagnose(spec: Spec | str, dtype=None, prove_laws: bool = True) -> list[Diagnostic]:
    """All diagnostics of ``spec``, errors and warnings, in source order (see :func:`examine`)."""
    return examine(spec, dtype, prove_laws).diagnostics


@deep
def examine(spec: Spec | str, dtype=None, prove_laws: bool = True) -> Examined:
    """All diagnostics of ``spec``, errors and warnings, in source order. Adaptors are checked
    applied to ``sgd``, the simplest base; a spec is built under every setting of the switches
    it reads, so that an error in a branch not taken by default is found too; a spec with
    probes is also built as at a step where every probe runs. Laws are proven under every
    setting of the switches they do not fix with ``at``."""
    try:
        spec = as_spec(spec)
        base = load("sgd") if spec.kind == "adaptor" else None
        target = apply_adaptor(spec, base) if base is not None else spec
    except SpecError as error:
        return Examined(error.diagnostics, [])
    switches = read_switches(target)
    runs = [_check_setting(target, switches, values) for values in _settings(target, switches)]
    found = [(d, None) for d in domains.diagnostics(target)]  # None: the same under every setting
    found += [(d, run.values) for run in runs for d in run.found]
    outcomes = []
    if not any(d.severity == "error" for d, _ in found):
        if prove_laws:
            pinned = base.hyper_defaults if base is not None else None
            law_found, outcomes = _laws(runs, switches, pinned)
            found += law_found
        default = runs[0].program
        if dtype is not None and default is not None:
            found += [(d, runs[0].values) for d in domains.underflow(default, dtype)]
    return Examined(_merged(found, switches, [run.values for run in runs if run.allowed]), outcomes)


@deep  # hashing a deep spec's statements recurses too
@functools.lru_cache(maxsize=256)
def safety_checked(spec: Spec) -> None:
    """The checks an optimizer runs once per spec, at construction: everything but the laws
    (proving them is `gradspec check`'s job); raises SpecError.

    A pass is remembered on disk (gradspec/cache.py), keyed by the spec's content and by the
    checker's own code, so that another process building the same spec (every rank of a
    distributed job, the next run of a script) pays nothing: the check is SymPy over every
    setting of the switches, most of an optimizer's first construction. Only the file's
    existence is read; a failure is not remembered, and raises again where it is built."""
    passed = f"checked-{_content_key(spec)}"
    if trusted_file(passed) is not None:
        return
    errors = [d for d in diagnose(spec, prove_laws=False) if d.severity == "error"]
    if errors:
        raise SpecError(errors)
    write_private(passed, "")


def _content_key(spec: Spec) -> str:
    """A hash of what the check reads: the spec (its statements with their sources, its
    hyperparameters) and the code of the packages that check it, with SymPy's version."""
    text = repr((spec.name, spec.kind, sorted(spec.hypers.items()), spec.items))
    return hashlib.sha256(f"{code_fingerprint()}\n{sympy_version()}\n{text}".encode()).hexdigest()[:32]


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A hash of the source of the front end and the checker (dsl/, compiler/, symbolic/ and
    this module), read once per process: a changed checker must not trust an old verdict."""
    root = pathlib.Path(__file__).parent
    digest = hashlib.sha256()
    files = [pathlib.Path(__file__), *sorted(p for d in ("dsl", "compiler", "symbolic") for p in (root / d).glob("*.py"))]
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def sympy_version() -> str:
    import sympy
    return sympy.__version__


def read_switches(spec: Spec) -> list[str]:
    """The boolean hyperparameters some statement of ``spec`` names, in declaration order:
    the only ones whose value can change the program (a law's ``at`` sets its own)."""
    named = set()
    for _, item in laws.walk(spec.items):
        for expr in _expressions(item):
            named.update(n.name for n in ast.names_in(expr) if n.qualifier is None)
    return [n for n, h in spec.hypers.items() if h.kind == "bool" and n in named]


def _expressions(item) -> list:
    if isinstance(item, ast.State):
        return [item.init]
    if isinstance(item, (ast.Define, ast.Override)):
        return [item.expr]
    if isinstance(item, (ast.Require, ast.If)):
        return [item.cond]
    return []


def _settings(spec: Spec, switches: list[str]):
    """Every setting of ``switches``, the defaults first."""
    defaults = [spec.hypers[n].default for n in switches]
    for flips in itertools.product((False, True), repeat=len(switches)):
        yield tuple(d != flip for d, flip in zip(defaults, flips))


def _check_setting(spec: Spec, switches: list[str], values: tuple) -> _Run:
    """Build and check ``spec`` at one setting: the plain step, the other branches of its
    numeric ``if`` conditions and, for a spec with probes, a step where every probe runs."""
    run = _Run(values, {**spec.hyper_defaults, **dict(zip(switches, values))}, [])
    try:
        run.program = build(spec, run.setting)
    except SpecError as error:  # a require failing is a setting, not a bug
        run.allowed = not any(d.code == "GS043" for d in error.diagnostics)
        run.found = [d for d in error.diagnostics if d.code != "GS043"]
        return run
    run.found += safety.diagnostics(run.program)
    run.found += _other_branches(spec, run.setting, run.program)
    if run.program.probe_periods:  # the steps where every probe runs, too
        probing = frozenset(range(len(run.program.probe_periods)))
        try:
            probed = build(spec, run.setting, probing=probing)
        except SpecError as error:
            run.found += [d for d in error.diagnostics if d.code != "GS043"]
        else:
            run.found += safety.diagnostics(probed)
            run.found += _other_branches(spec, run.setting, probed, probing=probing)
    return run


def _laws(runs: list[_Run], switches: list[str], pinned) -> tuple[list, list[LawOutcome]]:
    """Each law proven once per setting of the read switches its ``at`` leaves free; the
    diagnostics, and each law's outcome (its worst under any setting)."""
    found, done, worst = [], set(), {}
    for run in runs:
        if run.program is None:
            continue
        for index, (_, law) in enumerate(run.program.laws):
            bound = {name for name, value, _ in law.bindings if isinstance(value, bool)}
            key = (index, tuple(v for n, v in zip(switches, run.values) if n not in bound))
            if key in done:
                continue
            done.add(key)
            diagnostics = laws.check_law(run.program, index, pinned)
            found += [(d, run.values) for d in diagnostics]
            previous = worst.setdefault(id(law), (law, "proved"))[1]
            worst[id(law)] = (law, max(previous, _status(diagnostics), key=_STATUSES.index))
    return found, [LawOutcome(law_claim(law), law.message, status) for law, status in worst.values()]


_STATUSES = ("proved", "unproven", "invalid", "refuted")  # worse to the right


def _status(diagnostics: list[Diagnostic]) -> str:
    errors = {d.code for d in diagnostics if d.severity == "error"}
    if not errors:
        return "proved"
    return "refuted" if "GS081" in errors else "unproven" if errors == {"GS082"} else "invalid"


def law_claim(law: ast.Law) -> str:
    """The law as written, without ``law`` and its message."""
    text = printer.law(dataclasses.replace(law, message=None))
    return text.removeprefix("law ")


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


def _merged(found: list, switches: list[str], allowed: list[tuple]) -> list[Diagnostic]:
    """One diagnostic per problem: the same code, place and headline (a message's text before
    its first ': ', the reason after it may name what a setting knows) found under several
    settings is reported once, with the settings named when it does not occur under all."""
    groups: dict = {}
    for d, values in found:
        key = (d.code, d.source.filename if d.source else None, d.span, d.message.split(": ", 1)[0])
        first, settings = groups.setdefault(key, (d, set()))
        settings.add(values)
    out = []
    for d, settings in groups.values():
        note = None if None in settings else _settings_note(switches, settings, allowed)
        out.append(dataclasses.replace(d, message=f"{d.message} ({note})") if note else d)
    return sorted(out, key=lambda d: (d.source.filename if d.source else "", d.line or 0, d.column or 0))


def _settings_note(switches: list[str], settings: set, allowed: list[tuple]) -> str | None:
    """``"only with amsgrad = true"``, or None when ``settings`` holds every allowed one. The
    switches every setting agrees on, if they describe exactly these settings; else a list."""
    if not switches or set(allowed) <= settings:
        return None
    common = {i: values[i] for values in settings for i in range(len(switches))
              if all(other[i] == values[i] for other in settings)}
    matching = {values for values in allowed if all(values[i] == v for i, v in common.items())}
    if common and matching == settings:
        return "only with " + ", ".join(f"{switches[i]} = {_word(v)}" for i, v in sorted(common.items()))
    listed = sorted(settings, key=lambda values: [v != first for v, first in zip(values, allowed[0])])
    shown = [", ".join(f"{n} = {_word(v)}" for n, v in zip(switches, values)) for values in listed[:3]]
    more = f" and {len(listed) - 3} more settings" if len(listed) > 3 else ""
    return "only with " + "; or ".join(shown) + more


def _word(value: bool) -> str:
    return "true" if value else "false"
