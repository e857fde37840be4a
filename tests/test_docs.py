"""The docs stay true: every complete spec in docs/language.md parses and checks."""
import pathlib
import re

import pytest
import torch

import gradspec

LANGUAGE = pathlib.Path(__file__).parent.parent / "docs" / "language.md"
BLOCKS = re.findall(r"```gradspec\n(.*?)```", LANGUAGE.read_text(), re.S)


def test_the_reference_has_examples():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("text", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_every_spec_in_the_language_reference_checks_and_runs(text):
    spec = gradspec.check(gradspec.parse(text, "docs/language.md"))
    if spec.kind == "adaptor":
        from gradspec.dsl.resolve import apply_adaptor
        spec = apply_adaptor(spec, gradspec.load("adam"))
    param = torch.ones(4, dtype=torch.float64, requires_grad=True)
    opt = gradspec.Optimizer([param], spec, backend="eager")
    if opt.has_probes:  # a closure over a quadratic whose gradient at the ones is 0.5
        opt.step(lambda: 0.25 * (param ** 2).sum())
    else:
        param.grad = torch.full_like(param, 0.5)
        opt.step(loss=torch.tensor(1.0))
    assert not torch.equal(param.detach(), torch.ones(4, dtype=torch.float64))
