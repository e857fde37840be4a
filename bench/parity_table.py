"""The parity table of the shape-aware and cross-group specs: each case of
tests/test_matrix_parity.py (MATRIX_CASES against the transcriptions of
tests/matrix_references.py, ELEMENTWISE against pytorch-optimizer's classes) trained for the
test's 120 float64 steps with each backend, and the largest relative difference printed as a
markdown table. The tests assert these differences stay under their tolerances; this prints
the measured values for notes and docs.

    python bench/parity_table.py [--backends eager,compiled] [--only SUBSTRING]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import test_matrix_parity as parity  # noqa: E402  (the test's own cases and helpers)
from test_matrix_references import relative_error, train  # noqa: E402


def _reference_name(case) -> str:
    reference = case.reference
    name = getattr(reference, "__name__", "")
    if name == "<lambda>":
        return "transcription (tests/matrix_references.py)"
    return f"transcription {name}" if reference.__module__ == "matrix_references" else name


def rows(backends, only):
    for i, case in enumerate(parity.MATRIX_CASES):
        if only and only not in case.spec:
            continue
        if not parity.in_stdlib(case.spec):
            yield case.spec, "not in the stdlib", {b: "-" for b in backends}
            continue
        theirs, _ = train(lambda p, case=case: case.reference(p, **case.hyper, **case.reference_only))
        errors = {}
        for backend in backends:
            ours, _ = train(parity.gradspec_optimizer(case.spec, backend, **parity._spec_hyper(case)))
            errors[backend] = f"{relative_error(ours, theirs):.1e}"
        yield f"{case.spec} {case.hyper}", _reference_name(case), errors
    for spec, peer, kw, _ in parity.ELEMENTWISE:
        if only and only not in spec:
            continue
        theirs, _ = parity._peer(peer, kw)
        errors = {}
        for backend in backends:
            ours, _ = train(parity.gradspec_optimizer(spec, backend, **kw))
            errors[backend] = f"{relative_error(ours, theirs):.1e}"
        yield f"{spec} {kw}", f"pytorch-optimizer {peer.__name__}", errors


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="eager,compiled")
    parser.add_argument("--only", default="", help="only cases whose spec contains this")
    args = parser.parse_args(argv)
    backends = args.backends.split(",")
    print("| case | reference | " + " | ".join(backends) + " |")
    print("| --- | --- | " + " | ".join("---:" for _ in backends) + " |")
    for case, reference, errors in rows(backends, args.only):
        print(f"| {case} | {reference} | " + " | ".join(errors[b] for b in backends) + " |", flush=True)


if __name__ == "__main__":
    main()
