"""What probes cost in a training step: wall time per step (forward, backward, probes and the
update) of specs with probes against their base, next to the evaluations they declare.

    python bench/bench_probes.py --specs adam "deo(adam)" sophia sophia_g --steps 200

The model is an MLP classifier on a fixed random batch (no downloads); every spec trains the
same model from the same initialisation, and the first 20 steps (compilation) are not
timed. Figures printed are measured in this run: ms/step, the ratio to the first spec, and
closure calls / gradients / HVPs per step counted by the optimizer.
"""
from __future__ import annotations

import argparse
import time

import torch

import gradspec
from gradspec.compiler.cost import step_cost


def run(spec: str, args) -> dict:
    torch.manual_seed(0)
    widths = [args.inputs] + [args.width] * args.depth + [args.classes]
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.GELU()]
    model = torch.nn.Sequential(*layers[:-1]).to(args.device)
    data = torch.randn(args.batch, args.inputs, device=args.device)
    target = torch.randint(0, args.classes, (args.batch,), device=args.device)
    opt = gradspec.Optimizer(model.parameters(), spec, backend=args.backend, lr=1e-3)

    def closure():
        opt.zero_grad()
        logits = model(data)
        loss = torch.nn.functional.cross_entropy(logits, target)
        if not opt.has_probes:
            loss.backward()
            return loss
        return loss, logits

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        opt.step(closure)
    sync()
    before = opt.evaluations.as_dict()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = opt.step(closure)
    sync()
    elapsed = time.perf_counter() - start
    after = opt.evaluations.as_dict()
    counted = {k: (after[k] - before[k]) / args.steps for k in after}
    if not opt.has_probes:  # a plain closure's forward and backward, which the runtime does not see
        counted = {"closure_calls": 1.0, "gradients": 1.0, "hvps": 0.0}
    cost = step_cost(opt.spec)
    return {"spec": spec, "ms": 1e3 * elapsed / args.steps, "loss": float(loss.detach()),
            "params": sum(p.numel() for p in model.parameters()), "counted": counted,
            "declared": (cost.closure_calls, cost.gradients, cost.hvps)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--specs", nargs="+", default=["adam", "deo(adam)", "sophia", "sophia_g"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--inputs", type=int, default=256)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--backend", default="compiled")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    rows = [run(spec, args) for spec in args.specs]
    base = rows[0]["ms"]
    print(f"{rows[0]['params']} parameters, batch {args.batch}, {args.device}, backend {args.backend}, "
          f"{args.steps} timed steps")
    print(f"| spec | ms/step | vs {rows[0]['spec']} | closure calls/step | gradients/step | HVPs/step "
          f"| declared (calls, gradients, HVPs) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        c = r["counted"]
        declared = ", ".join(f"{x:g}" for x in r["declared"])
        print(f"| {r['spec']} | {r['ms']:.2f} | {r['ms'] / base:.2f}x | {c['closure_calls']:.2f} "
              f"| {c['gradients']:.2f} | {c['hvps']:.2f} | {declared} |")


if __name__ == "__main__":
    main()
