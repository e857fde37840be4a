"""Shampoo's cost, measured: its optimizer step against pytorch-optimizer's Shampoo at the same
refresh period, and its whole training step against Adam's on a small transformer.

    python bench/bench_shampoo_overhead.py step --params 2e6 --tensors 50 --every 1 100 --steps 200
    python bench/bench_shampoo_overhead.py train --width 256 --layers 4 --every 100 --steps 200

``step``: square matrices as ``gradspec bench`` makes them; gradspec's compiled ``shampoo`` and
``pytorch_optimizer.Shampoo`` with the same refresh period k (``preconditioning_compute_steps``;
pytorch-optimizer's default, 1, recomputes its SVD every step), stepped in turn. Each step is
sorted by whether it refreshed the inverse roots (ours at 1, k + 1, ...; pytorch-optimizer's at
k, 2k, ...): the table gives the median ordinary step, the median refresh step and the mean
over the run, which is what a training run pays per step.

``train``: a whole training step (zero_grad, forward, backward, step) of a decoder-only byte
transformer (gradspec.tasks.models.TinyTransformer) with gradspec's compiled adam, torch's fused
Adam and gradspec's shampoo in Distributed Shampoo's configuration (blocks of at most 1024,
filtering, Adam grafting, statistics EMA, roots refreshed every k steps), each training its own
copy of the model, one step of each in a rotating order. Distributed Shampoo reports at most 10%
per-step overhead over diagonal methods.

On a CPU the times are CPU seconds of this process (``time.process_time``: the machine is
shared, and the CPU time a step takes moves less with the others' load than its wall time); on
a GPU, wall time around synchronisations.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import gradspec


def clock(device: str):
    """Seconds for the device: CPU time on a CPU, synchronised wall time on a GPU."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


# ---- the optimizer step against pytorch-optimizer's Shampoo ----------------------------------

def square_params(n_params: int, n_tensors: int, device: str):
    side = int((n_params // n_tensors) ** 0.5)
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(side, side, generator=gen).to(device).requires_grad_() for _ in range(n_tensors)]
    grads = [(torch.randn(side, side, generator=gen) * 1e-3).to(device) for _ in range(n_tensors)]
    return params, grads


def stepper(opt, params, grads, device: str):
    def one() -> float:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        start = clock(device)
        opt.step()
        return clock(device) - start
    return one


def bench_step(args) -> None:
    from pytorch_optimizer import Shampoo as PoShampoo

    print(f"shampoo optimizer step: {args.params / 1e6:.1f}M fp32 parameters in {args.tensors} square "
          f"matrices, {args.device}, {torch.get_num_threads()} threads, {args.steps} steps each, interleaved; "
          f"{'CPU' if args.device == 'cpu' else 'wall'} ms")
    print("| refresh every k | optimizer | ordinary step ms | refresh step ms | mean ms/step |")
    print("| ---: | --- | ---: | ---: | ---: |")
    ratios = []
    for every in args.every:
        runs = {}
        for label, make in [
                ("gradspec shampoo (compiled)",
                 lambda p: gradspec.Optimizer(p, "shampoo", lr=1e-3, preconditioning_compute_steps=every,
                                              backend="compiled")),
                ("pytorch_optimizer.Shampoo", lambda p: PoShampoo(p, lr=1e-3, preconditioning_compute_steps=every))]:
            params, grads = square_params(int(args.params), args.tensors, args.device)
            runs[label] = (stepper(make(params), params, grads, args.device),
                           (lambda t: (t - 1) % every == 0) if label.startswith("gradspec") else
                           (lambda t: t % every == 0))
        runs["gradspec shampoo (compiled)"][0]()  # the compile of the refresh step (step 1) ...
        runs["gradspec shampoo (compiled)"][0]()  # ... and of the ordinary one (or the second refresh)
        skipped = 2
        samples = {label: [] for label in runs}
        order = list(runs)
        for i in range(args.steps):
            for label in order[i % 2:] + order[:i % 2]:
                one, refreshes = runs[label]
                t = i + 1 + (skipped if label.startswith("gradspec") else 0)
                samples[label].append((refreshes(t), one()))
        summary = {}
        for label, values in samples.items():
            plain = [s for refreshed, s in values if not refreshed]
            refresh = [s for refreshed, s in values if refreshed]
            summary[label] = (statistics.median(plain) if plain else None,
                              statistics.median(refresh) if refresh else None, statistics.mean(s for _, s in values))
            print(f"| {every} | {label} | " + " | ".join(_ms(x) for x in summary[label]) + " |")
        ours, theirs = summary["gradspec shampoo (compiled)"], summary["pytorch_optimizer.Shampoo"]
        ratios.append((every, *(None if a is None or b is None else b / a for a, b in zip(ours, theirs))))
    print("\npytorch-optimizer's time over ours (above 1: ours is faster)")
    print("| refresh every k | ordinary steps | refresh steps | mean per step |\n| ---: | ---: | ---: | ---: |")
    for every, *values in ratios:
        print(f"| {every} | " + " | ".join("-" if v is None else f"{v:.2f}x" for v in values) + " |")


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.2f}"


# ---- the whole training step against Adam ---------------------------------------------------

def bench_train(args) -> None:
    from gradspec.tasks.models import TinyTransformer

    torch.manual_seed(0)
    base = TinyTransformer(256, args.context, args.width, args.layers, args.heads).to(args.device)
    tokens = torch.randint(0, 256, (args.batch, args.context + 1), device=args.device)
    data, target = tokens[:, :-1], tokens[:, 1:]
    shampoo = dict(lr=1e-3, beta1=0.9, beta2=0.999, graft=True, weight_decouple=True, weight_decay=0.0,
                   max_preconditioner_dim=args.block, preconditioning_compute_steps=args.every)
    configurations = {
        "torch.optim.Adam fused": lambda p: torch.optim.Adam(p, lr=1e-3, fused=True),
        "gradspec adam (compiled)": lambda p: gradspec.Optimizer(p, "adam", lr=1e-3, backend="compiled"),
        f"gradspec shampoo, refresh every {args.every} (compiled)":
            lambda p: gradspec.Optimizer(p, "shampoo", backend="compiled", **shampoo),
    }
    runs = {}
    for label, make in configurations.items():
        model = copy.deepcopy(base)
        opt = make(model.parameters())

        def one(model=model, opt=opt) -> float:
            start = clock(args.device)
            opt.zero_grad()
            logits = model(data)
            torch.nn.functional.cross_entropy(logits.reshape(-1, 256), target.reshape(-1)).backward()
            opt.step()
            return clock(args.device) - start
        runs[label] = one
    warmup = 2  # gradspec shampoo compiles its refresh step at step 1 and its ordinary step at 2
    samples = {label: [] for label in runs}
    order = list(runs.items())
    for i in range(warmup + args.steps):
        for label, one in order[i % len(order):] + order[:i % len(order)]:
            seconds = one()
            if i >= warmup:
                samples[label].append(seconds)
    n = sum(p.numel() for p in base.parameters())
    shapes = sorted({tuple(p.shape) for p in base.parameters() if p.dim() >= 2}, reverse=True)
    print(f"TinyTransformer width {args.width}, {args.layers} layers, context {args.context}, batch {args.batch} "
          f"({n / 1e6:.2f}M parameters; matrices {', '.join('x'.join(map(str, s)) for s in shapes)}), "
          f"{args.device}, {torch.get_num_threads()} threads; {args.steps} training steps each, interleaved "
          f"(steps {warmup + 1} to {warmup + args.steps}); {'CPU' if args.device == 'cpu' else 'wall'} ms")
    adam = samples["gradspec adam (compiled)"]
    print("| optimizer | median ms/step | mean ms/step | median of per-round ratios to gradspec adam |\n"
          "| --- | ---: | ---: | ---: |")
    for label, values in samples.items():
        ratio = statistics.median(v / a for v, a in zip(values, adam))
        print(f"| {label} | {1e3 * statistics.median(values):.2f} | {1e3 * statistics.mean(values):.2f} | "
              f"{ratio:.3f}x |")
    # the refresh's cost, amortised over its period: each round pairs the steps taken together, so
    # the machine's drift cancels in a round's ratio; a refresh round's extra time is its cost
    label = next(label for label in samples if label.startswith("gradspec shampoo"))
    refresh = [r for r in range(args.steps) if (warmup + r) % args.every == 0]  # step t = warmup + r + 1
    ordinary = [samples[label][r] / adam[r] for r in range(args.steps) if r not in refresh]
    step_ratio = statistics.median(ordinary)
    extra = [samples[label][r] - step_ratio * adam[r] for r in refresh]
    line = f"\nshampoo over adam: ordinary steps {100 * (step_ratio - 1):+.1f}% (median of per-round ratios)"
    if extra:
        spread = statistics.mean(extra) / args.every / statistics.median(adam)
        line += (f"; a refresh step takes {1e3 * statistics.mean(extra):.0f} ms more, {100 * spread:.1f}% of an adam "
                 f"step once spread over its {args.every} steps: {100 * (step_ratio - 1 + spread):+.1f}% per step")
    print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    step = sub.add_parser("step", help="the optimizer step against pytorch-optimizer's Shampoo")
    step.add_argument("--params", type=float, default=2e6)
    step.add_argument("--tensors", type=int, default=50)
    step.add_argument("--every", type=int, nargs="+", default=[1, 100])
    step.add_argument("--steps", type=int, default=200)
    step.add_argument("--device", default="cpu")
    train = sub.add_parser("train", help="the whole training step against Adam on a transformer")
    train.add_argument("--width", type=int, default=256)
    train.add_argument("--layers", type=int, default=4)
    train.add_argument("--heads", type=int, default=4)
    train.add_argument("--context", type=int, default=64)
    train.add_argument("--batch", type=int, default=16)
    train.add_argument("--block", type=int, default=1024)
    train.add_argument("--every", type=int, default=100)
    train.add_argument("--steps", type=int, default=200)
    train.add_argument("--device", default="cpu")
    args = parser.parse_args()
    bench_step(args) if args.what == "step" else bench_train(args)


if __name__ == "__main__":
    main()
