"""Which hyperparameters decide the compiled program rather than feed it.

Most hyperparameters are 0-d tensor inputs of a compiled step, so a scheduler changing them
never recompiles. A few are structural: booleans (``amsgrad``), numbers read by an ``if`` or
``require`` condition (``if momentum > 0``), a subspace's rank and a shaped state's sizes
(a buffer's shape), ``repeat k`` counts and ``blocks B`` sizes (unrolled or tiled when the
step is built) and Lanczos's iteration counts. Their values key the cache of built programs, in the Optimizer
and in the functional transform alike.
"""
from __future__ import annotations

from ..dsl import ast
from ..dsl.resolve import Spec
from ..recursion import deep


@deep
def static_hypers(spec: Spec) -> tuple:
    """The structural hyperparameters of ``spec``, sorted by name."""
    names = {n for n, h in spec.hypers.items() if h.kind == "bool"}
    for _, item in spec.items:
        for node in _walk_items(item):
            if isinstance(node, (ast.If, ast.Require)):
                names |= {n.name for n in ast.names_in(node.cond) if n.name in spec.hypers}
            elif isinstance(node, ast.State):
                if node.rank is not None:
                    names.add(node.rank)  # a subspace's size is a buffer's shape
                names |= {d for d in node.dims or () if isinstance(d, str)}  # (rows, r): a buffer's shape
            elif isinstance(node, ast.Repeat) and isinstance(node.count, str):
                names.add(node.count)  # unrolled k times; for blocks B, the tiling
            for expr in _expressions(node):
                names |= {a.name for call in _calls(expr, "hessian_eigvecs") for a in call.args
                          if isinstance(a, ast.Name)}
    return tuple(sorted(names & set(spec.hypers)))


def _expressions(item):
    if isinstance(item, ast.Define):
        yield item.expr
    elif isinstance(item, ast.State):
        yield item.init


def _calls(expr, func: str):
    if isinstance(expr, ast.Call) and expr.func == func:
        yield expr
    for child in getattr(expr, "args", ()) + tuple(getattr(expr, a) for a in ("left", "right", "operand")
                                                   if hasattr(expr, a)):
        yield from _calls(child, func)


def _walk_items(item):
    yield item
    if isinstance(item, (ast.If, ast.Probe, ast.Repeat)):
        for inner in (item.then + item.otherwise if isinstance(item, ast.If) else item.items):
            yield from _walk_items(inner)
