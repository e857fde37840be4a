"""Backends turn a step GraphModule into a callable.

``eager`` runs the graph op by op (plain torch ops, easy to debug and step through);
``compiled`` hands the elementwise phase to ``torch.compile(fullgraph=True)`` so Inductor
fuses it into one kernel per bucket; the scalar phase always runs eagerly. Hyperparameters are tensor inputs, so neither backend
specialises on their values.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import shutil
import sys

import torch
import torch.fx as fx

from ..cache import trusted_file, write_private

BACKENDS = ("eager", "compiled")


def make(graph: fx.GraphModule, backend: str, device: torch.device | str = "cpu", any_size: bool = False):
    """``graph`` as a callable of ``backend``. ``any_size``: the graph does not depend on its
    buffers' lengths (see :func:`cached`), so the compiled kernel takes the length as an
    argument and one compile serves every bucket size."""
    if backend == "eager":
        return graph
    if backend == "compiled":
        on_cpu = torch.device(device).type == "cpu"
        if on_cpu:
            trust_known_vector_isa()
        options = CPU_OPTIONS if on_cpu else None
        compiled = torch.compile(graph, fullgraph=True, dynamic=None if any_size else False, options=options)
        return _FirstCall(compiled, remember_vector_isa if on_cpu else None, any_size)
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


# Inductor stores an elementwise value that more than 4 loads read (its default
# realize_reads_threshold) in a temporary of the bucket's size. In a spec with a reduction,
# such a value feeds both the reduction pass and the update pass (sgd_rms's root d), and the
# temporary is allocated again on every step. On CPU that is a fresh mapping, its pages
# faulted in each time. Recomputing the value in the second pass is cheaper. Measured with
# `gradspec bench sgd_rms --backends compiled` (10M parameters, 2-core CPU): 20.3 -> 7.4 ms;
# sgd_metric, lamb and the elementwise specs are unchanged or faster. Not measured on CUDA,
# where the caching allocator keeps the temporaries. realize_acc_reads_threshold does the
# same for a value that reads many buffers (more than 12 on CPU): ALTO's direction was
# stored between its passes; 23.7 -> 16.0 ms (docs/design.md).
CPU_OPTIONS = {"realize_reads_threshold": 64, "realize_acc_reads_threshold": 64}


class _FirstCall:
    """A compiled step that runs ``after_first`` once its first call (the compile) succeeded.
    With ``any_size``, the first call marks each buffer's length dynamic, so that first
    compile is already the general one (unmarked, Dynamo would compile the first size
    statically and recompile at the second)."""

    def __init__(self, compiled, after_first, any_size: bool = False):
        self.compiled = compiled
        self.after_first = after_first
        self.any_size = any_size
        self.for_any_length = any_size  # kept: any_size itself only marks the first call

    def __call__(self, *args):
        if self.any_size:
            for arg in args:
                if isinstance(arg, torch.Tensor) and arg.dim() >= 1 and arg.shape[-1] > 1:
                    torch._dynamo.maybe_mark_dynamic(arg, arg.dim() - 1)
        out = self.compiled(*args)
        self.any_size = False
        if self.after_first is not None:
            self.after_first()
            self.after_first = None
        return out


# ---- Inductor's vector-ISA probe
# Before its first CPU kernel, every process Inductor runs compiles test libraries for each
# vector ISA the CPU lists and dlopens them in child processes: on our 2-core CPU, 9.9 s of
# the 13 s first step with an empty cache and 1.3 s of 1.8 s with a warm one. Once a compiled
# step has run in this environment (same torch, Python, CPU capability and C++ compiler),
# later processes skip the probe with Inductor's own switch, cpp.vec_isa_ok, unless the user
# set it (or TORCHINDUCTOR_VEC_ISA_OK). GRADSPEC_CACHE_DIR moves the memo; deleting it
# brings the probe back. The memo is trusted only in a folder no other user can write
# (gradspec/cache.py): a planted one would make Inductor skip the probe.

def _isa_memo() -> str:
    """The memo's file name, which changes with anything that could change the probe's result."""
    compiler = shutil.which(os.environ.get("CXX", "c++")) or ""
    fingerprint = "|".join([torch.__version__, sys.executable, platform.machine(), compiler,
                            torch.backends.cpu.get_cpu_capability()])
    return "vec-isa-ok-" + hashlib.sha256(fingerprint.encode()).hexdigest()[:16]


def trust_known_vector_isa() -> None:
    config = torch._inductor.config.cpp
    if config.vec_isa_ok is None and trusted_file(_isa_memo()) is not None:
        config.vec_isa_ok = True


def remember_vector_isa() -> None:
    """Leave the memo; a folder that is not private, or a read-only home, leaves none (the
    probe simply runs again next time)."""
    write_private(_isa_memo(), "a compiled gradspec step ran here; Inductor's vector-ISA probe passed\n")


_CACHE: dict = {}


# A kernel compiled for any length ran 40% slower than one compiled for its length on our CPU
# (adam, 10M parameters: 10.7-11.0 vs 7.6-7.9 ms, fused Adam 7.5-7.7; docs/design.md): the
# loop bound and the tail become run-time values. So a length-free step is compiled for its
# lengths up to STATIC_LAYOUTS times, and one kernel for any length serves every layout after
# those: a model with one or two groups keeps the fast kernels, one with 48 groups of distinct
# sizes compiles five graphs, not 48.
STATIC_LAYOUTS = 4


def cached(graphs, shapes, backend: str, device: torch.device | str = "cpu", relower=None):
    """The (scalar, main) callables of a step, shared by every optimizer whose graphs have the
    same code and bucket shapes: a second optimizer with the same spec and layout does not
    compile again. ``relower(shapes)`` lowers the same program for other shapes: where the
    graphs come out the same for longer buffers, the step depends on no length, and after
    :data:`STATIC_LAYOUTS` layouts of the same code and dtypes one kernel compiled for any
    length serves the rest."""
    key = (graphs.scalar.code, graphs.main.code, tuple(shapes), backend, str(device))
    if key in _CACHE:
        return _CACHE[key]
    family = (graphs.scalar.code, graphs.main.code, tuple((s.dtype, s.state_dtype) for s in shapes), backend,
              str(device))
    layouts = _CACHE.setdefault(("static layouts", *family), set())
    if backend == "compiled" and len(layouts) >= STATIC_LAYOUTS and relower is not None \
            and _independent_of_lengths(graphs, shapes, relower):
        if family not in _CACHE:
            _CACHE[family] = (graphs.scalar, make(graphs.main, backend, device, any_size=True))
        _CACHE[key] = _CACHE[family]
    else:
        # The scalar phase is a handful of 0-d ops (15 us/step eagerly on CPU for adam);
        # compiling it would cost a second C++ build (several seconds) for nothing.
        _CACHE[key] = (graphs.scalar, make(graphs.main, backend, device))
        layouts.add(key)
    return _CACHE[key]


def _independent_of_lengths(graphs, shapes, relower) -> bool:
    """Whether the graphs lowered for every tensor one row longer are the same code: a
    lowering that uses a length (a per-tensor reduction's runs, a matrix's shape, an element
    count) writes it into the graph as a constant. Sharded buckets carry their global shapes
    and are kept to their own compile."""
    if any(s.sharding is not None for s in shapes):
        return False
    longer = []
    for shape in shapes:
        tensors = tuple((s[0] + 1, *s[1:]) if s else (2,) for s in shape.shapes)
        numel = sum(int(torch.Size(s).numel()) for s in tensors) if tensors else shape.numel + shape.ntensors
        longer.append(dataclasses.replace(shape, numel=numel, shapes=tensors))
    other = relower(longer)
    return other.scalar.code == graphs.scalar.code and other.main.code == graphs.main.code
