"""Trends of a signal over a run, for the rules that warn before a failure: how fast a quantity grows, and when at
that rate it passes a threshold. The fit is a least-squares line through log10 of the signal against the step, over
the most recent measurements: a signal that grows geometrically (attention logits under a too-hot learning rate,
Adam's second moment decaying toward epsilon) is a straight line there, and its slope is the growth per step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Forecast", "forecast"]

# Points the fit needs: fewer make a slope out of noise (two points always fit a line).
MIN_POINTS = 4
# The fit reads the most recent points only: a signal's rate now, not averaged over a warmup long past.
WINDOW = 8


@dataclass(frozen=True)
class Forecast:
    """``factor_per_100``: how many times the signal grows every 100 steps at its recent rate (below 1: it falls);
    ``steps_to_threshold``: steps after ``last_step`` until it passes ``threshold`` at that rate (None when it does
    not head there); ``r2``: how straight the line is in log space (1 = exactly geometric)."""

    factor_per_100: float
    steps_to_threshold: float | None
    last_step: int
    last_value: float
    r2: float

    def says(self, name: str, threshold: float) -> str:
        """One clause a finding's message can carry."""
        rate = f"{name} grows x{self.factor_per_100:.2g} per 100 steps"
        if self.steps_to_threshold is None or self.steps_to_threshold < 1:
            return rate  # not heading there, or past it already (the finding says the value itself)
        return f"{rate}; at this rate it passes {threshold:.0e} in about {_round(self.steps_to_threshold)} steps"


def _round(steps: float) -> int:
    """Steps said to two significant figures: a forecast is not more precise than that."""
    if steps < 100:
        return int(round(steps))
    digits = int(math.floor(math.log10(steps))) - 1
    return int(round(steps, -digits))


def forecast(steps: np.ndarray, values: np.ndarray, threshold: float, window: int = WINDOW,
             below: bool = False) -> Forecast | None:
    """The recent trend of a positive signal measured at ``steps``, and when it passes ``threshold`` (from below; with
    ``below=True`` when it falls under it). None without MIN_POINTS finite, positive values in the window."""
    steps = np.asarray(steps, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    keep = np.isfinite(values) & (values > 0)
    steps, values = steps[keep][-window:], values[keep][-window:]
    if steps.size < MIN_POINTS or np.ptp(steps) == 0:
        return None
    y = np.log10(values)
    slope, intercept = np.polyfit(steps, y, 1)
    fitted = slope * steps + intercept
    spread = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum((y - fitted) ** 2)) / spread if spread > 0 else 1.0
    last_step, last_value = int(steps[-1]), float(values[-1])
    to_go = math.log10(threshold) - (slope * last_step + intercept)
    heading = (slope < 0 and to_go < 0) if below else (slope > 0 and to_go > 0)
    steps_to = float(to_go / slope) if heading else None
    if not below and to_go <= 0 or below and to_go >= 0:
        steps_to = 0.0  # already past it
    return Forecast(float(10 ** (100 * slope)), steps_to, last_step, last_value, r2)
