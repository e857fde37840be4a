"""``gradspec bench``: optimizer-step speed, measured in one run, as ratios.

For each spec and backend it times our step in both gradient paths, "views" (the gradients
are in the flat gradient buffer, where backward leaves them in either ``zero_grad`` mode)
and "copy" (gradients assigned by hand, ``p.grad = tensor``, which the step copies in;
bench/bench_train_step.py times whole training steps), next to torch.optim's fused
and foreach Adam and the same method in pytorch-optimizer and HeavyBall where they have
it (optional imports). The roofline is the bytes a perfect step moves, read off the spec's IR (every
buffer the elementwise phase reads or writes, see compiler/cost.py), divided by the copy
bandwidth. Every row's steps are interleaved with fused Adam's steps and with a copy of the
same size, and its ratios use those paired timings: on a shared machine whose speed drifts
by 30% within a run, ratios against figures taken minutes apart are noise.

Compile time is construction plus the first step, in a fresh process: cold (empty Inductor
cache) and warm (the cache the cold run filled), each for the process's first graph, which
also pays torch.compile's one-time start (imports, Inductor's source hash, CPU probes), and
for a second graph in the same process, once started (what one more optimizer, or a program
already using torch.compile, waits for).

Specs with probes are timed on their ordinary step (probes need a model: see
bench/bench_probes.py).
"""
from __future__ import annotations

import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from .compiler.cost import elements_moved
from .runtime.optimizer import Optimizer

# (label, set_to_none): the gradient path, in the flat buffer or assigned by hand and copied in
PATHS = (("views", False), ("copy", True))


@dataclass(frozen=True)
class Peer:
    """The same method in another package: ``package.cls(params, lr=..., **options)``."""

    package: str  # an optional import: its rows are left out where it is not installed
    cls: str
    options: tuple = ()  # (name, value) pairs given to the constructor
    group: tuple = ()  # (name, value) pairs the class reads from the parameter group only


# pytorch-optimizer's names where it has the method, HeavyBall's (issue 15's speed peers)
PEERS = {
    "lamb": [Peer("pytorch_optimizer", "Lamb")],
    "lion": [Peer("pytorch_optimizer", "Lion")],
    "dualadam": [Peer("pytorch_optimizer", "DualAdam")],
    "adam": [Peer("heavyball", "AdamW", (("weight_decay", 0.0),))],
    "muon": [Peer("pytorch_optimizer", "Muon", group=(("use_muon", True),)), Peer("heavyball", "Muon")],
    "muon_adamw": [Peer("heavyball", "MuonAdamW")],
    "adafactor": [Peer("pytorch_optimizer", "AdaFactor")],
    "shampoo": [Peer("pytorch_optimizer", "Shampoo")],
    "soap": [Peer("pytorch_optimizer", "SOAP"), Peer("heavyball", "SOAP")],
    "prodigy": [Peer("pytorch_optimizer", "Prodigy")],
    # galore(adam)'s defaults: rank 128, a refresh every 200 steps, scale 0.25, the SVD's side by the shape
    "galore(adam)": [Peer("pytorch_optimizer", "GaLore", group=(("rank", 128), ("update_proj_gap", 200),
                                                                 ("scale", 0.25), ("projection_type", "std")))],
    "schedule_free_sgd": [Peer("pytorch_optimizer", "ScheduleFreeSGD")],
    "schedule_free_adamw": [Peer("pytorch_optimizer", "ScheduleFreeAdamW"), Peer("heavyball", "SFAdamW")],
}
MATRIX_SPECS = {"muon", "muon_adamw", "adafactor", "shampoo", "soap", "galore(adam)"}


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


def stepper(opt, params, grads, device: str, set_to_none: bool):
    """A function that takes one step of ``opt`` and returns its seconds. A spec that reads
    the loss gets step(loss=1)."""
    loss = torch.tensor(1.0)
    reads_loss = isinstance(opt, Optimizer) and opt.program().uses_loss

    def one() -> float:
        if set_to_none or any(p.grad is None for p in params):
            for p, g in zip(params, grads):
                p.grad = g.clone()
        _sync(device)
        start = time.perf_counter()
        opt.step(loss=loss) if reads_loss else opt.step()
        _sync(device)
        return time.perf_counter() - start
    return one


def copier(n: int, device: str):
    """A function that copies n fp32 elements and returns its seconds: the bandwidth probe."""
    a, b = torch.empty(n, device=device), torch.empty(n, device=device)

    def one() -> float:
        _sync(device)
        start = time.perf_counter()
        b.copy_(a)
        _sync(device)
        return time.perf_counter() - start
    return one


def time_paired(ours, references: dict, steps: int) -> tuple[float, float, dict]:
    """(first step in seconds, median ms per later step, {reference: (median ms, best ms)}),
    the steps interleaved with the references' in rounds (each of them once per round): the
    machine's drift during a run then moves both sides of every ratio alike. Who goes first
    rotates from round to round, because on our CPU the first step of a round ran faster
    than the others, enough to flip a 5% comparison."""
    first = ours()
    runners = [("ours", ours), *references.items()]
    samples = {name: [] for name, _ in runners}
    for i in range(3 + steps):  # three warm-up rounds, not kept
        turn = i % len(runners)
        for name, run in runners[turn:] + runners[:turn]:
            seconds = run()
            if i >= 3:
                samples[name].append(seconds)
    ms = 1e3 * statistics.median(samples.pop("ours"))
    return first, ms, {name: (1e3 * statistics.median(values), 1e3 * min(values)) for name, values in samples.items()}


_CHILD = """
import json, time, torch, gradspec
seconds = []
for size in ({size}, {size} + 1):
    params = [torch.randn(size, requires_grad=True) for _ in range({tensors})]
    for p in params:
        p.grad = torch.randn_like(p)
    start = time.perf_counter()
    opt = gradspec.Optimizer(params, {spec!r}, backend="compiled")
    opt.step(loss=torch.tensor(1.0)) if opt.program().uses_loss else opt.step()
    seconds.append(time.perf_counter() - start)
print(json.dumps(seconds))
"""


def compile_seconds(spec: str, tensors: int, cache_dir: str, size: int = 1000) -> list:
    """Construction plus first compiled step of ``spec`` in a fresh process with this
    Inductor cache, twice: [first graph, which also pays the process's one-time start of
    torch.compile (imports, Inductor's source hash and CPU probes), a second graph (tensors
    one element longer) in the same process]."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir)
    out = subprocess.run([sys.executable, "-c", _CHILD.format(spec=spec, tensors=tensors, size=size)],
                         env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"compiling {spec} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(specs: list[str], params: float = 10e6, tensors: int = 50, device: str = "cpu", steps: int = 20,
        backends: tuple = ("compiled", "eager"), compile_tensors: tuple = (), peers: bool = True) -> dict:
    """Every measurement, as a dict (what ``--json`` writes). Each row is timed interleaved
    with torch.optim's fused Adam and with the bandwidth probe, and its ratios use those
    paired figures."""
    n = int(params)
    torch.manual_seed(0)
    bandwidth_probe = copier(n, device)
    fused_params, fused_grads = make_params(n, tensors, device)
    fused = stepper(torch.optim.Adam(fused_params, lr=1e-3, fused=True), fused_params, fused_grads, device, True)
    references = {"fused": fused, "copy": bandwidth_probe}
    result = {"torch": torch.__version__, "device": device, "threads": torch.get_num_threads(), "params": n,
              "tensors": tensors, "rows": [], "compile": []}

    def measure(label, kind, one, moved):
        first, ms, paired = time_paired(one, references, steps)
        copy_ms = paired["copy"][1]  # the bandwidth is the best copy: what a perfect step could reach
        roofline_ms = moved / 2 * copy_ms  # a copy moves 2 elements of 4 bytes each
        result["rows"].append({"label": label, "kind": kind, "ms": ms, "first_step_s": first,
                               "bytes_per_param": moved * 4, "roofline_ms": roofline_ms,
                               "fused_adam_ms": paired["fused"][0], "bandwidth_gbs": 8 * n / copy_ms / 1e6})

    adam_moved = elements_moved(Optimizer([torch.zeros(1, requires_grad=True)], "adam", backend="eager").program())
    for label, kwargs in [("torch.optim.Adam fused", {"fused": True}), ("torch.optim.Adam foreach", {"foreach": True})]:
        ps, gs = make_params(n, tensors, device)
        measure(label, "torch", stepper(torch.optim.Adam(ps, lr=1e-3, **kwargs), ps, gs, device, True), adam_moved)
    for spec in specs:
        moved = elements_moved(Optimizer([torch.zeros(1, requires_grad=True)], spec, backend="eager").program())
        for backend in backends:
            for path, set_to_none in PATHS:
                ps, gs = make_params(n, tensors, device, spec in MATRIX_SPECS)
                opt = Optimizer(ps, spec, backend=backend, lr=1e-3)
                measure(f"gradspec {spec} {backend} ({path})", "gradspec", stepper(opt, ps, gs, device, set_to_none),
                        moved)
        for peer in PEERS.get(spec, []) if peers else []:
            package = _optional_package(peer.package)
            if package is None:
                continue
            ps, gs = make_params(n, tensors, device, spec in MATRIX_SPECS)
            groups = [{"params": ps, **dict(peer.group)}] if peer.group else ps
            opt = getattr(package, peer.cls)(groups, lr=1e-3, **dict(peer.options))
            measure(f"{peer.package}.{peer.cls}", "peer", stepper(opt, ps, gs, device, True), moved)
        for count in compile_tensors:
            with tempfile.TemporaryDirectory() as cache:
                cold, cold_started = compile_seconds(spec, count, cache)
                warm, warm_started = compile_seconds(spec, count, cache)
            result["compile"].append({"spec": spec, "tensors": count, "cold_s": cold, "warm_s": warm,
                                      "cold_started_s": cold_started, "warm_started_s": warm_started})
    result["bandwidth_gbs"] = statistics.median(r["bandwidth_gbs"] for r in result["rows"])
    return result


def _optional_package(name: str):
    """A peer package, or None where it is not installed (its rows are then left out)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def render(result: dict) -> str:
    lines = [f"torch {result['torch']}, {result['device']}, {result['threads']} threads, "
             f"{result['params'] / 1e6:.1f}M fp32 params in {result['tensors']} tensors; "
             f"copy bandwidth {result['bandwidth_gbs']:.1f} GB/s (best copy, median over rows)",
             "every row is timed interleaved with fused Adam and a copy: its ratios use those paired timings",
             "rows are timed minutes apart while the machine's speed drifts, so a row with the smaller ms/step "
             "can have the larger ratio: rank rows by the ratio, which divides out that drift", "",
             "| optimizer | ms/step | vs fused Adam | roofline ms (bytes/param) | vs roofline | first step s |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        lines.append(f"| {r['label']} | {r['ms']:.2f} | {r['ms'] / r['fused_adam_ms']:.2f}x | {r['roofline_ms']:.2f} "
                     f"({r['bytes_per_param']}) | {r['ms'] / r['roofline_ms']:.2f}x | {r['first_step_s']:.2f} |")
    if result["compile"]:
        lines += ["", "compile: construction and first step in a fresh process (its first graph pays "
                  "torch.compile's one-time start), then of a second graph in the same process",
                  "", "| spec | tensors | cold s | warm s | cold, started s | warm, started s |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {c['spec']} | {c['tensors']} | {c['cold_s']:.2f} | {c['warm_s']:.2f} | "
                  f"{c['cold_started_s']:.2f} | {c['warm_started_s']:.2f} |" for c in result["compile"]]
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
