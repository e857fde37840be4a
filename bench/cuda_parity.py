"""Every stdlib optimizer on one device, compiled against eager, and the checks' cost.

    python bench/cuda_parity.py --device cuda

For each stdlib optimizer (adaptors applied to adam): 30 steps of a small MLP in float32
with the compiled backend and with the eager one, from the same start and gradients;
prints the largest relative parameter difference and the compile count. Not a test:
the tests run on CPU; this is the check to run where a GPU is lent.
"""
from __future__ import annotations

import argparse
import time

import torch

import gradspec
from gradspec import stdlib


def train(spec, backend, device, steps=30):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 10)).to(device)
    data = torch.randn(256, 64, device=device)
    target = torch.randint(0, 10, (256,), device=device)
    opt = gradspec.Optimizer(model.parameters(), spec, backend=backend)

    def closure():  # specs with probes differentiate the loss themselves (see runtime/probes.py)
        opt.zero_grad()
        logits = model(data)
        loss = torch.nn.functional.cross_entropy(logits, target)
        if not opt.has_probes:
            loss.backward()
        return (loss, logits) if opt.has_probes else loss
    for _ in range(steps):
        opt.step(closure)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    start = time.perf_counter()
    for name in stdlib.names():
        gradspec.check(name)
    print(f"gradspec check of {len(stdlib.names())} stdlib specs: {time.perf_counter() - start:.2f} s")
    import torch._dynamo.utils as dynamo_utils
    worst = 0.0
    for name in stdlib.names():
        spec = f"{name}(adam)" if gradspec.load(name).kind == "adaptor" else name
        dynamo_utils.counters.clear()
        compiled = train(spec, "compiled", args.device)
        frames = dynamo_utils.counters["stats"]["unique_graphs"]
        eager = train(spec, "eager", args.device)
        rel = ((compiled - eager).abs().max() / eager.abs().max()).item()
        worst = max(worst, rel)
        print(f"{spec:<22} {args.device}: max |compiled - eager| / max|p| = {rel:.2e}, graphs compiled: {frames}")
    print(f"worst: {worst:.2e}")


if __name__ == "__main__":
    main()
