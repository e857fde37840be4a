"""The ``gradspec`` command line: list, check, show, diff, docs, compare.

A bad spec is reported as located diagnostics and exit status 1, never as a traceback.
Each verb imports what it needs when it runs: the front end is light, but the checker
brings SymPy and the lowering torch (seconds between them), which ``--help``, ``list`` and
``show`` without ``--fx`` never use.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import textwrap

from . import __version__, stdlib
from .dsl import printer
from .dsl.errors import Diagnostic, SpecError
from .dsl.resolve import apply_adaptor, load


DTYPES = ["float16", "bfloat16", "float32", "float64"]
"""The parameter dtypes a spec is checked and costed for."""

MOST_PARAMETERS = 1e11
"""More than any one machine holds in fp32 (400 GB): a larger --params is a typo."""


def _parameter_count(text: str) -> float:
    try:
        count = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= count <= MOST_PARAMETERS:  # NaN fails too
        raise argparse.ArgumentTypeError(f"a parameter count from 1 to {MOST_PARAMETERS:.0e}, not {text}")
    return count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gradspec", description="Optimizers as checked, compiled specs.")
    parser.add_argument("--version", action="version", version=f"gradspec {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True)

    verbs.add_parser("list", help="stdlib specs, one line each")

    p = verbs.add_parser("check", help="parse and check specs; exit 1 with located errors")
    p.add_argument("specs", nargs="*", help="stdlib names, spec expressions or .opt files")
    p.add_argument("--all", action="store_true", help="check every stdlib spec")
    p.add_argument("--json", action="store_true", help="diagnostics as JSON, for editors and CI")
    p.add_argument("--dtype", choices=DTYPES, help="also warn about constants that vanish in this dtype")

    p = verbs.add_parser("diff", help="where two specs' update rules differ, in terms of the maths")
    p.add_argument("a")
    p.add_argument("b")

    p = verbs.add_parser("docs", help="generate the stdlib reference (docs/stdlib.md)")
    p.add_argument("--out", default="docs/stdlib.md")
    p.add_argument("--check", action="store_true", help="exit 1 if the file is not up to date")

    p = verbs.add_parser("show", help="a spec's source (comments included), expanded body, or FX graphs")
    p.add_argument("spec")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--expanded", action="store_true",
                      help="the resolved body: variants applied, adaptors expanded (the default for expressions)")
    form.add_argument("--fx", action="store_true", help="the torch.fx graph of one step")
    form.add_argument("--python", action="store_true", help="the Python code of that graph")
    form.add_argument("--latex", action="store_true", help="the equations, one per statement")
    form.add_argument("--cost", action="store_true",
                      help="model evaluations and bytes moved per step, at the default hyperparameters")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="parameter dtype for --cost's bytes")

    p = verbs.add_parser("compare", help="train variants on a built-in task over seeds: table, CSV, plots, report")
    p.add_argument("specs", nargs="+", help="stdlib names, spec expressions, .opt files; or comparison files (.toml)")
    p.add_argument("--task", help="a built-in task (gradspec list) or path/to/file.py:function")
    p.add_argument("--steps", type=int, help="training steps per run (default: the task's)")
    p.add_argument("--seeds", type=int, help="seeds per variant (default 3)")
    p.add_argument("--lr-grid", type=float, nargs="+", help="pick each variant's lr on the validation loss first")
    p.add_argument("--no-vmap", action="store_true",
                   help="train an --lr-grid one rate at a time even where it could be one vmapped run "
                        "(both agree to rounding; the report says which ran)")
    p.add_argument("--lr", type=float, help="one learning rate for every variant (default: each spec's own)")
    p.add_argument("--backend", default="eager", choices=["eager", "compiled"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--sharpness", action="store_true", help="report the top Hessian eigenvalue at the end")
    p.add_argument("--workers", type=int, default=1,
                   help="train this many runs at once in local worker processes (default 1: one after another "
                        "in this process); results are the same either way")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="train the runs as tasks on a Ray cluster: auto, ray://HOST:10001, or local to start one "
                        "here (pip install 'gradspec[ray]')")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per run (default 1, wherever the run trains, so that results do not "
                        "depend on --workers)")
    p.add_argument("--smooth", type=int, default=1,
                   help="plot the training loss as a moving average over this many steps (the CSV keeps the raw "
                        "values; default 1: unsmoothed)")
    p.add_argument("--out", help="write runs.csv, evals.csv, loss_vs_step.png, loss_vs_time.png (trajectories.png "
                                 "for 2-D functions) and report.md here")
    p.add_argument("--results", help="with comparison files: run them all and write this results page")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = verbs.add_parser("bench", help="step speed vs torch.optim, pytorch-optimizer and the memory roofline")
    p.add_argument("specs", nargs="+")
    p.add_argument("--params", type=_parameter_count, default=10e6, help="parameters in all (default 1e7)")
    p.add_argument("--tensors", type=int, default=50)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=20, help="timed steps (median) after 4 untimed")
    p.add_argument("--backends", nargs="+", default=["compiled", "eager"], choices=["compiled", "eager"])
    p.add_argument("--compile-tensors", type=int, nargs="*",
                   help="also time cold and warm compiles in fresh processes, for these tensor counts")
    p.add_argument("--no-peers", action="store_true", help="skip pytorch-optimizer")
    p.add_argument("--json", help="write every measurement to this file")

    args = parser.parse_args(argv)
    try:
        return {"list": _list, "check": _check, "show": _show, "diff": _diff, "docs": _docs,
                "compare": _compare, "bench": _bench}[args.verb](args)
    except SpecError as error:
        print(error.render(), file=sys.stderr)
        return 1
    except OSError as error:
        print(f"gradspec: {error}", file=sys.stderr)
        return 1


def _list(args) -> int:
    rows = []
    for name in stdlib.names():
        spec = load(name)
        kind = "adaptor" if spec.kind == "adaptor" else "optimizer"
        rows.append((name, kind, first_sentence(spec.doc or "")))
    width = max(len(r[0]) for r in rows)
    for name, kind, summary in rows:
        print(_hanging(f"{name:<{width}}  {kind:<9}  ", summary))
    from . import tasks
    print("\nbuilt-in tasks (gradspec compare SPEC... --task NAME):")
    width = max(len(n) for n in tasks.names())
    for name in tasks.names():
        task = tasks.get(name)
        print(_hanging(f"{name:<{width}}  {task.steps:>5} steps  ", task.description))
    return 0


def first_sentence(doc: str) -> str:
    """The doc's first sentence, whole: its first paragraph's lines joined (a line that ends
    in a hyphen joins without a space), up to the first full stop that ends a sentence."""
    paragraph = doc.strip().split("\n\n")[0]
    text = ""
    for line in (line.strip() for line in paragraph.splitlines()):
        text += line if text.endswith("-") or not text else " " + line
    end = re.search(r"[.!?](?=\s+[A-Z(]|$)", text)
    return text[:end.end()] if end else text


def _hanging(prefix: str, text: str) -> str:
    """``prefix`` then ``text`` wrapped at word breaks to the terminal's width, later lines
    indented under the text's start (never cut mid-word or mid-sentence)."""
    columns = max(shutil.get_terminal_size((100, 24)).columns, len(prefix) + 30)
    return textwrap.fill(text, columns, initial_indent=prefix, subsequent_indent=" " * len(prefix),
                         break_on_hyphens=False)


def _check(args) -> int:
    from .check import Examined, examine
    names = list(args.specs) + (stdlib.names() if args.all else [])
    if not names:
        print("gradspec check: name specs to check, or --all", file=sys.stderr)
        return 2
    failed, report = 0, []
    for name in names:
        try:
            examined = examine(name, args.dtype)
        except OSError as error:
            examined = Examined([Diagnostic("GS000", str(error))], [])
        found = examined.diagnostics
        errors = [d for d in found if d.severity == "error"]
        failed += bool(errors)
        report.append({"spec": name, "ok": not errors, "diagnostics": [d.as_dict() for d in found],
                       "laws": [{"law": o.claim, "message": o.message, "status": o.status} for o in examined.laws]})
        if not args.json:
            for d in found:
                print(d.render(), file=sys.stderr)
            if not errors or examined.laws:
                print(_check_summary(name, not errors, examined.laws))
    if args.json:
        print(json.dumps(report, indent=2))
    return 1 if failed else 0


_LAW_WORDS = {"proved": "proved", "unproven": "not proven", "refuted": "refuted", "invalid": "invalid"}


def _check_summary(name: str, ok: bool, outcomes: list) -> str:
    """``adam: ok, 2 laws proved``, then one indented line per law: its outcome, the claim as
    written and the law's own words."""
    verdict = "ok" if ok else "failed"
    if not outcomes:
        return f"{name}: {verdict}, no laws declared" if ok else f"{name}: {verdict}"
    counts = {}
    for outcome in outcomes:
        counts[_LAW_WORDS[outcome.status]] = counts.get(_LAW_WORDS[outcome.status], 0) + 1
    tally = ", ".join(f"{n} {'law' if n == 1 else 'laws'} {word}" for word, n in counts.items())
    lines = [f"{name}: {verdict}, {tally}"]
    width = max(len(_LAW_WORDS[o.status]) for o in outcomes)
    for outcome in outcomes:
        words = f" \N{EM DASH} {outcome.message}" if outcome.message else ""
        lines.append(_hanging(f"  {_LAW_WORDS[outcome.status]:<{width}}  ", outcome.claim + words))
    return "\n".join(lines)


def _diff(args) -> int:
    from .symbolic.diff import diff
    a, b = load(args.a), load(args.b)
    differences, only = diff(a, b)
    for d in differences:
        print(d.render(args.a, args.b))
    for line in only:
        print(line)
    return 0 if all(d.equal for d in differences) and not only else 1


def _docs(args) -> int:
    from .docs import stdlib_reference
    text = stdlib_reference()
    if args.check:
        try:
            with open(args.out) as handle:
                current = handle.read()
        except OSError:
            current = None
        if current != text:
            print(f"{args.out} is stale: run `gradspec docs`", file=sys.stderr)
            return 1
        return 0
    with open(args.out, "w") as handle:
        handle.write(text)
    print(f"wrote {args.out}")
    return 0


def _show(args) -> int:
    spec = load(args.spec)
    if args.latex:
        from .compiler.ir import build_probing
        from .symbolic import latex
        if spec.kind == "adaptor":
            spec = apply_adaptor(spec, load("sgd"))
        print(latex.render(build_probing(spec)))
        return 0
    if args.cost:
        if spec.kind == "adaptor":
            spec = apply_adaptor(spec, load("sgd"))
        print(_cost_text(spec, args.dtype))
        return 0
    if not (args.fx or args.python):
        is_file = stdlib.source(args.spec) is not None or args.spec.endswith(".opt")
        print(spec.source.text.rstrip() if is_file and not args.expanded else printer.spec(spec))
        return 0
    if spec.kind == "adaptor":
        print(f"gradspec show: '{spec.name}' is an adaptor; show it applied, as {spec.name}(adam)", file=sys.stderr)
        return 1
    import torch
    from .compiler.ir import build, build_probing
    from .compiler.lower import lower_step
    from .compiler.lowerer import BucketShape
    from .symbolic.simplify import rewritten, simplified
    shapes = [BucketShape(numel=1024, ntensors=4, dtype=torch.float32)]
    written = build(spec)
    candidate = rewritten(written)
    used = simplified(written)
    counts = [sum(len(g.graph.nodes) for g in (gs.scalar, gs.main))
              for gs in (lower_step(p, shapes) for p in (written, candidate or written))]
    print(f"# IR nodes: {len(written.nodes())} as written, "
          f"{len(candidate.nodes()) if candidate else 'n/a'} after SymPy cse and folding; "
          f"FX nodes: {counts[0]} before, {counts[1]} after; "
          f"compiled: {'the SymPy form' if used is not written else 'as written (not smaller)'}\n")
    graphs = lower_step(used, shapes)
    phases = [("scalar phase", graphs.scalar), ("elementwise phase, one bucket", graphs.main)]
    if written.probe_periods:  # the step where every probe runs is its own graph
        probing = lower_step(simplified(build_probing(spec)), shapes)
        phases.append(("elementwise phase on a step where every probe runs (probe results are inputs)",
                       probing.main))
    for title, graph in phases:
        print(f"# {title}: {len(graph.graph.nodes)} FX nodes")
        print(graph.code.strip() if args.python else graph.graph)
        print()
    return 0


def _bench(args) -> int:
    from . import bench
    for spec in args.specs:
        if any(type(item).__name__ == "Probe" and item.model for _, item in load(spec).items):
            print(f"gradspec bench: {spec} evaluates the model in its probes; time it with a model: "
                  "python bench/bench_probes.py --specs ...", file=sys.stderr)
            return 2
    if args.tensors < 1 or args.params < args.tensors:
        print("gradspec bench: --tensors must be >= 1 and --params at least the tensor count", file=sys.stderr)
        return 2
    return bench.main(args)


def _compare(args) -> int:
    from . import compare
    files = [s for s in args.specs if s.endswith(".toml")]
    if files and len(files) != len(args.specs):
        print("gradspec compare: give either comparison files or specs, not both", file=sys.stderr)
        return 2
    execution = {"workers": args.workers, "ray": args.ray, "threads": args.threads}
    try:
        if args.results:
            if not files:
                print("gradspec compare: --results takes comparison files (.toml)", file=sys.stderr)
                return 2
            compare.write_results(files, args.results, progress=not args.quiet, smooth=args.smooth, **execution)
            print(f"wrote {args.results}")
            return 0
        if files:  # several files with --out: one folder each, named after the file
            outs = [args.out if len(files) == 1 or not args.out else
                    os.path.join(args.out, os.path.splitext(os.path.basename(f))[0]) for f in files]
            results = [compare.run_file(f, out, not args.quiet, args.steps, args.seeds, vmap=not args.no_vmap,
                                        smooth=args.smooth, **execution)
                       for f, out in zip(files, outs)]
        else:
            if not args.task:
                print("gradspec compare: --task is required (see gradspec list)", file=sys.stderr)
                return 2
            for spec in args.specs:  # every spec is sound before any training starts
                load(spec)
            outs = [args.out]
            results = [compare.compare(args.specs, args.task, args.steps, 3 if args.seeds is None else args.seeds,
                                       args.lr_grid, args.lr, args.backend, args.device, args.sharpness, args.out,
                                       not args.quiet, vmap=not args.no_vmap, smooth=args.smooth, **execution)]
    except ValueError as error:
        print(f"gradspec compare: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:  # a run that cannot go on (sophia_g on a task without logits)
        print(f"gradspec compare: {error}", file=sys.stderr)
        return 1
    for result, out in zip(results, outs):
        title = result.settings.get("title")
        print((f"## {title}\n\n" if title else "") + f"task {result.task.name}: {result.task.description}\n")
        print(result.table())
        for v in result.verdicts:
            print(f"- {v.verdict} ({v.at}): {v.expectation}: {v.detail}")
        for note in compare.report.lr_dependence(result.verdicts):
            print(f"- note: {note}")
        for warning in result.warnings:
            print(f"gradspec compare: warning: {warning}", file=sys.stderr)
        if out:
            print(f"\nwrote {_and(result.files)} under {out}")
        print()
    return 0


def _and(names: list) -> str:
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else "".join(names)


def _cost_text(spec, dtype: str) -> str:
    import torch
    from .compiler.cost import step_cost
    itemsize = getattr(torch, dtype).itemsize
    cost = step_cost(spec)
    lines = [f"{spec.name}: per step, averaged over the probe periods, at the default hyperparameters",
             f"  closure calls (forward passes)   {cost.closure_calls:g}",
             f"  gradients (backward passes)      {cost.gradients:g}",
             f"  Hessian-vector products          {cost.hvps:g}"]
    for probe in cost.probes:
        calls = "; ".join(f"{name}: {c} closure call, {g} gradient, {h} HVP" for name, c, g, h in probe.calls
                          if c or g or h)
        # an ``every k { }`` block (a preconditioner refresh) evaluates no model: it is no probe
        lines.append(f"  probe every {probe.period} steps: {calls}" if calls else
                     f"  every {probe.period} steps: periodic work, no model evaluation")
    if cost.differentiates_gradient:
        lines.append("  on probe steps the gradient is taken with create_graph=True (exact HVPs)")
    lines.append(f"  optimizer memory traffic, a step without probes: {cost.elements_moved * itemsize} bytes per "
                 f"parameter ({cost.elements_moved} {dtype} buffers read or written)")
    if cost.probes:
        lines.append(f"    on a step where every periodic block runs {cost.elements_moved_probing * itemsize} bytes "
                     "per parameter")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
