"""Hypothesis mutates stdlib specs, token by token and subtree by subtree: whatever comes
out, parsing and checking it either succeeds or raises SpecError, never anything else."""
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradspec
from gradspec import stdlib
from gradspec.check import diagnose

SOURCES = [stdlib.source(n) for n in stdlib.names()]
# Example counts: a subtree mutation is well-formed, so each is checked in full (laws proven
# by SymPy, ~0.1 s); 50 of them and 100 token mutations keep the fast suite fast.
TOKEN = re.compile(r'"""(?:.|\n)*?"""|"[^"\n]*"|[A-Za-z_][A-Za-z_0-9]*|[0-9.]+(?:e-?[0-9]+)?|\S')
FRAGMENTS = ["0", "-1", "1e-30", "grad", "param'", "m'", "step", "sqrt(grad)", "log(0)", "(", ")", "{", "}",
             "=", "'", "global.sum(grad)", "tensor.norm(m)", "where(step > 1, 1, 0)", "^", "/", "law", "at",
             "given", "equals adam", "state", "hyper", "if", "true", "in [1, 0]", "base.grad", "%", "->"]
EXPRESSIONS = ["0", "1 / grad", "sqrt(grad)", "grad^0.5", "log(step - 1)", "lr / (1 - beta1)", "m'",
               "global.sum(grad) / global.norm(grad)", "where(grad > 0, grad, -grad)", "max(v, 0)"]


def _check(text):
    try:
        diagnose(gradspec.parse(text))
    except gradspec.SpecError:
        pass


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SOURCES), st.data())
def test_token_mutations_only_raise_spec_errors(source, data):
    tokens = [(m.start(), m.end()) for m in TOKEN.finditer(source)]
    text = source
    for _ in range(data.draw(st.integers(1, 3))):
        tokens = [(m.start(), m.end()) for m in TOKEN.finditer(text)]
        start, end = data.draw(st.sampled_from(tokens))
        action = data.draw(st.sampled_from(["delete", "duplicate", "replace"]))
        piece = text[start:end]
        new = "" if action == "delete" else piece + " " + piece if action == "duplicate" else \
            data.draw(st.sampled_from(FRAGMENTS))
        text = text[:start] + new + text[end:]
    _check(text)


@settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SOURCES), st.data())
def test_subtree_mutations_only_raise_spec_errors(source, data):
    """Replace the right-hand side of a statement by another expression: well-formed text
    whose names, types, scopes, safety or laws may now be wrong."""
    lines = source.splitlines()
    targets = [i for i, line in enumerate(lines) if re.match(r"\s*[A-Za-z_.']+\s*=\s*\S", line)
               and not line.lstrip().startswith(("hyper", "optimizer"))]
    if not targets:
        return
    index = data.draw(st.sampled_from(targets))
    left = lines[index].split("=", 1)[0]
    lines[index] = left + "= " + data.draw(st.sampled_from(EXPRESSIONS))
    _check("\n".join(lines))
