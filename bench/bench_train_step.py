"""A whole training step (zero_grad, forward, backward, optimizer step) with torch.optim's
fused Adam and with gradspec's compiled adam, under both ``zero_grad`` modes, interleaved.

    python bench/bench_train_step.py --width 1024 --depth 9 --batch 32 --steps 30
    python bench/bench_train_step.py --width 64 --depth 500 --steps 30   # 1,000 parameter tensors

``gradspec bench`` times the optimizer step alone. Under torch's default
``zero_grad(set_to_none=True)`` backward hands out fresh gradients, which a hook copies into
gradspec's flat buffer as they arrive; under ``set_to_none=False`` backward adds into the
zeroed buffer in place (on a GPU the step copies fresh gradients in one multi-tensor launch
instead of a hook per tensor: the 1,000-tensor model shows whether any per-tensor launch is
left). Either way the cost sits in backward, not in the step, so the
question is one for the whole step: this script answers it on an MLP (no downloads). Each configuration trains
its own copy of the same model; one step of each is taken in turn, in a rotating order, so
the machine's drift and any first-in-turn effect fall on all of them alike, and the median
is printed with its ratio to fused Adam.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import gradspec


def mlp(args) -> torch.nn.Module:
    torch.manual_seed(0)
    widths = [args.width] * (args.depth + 1)
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.GELU()]
    return torch.nn.Sequential(*layers[:-1]).to(args.device)


def trainer(model, opt, set_to_none: bool, data, target, device: str):
    def one() -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=set_to_none)
        torch.nn.functional.mse_loss(model(data), target).backward()
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start
    return one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=9)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    base = mlp(args)
    data = torch.randn(args.batch, args.width, device=args.device)
    target = torch.randn(args.batch, args.width, device=args.device)
    configurations = {}

    def ours(params):
        return gradspec.Optimizer(params, "adam", lr=1e-4, backend="compiled")

    for label, make, set_to_none in [
            ("torch.optim.Adam fused, set_to_none=True", lambda p: torch.optim.Adam(p, lr=1e-4, fused=True), True),
            ("gradspec adam, set_to_none=True (hook copies in)", ours, True),
            ("gradspec adam, set_to_none=False (in place)", ours, False)]:
        model = copy.deepcopy(base)
        configurations[label] = trainer(model, make(model.parameters()), set_to_none, data, target, args.device)
    samples = {label: [] for label in configurations}
    order = list(configurations.items())
    for i in range(args.steps + 3):  # the first steps compile and warm up: not kept
        for label, one in order[i % len(order):] + order[:i % len(order)]:  # who goes first rotates
            seconds = one()
            if i >= 3:
                samples[label].append(seconds)
    params = sum(p.numel() for p in base.parameters())
    print(f"MLP {args.depth} x {args.width}^2 ({params / 1e6:.1f}M parameters), batch {args.batch}, "
          f"{args.device}, {torch.get_num_threads()} threads, median of {args.steps} interleaved steps")
    reference = statistics.median(next(iter(samples.values())))
    print("| configuration | ms/step | vs fused Adam |\n| --- | ---: | ---: |")
    for label, values in samples.items():
        ms = statistics.median(values)
        print(f"| {label} | {1e3 * ms:.2f} | {ms / reference:.2f}x |")


if __name__ == "__main__":
    main()
