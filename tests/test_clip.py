"""Clipping against hand-computed results on small tensors."""

import math

import numpy as np
import pytest
import torch

import gradmedic as gm
from gradmedic.remedies import AutoClip, adaptive_clip_grad_, clip_


def param(weight, grad):
    p = torch.nn.Parameter(torch.tensor(weight, dtype=torch.float64))
    p.grad = torch.tensor(grad, dtype=torch.float64)
    return p


def test_agc_by_hand():
    # rows of w have norms 5 and 1; lambda = 0.1 allows gradient norms 0.5 and 0.1
    w = param([[3.0, 4.0], [0.0, 1.0]], [[0.3, 0.4], [10.0, 0.0]])
    # a zero bias: its norm is raised to eps = 1e-3, so it allows 1e-4; the gradient (norm 5) shrinks to that
    b = param([0.0, 0.0], [3.0, 4.0])
    adaptive_clip_grad_([w, b], clip_factor=0.1, eps=1e-3)
    torch.testing.assert_close(w.grad, torch.tensor([[0.3, 0.4], [0.1, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(b.grad, torch.tensor([6e-5, 8e-5], dtype=torch.float64))


def test_autoclip_uses_the_percentile_of_the_history():
    clipper = AutoClip(percentile=10)
    p = param([1.0], [0.0])
    for norm in (1.0, 10.0, 100.0, 1000.0):
        p.grad = torch.tensor([norm], dtype=torch.float64)
        returned = clip_([p], mode="autoclip", autoclip=clipper)
        assert float(returned) == pytest.approx(norm)
    # 10th percentile of [1, 10, 100, 1000], linear interpolation: 1 + 0.3 * (10 - 1) = 3.7
    assert float(p.grad) == pytest.approx(3.7)
    assert clipper.threshold() == pytest.approx(float(np.percentile([1, 10, 100, 1000], 10)))


def test_norm_and_value_modes():
    a, b = param([1.0, 1.0], [3.0, 0.0]), param([1.0], [4.0])
    total = clip_([a, b], mode="norm", max_norm=1.0)
    assert float(total) == pytest.approx(5.0)
    norm_after = math.sqrt(float(a.grad.square().sum() + b.grad.square().sum()))
    assert norm_after == pytest.approx(1.0, rel=1e-5)
    c = param([1.0, 1.0], [3.0, -0.5])
    clip_(c, mode="value", clip_value=1.0)
    torch.testing.assert_close(c.grad, torch.tensor([1.0, -0.5], dtype=torch.float64))
    skip = torch.nn.Parameter(torch.ones(2))  # grad None: skipped, no error
    clip_([skip, c], mode="agc")


@pytest.mark.parametrize("kwargs,match", [
    ({"mode": "fancy"}, "Argument mode should be one of"),
    ({"mode": "autoclip"}, "Argument autoclip should be an AutoClip"),
    ({"mode": "norm", "max_norm": 0}, "Argument max_norm"),
])
def test_bad_modes(kwargs, match):
    with pytest.raises(gm.GradmedicError, match=match):
        clip_(param([1.0], [1.0]), **kwargs)
