"""ReDo recycling: the output is unchanged at the reset, the units come back, the optimizer forgets them."""

import pytest
import torch
from torch import nn

import gradmedic as gm
from gradmedic.remedies import RestartOnVanishing, dormant_units, recycle_
from tests.zoo import mlp


def dead_net():
    model = mlp(4, 32, nn.ReLU)
    with torch.no_grad():
        model[2].bias[:20] = -10.0  # 20 of 32 units of the second hidden layer never fire
    return model


def test_dormant_units_by_score():
    model = dead_net()
    x = torch.randn(128, 16)
    masks = dormant_units(model, x)[model[2]]
    assert bool(masks[:20].all())  # the 20 dead units; ReDo's tau-score may add a barely active one
    assert int(masks.sum()) <= 22
    assert int(dormant_units(model, x, tau=0.0)[model[2]].sum()) == 20  # tau 0: exactly the dead ones


def test_recycle_keeps_the_output_and_revives_units():
    torch.manual_seed(0)
    model = dead_net()
    x = torch.randn(128, 16)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    model(x).sum().backward()
    opt.step()
    before = model(x).detach()
    done = recycle_(model, x, optimizer=opt, tau=0.0)  # the dead units only: their output was exactly 0
    assert done["2"] == 20
    torch.testing.assert_close(model(x).detach(), before, rtol=0, atol=1e-6)  # same function at the reset
    assert float(model[4].weight.detach()[:, :20].abs().max()) == 0.0  # outgoing weights zeroed
    state = opt.state[model[2].weight]
    assert float(state["exp_avg"][:20].abs().max()) == 0.0 and float(state["exp_avg_sq"][:20].abs().max()) == 0.0
    assert int(dormant_units(model, x, tau=0.0)[model[2]][:20].sum()) == 0  # none of them is dead any more
    assert all(name != "8" for name in done)  # the output layer itself never


def test_restart_on_vanishing_after_patience():
    model = mlp(8, 32, nn.Sigmoid)
    x = torch.randn(64, 16)
    report = gm.check(model, x)
    assert report.of_kind("vanishing_gradients")
    policy = RestartOnVanishing(model, patience=2)
    assert policy.update(report) is False
    assert policy.update(report) is True and policy.restarts == 1
    with pytest.raises(gm.GradmedicError, match="patience"):
        RestartOnVanishing(model, patience=0)


def test_recycling_barely_active_units_moves_the_output_little():
    # at the default tau a unit with a little activity is recycled too: its mean output is folded into the
    # next layer's bias, so only its variation around the mean is lost
    torch.manual_seed(0)
    model = dead_net()
    x = torch.randn(128, 16)
    before = model(x).detach()
    recycle_(model, x)
    change = (model(x).detach() - before).abs().max() / before.abs().max()
    assert float(change) < 0.05
