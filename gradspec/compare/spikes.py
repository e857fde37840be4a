"""Loss spikes: the metric of claims such as DEO's, that a method removes Adam's sudden jumps
in the training loss.

A spike is a step-to-step rise of the training loss above a threshold. Minibatch losses
rise and fall by some amount at every step, so the threshold is set from the runs being
compared, never per run: ``factor`` times the median absolute step-to-step change over all
of them (a robust scale of the ordinary noise), so that every variant is judged by the same
bar and a method cannot lower its own.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Sequence

FACTOR = 5.0


@dataclass(frozen=True)
class Spikes:
    """One run's spikes above a shared ``threshold``: how many, the largest rise, and the
    sum of the rises (how much loss the spikes cost)."""

    count: int
    largest: float
    total: float
    threshold: float


def rises(losses: Sequence[float]) -> list[float]:
    """Step-to-step changes of a loss curve (positive: the loss rose)."""
    return [b - a for a, b in zip(losses, losses[1:])]


def shared_threshold(runs: Sequence[Sequence[float]], factor: float = FACTOR) -> float:
    """``factor`` times the median absolute step-to-step change over every run."""
    changes = [abs(c) for losses in runs for c in rises(losses)]
    if not changes:
        raise ValueError("loss spikes need runs of at least two steps")
    return factor * statistics.median(changes)


def spikes(losses: Sequence[float], threshold: float) -> Spikes:
    """The rises of ``losses`` above ``threshold``."""
    above = [c for c in rises(losses) if c > threshold]
    return Spikes(len(above), max(above, default=0.0), sum(above), threshold)


def compare(runs: dict, factor: float = FACTOR) -> dict:
    """``{name: Spikes}`` for ``{name: losses}``, all against one threshold."""
    threshold = shared_threshold(list(runs.values()), factor)
    return {name: spikes(losses, threshold) for name, losses in runs.items()}
