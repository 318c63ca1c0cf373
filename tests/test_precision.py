"""Loss scaling: float16 gradients flush to zero without it and survive with it."""

import pytest
import torch
from torch import nn

import gradmedic as gm
from gradmedic.remedies import ScaledStep, clip_


def small_loss_grads(scale: float) -> torch.Tensor:
    """First-layer weight gradient of a float16 model given a tiny loss, computed with the loss scaled by
    ``scale`` and the gradient divided by it again in float32 (what GradScaler automates)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)).half()
    x = torch.randn(32, 16).half()
    # a loss whose gradient per output (1e-9 / 32) is far below float16's smallest subnormal (6e-8)
    loss = model(x).float().mean() * 1e-9
    (loss * scale).backward()
    return model[0].weight.grad.float() / scale


def test_without_scaling_float16_gradients_flush_to_zero():
    plain = small_loss_grads(1.0)
    scaled = small_loss_grads(2.0**24)  # GradScaler grows its scale to such values by itself
    assert float((plain == 0).float().mean()) == 1.0
    assert float((scaled == 0).float().mean()) < 0.01
    # and the scaled gradients are right: the same computation in float64
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)).half().double()
    x = torch.randn(32, 16).half().double()
    (ref(x).mean() * 1e-9).backward()
    torch.testing.assert_close(scaled.double(), ref[0].weight.grad, rtol=0.05, atol=1e-14)


def test_scaled_step_trains_under_autocast():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    before = model[0].weight.detach().clone()
    stepper = ScaledStep(torch.optim.SGD(model.parameters(), lr=0.1))
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(torch.randn(16, 8)).float().square().mean()
    stepper.step(loss)
    assert not torch.equal(model[0].weight, before)
    assert all(p.grad is None for p in model.parameters())  # zeroed after the step


def test_scaled_step_unscales_before_clipping():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: look at the gradients the clip saw
    seen = []

    def clip(params):
        seen.append(float(clip_(params, mode="norm", max_norm=1e9)))

    stepper = ScaledStep(opt, clip=clip, init_scale=1024.0)
    x = torch.ones(2, 4)
    stepper.step(model(x).sum())
    expected = float(torch.cat([torch.full((4,), 2.0), torch.tensor([2.0])]).norm())  # unscaled norm
    assert seen == [pytest.approx(expected)]
    with pytest.raises(gm.GradmedicError, match="float32"):
        ScaledStep(torch.optim.SGD(nn.Linear(2, 2).half().parameters(), lr=0.1))
