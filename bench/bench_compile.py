"""Compile time of a spec's step: cold (empty Inductor cache) and warm (on-disk cache), each in
a fresh process, for a given number of tensors.

    python bench/bench_compile.py adam --tensors 10 1000
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

CHILD = """
import time, torch, gradspec
params = [torch.randn(1000, requires_grad=True) for _ in range({tensors})]
for p in params:
    p.grad = torch.randn_like(p)
opt = gradspec.Optimizer(params, {spec!r}, backend="compiled")
t0 = time.perf_counter(); opt.step(); print(time.perf_counter() - t0)
"""


def first_step_seconds(spec: str, tensors: int, cache_dir: str) -> float:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir)
    out = subprocess.run([sys.executable, "-c", CHILD.format(spec=spec, tensors=tensors)],
                         env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("specs", nargs="*", default=["adam"])
    parser.add_argument("--tensors", type=int, nargs="+", default=[10, 1000])
    args = parser.parse_args()
    print(f"{'spec':<24}{'tensors':>8}{'cold s':>9}{'warm s':>9}")
    for spec in args.specs:
        for tensors in args.tensors:
            with tempfile.TemporaryDirectory() as cache:
                cold = first_step_seconds(spec, tensors, cache)
                warm = first_step_seconds(spec, tensors, cache)
            print(f"{spec:<24}{tensors:>8}{cold:>9.2f}{warm:>9.2f}")


if __name__ == "__main__":
    main()
