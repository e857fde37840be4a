"""The ``gradspec`` command line: list, check, show.

A bad spec is reported as located diagnostics and exit status 1, never as a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys

from . import stdlib
from .check import check
from .compiler.ir import build
from .compiler.lower import BucketShape, lower_step
from .dsl import printer
from .dsl.errors import SpecError
from .dsl.resolve import load


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gradspec", description="Optimizers as checked, compiled specs.")
    verbs = parser.add_subparsers(dest="verb", required=True)

    verbs.add_parser("list", help="stdlib specs, one line each")

    p = verbs.add_parser("check", help="parse and check specs; exit 1 with located errors")
    p.add_argument("specs", nargs="*", help="stdlib names, spec expressions or .opt files")
    p.add_argument("--all", action="store_true", help="check every stdlib spec")
    p.add_argument("--json", action="store_true", help="diagnostics as JSON, for editors and CI")

    p = verbs.add_parser("show", help="a spec's source (comments included), expanded body, or FX graphs")
    p.add_argument("spec")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--expanded", action="store_true",
                      help="the resolved body: variants applied, adaptors expanded (the default for expressions)")
    form.add_argument("--fx", action="store_true", help="the torch.fx graph of one step")
    form.add_argument("--python", action="store_true", help="the Python code of that graph")

    args = parser.parse_args(argv)
    try:
        return {"list": _list, "check": _check, "show": _show}[args.verb](args)
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
        summary = (spec.doc or "").split("\n")[0]
        kind = "adaptor" if spec.kind == "adaptor" else "optimizer"
        rows.append((name, kind, summary))
    width = max(len(r[0]) for r in rows)
    for name, kind, summary in rows:
        print(f"{name:<{width}}  {kind:<9}  {summary}")
    return 0


def _check(args) -> int:
    names = list(args.specs) + (stdlib.names() if args.all else [])
    if not names:
        print("gradspec check: name specs to check, or --all", file=sys.stderr)
        return 2
    failed, report = 0, []
    for name in names:
        try:
            check(name)
            report.append({"spec": name, "ok": True, "diagnostics": []})
            if not args.json:
                print(f"{name}: ok")
        except SpecError as error:
            failed += 1
            report.append({"spec": name, "ok": False, "diagnostics": [d.as_dict() for d in error.diagnostics]})
            if not args.json:
                print(error.render(), file=sys.stderr)
        except OSError as error:
            failed += 1
            report.append({"spec": name, "ok": False, "diagnostics": [{"code": "GS000", "message": str(error)}]})
            if not args.json:
                print(f"{name}: {error}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2))
    return 1 if failed else 0


def _show(args) -> int:
    spec = load(args.spec)
    if not (args.fx or args.python):
        is_file = stdlib.source(args.spec) is not None or args.spec.endswith(".opt")
        print(spec.source.text.rstrip() if is_file and not args.expanded else printer.spec(spec))
        return 0
    if spec.kind == "adaptor":
        print(f"gradspec show: '{spec.name}' is an adaptor; show it applied, as {spec.name}(adam)", file=sys.stderr)
        return 1
    import torch
    graphs = lower_step(build(spec), [BucketShape(numel=1024, ntensors=4, dtype=torch.float32)])
    for title, graph in (("scalar phase", graphs.scalar), ("elementwise phase, one bucket", graphs.main)):
        print(f"# {title}: {len(graph.graph.nodes)} FX nodes")
        print(graph.code.strip() if args.python else graph.graph)
        print()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
