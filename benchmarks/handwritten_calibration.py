"""The numbers issue 28's rule changes would be calibrated on, read from gm.check's trace on every entry of the
hand-written corpus (tests/handwritten.py), at init and after ``STEPS`` Adam steps: per entry the smallest and the
largest grad/weight of a layer (embeddings and layers whose weights are exactly zero left out), the profile's
worst vanishing measure (geometric mean of signal and grad/weight relative to the reference, as
gradmedic.diagnosis.depth reads it) and the end-to-end backward signal ratio.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/handwritten_calibration.py > benchmarks/handwritten_calibration.md
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gradmedic as gm  # noqa: E402
from gradmedic.diagnosis.rules.depth import _profile  # noqa: E402
from tests.handwritten import ENTRIES, STEPS  # noqa: E402


def _numbers(report) -> dict:
    trace = report.trace
    roles = trace.meta.get("roles", {})
    gw = {k: v for k, v in trace.last("grad_to_weight").items()
          if math.isfinite(v) and v > 0 and roles.get(k) not in ("embedding", "block", "norm")}
    lo = min(gw, key=gw.get) if gw else None
    hi = max(gw, key=gw.get) if gw else None
    profile = _profile(trace)
    worst = signal = math.nan
    if profile is not None:
        _, _, b, g, _, _ = profile
        worst, signal = float(np.sqrt(b * g).min()), float(b[0])
    return {"min_gw": (lo, gw.get(lo, math.nan)), "max_gw": (hi, gw.get(hi, math.nan)), "worst": worst,
            "signal": signal}


def main() -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    print("| entry | expected | when | smallest grad/weight | largest grad/weight | profile worst sqrt(b*g) | "
          "first/reference signal |")
    print("|---|---|---|---|---|---|---|")
    for entry in ENTRIES:
        model, inputs, kwargs = entry.build()
        for when, steps in (("init", 0), (f"steps={STEPS}", STEPS)):
            n = _numbers(gm.check(model, inputs, steps=steps, **kwargs))
            expect = entry.at_init if steps == 0 else entry.after_steps
            print(f"| {entry.name} | {expect} | {when} | {n['min_gw'][1]:.1e} ({n['min_gw'][0]}) | "
                  f"{n['max_gw'][1]:.1e} ({n['max_gw'][0]}) | {n['worst']:.1e} | {n['signal']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
