"""Reading spec files: which paths may be read, how much of them, and in which encoding.

A path reaches gradspec from a user (``gradspec.load(path)``, ``gradspec check FILE``) or from
a spec (``import "x.opt" as x``). Either way only a regular ``.opt`` file of at most
:data:`MAX_SPEC_BYTES` is read, so a path to a device that never ends (``/dev/zero``), a FIFO
that blocks, a directory or a system file gives a short error instead of a hang, an
exhausted memory, or a parse error that quotes the file's first line. Text is UTF-8; a
leading byte-order mark is dropped; anything else is a located :class:`SpecError`.
"""
from __future__ import annotations

import os
import stat

from .errors import Diagnostic, Source, Span, SpecError

MAX_SPEC_BYTES = 1 << 20
"""The largest spec file read (1 MiB): the whole stdlib is 40 KB."""

SUFFIX = ".opt"
_BOM = "\ufeff"


class Unreadable(Exception):
    """A path that is not read, with the reason and a hint. Not a SpecError: the caller
    knows where the path was written (an import statement, the command line)."""

    def __init__(self, reason: str, hint: str | None = None, missing: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.hint = hint
        self.missing = missing  # the path names nothing: the caller may suggest a near name


def read_spec_file(path: str) -> Source:
    """The text of the spec file at ``path``; raises :class:`Unreadable` for a path that is
    not a regular ``.opt`` file of at most MAX_SPEC_BYTES, and SpecError (GS006) for text
    that is not UTF-8."""
    if not path.endswith(SUFFIX):
        raise Unreadable("spec files end in .opt")
    if not real_path(path).endswith(SUFFIX):
        raise Unreadable("it is a link to a file that does not end in .opt", "link only to .opt spec files")
    # O_NONBLOCK: opening a FIFO must not wait for a writer; the kind is checked on the
    # opened descriptor, so the file cannot be swapped between the check and the read.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        descriptor = os.open(path, flags)
    except OSError as error:
        raise Unreadable(_reason(error), missing=isinstance(error, FileNotFoundError)) from None
    try:
        info = os.fstat(descriptor)
        if stat.S_ISDIR(info.st_mode):
            raise Unreadable("it is a directory", "name a .opt file in it")
        if not stat.S_ISREG(info.st_mode):
            raise Unreadable("it is not a regular file (a device, pipe or socket)")
        data = _read_at_most(descriptor, MAX_SPEC_BYTES + 1)
    finally:
        os.close(descriptor)
    if len(data) > MAX_SPEC_BYTES:
        raise Unreadable(f"it is larger than {MAX_SPEC_BYTES:,} bytes, the most a spec file may hold",
                         "split it into specs that import each other")
    return decode(data, path)


def real_path(path: str) -> str:
    """``path`` with its links resolved; :class:`Unreadable` for a path no file can have."""
    if "\0" in path:
        raise Unreadable("a path cannot hold a NUL character")
    return os.path.realpath(path)


def _read_at_most(descriptor: int, limit: int) -> bytes:
    """Up to ``limit`` bytes (a file may grow after its size was read)."""
    chunks, size = [], 0
    while size < limit:
        chunk = os.read(descriptor, limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def decode(data: bytes, filename: str) -> Source:
    """UTF-8 text without a leading byte-order mark; the first byte that is not UTF-8 is a
    located GS006."""
    try:
        return Source(strip_bom(data.decode("utf-8")), filename)
    except UnicodeDecodeError as error:
        before = strip_bom(data[:error.start].decode("utf-8"))  # valid up to the bad byte
        line = before.count("\n") + 1
        column = len(before) - (before.rfind("\n") + 1) + 1
        raise SpecError(Diagnostic(
            "GS006", f"the file is not UTF-8 text: byte 0x{data[error.start]:02x} cannot start or continue a character",
            Source(strip_bom(data.decode("utf-8", "replace")), filename), Span(line, column, line, column + 1),
            "save the spec as UTF-8 (a spec is text; a Latin-1 editor setting writes such bytes)")) from None


def strip_bom(text: str) -> str:
    """``text`` without the byte-order mark some editors put first."""
    return text[1:] if text.startswith(_BOM) else text


def _reason(error: OSError) -> str:
    """An OSError as a short reason, without the path (the caller shows the path as written)."""
    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, PermissionError):
        return "permission denied"
    return (error.strerror or str(error)).lower()
