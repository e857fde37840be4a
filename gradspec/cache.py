"""Where gradspec keeps what it learns once per machine: ``$GRADSPEC_CACHE_DIR``, else
``$XDG_CACHE_HOME/gradspec``, else ``~/.cache/gradspec``. Everything in it can be deleted;
it is only ever a shortcut."""
from __future__ import annotations

import os


def cache_path(name: str) -> str:
    """The path of ``name`` in the cache folder, creating the folder if it can (a read-only
    home leaves it missing, and callers then simply do the work again)."""
    base = os.environ.get("GRADSPEC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gradspec")
    try:
        os.makedirs(base, exist_ok=True)
    except OSError:
        pass
    return os.path.join(base, name)
