"""Gradients the step copies into its flat buffer (assigned by hand, or on a GPU, where no
per-tensor hook runs in backward) never write into a gradient someone kept."""
import torch

import gradspec


def test_a_kept_gradient_does_not_change_when_the_step_copies_a_new_one_in():
    torch.manual_seed(0)
    params = [torch.randn(4, requires_grad=True), torch.randn(3, requires_grad=True)]
    opt = gradspec.Optimizer(params, "sgd", backend="eager", lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    kept = [p.grad for p in params]  # views of the flat buffer after a step
    snapshot = [g.clone() for g in kept]
    for p in params:
        p.grad = torch.full_like(p, 7.0)  # a new gradient, assigned by hand
    before = [p.detach().clone() for p in params]
    opt.step()
    for g, s in zip(kept, snapshot):
        assert torch.equal(g, s)
    for p, b in zip(params, before):
        assert torch.allclose(p, b - 0.7)
        assert torch.equal(p.grad, torch.full_like(p, 7.0))
