"""Where gradspec keeps what it learns once per machine: ``$GRADSPEC_CACHE_DIR``, else
``$XDG_CACHE_HOME/gradspec``, else ``~/.cache/gradspec``. Everything in it can be deleted;
it is only ever a shortcut.

A shortcut must not be a way in: whatever is read from the folder changes what this process
does, so the folder is used only when nobody else could have written into it. It is created
private (0700), and it and every file read from it must be ours, not writable by group or
others, and not symbolic links; otherwise the cache is treated as absent (the work is simply
done again). Nothing in it is ever unpickled or executed. What it holds: the Inductor vector-ISA
memo (compiler/backends.py) and the passed safety checks (check.py), trusted for their
existence alone, and the SymPy rewrite's verdicts (symbolic/simplify.py), JSON read back
into IR nodes only after every field is checked.
"""
from __future__ import annotations

import os
import stat

_FOREIGN_WRITABLE = stat.S_IWGRP | stat.S_IWOTH


def cache_dir() -> str:
    """The configured cache folder (it may not exist)."""
    return os.environ.get("GRADSPEC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gradspec")


def private_cache_dir(create: bool = False) -> str | None:
    """The cache folder if only this user can write into it, else None. With ``create``, a
    missing folder is made (mode 0700); a read-only home leaves it missing, and callers then
    simply do the work again."""
    base = cache_dir()
    if create and not os.path.lexists(base):
        try:
            os.makedirs(base, mode=0o700, exist_ok=True)
        except OSError:
            return None
    return base if _is_ours(base, stat.S_ISDIR) else None


def trusted_file(name: str) -> str | None:
    """The path of ``name`` in the cache folder if that file exists and only this user could
    have written it (see the module docstring), else None."""
    base = private_cache_dir()
    if base is None:
        return None
    path = os.path.join(base, name)
    return path if _is_ours(path, stat.S_ISREG) else None


def write_private(name: str, text: str) -> bool:
    """Write ``name`` in the cache folder, readable and writable by this user only. False when
    the folder is not private or the file cannot be written (the cache is then just absent)."""
    base = private_cache_dir(create=True)
    if base is None:
        return False
    path = os.path.join(base, name)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    try:
        descriptor = os.open(path, flags, 0o600)
    except OSError:
        return False
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    return _is_ours(path, stat.S_ISREG)


def _is_ours(path: str, is_kind) -> bool:
    """``path`` exists, is of the kind ``is_kind`` tests for (not a symbolic link), belongs to
    this user and is not writable by group or others. Without POSIX owners, never."""
    getuid = getattr(os, "getuid", None)
    if getuid is None:
        return False
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return is_kind(info.st_mode) and info.st_uid == getuid() and not info.st_mode & _FOREIGN_WRITABLE
