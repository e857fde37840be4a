"""Analytic landscapes: the induced-metric paper's five 2-D test functions, and a saddle.

The 2-D functions start where the paper's notebooks start and count as solved when the
loss (whose minimum is 0) is below the paper's tolerance; the headline metric is the
distance to the nearest global minimum. The saddle task measures escape: it starts a
hair away from a strict saddle whose one descent direction has small curvature.
"""
from __future__ import annotations

import math

from . import Problem, PureLoss, Task, add

# The functions take tensors and use their methods, so that defining (and listing) the tasks
# imports no torch: a problem imports it when it is built.


def beale(x, y):
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y ** 2) ** 2 + (2.625 - x + x * y ** 3) ** 2


def rosenbrock(x, y):
    return (1 - x) ** 2 + 100 * (y - x ** 2) ** 2


def himmelblau(x, y):
    return (x ** 2 + y - 11) ** 2 + (x + y ** 2 - 7) ** 2


def ackley(x, y):
    tau = 2 * math.pi
    r = (0.5 * (x ** 2 + y ** 2) + 1e-30).sqrt()  # + 1e-30: the gradient at the minimum is 0, not NaN
    return -20 * (-0.2 * r).exp() - (0.5 * ((tau * x).cos() + (tau * y).cos())).exp() + math.e + 20


def rastrigin(x, y):
    tau = 2 * math.pi
    return 20 + x ** 2 - 10 * (tau * x).cos() + y ** 2 - 10 * (tau * y).cos()


HIMMELBLAU_MINIMA = ((3.0, 2.0), (-2.805118, 3.131312), (-3.779310, -3.283186), (3.584428, -1.848126))

# name: (function, start, global minima, tolerance on the loss, plot bounds)
FUNCTIONS = {
    "beale": (beale, (0.0, 0.0), ((3.0, 0.5),), 1e-7, (-1.0, 4.5, -1.5, 2.0)),
    "rosenbrock": (rosenbrock, (0.0, 0.0), ((1.0, 1.0),), 1e-7, (-0.5, 1.5, -0.5, 1.5)),
    "himmelblau": (himmelblau, (0.0, 0.0), HIMMELBLAU_MINIMA, 1e-6, (-5.0, 5.0, -5.0, 5.0)),
    "ackley": (ackley, (2.0, 2.0), ((0.0, 0.0),), 1e-6, (-3.0, 3.0, -3.0, 3.0)),
    "rastrigin": (rastrigin, (2.0, 2.0), ((0.0, 0.0),), 1e-6, (-3.0, 3.0, -3.0, 3.0)),
}


def _two_d(name):
    function, start, minima, tolerance, bounds = FUNCTIONS[name]

    def make(seed: int, device: str) -> Problem:
        """The start is the paper's: a 2-D function has no randomness, so seeds agree."""
        import torch
        point = torch.nn.Parameter(torch.tensor(start, dtype=torch.float64, device=device))

        def loss(step):
            return function(point[0], point[1]), None

        def evaluate():
            with torch.no_grad():
                value = float(function(point[0], point[1]))
                distance = min(math.dist(point.tolist(), m) for m in minima)
            return {"eval_loss": value, "distance": distance, "solved": float(value <= tolerance)}

        return Problem([point], loss, evaluate, lambda: evaluate()["eval_loss"],
                       lambda: function(point[0], point[1]), lambda: tuple(point.tolist()),
                       PureLoss(lambda params, step: (function(params[0][0], params[0][1]), None)))

    return Task(name, make, f"{name.capitalize()} from {start} (the induced-metric paper's start), "
                            f"solved at loss <= {tolerance:g}",
                steps=1000, target=tolerance, metric="distance", eval_every=1000,
                surface={"f": function, "bounds": bounds, "minima": minima, "start": start})


for _name in FUNCTIONS:
    add(_two_d(_name))


def _saddle(seed: int, device: str) -> Problem:
    """A 10-D strict saddle at 0: curvatures 1..3 in nine directions, -0.2 in one (rotated
    away from the axes, the same rotation for every seed), with a quartic wall, so the two
    minima lie at loss -0.2^2 / 4 = -0.01. Seeds only move the start, 1e-6 from the saddle."""
    import torch
    rotation, _ = torch.linalg.qr(torch.randn(10, 10, generator=torch.Generator().manual_seed(1234),
                                              dtype=torch.float64))
    curvatures = torch.cat([torch.linspace(1.0, 3.0, 9, dtype=torch.float64), torch.tensor([-0.2],
                                                                                           dtype=torch.float64)])
    rotation, curvatures = rotation.to(device), curvatures.to(device)
    start = 1e-6 * torch.randn(10, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    theta = torch.nn.Parameter(start.to(device))

    def value_at(point):
        z = rotation.T @ point
        return 0.5 * (curvatures * z * z).sum() + 0.25 * z[-1] ** 4 + 0.25 * (z[:-1] ** 4).sum()

    def value():
        return value_at(theta)

    def evaluate():
        with torch.no_grad():
            z = rotation.T @ theta
            return {"eval_loss": float(value()), "escape": float(z[-1].abs())}

    return Problem([theta], lambda step: (value(), None), evaluate, lambda: evaluate()["eval_loss"], value,
                   pure=PureLoss(lambda params, step: (value_at(params[0]), None)))


add(Task("saddle", _saddle, "escape from a 10-D strict saddle with one flat-ish descent direction "
                            "(curvature -0.2); reached at loss <= -0.0095 (the minima are at -0.01)",
         steps=400, target=-0.0095, metric="eval_loss", eval_every=50))
