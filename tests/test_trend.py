"""The trend fit against hand-derived geometric signals."""

import math

import numpy as np
import pytest

from gradmedic.diagnosis.rules._trend import forecast


def test_a_geometric_signal_reads_its_rate_and_the_step_it_passes_a_threshold():
    steps = np.arange(0, 400, 50)
    values = 3.0 * 1.8 ** (steps / 100)  # x1.8 per 100 steps, by construction
    f = forecast(steps, values, threshold=1e4)
    assert f.factor_per_100 == pytest.approx(1.8, rel=1e-9)
    # 3 * 1.8^(s/100) = 1e4  <=>  s = 100 * log(1e4/3) / log(1.8); minus the last step (350)
    assert f.steps_to_threshold == pytest.approx(100 * math.log(1e4 / 3) / math.log(1.8) - 350, rel=1e-9)
    assert f.r2 == pytest.approx(1.0)
    assert "x1.8 per 100 steps" in f.says("the max attention logit", 1e4)


def test_a_falling_signal_does_not_head_up_and_reaches_a_floor_from_above():
    steps = np.arange(10)
    values = 2.0 ** -steps.astype(float)
    assert forecast(steps, values, threshold=10.0).steps_to_threshold is None
    f = forecast(steps, values, threshold=2.0 ** -20, below=True)
    assert f.steps_to_threshold == pytest.approx(11.0)


def test_too_few_points_or_non_positive_values_give_no_forecast():
    assert forecast(np.arange(3), np.ones(3), 10.0) is None
    assert forecast(np.arange(6), np.array([0, -1, np.nan, 1, 2, np.inf]), 10.0) is None


def test_a_signal_past_its_threshold_gets_no_countdown():
    """Adam's margin already below 1 and still shrinking: "falls below 1e+00 in about 0 steps" said nothing."""
    steps = np.arange(0, 800, 100)
    f = forecast(steps, 1e-3 * 0.93 ** (steps / 100), 1.0, below=True)
    assert f is not None and f.factor_per_100 == pytest.approx(0.93, rel=1e-6)
    assert f.says("it", 1.0) == "it grows x0.93 per 100 steps"
