"""Optimizer-step speed: gradspec against torch.optim's fused and foreach Adam, in one run.

    python bench/bench_step.py                      # 10M fp32 params in 50 tensors, CPU
    python bench/bench_step.py --params 1e6 --tensors 10 --specs adam lion --device cuda
    python bench/bench_step.py --specs lamb alto --backends compiled   # + pytorch-optimizer's Lamb

Prints ms/step (median over --steps timed steps after warm-up) for torch.optim.Adam
(fused, foreach), and for each gradspec spec and backend in both gradient paths: "views"
(zero_grad(set_to_none=False): backward writes straight into the flat gradient buffer) and
"copy" (torch's default set_to_none=True: fresh grads are copied in each step). It also
prints the cold compile time (first step, which includes Inductor's codegen and the C++
compile unless the on-disk cache already has it) and the memory roofline: bytes moved per
step divided by a measured copy bandwidth.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import gradspec


def make_params(n_params: int, n_tensors: int, device: str, matrix: bool = False):
    """``n_tensors`` tensors of about n_params / n_tensors elements each: vectors, or square
    matrices for the specs that work on matrices (muon)."""
    size = n_params // n_tensors
    shape = (int(size ** 0.5), int(size ** 0.5)) if matrix else (size,)
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(shape, generator=gen).to(device).requires_grad_() for _ in range(n_tensors)]
    grads = [torch.randn(shape, generator=gen).to(device) * 1e-3 for _ in range(n_tensors)]
    return params, grads


MATRIX_SPECS = {"muon"}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(opt, params, grads, steps: int, device: str, set_to_none: bool) -> tuple[float, float]:
    """(first step seconds, median ms per step over ``steps`` later steps). A spec that reads
    the loss gets a constant one, as a training loop would pass with step(loss=...)."""
    if isinstance(opt, gradspec.Optimizer) and opt.program().uses_loss:
        step, loss = opt.step, torch.tensor(1.0)
        opt.step = lambda: step(loss=loss)
    def one():
        if set_to_none:
            for p, g in zip(params, grads):
                p.grad = g.clone()
        else:  # the gradient stays where backward would have accumulated it
            for p, g in zip(params, grads):
                if p.grad is None:
                    p.grad = g.clone()
        opt.step()
    t0 = time.perf_counter()
    one()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(3):
        one()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        if set_to_none:  # time only the step, not the test's own grad allocation
            for p, g in zip(params, grads):
                p.grad = g.clone()
            sync(device)
            t0 = time.perf_counter()
            opt.step()
        else:
            opt.step()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return first, statistics.median(times)


def bandwidth_gbs(n: int, device: str) -> float:
    """Measured copy bandwidth: bytes read plus written per second, best of a few."""
    a = torch.empty(n, device=device)
    b = torch.empty(n, device=device)
    best = float("inf")
    for _ in range(10):
        sync(device)
        t0 = time.perf_counter()
        b.copy_(a)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 8 * n / best / 1e9


def roofline_bytes(spec_name: str, n_states: int, element_size: int = 4) -> int:
    """Bytes per parameter a perfect step moves: read param, grad and each state; write param
    and each state."""
    return element_size * (2 + n_states + 1 + n_states)


PEERS = {"lamb": "Lamb", "lion": "Lion", "dualadam": "DualAdam", "muon": "Muon"}
"""The same method in pytorch-optimizer (an optional import), timed in the same run."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=10e6)
    parser.add_argument("--tensors", type=int, default=50)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--specs", nargs="+", default=["adam"])
    parser.add_argument("--backends", nargs="+", default=["compiled", "eager"])
    args = parser.parse_args()
    n = int(args.params)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, "
          f"{n / 1e6:.1f}M fp32 params in {args.tensors} tensors, median of {args.steps} steps")
    bw = bandwidth_gbs(n, args.device)
    print(f"measured copy bandwidth: {bw:.1f} GB/s\n")
    print(f"{'optimizer':<34}{'ms/step':>9}{'vs fused':>10}{'roofline ms':>13}{'vs roof':>9}{'first step s':>14}")

    rows = []
    for label, kwargs in [("torch.optim.Adam fused", {"fused": True}), ("torch.optim.Adam foreach", {"foreach": True})]:
        params, grads = make_params(n, args.tensors, args.device)
        opt = torch.optim.Adam(params, lr=1e-3, **kwargs)
        rows.append((label, *time_steps(opt, params, grads, args.steps, args.device, True)[::-1], 2))
    fused_ms = rows[0][1]

    for spec in args.specs:
        n_states = len(gradspec.Optimizer([torch.zeros(1, requires_grad=True)], spec, backend="eager").program().state_names)
        for backend in args.backends:
            for path, set_to_none in (("views", False), ("copy", True)):
                params, grads = make_params(n, args.tensors, args.device, spec in MATRIX_SPECS)
                opt = gradspec.Optimizer(params, spec, backend=backend, lr=1e-3)
                first, ms = time_steps(opt, params, grads, args.steps, args.device, set_to_none)
                rows.append((f"gradspec {spec} {backend} ({path})", ms, first, n_states))

        peer = PEERS.get(spec)
        if peer is not None:
            try:
                import pytorch_optimizer
            except ImportError:
                continue
            params, grads = make_params(n, args.tensors, args.device, spec in MATRIX_SPECS)
            groups = [{"params": params, "use_muon": True}] if spec == "muon" else params  # its Muon's protocol
            opt = getattr(pytorch_optimizer, peer)(groups, lr=1e-3)
            first, ms = time_steps(opt, params, grads, args.steps, args.device, True)
            rows.append((f"pytorch_optimizer.{peer}", ms, first, n_states))

    for label, ms, first, n_states in rows:
        roof_ms = roofline_bytes(label, n_states) * n / (bw * 1e9) * 1e3
        print(f"{label:<34}{ms:>9.2f}{ms / fused_ms:>9.2f}x{roof_ms:>13.2f}{ms / roof_ms:>8.2f}x{first:>14.2f}")


if __name__ == "__main__":
    main()
