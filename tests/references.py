"""Plain-PyTorch transcriptions shared by the parity tests (never generated from a spec)."""
import torch


class Lion(torch.optim.Optimizer):
    """Lion as the paper writes it (Chen et al. 2023, Program 1)."""

    def __init__(self, params, lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                m = self.state[p].setdefault("m", torch.zeros_like(p))
                c = group["beta1"] * m + (1 - group["beta1"]) * p.grad
                p -= group["lr"] * (torch.sign(c) + group["weight_decay"] * p)
                m.mul_(group["beta2"]).add_((1 - group["beta2"]) * p.grad)
