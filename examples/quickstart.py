"""Train a small MLP on a synthetic two-moons-style task with a stdlib spec and print its loss.

    python examples/quickstart.py                    # adam, compiled
    python examples/quickstart.py "lookahead(sgd(momentum=0.9))" --backend eager --lr 0.1
"""
import argparse
import math

import torch

import gradspec


def two_spirals(n: int, generator: torch.Generator):
    """Points on two interleaved spirals, labelled by spiral: a small task that needs a hidden layer."""
    t = torch.rand(n, generator=generator) * 3 * math.pi
    label = torch.randint(0, 2, (n,), generator=generator)
    sign = 1 - 2 * label.float()
    x = torch.stack([sign * t * torch.cos(t), sign * t * torch.sin(t)], 1) / (3 * math.pi)
    return x + 0.02 * torch.randn(n, 2, generator=generator), label


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("spec", nargs="?", default="adam")
    parser.add_argument("--backend", default="compiled", choices=["compiled", "eager"])
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    x, y = two_spirals(1024, generator)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64),
                                torch.nn.Tanh(), torch.nn.Linear(64, 2))
    opt = gradspec.Optimizer(model.parameters(), args.spec, backend=args.backend, lr=args.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for step in range(1, args.steps + 1):
        loss = opt.step(closure)
        scheduler.step()
        if step % 50 == 0 or step == 1:
            accuracy = (model(x).argmax(1) == y).float().mean()
            print(f"step {step:4d}  loss {loss.item():.4f}  accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
