"""The shipped specs: ``*.opt`` files in this package, found by name."""
from __future__ import annotations

from importlib import resources


def names() -> list[str]:
    """Every stdlib spec name, sorted."""
    return sorted(p.name[:-4] for p in resources.files(__name__).iterdir() if p.name.endswith(".opt"))


def source(name: str) -> str | None:
    """The text of stdlib spec ``name``, or None if there is none. Only a plain name is
    looked up, so a name can never reach outside this folder ("../x")."""
    if not name.isidentifier() or len(name) > 100:  # longer than any file name a folder holds
        return None
    path = resources.files(__name__).joinpath(f"{name}.opt")
    return path.read_text() if path.is_file() else None
