"""Located, human-readable errors for specs.

Every problem found in a spec, from a stray character to a hyperparameter outside its
domain, becomes a :class:`Diagnostic` that knows where it is (file, line, column, span) and
how to fix it (a hint). A pass collects all its diagnostics and raises them together as one
:class:`SpecError`, so a user fixes a whole spec in one round instead of one error per run.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Span:
    """A region of a source text; lines and columns count from 1, ``end_column`` is exclusive."""

    line: int
    column: int
    end_line: int
    end_column: int

    @staticmethod
    def of(meta) -> "Span | None":
        """The span of a Lark tree (``meta``) or token, if Lark recorded one."""
        if meta is None or getattr(meta, "empty", False) or getattr(meta, "line", None) is None:
            return None
        return Span(meta.line, meta.column, meta.end_line, meta.end_column)


@dataclass(frozen=True)
class Source:
    """A spec's text with the name users know it by (a path, a stdlib name or ``<string>``)."""

    text: str
    filename: str = "<string>"

    def line(self, number: int) -> str:
        """Line ``number`` as the parser counts lines: ended by "\n" alone (str.splitlines also
        breaks at U+2028, U+0085 or a form feed inside a comment, which shifted every excerpt
        after one)."""
        lines = self.text.split("\n")
        return lines[number - 1].removesuffix("\r") if 1 <= number <= len(lines) else ""


@dataclass(frozen=True)
class Diagnostic:
    """One problem: a stable code, a message, where it is, and what to do about it."""

    code: str
    message: str
    source: Source | None = None
    span: Span | None = None
    hint: str | None = None
    severity: str = "error"

    @property
    def line(self) -> int | None:
        return self.span.line if self.span else None

    @property
    def column(self) -> int | None:
        return self.span.column if self.span else None

    def render(self) -> str:
        """``file:line:col: error[code]: message``, the source line, a caret line and the hint."""
        where = self.source.filename if self.source else "<spec>"
        if self.span:
            where += f":{self.span.line}:{self.span.column}"
        out = [f"{where}: {self.severity}[{self.code}]: {self.message}"]
        if self.source and self.span:
            text = self.source.line(self.span.line)
            width = 1
            if self.span.end_line == self.span.line:
                width = max(1, self.span.end_column - self.span.column)
            out.append(f"  {self.span.line:>4} | {text}")
            out.append("       | " + " " * (self.span.column - 1) + "^" * width)
        if self.hint:
            out.append(f"  hint: {self.hint}")
        return "\n".join(out)

    def as_dict(self) -> dict:
        return {
            "code": self.code,
            "severity": self.severity,
            "message": self.message,
            "file": self.source.filename if self.source else None,
            "line": self.line,
            "column": self.column,
            "hint": self.hint,
        }


class SpecError(Exception):
    """A spec that cannot be compiled, with every diagnostic its pass found.

    ``line``, ``column``, ``message``, ``hint`` and ``filename`` describe the first
    diagnostic; ``diagnostics`` holds them all. ``str(error)`` is the rendered report.
    """

    def __init__(self, diagnostics: list[Diagnostic] | Diagnostic):
        if isinstance(diagnostics, Diagnostic):
            diagnostics = [diagnostics]
        if not diagnostics:
            raise ValueError("a SpecError needs at least one diagnostic")
        self.diagnostics = list(diagnostics)
        super().__init__(self.render())

    @property
    def first(self) -> Diagnostic:
        return self.diagnostics[0]

    code = property(lambda self: self.first.code)
    message = property(lambda self: self.first.message)
    hint = property(lambda self: self.first.hint)
    line = property(lambda self: self.first.line)
    column = property(lambda self: self.first.column)
    filename = property(lambda self: self.first.source.filename if self.first.source else None)

    def render(self) -> str:
        return "\n".join(d.render() for d in self.diagnostics)


@dataclass
class Collector:
    """Gathers the diagnostics of one pass; :meth:`raise_if_any` ends the pass."""

    source: Source | None = None
    diagnostics: list[Diagnostic] = field(default_factory=list)

    def error(self, code: str, message: str, span: Span | None = None, hint: str | None = None,
              source: Source | None = None) -> None:
        self.diagnostics.append(Diagnostic(code, message, source or self.source, span, hint))

    def raise_if_any(self) -> None:
        """Raise every diagnostic collected so far, in source order."""
        if self.diagnostics:
            raise SpecError(sorted(self.diagnostics, key=_position))


def _position(d: Diagnostic):
    return (d.source.filename if d.source else "", d.line or 0, d.column or 0)


def did_you_mean(word: str, candidates) -> str | None:
    """``"did you mean 'beta1'?"`` for the closest candidate, or None if none is close."""
    close = closest(word, candidates)
    return f"did you mean '{close}'?" if close else None


def closest(word: str, candidates) -> str | None:
    """The candidate most like ``word``, or None if none is close."""
    close = difflib.get_close_matches(word, sorted(set(candidates)), n=1, cutoff=0.6)
    return close[0] if close else None
