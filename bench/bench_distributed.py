"""The optimizer step under FSDP2, gradspec against torch.optim, on every rank's shards.

    torchrun --nproc_per_node 2 bench/bench_distributed.py --params 4000000 --tensors 20 --specs adam lamb

Each rank holds 1/world of every tensor (FSDP2's fully_shard). The gradients are set once
and only ``opt.step()`` is timed (median of --steps after 5 warm-up steps), so the figure is
the optimizer's own cost: for gradspec, the copy of the shards into its flat buffers and
back (docs/distributed.md), the fused step and, for lamb, the all-reduce of the per-tensor
norms inside the compiled graph. torch.optim.Adam (foreach; fused has no DTensor support on
CPU) is the reference, and gradspec on one process with the same local sizes is shown
next to it, so the cost of sharding is visible.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import gradspec


def model(params: int, tensors: int):
    torch.manual_seed(0)
    rows = max(1, params // tensors // 1024)
    layers = torch.nn.ModuleList(torch.nn.Linear(1024, rows, bias=False) for _ in range(tensors))
    for layer in layers:
        fully_shard(layer)
    return layers


def timed(opt, steps: int) -> float:
    for _ in range(5):
        opt.step()
    times = []
    for _ in range(steps):
        dist.barrier()
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=int, default=4_000_000)
    parser.add_argument("--tensors", type=int, default=20)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--specs", nargs="+", default=["adam", "lamb"])
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rows = []
    for label, make in [("torch.optim.Adam foreach", lambda ps: torch.optim.Adam(ps, foreach=True))] + [
            (f"gradspec {spec}", lambda ps, spec=spec: gradspec.Optimizer(ps, spec)) for spec in args.specs]:
        layers = model(args.params, args.tensors)
        params = list(layers.parameters())
        for p in params:
            p.grad = torch.randn_like(p)
        rows.append((label, timed(make(params), args.steps)))
        local = [torch.nn.Parameter(p.to_local().clone()) for p in params]  # the same shards, unsharded
        for p in local:
            p.grad = torch.randn_like(p)
        if label.startswith("gradspec"):
            rows.append((label + ", one process, local sizes", timed(make(local), args.steps)))
    if dist.get_rank() == 0:
        numel = sum(p.numel() for p in params)
        print(f"{numel / 1e6:.1f}M parameters in {args.tensors} tensors, sharded over {dist.get_world_size()} ranks")
        for label, ms in rows:
            print(f"  {label:48s} {ms:8.2f} ms/step  ({ms / rows[0][1]:.2f}x torch.optim)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
