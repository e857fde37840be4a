"""From spec text or a spec expression to one flat :class:`Spec`.

Resolution looks names up (stdlib, imports), applies variants (``adam(beta2 = 0.95)``) and
expands adaptors (``lookahead(adam)``) into a single body of definitions. An adaptor's own
locals and states are namespaced with its name (``lookahead.slow``) so they never clash with
the base's; ``base.X = expr`` replaces what the base sees as ``X`` (its gradient input, a
local such as its direction) and the base's ``param'`` becomes ``<adaptor>.base_update``
when the adaptor defines its own ``param'``. An adaptor that replaces both ``grad`` and
``param`` runs its base in a space of its own (GaLore's projection): the base's per-element
states are marked with the definition that replaces ``grad`` (``State.space``), and take its
shape where it is not the parameter's.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass, field

from .. import stdlib
from . import ast
from .errors import Collector, Diagnostic, Source, SpecError, closest, did_you_mean
from .files import SUFFIX, Unreadable, read_spec_file, real_path
from .parser import RESERVED, parse
from ..recursion import deep

INPUTS = ("grad", "param", "step", "loss")
BUILTIN_NAMES = ("inf", "matrix", "vector", "rows", "cols")
"""Names the language gives a meaning where a spec has not: the number inf, the shape classes
read by ``if matrix { }``, and the sizes of ``eye(rows)`` and state shapes."""
"""What the runtime feeds every spec: the gradient, the parameter, the step t (from 1) and the
closure's loss. The learning rate is the hyperparameter ``lr``, which schedulers change."""


@dataclass(frozen=True)
class Spec:
    """A resolved spec: hyperparameters and a flat body, ready to be compiled.

    ``items`` pairs each statement with the source it came from, so that errors found later
    (unknown names, scopes, cycles) still point into the right file.
    """

    name: str
    kind: str  # "optimizer" or "adaptor"
    hypers: dict = field(hash=False)
    items: tuple = ()
    doc: str | None = None
    source: Source | None = None
    adaptor_ast: ast.SpecAST | None = field(default=None, compare=False, repr=False)

    def with_hyper(self, **values) -> "Spec":
        """A variant with other defaults; raises SpecError for unknown names or bad values."""
        return _override(self, [(k, v, None) for k, v in values.items()], None)

    @property
    def hyper_defaults(self) -> dict:
        return {name: h.default for name, h in self.hypers.items()}

    def __repr__(self) -> str:
        return f"<gradspec.Spec {self.name}>"


class SpecRef:
    """The other side of a ``law equals``: its text, and the spec, resolved on first use."""

    def __init__(self, text: str, resolve_spec):
        self.text = text
        self._resolve = resolve_spec
        self._spec = None

    def get(self) -> Spec:
        if self._spec is None:
            self._spec = self._resolve()
        return self._spec

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:  # by text, as it compares: the same in every process
        return f"SpecRef({self.text!r})"

    # Equal by text, so two loads of one spec are equal and hash alike: the safety check is
    # cached per Spec, and an identity-equal reference made every load of a spec with a
    # ``law equals`` miss that cache. The text is enough, since a Spec also compares its source.
    def __eq__(self, other) -> bool:
        return isinstance(other, SpecRef) and self.text == other.text

    def __hash__(self) -> int:
        return hash(("SpecRef", self.text))


def as_spec(spec) -> Spec:
    """``spec`` itself if it is a resolved Spec, else what :func:`load` makes of it."""
    return spec if isinstance(spec, Spec) else load(spec)


@deep
def load(name_or_path: str) -> Spec:
    """A stdlib name (``adam``), a spec expression (``lookahead(adam, sync_period = 5)``), a
    path to a ``.opt`` file (anything else that ends in ``.opt``, holds a path separator or
    names an existing file; only regular .opt files are read, see gradspec.dsl.files), or a
    spec's source text: a string with a line break, which no name, path or expression has,
    read as ``gradspec.parse`` reads it. Every problem, a missing file included, is a
    SpecError. A path may be given as a pathlib.Path."""
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    if not isinstance(name_or_path, str):
        raise TypeError(f"a spec is given by a name, a spec expression, a path or its source text (a str), "
                        f"not {type(name_or_path).__name__}")
    if "\n" in name_or_path:  # Optimizer(params, text) and check(text) as users try them
        return parse_spec(name_or_path)
    text = stdlib.source(name_or_path) if name_or_path.isidentifier() else None
    if text is None and (name_or_path.endswith(SUFFIX) or os.path.sep in name_or_path
                         or os.path.lexists(name_or_path)):
        try:
            source = read_spec_file(name_or_path)
        except Unreadable as problem:
            raise SpecError(Diagnostic("GS005", f"cannot load '{name_or_path}': {problem.reason}",
                                       Source("", name_or_path), None,
                                       problem.hint or _load_hint(name_or_path, problem))) from None
        return resolve(parse(source.text, name_or_path), os.path.dirname(name_or_path))
    if text is not None:
        return resolve(parse(text, f"<stdlib>/{name_or_path}.opt"))
    prefix = "optimizer _ = "
    try:
        expr = parse(prefix + name_or_path, "<expression>")
    except SpecError as error:  # point into the expression the user typed, not our wrapper
        raise SpecError([_shift(d, Source(name_or_path, "<expression>"), -len(prefix))
                         for d in error.diagnostics]) from None
    return _Resolver(Source(name_or_path, "<expression>"), ".").call(_shift_call(expr.variant, -len(prefix)))


def _load_hint(path: str, problem: Unreadable) -> str:
    """For a missing file: the stdlib spec of that name, or a spec file of a similar name in
    the same folder, or where the path was looked for."""
    if not problem.missing:
        return "name a .opt file, a stdlib spec or a spec expression"
    folder, name = os.path.split(path)
    stem = name[:-len(SUFFIX)] if name.endswith(SUFFIX) else name
    if stdlib.source(stem) is not None:
        return f"the stdlib's '{stem}' is loaded by its name, without .opt"
    where = ("check the path" if os.path.isabs(path)
             else f"a relative path is looked for from the current folder, {os.getcwd()}")
    return _nearby_spec(folder, name) or where


def _nearby_spec(folder: str, name: str) -> str | None:
    """``did you mean 'x.opt'?`` for a spec file in ``folder`` named like ``name``."""
    try:
        nearby = {f[:-len(SUFFIX)]: f for f in os.listdir(folder or ".") if f.endswith(SUFFIX)}
    except OSError:
        return None
    close = closest(name[:-len(SUFFIX)] if name.endswith(SUFFIX) else name, nearby)
    return f"did you mean '{os.path.join(folder, nearby[close])}'?" if close else None


def _shift(d: Diagnostic, source: Source, columns: int) -> Diagnostic:
    span = d.span and dataclasses.replace(d.span, column=max(1, d.span.column + columns),
                                          end_column=max(2, d.span.end_column + columns))
    return dataclasses.replace(d, source=source, span=span)


def _shift_call(call: ast.SpecCall, columns: int) -> ast.SpecCall:
    def moved(span):
        return span and dataclasses.replace(span, column=span.column + columns, end_column=span.end_column + columns)
    return ast.SpecCall(call.name, tuple(_shift_call(a, columns) for a in call.args),
                        tuple((k, v, moved(sp)) for k, v, sp in call.overrides), moved(call.span))


@deep
def parse_spec(text: str, filename: str = "<string>") -> Spec:
    """Parse and resolve spec text (the public ``gradspec.parse``)."""
    if not isinstance(text, str):
        raise TypeError(f"gradspec.parse reads a spec's source text (a str), not {type(text).__name__}; "
                        "gradspec.load takes a name, an expression or a path")
    return resolve(parse(text, filename), os.path.dirname(filename) if os.path.sep in filename else ".")


@deep
def resolve(tree: ast.SpecAST, directory: str = ".") -> Spec:
    return _Resolver(tree.source, directory, tree).spec_of(tree)


@dataclass(frozen=True)
class _Importer:
    """A file on the way to the one being read: its real path (to find cycles) and the name
    it was given (to show them)."""

    real_path: str
    shown: str


class _Resolver:
    """Resolves one file: its imports are visible to its spec expressions.

    Imports are read when the file is, and their imports in turn, so a cycle is found
    however the specs are used; ``importers`` are the files whose imports led here, and
    ``loaded`` the files already read (with their own imports) during this resolution,
    so a file imported along many paths is read once.
    """

    def __init__(self, source: Source, directory: str, tree: ast.SpecAST | None = None,
                 importers: tuple[_Importer, ...] = (), loaded: dict | None = None):
        self.source = source
        self.directory = directory
        self.tree = tree
        self.loaded = {} if loaded is None else loaded
        here = _importer(source.filename)
        self.importers = importers + ((here,) if here else ())
        self.imports: dict[str, _Resolver] = {}
        errors = Collector(source)
        for item in (tree.items if tree else ()):
            if isinstance(item, ast.Import):
                if item.alias in self.imports:
                    errors.error("GS010", f"'{item.alias}' is imported twice", item.span,
                                 "give the second import another name")
                    continue
                imported = self._read_import(item, errors)
                if imported is not None:
                    self.imports[item.alias] = imported
        errors.raise_if_any()

    def _read_import(self, item: ast.Import, errors: Collector) -> "_Resolver | None":
        """The resolver of an imported file. Import paths are relative to the importing
        file's folder and name .opt files; absolute paths are refused, so that a spec means
        the same on every machine and never reads a system file."""
        if os.path.isabs(item.path):
            errors.error("GS020", f"cannot import '{item.path}': import paths are relative, not absolute", item.span,
                         "give the path from this file's folder, or copy the spec next to it")
            return None
        path = os.path.normpath(os.path.join(self.directory, item.path))
        try:
            key = real_path(path)
            cycle_start = next((n for n, i in enumerate(self.importers) if i.real_path == key), None)
            if cycle_start is not None:
                shown = [i.shown for i in self.importers[cycle_start:]] + [path]
                errors.error("GS032", "import cycle: " + " -> ".join(shown), item.span,
                             "a spec cannot import itself or a spec that imports it; move the shared part "
                             "into a third file")
                return None
            if key in self.loaded:
                return self.loaded[key]
            source = read_spec_file(path)
        except Unreadable as problem:
            hint = problem.hint or (problem.missing and _nearby_spec(*os.path.split(path))) or (
                "paths are relative to the importing file's folder" if problem.missing
                else "an import names a .opt spec file; stdlib specs need no import")
            errors.error("GS020", f"cannot import '{item.path}': {problem.reason}", item.span, hint)
            return None
        tree = parse(source.text, path)
        resolver = _Resolver(tree.source, os.path.dirname(path), tree, self.importers, self.loaded)
        self.loaded[key] = resolver
        return resolver

    def lookup(self, name: str, span) -> "tuple[_Resolver, ast.SpecAST]":
        """The spec ``name`` (an import, else a stdlib spec) and the resolver of its file."""
        if name in self.imports:
            imported = self.imports[name]
            return imported, imported.tree
        text = stdlib.source(name)
        if text is None:
            hint = did_you_mean(name, list(self.imports) + stdlib.names())
            raise SpecError(Diagnostic("GS021", f"unknown spec '{name}'", self.source, span,
                                       hint or "see `gradspec list` for the stdlib"))
        return self, parse(text, f"<stdlib>/{name}.opt")

    def spec_of(self, tree: ast.SpecAST) -> Spec:
        if tree.kind == "variant":
            resolver = self if tree is self.tree else _Resolver(tree.source, self.directory, tree,
                                                               self.importers, self.loaded)
            spec = resolver.call(tree.variant)
            errors = Collector(tree.source)
            laws = []
            for item in tree.items:
                if isinstance(item, ast.Law):
                    laws.append((tree.source, resolver.law(item)))
                elif not isinstance(item, ast.Import):
                    errors.error("GS017", f"'{tree.name}' is a variant: it holds only laws", item.span,
                                 "write a full spec with 'optimizer NAME' to add statements")
            errors.raise_if_any()
            return dataclasses.replace(spec, name=tree.name, doc=tree.doc or spec.doc,
                                       items=spec.items + tuple(laws))
        spec = _body_spec(tree)
        items = tuple((src, self.law(i, tree.base_param) if isinstance(i, ast.Law) else i) for src, i in spec.items)
        return dataclasses.replace(spec, items=items)

    def law(self, law: ast.Law, base_param: str | None = None) -> ast.Law:
        """``law equals NAME(...)``: the other spec is resolved when the law is checked (two
        specs may name each other in their laws), with this file's imports. An adaptor's
        ``law equals base`` is bound when the adaptor is applied."""
        if law.kind != "equals" or not isinstance(law.target, ast.SpecCall) or law.target.name == base_param:
            return law
        return dataclasses.replace(law, target=SpecRef(str(law.target), lambda: self.call(law.target)))

    def call(self, call: ast.SpecCall) -> Spec:
        resolver, tree = self.lookup(call.name, call.span)
        spec = resolver.spec_of(tree)
        if spec.kind == "adaptor":
            if len(call.args) != 1:
                raise SpecError(Diagnostic(
                    "GS022", f"adaptor '{call.name}' takes one base spec, got {len(call.args)}",
                    self.source, call.span, f"write {call.name}(adam) or another base"))
            base = self.call(call.args[0])
            if _applies(base, spec):
                raise SpecError(_applied_twice(spec, base, self.source, call.span))
            spec = apply_adaptor(spec, base)
        elif call.args:
            raise SpecError(Diagnostic(
                "GS023", f"'{call.name}' is an optimizer, not an adaptor: it takes no base spec",
                self.source, call.span, "override hyperparameters with name = value"))
        return _override(spec, list(call.overrides), self.source) if call.overrides else spec


def _importer(filename: str) -> _Importer | None:
    """A file's place in an import chain; None for text that is not a file (``<string>``,
    a stdlib spec, a spec expression)."""
    if filename.startswith("<") or "\0" in filename:
        return None
    return _Importer(os.path.realpath(filename), filename)


def _body_spec(tree: ast.SpecAST) -> Spec:
    """An ``optimizer`` or ``adaptor`` file as a Spec (hyperparameters split from the body)."""
    errors = Collector(tree.source)
    hypers: dict[str, ast.Hyper] = {}
    items = []
    for item in tree.items:
        if isinstance(item, ast.Hyper):
            if item.name in hypers:
                errors.error("GS010", f"hyperparameter '{item.name}' is declared twice", item.span)
            elif item.name in INPUTS:
                errors.error("GS011", f"'{item.name}' is an input and cannot be a hyperparameter", item.span)
            hypers[item.name] = item
            _check_default(item, errors)
        elif not isinstance(item, ast.Import):
            items.append((tree.source, item))
    _check_blocks(tree.items, hypers, errors)
    for item in tree.walk():
        if isinstance(item, ast.Override) and tree.kind != "adaptor":
            errors.error("GS057", f"'{item.qualifier}.{item.name} = ...' sets a value of a base optimizer, and "
                                  f"only an adaptor has one", item.span,
                         f"drop '{item.qualifier}.' for a definition of this optimizer, or write an adaptor: "
                         f"adaptor {tree.name}(base)")
        if isinstance(item, ast.Blocks):
            pass  # checked above: a blocks body may declare states, unlike a probe's or a loop's
        elif isinstance(item, ast.If):
            for inner in item.then + item.otherwise:
                if isinstance(inner, (ast.Hyper, ast.Law, ast.Probe)):
                    what = {ast.Hyper: "hyperparameters are", ast.Law: "laws are"}.get(type(inner), "probes are")
                    errors.error("GS012", f"{what} declared at the top level, not inside 'if'",
                                 inner.span, "move the declaration above the 'if'")
        elif isinstance(item, (ast.Probe, ast.Repeat)):
            block = _block_word(item)
            for inner in tree_items(item.items):
                if isinstance(inner, (ast.Hyper, ast.Law, ast.State, ast.Probe)):
                    what = type(inner).__name__.lower()
                    errors.error("GS018", f"a {what} cannot be declared inside {block}", inner.span,
                                 f"declare it at the top level; {block} sets next values (h' = ...)")
                elif isinstance(inner, ast.Define) and inner.primed and inner.name == "param":
                    errors.error("GS018", f"the update param' cannot be inside {block}: every step updates once",
                                 inner.span, f"compute what {block} finds into a state or definition, and use it "
                                             f"in param'")
            _check_every(item, hypers, errors)
        name = getattr(item, "name", None)
        if name in RESERVED and not isinstance(item, ast.Override):
            errors.error("GS013", f"'{name}' is a reserved word", item.span, "choose another name")
    errors.raise_if_any()
    return Spec(tree.name, tree.kind, hypers, tuple(items), tree.doc, tree.source,
                tree if tree.kind == "adaptor" else None)


def tree_items(items):
    """``items`` and the items nested in their ``if`` blocks."""
    for item in items:
        yield item
        if isinstance(item, ast.If):
            yield from tree_items(item.then + item.otherwise)


def _check_blocks(items, hypers: dict, errors: Collector, around: str | None = None) -> None:
    """``blocks B { ... }`` (see ast.Blocks): B an int hyperparameter >= 1 or a whole number, the
    block at the top level or in an ``if`` (not inside another block, a probe or a loop), and
    its body made of what exists per block: definitions, next values, states with a shape of
    their own (``: (rows, rows)``, ``: rows``, ``: tensor``), ``if`` and ``every``. GS074."""
    for item in items:
        if isinstance(item, ast.Blocks):
            if around is not None:
                errors.error("GS074", f"a blocks block cannot be inside {around}", item.span,
                             "put 'blocks B { }' at the top level (or in an 'if'); an 'every' or 'repeat' "
                             "may be inside it")
            _check_every(item, hypers, errors)
            for inner in tree_items(item.items):
                _check_block_item(inner, errors)
            _check_blocks(item.items, hypers, errors, "another blocks block")
        elif isinstance(item, ast.If):
            _check_blocks(item.then + item.otherwise, hypers, errors, around)
        elif isinstance(item, (ast.Probe, ast.Repeat)):
            _check_blocks(item.items, hypers, errors, _block_word(item))


def _check_block_item(inner, errors: Collector) -> None:
    if isinstance(inner, (ast.Hyper, ast.Law)):
        what = "hyperparameter" if isinstance(inner, ast.Hyper) else "law"
        errors.error("GS074", f"a {what} is declared at the top level, not inside a blocks block", inner.span,
                     "move the declaration above 'blocks'")
    elif isinstance(inner, ast.Probe) and inner.model:
        errors.error("GS074", "a model probe cannot be inside a blocks block", inner.span,
                     "evaluate the model outside 'blocks' and read the result inside; 'every k { }' may be inside")
    elif isinstance(inner, ast.State) and inner.scope not in ("tensor", "shaped"):
        kind = {"element": "a per-element", "global": "a per-group", "subspace": "a subspace"}[inner.scope]
        errors.error("GS074", f"{kind} state cannot be declared inside a blocks block: a block keeps states "
                              f"shaped per block", inner.span,
                     f"declare {inner.name} outside 'blocks' (inside, it is read block by block), or give it a "
                     f"block's shape: ': (rows, rows)', ': rows', ': tensor'")
    elif isinstance(inner, ast.State) and inner.scope == "shaped" and tuple(inner.dims) == ("rows", "cols"):
        errors.error("GS074", f"state '{inner.name}: (rows, cols)' inside a blocks block is a per-element state: "
                              f"a block keeps states of shapes of their own", inner.span,
                     f"declare {inner.name} outside 'blocks' without a shape (inside, it is read block by block)")
    elif isinstance(inner, ast.Define) and inner.primed and inner.name == "param":
        errors.error("GS074", "the update param' cannot be inside a blocks block", inner.span,
                     "compute the direction inside, and write param' = ... outside: a block's elementwise "
                     "value is read outside reassembled")


def _block_word(item) -> str:
    """How an error names a block: "a probe", "an every block", "a repeat block"."""
    if isinstance(item, ast.Blocks):
        return "a blocks block"
    if isinstance(item, ast.Repeat):
        return "a repeat block"
    return "a probe" if item.model else "an every block"


def _check_every(probe: ast.Probe | ast.Repeat, hypers: dict, errors: Collector) -> None:
    """A block's period (probe, every), count (repeat) or size (blocks) is a positive int: a
    literal, or an int hyperparameter that is >= 1. GS019, or GS074 for a block size."""
    every = probe.count if isinstance(probe, ast.Repeat) else probe.every
    if isinstance(probe, ast.Blocks):
        code, what, count, example = "GS074", "a blocks block cuts blocks of at most k rows and columns", \
            "block size", 1024
    elif isinstance(probe, ast.Repeat):
        code, what, count, example = "GS019", "a repeat block runs k times", "repeat count", 10
    else:
        code, what, count, example = "GS019", f"{_block_word(probe)} runs every k steps", "probe period", 10
    if isinstance(every, str):
        hyper = hypers.get(every)
        if hyper is None:
            errors.error(code, f"{what}, k an int hyperparameter; '{every}' is not one",
                         probe.span, did_you_mean(every, hypers) or f"declare hyper {every}: int = {example} >= 1")
        elif hyper.kind != "int" or hyper.check(1) or not _at_least_one(hyper):
            errors.error(code, f"the {count} '{every}' must be an int hyperparameter constrained >= 1",
                         hyper.span, f"hyper {every}: int = {max(1, round(float(hyper.default)))} >= 1")
    elif not isinstance(every, int) or every < 1:
        errors.error(code, f"a {count} must be a whole number >= 1, not {every}", probe.span,
                     f"write a whole number, or an int hyperparameter: hyper k: int = {example} >= 1")


def _at_least_one(hyper: ast.Hyper) -> bool:
    c = hyper.constraint
    if isinstance(c, ast.Bound):
        return (c.op == ">=" and c.value >= 1) or (c.op == ">" and c.value >= 0)
    return isinstance(c, ast.Interval) and (c.low > 0 or (c.low == 0 and not c.low_closed))


def _check_default(hyper: ast.Hyper, errors: Collector) -> None:
    if getattr(hyper.constraint, "is_empty", False):
        errors.error("GS070", f"the constraint {hyper.constraint.describe(hyper.name)} allows no value",
                     hyper.span, "write the lower end first; an interval with equal ends must be closed")
        return
    problem = hyper.check(hyper.default)
    if problem:
        errors.error("GS014", f"the default {problem}", hyper.span, "change the default or the constraint")


def _override(spec: Spec, overrides, source: Source | None) -> Spec:
    errors = Collector(source or spec.source)
    hypers = dict(spec.hypers)
    seen = set()
    for name, value, span in overrides:
        if name in seen:
            errors.error("GS016", f"{name} is set twice", span, "keep one of the two values")
            continue
        seen.add(name)
        if name not in hypers:
            errors.error("GS015", f"'{spec.name}' has no hyperparameter '{name}'", span,
                         did_you_mean(name, hypers) or f"its hyperparameters: {', '.join(hypers)}")
            continue
        old = hypers[name]
        if old.kind == "real" and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if old.kind == "int" and isinstance(value, float) and value.is_integer():
            value = int(value)
        problem = old.check(value)
        if problem is None and isinstance(value, float) and not math.isfinite(value) and value != old.default:
            # as the optimizer refuses such a value: an infinity only where the default is one
            problem = f"{name} must be a finite number, got {value}"
        if problem is None and (old.kind == "bool") != isinstance(value, bool):
            problem = f"{name} must be {'true or false' if old.kind == 'bool' else 'a number'}"
        if problem:
            errors.error("GS016", problem, span)
            continue
        hypers[name] = dataclasses.replace(old, default=value)
    errors.raise_if_any()
    return dataclasses.replace(spec, hypers=hypers)


# ---- adaptors ------------------------------------------------------------------------------


@deep
def apply_adaptor(adaptor: Spec, base: Spec) -> Spec:
    """Expand ``adaptor(base)`` into one flat spec (see the module docstring for the rules)."""
    if base.kind == "adaptor":
        raise SpecError(Diagnostic("GS024", f"'{base.name}' is an adaptor and needs a base itself",
                                   adaptor.source, None, f"write {adaptor.name}({base.name}(adam))"))
    if _applies(base, adaptor):
        raise SpecError(_applied_twice(adaptor, base, adaptor.source, None))
    tree = adaptor.adaptor_ast
    prefix = adaptor.name + "."
    errors = Collector(adaptor.source)
    own = _defined_names(adaptor.items)
    base_names = _defined_names(base.items) | set(INPUTS)
    overrides = {i.name for _, i in _walk(adaptor.items) if isinstance(i, ast.Override)}
    replaces_update = "param'" in own
    update_name = prefix + "base_update"

    for name, hyper in adaptor.hypers.items():
        if name in base.hypers:
            errors.error("GS025", f"adaptor '{adaptor.name}' and '{base.name}' both declare '{name}'",
                         hyper.span, "rename the adaptor's hyperparameter")
    for _, item in _walk(adaptor.items):
        if isinstance(item, ast.Override):
            if item.qualifier != tree.base_param:
                errors.error("GS026", f"'{item.qualifier}' is not this adaptor's base", item.span,
                             f"the base is called '{tree.base_param}'")
            elif item.name not in base_names or item.name in _state_names(base.items):
                errors.error("GS027", f"'{base.name}' has no input or definition '{item.name}' to replace",
                             item.span, did_you_mean(item.name, base_names - _state_names(base.items)))

    visible = own | set(INPUTS) | set(adaptor.hypers) | set(base.hypers) | set(BUILTIN_NAMES)

    def rename_adaptor(node: ast.Name) -> ast.Name:
        if node.qualifier == "groups" and tree.base_param != "groups" and not node.primed:
            return node  # groups.numel, a size over every parameter group
        if node.qualifier is not None:
            if node.qualifier != tree.base_param:
                errors.error("GS026", f"'{node.qualifier}' is not this adaptor's base", node.span,
                             f"the base is called '{tree.base_param}'")
                return node
            if node.name == "param" and node.primed:
                return ast.Name(update_name if replaces_update else "param", not replaces_update, span=node.span)
            if node.name not in base_names:
                errors.error("GS028", f"'{base.name}' defines no '{node.name}'", node.span,
                             did_you_mean(node.name, base_names))
            return ast.Name(node.name, node.primed, span=node.span)
        if node.name in own and node.name not in INPUTS:
            return ast.Name(prefix + node.name, node.primed, span=node.span)
        if node.name not in visible:
            hint = (f"the base's definitions are read as {tree.base_param}.{node.name}"
                    if node.name in base_names else did_you_mean(node.name, visible))
            errors.error("GS030", f"unknown name '{node.name}'", node.span, hint)
        return node

    def rename_base(node: ast.Name) -> ast.Name:
        if node.qualifier is None and node.name in overrides and not node.primed:
            return ast.Name(prefix + node.name, span=node.span)
        if replaces_update and node.name == "param" and node.primed:
            return ast.Name(update_name, span=node.span)
        return node

    def adaptor_item(item):
        if isinstance(item, ast.Override):
            return ast.Define(prefix + item.name, _map_names(item.expr, rename_adaptor), False, item.span)
        if isinstance(item, (ast.Define, ast.State)) and not (item.name == "param" and getattr(item, "primed", False)):
            item = dataclasses.replace(item, name=prefix + item.name)
        return _map_item(item, rename_adaptor, adaptor_item)

    def adaptor_law(law: ast.Law) -> ast.Law:
        def rename_name(node):  # a law may name fresh symbols, as k in grad -> k * grad
            return node if node.qualifier is None and node.name not in visible else rename_adaptor(node)
        rename = functools.partial(_map_names, fn=rename_name)
        target = law.target
        if law.kind == "equals" and isinstance(target, ast.SpecCall) and target.name == tree.base_param:
            if target.args or target.overrides:
                errors.error("GS029", f"'{tree.base_param}' is the base spec and takes no arguments", target.span)
            target = SpecRef(base.name, lambda: base)
        elif law.kind == "holds":
            target = rename(target)
        return dataclasses.replace(
            law, target=target, given=rename(law.given) if law.given is not None else None,
            mappings=tuple((rename_name(ast.Name(n)).name, rename(e)) for n, e in law.mappings))

    projects = {"grad", "param"} <= overrides  # the base runs on a gradient and parameter of the adaptor's

    def base_item(item):
        if replaces_update and isinstance(item, ast.Define) and item.name == "param" and item.primed:
            item = ast.Define(update_name, item.expr, False, item.span)
        if projects and isinstance(item, ast.State) and item.scope == "element":
            item = dataclasses.replace(item, space=prefix + "grad")
        return _map_item(item, rename_base, base_item)

    # the base's laws are about the base alone; the adaptor's own laws carry over
    items = tuple((src, base_item(i)) for src, i in base.items if not isinstance(i, ast.Law))
    items += tuple((src, adaptor_law(i) if isinstance(i, ast.Law) else adaptor_item(i))
                   for src, i in adaptor.items)
    errors.raise_if_any()
    doc = adaptor.doc
    return Spec(f"{adaptor.name}({base.name})", "optimizer", {**base.hypers, **adaptor.hypers},
                items, doc, adaptor.source)


def _applies(spec: Spec, adaptor: Spec) -> bool:
    """Whether ``spec`` already has ``adaptor`` applied: it holds the adaptor's namespaced
    names (``lookahead.slow``), whatever the variant that wraps it is called."""
    prefix = adaptor.name + "."
    return any(name.startswith(prefix) for name in _defined_names(spec.items))


def _applied_twice(adaptor: Spec, base: Spec, source: Source | None, span) -> Diagnostic:
    return Diagnostic("GS033", f"an adaptor cannot be applied twice: '{base.name}' already applies '{adaptor.name}'",
                      source, span, f"apply '{adaptor.name}' once; its hyperparameters are set as "
                                    f"{adaptor.name}(adam, name = value)")


def _walk(items):
    for src, item in items:
        yield src, item
        if isinstance(item, ast.If):
            yield from _walk([(src, i) for i in item.then + item.otherwise])
        elif isinstance(item, (ast.Probe, ast.Repeat)):
            yield from _walk([(src, i) for i in item.items])


def _defined_names(items) -> set[str]:
    """Locals and states defined anywhere in a body; ``param'`` when the body defines the update."""
    out = set()
    for _, item in _walk(items):
        if isinstance(item, ast.State) or (isinstance(item, ast.Define) and not item.primed):
            out.add(item.name)
        elif isinstance(item, ast.Define) and item.name == "param":
            out.add("param'")
    return out


def _state_names(items) -> set[str]:
    return {i.name for _, i in _walk(items) if isinstance(i, ast.State)}


def _map_names(expr, fn):
    """``expr`` with every Name replaced by ``fn(name)``."""
    if isinstance(expr, ast.Name):
        return fn(expr)
    if isinstance(expr, ast.BinOp):
        return ast.BinOp(expr.op, _map_names(expr.left, fn), _map_names(expr.right, fn), expr.span)
    if isinstance(expr, ast.UnOp):
        return ast.UnOp(expr.op, _map_names(expr.operand, fn), expr.span)
    if isinstance(expr, (ast.Call, ast.Reduce)):
        return dataclasses.replace(expr, args=tuple(_map_names(a, fn) for a in expr.args))
    return expr


def _map_item(item, rename, recurse):
    if isinstance(item, ast.State):
        return dataclasses.replace(item, init=_map_names(item.init, rename))
    if isinstance(item, (ast.Define, ast.Override)):
        return dataclasses.replace(item, expr=_map_names(item.expr, rename))
    if isinstance(item, ast.Require):
        return dataclasses.replace(item, cond=_map_names(item.cond, rename))
    if isinstance(item, ast.If):
        return ast.If(_map_names(item.cond, rename), tuple(recurse(i) for i in item.then),
                      tuple(recurse(i) for i in item.otherwise), item.span)
    if isinstance(item, (ast.Probe, ast.Repeat)):
        return dataclasses.replace(item, items=tuple(recurse(i) for i in item.items))
    return item
