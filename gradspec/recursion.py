"""Deep specs without ``RecursionError``.

The front end (parse tree to AST, name resolution, the IR builder, the checker, the FX
lowering) walks expressions recursively, as compilers usually do: the code stays short and
each walker reads like the grammar. A spec can nest far deeper than Python's default limit
of 1,000 frames, though: a 10,000-term sum is a 10,000-deep left-associated chain of ``+``,
and a 5,000-line chain of definitions inlines into one expression as deep.

Rather than rewrite every walker with an explicit stack, the public entry points are
decorated with :func:`deep`: the first such call on a thread runs its work on a helper
thread whose stack is large (``STACK_BYTES``) with the recursion limit raised to match, and
nested calls run directly. What that allows is bounded once more by :data:`MAX_DEPTH`, which
the parser enforces with a located SpecError, so no input reaches a real stack overflow.

The helper thread starts in about 0.1 ms; everything that runs there is pure Python over
the spec (no torch state, which is thread-local, is read or changed).
"""
from __future__ import annotations

import functools
import sys
import threading

STACK_BYTES = 512 * 1024 * 1024
"""The helper thread's stack: virtual memory, touched only as deep as a spec goes."""

RECURSION_LIMIT = 250_000
"""Python frames allowed on the helper thread; about 2 KB of C stack each at worst."""

MAX_DEPTH = 20_000
"""The deepest expression a spec may hold (after definitions are inlined); the parser and
the IR builder refuse deeper ones with a SpecError. Recursive walkers take a few frames
per level, so this stays well inside RECURSION_LIMIT."""

_state = threading.local()
_lock = threading.Lock()
_active = 0
_saved_limit = 0


def deep(fn):
    """Run ``fn`` with room for deep recursion (see the module docstring)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if getattr(_state, "inside", False):
            return fn(*args, **kwargs)
        return _on_deep_thread(fn, args, kwargs)

    return wrapper


def _on_deep_thread(fn, args, kwargs):
    outcome: dict = {}

    def target():
        _state.inside = True
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as error:  # handed back to the calling thread as it was raised
            outcome["error"] = error

    global _active, _saved_limit
    with _lock:
        if _active == 0:
            _saved_limit = sys.getrecursionlimit()
            sys.setrecursionlimit(max(_saved_limit, RECURSION_LIMIT))
        _active += 1
    try:
        with _lock:
            previous_size = threading.stack_size()
            threading.stack_size(STACK_BYTES)
            try:
                worker = threading.Thread(target=target, name="gradspec-deep", daemon=True)
                worker.start()  # the stack size applies when a thread starts
            finally:
                threading.stack_size(previous_size)
        worker.join()
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                sys.setrecursionlimit(_saved_limit)
    if "error" in outcome:
        error = outcome.pop("error")
        try:
            raise error
        finally:
            del error
    return outcome["value"]
