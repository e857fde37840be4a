"""Peak and steady memory of an optimizer's first steps, against torch.optim's fused Adam.

    python bench/bench_memory.py --params 25e6 --tensors 100

Each configuration runs in a fresh process: the parameters and their gradients are made,
the step's kernel is compiled on a tiny model first (so compiling is not counted), the
process's peak resident memory is reset (``/proc/self/clear_refs``; glibc's mmap threshold
is fixed, so freed tensors leave the resident size), then the optimizer is
built and stepped three times. Printed: the peak during the first step and the memory held
after the third, both above the parameters and gradients, in MB and in bytes per parameter,
with the ratio of the whole (parameters, gradients and optimizer) to fused Adam's. On a GPU
(``--device cuda``) the figures are ``torch.cuda.max_memory_allocated`` and
``memory_allocated`` instead. Linux only, for the CPU figures.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CONFIGURATIONS = {
    "torch.optim.Adam fused": "torch.optim.Adam(params, lr=1e-3, fused=True)",
    "gradspec adam (aliases, the default)": "gradspec.Optimizer(params, 'adam', lr=1e-3)",
}

_CHILD = """
import json, torch, gradspec
device = {device!r}

def resident():
    if device != "cpu":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    kb = lambda name: int(fields[name].split()[0]) * 1024
    return kb("VmRSS"), kb("VmHWM")

def reset_peak():
    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

def make(n, tensors):
    size = n // tensors
    params = [torch.randn(size, device=device).requires_grad_() for _ in range(tensors)]
    for p in params:
        p.grad = torch.randn_like(p)
    return params

params = make(1024, 2)  # compiles the kernel the measured step reuses (its graph is length-free)
opt = {build}
opt.step()
del opt, params
params = make({params}, {tensors})
held_before, _ = resident()
reset_peak()
opt = {build}
opt.step()
_, peak = resident()
for _ in range(2):
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
held_after, _ = resident()
print(json.dumps({{"peak": peak - held_before, "held": held_after - held_before}}))
"""


def measure(build: str, params: int, tensors: int, device: str) -> dict:
    code = _CHILD.format(device=device, build=build, params=params, tensors=tensors)
    # a fixed mmap threshold: glibc otherwise raises it after the first large free, serves
    # later tensors from its heap and keeps their pages when they are freed, so the resident
    # size would count memory the program released
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=25e6)
    parser.add_argument("--tensors", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    n = int(args.params)
    results = {label: measure(build, n, args.tensors, args.device) for label, build in CONFIGURATIONS.items()}
    base = 8 * n  # fp32 parameters and gradients, held by every configuration
    reference = results["torch.optim.Adam fused"]
    print(f"{n / 1e6:.1f}M fp32 parameters in {args.tensors} tensors on {args.device}; memory above the "
          f"parameters and gradients ({base / 1e6:.0f} MB), and the whole as a ratio to fused Adam's")
    print("| optimizer | first-step peak MB (B/param) | whole vs fused | held after 3 steps MB (B/param) | whole vs fused |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, r in results.items():
        print(f"| {label} | {r['peak'] / 1e6:.0f} ({r['peak'] / n:.1f}) | {(base + r['peak']) / (base + reference['peak']):.3f}x "
              f"| {r['held'] / 1e6:.0f} ({r['held'] / n:.1f}) | {(base + r['held']) / (base + reference['held']):.3f}x |")


if __name__ == "__main__":
    main()
