"""``gradspec bench``: optimizer-step speed, measured in one run, as ratios.

For each spec and backend it times our step in both gradient paths, "views" (backward wrote
into the flat gradient buffer: ``zero_grad(set_to_none=False)``) and "copy" (torch's
default ``set_to_none=True``: fresh gradients are copied in), next to torch.optim's fused
and foreach Adam and the same method in pytorch-optimizer where it has one (an optional
import). The roofline is the bytes a perfect step moves, read off the spec's IR (every
buffer the elementwise phase reads or writes, see compiler/cost.py), divided by the copy
bandwidth measured in the same run. Compile time is the first step in a fresh process:
cold (empty Inductor cache) and warm (the cache the cold run filled).

Specs with probes are timed on their ordinary step (probes need a model: see
bench/bench_probes.py).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from .compiler.cost import elements_moved
from .runtime.optimizer import Optimizer

PEERS = {"lamb": "Lamb", "lion": "Lion", "dualadam": "DualAdam", "muon": "Muon"}
MATRIX_SPECS = {"muon"}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_params(n_params: int, n_tensors: int, device: str, matrix: bool = False, dtype=torch.float32):
    """``n_tensors`` tensors of about n_params / n_tensors elements: vectors, or square
    matrices for specs that work on matrices (muon)."""
    size = max(1, n_params // n_tensors)
    shape = (int(size ** 0.5), int(size ** 0.5)) if matrix else (size,)
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(shape, generator=gen).to(device, dtype).requires_grad_() for _ in range(n_tensors)]
    grads = [(torch.randn(shape, generator=gen) * 1e-3).to(device, dtype) for _ in range(n_tensors)]
    return params, grads


def time_steps(opt, params, grads, steps: int, device: str, set_to_none: bool) -> tuple[float, float]:
    """(first step in seconds, median ms per later step). A spec that reads the loss gets
    step(loss=1)."""
    loss = torch.tensor(1.0)
    reads_loss = isinstance(opt, Optimizer) and opt.program().uses_loss

    def one():
        if set_to_none or any(p.grad is None for p in params):
            for p, g in zip(params, grads):
                p.grad = g.clone()
        _sync(device)
        start = time.perf_counter()
        opt.step(loss=loss) if reads_loss else opt.step()
        _sync(device)
        return time.perf_counter() - start

    first = one()
    for _ in range(3):
        one()
    return first, 1e3 * statistics.median(one() for _ in range(steps))


def bandwidth_gbs(n: int, device: str) -> float:
    """Copy bandwidth (bytes read plus written per second), best of ten."""
    a, b = torch.empty(n, device=device), torch.empty(n, device=device)
    best = float("inf")
    for _ in range(10):
        _sync(device)
        start = time.perf_counter()
        b.copy_(a)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 8 * n / best / 1e9


_CHILD = """
import json, time, torch, gradspec
params = [torch.randn({size}, requires_grad=True) for _ in range({tensors})]
for p in params:
    p.grad = torch.randn_like(p)
opt = gradspec.Optimizer(params, {spec!r}, backend="compiled")
start = time.perf_counter()
opt.step(loss=torch.tensor(1.0)) if opt.program().uses_loss else opt.step()
print(json.dumps(time.perf_counter() - start))
"""


def compile_seconds(spec: str, tensors: int, cache_dir: str, size: int = 1000) -> float:
    """The first compiled step of ``spec`` in a fresh process with this Inductor cache."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir)
    out = subprocess.run([sys.executable, "-c", _CHILD.format(spec=spec, tensors=tensors, size=size)],
                         env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"compiling {spec} failed:\n{out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def run(specs: list[str], params: float = 10e6, tensors: int = 50, device: str = "cpu", steps: int = 20,
        backends: tuple = ("compiled", "eager"), compile_tensors: tuple = (), peers: bool = True) -> dict:
    """Every measurement, as a dict (what ``--json`` writes)."""
    n = int(params)
    torch.manual_seed(0)
    bandwidth = bandwidth_gbs(n, device)
    result = {"torch": torch.__version__, "device": device, "threads": torch.get_num_threads(), "params": n,
              "tensors": tensors, "bandwidth_gbs": bandwidth, "rows": [], "compile": []}

    def add(label, kind, ms, first, moved):
        roofline_ms = moved * 4 * n / (bandwidth * 1e9) * 1e3
        result["rows"].append({"label": label, "kind": kind, "ms": ms, "first_step_s": first,
                               "bytes_per_param": moved * 4, "roofline_ms": roofline_ms})

    adam_moved = elements_moved(Optimizer([torch.zeros(1, requires_grad=True)], "adam", backend="eager").program())
    for label, kwargs in [("torch.optim.Adam fused", {"fused": True}), ("torch.optim.Adam foreach", {"foreach": True})]:
        ps, gs = make_params(n, tensors, device)
        first, ms = time_steps(torch.optim.Adam(ps, lr=1e-3, **kwargs), ps, gs, steps, device, True)
        add(label, "torch", ms, first, adam_moved)
    for spec in specs:
        moved = elements_moved(Optimizer([torch.zeros(1, requires_grad=True)], spec, backend="eager").program())
        for backend in backends:
            for path, set_to_none in (("views", False), ("copy", True)):
                ps, gs = make_params(n, tensors, device, spec in MATRIX_SPECS)
                first, ms = time_steps(Optimizer(ps, spec, backend=backend, lr=1e-3), ps, gs, steps, device,
                                       set_to_none)
                add(f"gradspec {spec} {backend} ({path})", "gradspec", ms, first, moved)
        peer = PEERS.get(spec)
        if peers and peer is not None:
            try:
                import pytorch_optimizer
            except ImportError:
                continue
            ps, gs = make_params(n, tensors, device, spec in MATRIX_SPECS)
            groups = [{"params": ps, "use_muon": True}] if spec == "muon" else ps  # its Muon's protocol
            opt = getattr(pytorch_optimizer, peer)(groups, lr=1e-3)
            first, ms = time_steps(opt, ps, gs, steps, device, True)
            add(f"pytorch_optimizer.{peer}", "peer", ms, first, moved)
        for count in compile_tensors:
            with tempfile.TemporaryDirectory() as cache:
                cold = compile_seconds(spec, count, cache)
                warm = compile_seconds(spec, count, cache)
            result["compile"].append({"spec": spec, "tensors": count, "cold_s": cold, "warm_s": warm})
    return result


def render(result: dict) -> str:
    fused = result["rows"][0]["ms"]
    lines = [f"torch {result['torch']}, {result['device']}, {result['threads']} threads, "
             f"{result['params'] / 1e6:.1f}M fp32 params in {result['tensors']} tensors; "
             f"measured copy bandwidth {result['bandwidth_gbs']:.1f} GB/s", "",
             "| optimizer | ms/step | vs fused Adam | roofline ms (bytes/param) | vs roofline | first step s |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        lines.append(f"| {r['label']} | {r['ms']:.2f} | {r['ms'] / fused:.2f}x | {r['roofline_ms']:.2f} "
                     f"({r['bytes_per_param']}) | {r['ms'] / r['roofline_ms']:.2f}x | {r['first_step_s']:.2f} |")
    if result["compile"]:
        lines += ["", "| spec | tensors | cold compile s | warm compile s |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {c['spec']} | {c['tensors']} | {c['cold_s']:.2f} | {c['warm_s']:.2f} |"
                  for c in result["compile"]]
    return "\n".join(lines)


def main(args) -> int:
    result = run(args.specs, args.params, args.tensors, args.device, args.steps, tuple(args.backends),
                 tuple(args.compile_tensors or ()), peers=not args.no_peers)
    print(render(result))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
        print(f"\nwrote {args.json}")
    return 0
