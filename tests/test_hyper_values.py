"""Infinite hyperparameter values: accepted where the spec's default is that infinity (an
unbounded growth rate), refused everywhere else (an infinite lr is a mistake)."""
import math

import pytest
import torch

import gradspec

SPEC = """
optimizer capped_sgd
hyper lr = 0.1 >= 0
hyper cap = inf > 0
param' = param - lr * min(grad, cap)
"""


def _step(**hyper):
    p = torch.tensor([1.0, -2.0], requires_grad=True)
    opt = gradspec.Optimizer([p], gradspec.parse(SPEC), backend="eager", **hyper)
    p.grad = torch.tensor([3.0, -4.0])
    opt.step()
    return p.detach()


def test_an_infinite_default_is_a_value_the_optimizer_takes():
    assert torch.equal(_step(), torch.tensor([0.7, -1.6]))
    assert torch.equal(_step(cap=math.inf), torch.tensor([0.7, -1.6]))
    assert torch.equal(_step(cap=1.0), torch.tensor([0.9, -1.6]))


@pytest.mark.parametrize("hyper", [{"lr": math.inf}, {"cap": -math.inf}, {"cap": math.nan}])
def test_other_non_finite_values_are_refused(hyper):
    with pytest.raises(ValueError, match="must be a finite number"):
        _step(**hyper)
