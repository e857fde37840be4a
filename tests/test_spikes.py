"""The loss-spike measure that DEO's claim is judged by."""
import pytest

from gradspec.compare import spikes


def test_spikes_are_rises_above_one_threshold_shared_by_every_run():
    smooth = [3.0 - 0.01 * t + (0.005 if t % 2 else -0.005) for t in range(100)]
    spiky = list(smooth)
    spiky[40] += 0.5
    spiky[70] += 0.3
    result = spikes.compare({"adam": spiky, "deo(adam)": smooth})
    assert result["adam"].threshold == result["deo(adam)"].threshold
    assert result["adam"].count == 2
    assert result["adam"].largest == pytest.approx(0.5 + 0.01 - 0.01, abs=0.02)
    assert result["deo(adam)"].count == 0 and result["deo(adam)"].largest == 0.0
    assert result["adam"].total == pytest.approx(sum(c for c in spikes.rises(spiky) if c > result["adam"].threshold))


def test_a_run_cannot_lower_its_own_bar():
    """A noisier run does not raise the threshold for itself alone: the median is pooled."""
    quiet = [1.0] * 50
    noisy = [1.0 + (0.2 if t % 2 else 0.0) for t in range(50)]
    alone = spikes.spikes(noisy, spikes.shared_threshold([noisy]))
    pooled = spikes.compare({"quiet": quiet, "noisy": noisy})["noisy"]
    assert alone.count == 0
    assert pooled.threshold < alone.threshold


def test_too_short_runs_are_refused():
    with pytest.raises(ValueError, match="at least two steps"):
        spikes.shared_threshold([[1.0]])
