"""Specs that nest far deeper than Python's recursion limit: each is checked and built (or
refused with a located SpecError), and computes what it says."""
import sys

import pytest
import torch

import gradspec
from gradspec.recursion import MAX_DEPTH

HEAD = "optimizer deep\nhyper lr = 0.5 > 0\n"
# Without gradspec.recursion (walkers on the calling thread, Python's default limit of 1,000
# frames) a RecursionError came at a 248-term sum, 243 unary minuses, 325 nots and a 138-deep
# definition chain; the sizes below are 3 to 12 times those, and test_deeper_than_the_limit
# parses MAX_DEPTH (20,000) levels.


def _step(text: str, grad: torch.Tensor) -> torch.Tensor:
    param = torch.nn.Parameter(torch.zeros_like(grad))
    opt = gradspec.Optimizer([param], gradspec.parse(text), backend="eager")
    param.grad = grad.clone()
    opt.step()
    return param.detach()


GRAD = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)


def test_three_thousand_term_sum():
    text = HEAD + "d = " + " + ".join(["grad"] * 3_000) + "\nparam' = param - lr * d\n"
    gradspec.check(gradspec.parse(text))
    assert torch.allclose(_step(text, GRAD), -0.5 * 3_000 * GRAD, rtol=1e-12)


def test_a_thousand_unary_minuses_and_nots():
    minus = HEAD + "d = " + "-" * 1001 + "grad\nparam' = param - lr * d\n"
    assert torch.equal(_step(minus, GRAD), 0.5 * GRAD)  # an odd count: -grad
    nots = HEAD + "hyper flip = true\nd = where(" + "not " * 1000 + "flip, grad, 0)\nparam' = param - lr * d\n"
    gradspec.check(gradspec.parse(nots))
    assert torch.equal(_step(nots, GRAD), -0.5 * GRAD)  # an even count: flip itself


def test_fifteen_hundred_deep_definition_chain():
    lines = ["d0 = grad"] + [f"d{i} = d{i - 1} + 1" for i in range(1, 1501)]
    text = HEAD + "\n".join(lines) + "\nparam' = param - lr * d1500\n"
    gradspec.check(gradspec.parse(text))
    assert torch.allclose(_step(text, GRAD), -0.5 * (GRAD + 1500), rtol=1e-12)


def test_deeper_than_the_limit_is_a_located_error():
    text = HEAD + "d = " + " + ".join(["grad"] * (MAX_DEPTH + 10)) + "\nparam' = param - lr * d\n"
    with pytest.raises(gradspec.SpecError) as error:
        gradspec.parse(text)
    assert (error.value.code, error.value.line) == ("GS009", 3)
    assert error.value.hint


def test_the_recursion_limit_is_restored():
    before = sys.getrecursionlimit()
    gradspec.check(gradspec.parse(HEAD + "d = " + "-" * 1000 + "grad\nparam' = param - lr * d\n"))
    assert sys.getrecursionlimit() == before


def test_errors_keep_their_type_across_the_deep_thread():
    with pytest.raises(gradspec.SpecError) as error:
        gradspec.parse(HEAD + "param' = param - lr * grad $\n")
    assert error.value.code == "GS001"


@pytest.mark.parametrize("link, by_hand", [
    ("d{i} * d{i} / (1 + d{i} * d{i})", lambda d: d * d / (1 + d * d)),
    ("d{i} / (1 + tensor.norm(d{i}))", lambda d: d / (1 + d.norm())),
])
def test_a_chain_that_doubles_as_a_tree_builds_and_computes_what_it_says(link, by_hand):
    """Each link reads the one before twice: 40 links are 2^40 nodes as a tree. SymPy's
    arithmetic and the rewrite's count walk trees; building the optimizer took 36 s at 18
    links and never ended at 40. The rewrite now stops at its tree limit and keeps the spec
    as written."""
    from gradspec.compiler.ir import build
    from gradspec.symbolic.simplify import WORK_BUDGET, _decide
    from gradspec.symbolic.translate import TooLarge, Translator, outputs
    links = 40
    text = HEAD + "d0 = grad\n" + "".join(f"d{i + 1} = " + link.format(i=i) + "\n" for i in range(links)) + \
        f"param' = param - lr * d{links}\n"
    program = build(gradspec.parse(text))
    with pytest.raises(TooLarge):
        outputs(program, Translator(program, tree_limit=10 * WORK_BUDGET))
    assert _decide(program) == {"kept": True}
    expected = GRAD
    for _ in range(links):
        expected = by_hand(expected)
    torch.testing.assert_close(_step(text, GRAD), -0.5 * expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("link, by_hand", [
    ("d{i} * d{i}", lambda d: d * d),
    ("where(d{i} > 0, d{i}, -d{i})", torch.abs),
])
def test_the_range_analysis_walks_a_chain_as_a_graph(link, by_hand):
    """The checker's ranges: a product's factors are counted over the graph (d * d took over
    25 s to check at 23 links, as a tree of 2^23 factors), and the facts that nested where
    branches gather are kept only below the node they are about (12 links took 17 s, the
    subtree being looked up under each of 2^n sets of facts). 40 links check and compute."""
    links = 40
    text = HEAD + "d0 = grad\n" + "".join(f"d{i + 1} = " + link.format(i=i) + "\n" for i in range(links)) + \
        f"param' = param - lr * d{links}\n"
    gradspec.check(gradspec.parse(text))  # raises SpecError on any error
    expected = GRAD
    for _ in range(links):
        expected = by_hand(expected)
    torch.testing.assert_close(_step(text, GRAD), -0.5 * expected, rtol=1e-12, atol=0)
