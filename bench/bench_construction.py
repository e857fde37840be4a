"""How long building an optimizer takes in a fresh process, and in the next one.

    python bench/bench_construction.py deo(adam) shampoo soap

Each spec is built (eager backend, a 4 x 3 model) in two processes that share one empty
cache folder, one after the other: the first pays the safety check (SymPy over every setting
of the switches) and leaves its verdict there, the second finds it. In each process a plain
sgd is built first, untimed, so that imports and the first lowering are not counted.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

_CHILD = """
import json, sys, time, torch, gradspec
model = torch.nn.Linear(4, 3)
gradspec.Optimizer(model.parameters(), "sgd", backend="eager")
seconds = {}
for name in sys.argv[1:]:
    start = time.perf_counter()
    gradspec.Optimizer(model.parameters(), name, backend="eager")
    seconds[name] = time.perf_counter() - start
print(json.dumps(seconds))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="+")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        env = dict(os.environ, GRADSPEC_CACHE_DIR=os.path.join(folder, "cache"))
        runs = [json.loads(subprocess.run([sys.executable, "-c", _CHILD, *args.specs], env=env, check=True,
                                          capture_output=True, text=True).stdout) for _ in range(2)]
    print(f"{'spec':<24} {'first process':>14} {'second process':>15}")
    for name in args.specs:
        print(f"{name:<24} {runs[0][name]:>13.3f}s {runs[1][name]:>14.3f}s")


if __name__ == "__main__":
    main()
