"""``gradspec.check``: everything that can be known about a spec before its first step."""
from __future__ import annotations

import itertools

from .compiler.ir import build
from .dsl.errors import SpecError
from .dsl.resolve import Spec, load


def check(spec: Spec | str) -> Spec:
    """Resolve ``spec`` and build its IR under every setting of its boolean switches, so that
    an error hidden in a branch not taken by default is found too. Raises SpecError with all
    diagnostics; returns the resolved spec when it is sound. Adaptors are checked applied to
    ``sgd``, the simplest base."""
    spec = load(spec) if isinstance(spec, str) else spec
    if spec.kind == "adaptor":
        from .dsl.resolve import apply_adaptor
        spec_to_build = apply_adaptor(spec, load("sgd"))
    else:
        spec_to_build = spec
    switches = [n for n, h in spec_to_build.hypers.items() if h.kind == "bool"]
    diagnostics, seen = [], set()
    for values in itertools.product((False, True), repeat=len(switches)):
        setting = {**spec_to_build.hyper_defaults, **dict(zip(switches, values))}
        try:
            build(spec_to_build, setting)
        except SpecError as error:
            for d in error.diagnostics:
                key = (d.code, d.message, d.line, d.column)
                if key not in seen and d.code != "GS043":  # a require failing is a setting, not a bug
                    seen.add(key)
                    diagnostics.append(d)
    if diagnostics:
        raise SpecError(diagnostics)
    return spec
