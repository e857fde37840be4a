"""Backends turn a step GraphModule into a callable.

``eager`` runs the graph op by op (plain torch ops, easy to debug and step through);
``compiled`` hands the elementwise phase to ``torch.compile(fullgraph=True)`` so Inductor
fuses it into one kernel per bucket; the scalar phase always runs eagerly. Hyperparameters are tensor inputs, so neither backend
specialises on their values.
"""
from __future__ import annotations

import torch
import torch.fx as fx

BACKENDS = ("eager", "compiled")


def make(graph: fx.GraphModule, backend: str):
    if backend == "eager":
        return graph
    if backend == "compiled":
        return torch.compile(graph, fullgraph=True, dynamic=False)
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


_CACHE: dict = {}


def cached(graphs, shapes, backend: str):
    """The (scalar, main) callables of a step, shared by every optimizer whose graphs have the
    same code and bucket shapes: a second optimizer with the same spec and layout does not
    compile again."""
    key = (graphs.scalar.code, graphs.main.code, tuple(shapes), backend)
    if key not in _CACHE:
        # The scalar phase is a handful of 0-d ops (15 us/step eagerly on CPU for adam);
        # compiling it would cost a second C++ build (several seconds) for nothing.
        _CACHE[key] = (graphs.scalar, make(graphs.main, backend))
    return _CACHE[key]
