"""Init remedies against the formulas they implement (variances within sampling tolerance)."""

import math

import pytest
import torch
from torch import nn

import gradmedic as gm
from gradmedic.remedies import (
    add_residual,
    fixup_,
    following_activations,
    forget_gate_bias_,
    he_,
    identity_recurrent_,
    lsuv_,
    orthogonal_,
    xavier_,
)

# The sample variance of N = 500k i.i.d. entries has relative standard error sqrt(2/N) = 0.2%
# (normal) or less (uniform); 3% is > 10 standard errors.
VAR_RTOL = 0.03


def var(t: torch.Tensor) -> float:
    return float(t.detach().double().var())


def two_layers(act: type[nn.Module]) -> nn.Sequential:
    return nn.Sequential(nn.Linear(1000, 500), nn.BatchNorm1d(500), act(), nn.Linear(500, 10))


@pytest.mark.parametrize("act,gain", [(nn.ReLU, math.sqrt(2)), (nn.Tanh, 5 / 3), (nn.Sigmoid, 1.0)])
def test_he_uses_the_following_activation(act, gain):
    torch.manual_seed(0)
    model = he_(two_layers(act))
    assert var(model[0].weight) == pytest.approx(gain**2 / 1000, rel=VAR_RTOL)
    assert var(model[3].weight) == pytest.approx(1 / 500, rel=0.1)  # output layer: linear gain; 5k entries
    assert float(model[0].bias.detach().abs().max()) == 0.0


@pytest.mark.parametrize("act,gain", [(nn.Tanh, 5 / 3), (nn.ReLU, math.sqrt(2)), (nn.Sigmoid, 1.0)])
def test_xavier_variance(act, gain):
    torch.manual_seed(0)
    model = xavier_(two_layers(act))
    assert var(model[0].weight) == pytest.approx(gain**2 * 2 / (1000 + 500), rel=VAR_RTOL)


def test_following_activation_found_by_running_the_model():
    class Defined(nn.Module):  # defined in one order, called in another
        def __init__(self):
            super().__init__()
            self.act = nn.Tanh()
            self.b = nn.Linear(4, 2)
            self.a = nn.Linear(3, 4)

        def forward(self, x):
            return self.b(self.act(self.a(x)))

    model = Defined()
    follows = following_activations(model, torch.randn(2, 3))
    assert follows[model.a] is model.act and follows[model.b] is None


def test_orthogonal_including_recurrent_gates():
    torch.manual_seed(0)
    model = nn.ModuleDict({"lin": nn.Linear(64, 64), "lstm": nn.LSTM(8, 16)})
    orthogonal_(model, gain=1.0)
    w = model["lin"].weight.detach().double()
    torch.testing.assert_close(w @ w.T, torch.eye(64, dtype=torch.float64), atol=1e-5, rtol=0)
    for block in model["lstm"].weight_hh_l0.detach().double().chunk(4):
        torch.testing.assert_close(block @ block.T, torch.eye(16, dtype=torch.float64), atol=1e-5, rtol=0)


def test_lsuv_reaches_unit_variance():
    torch.manual_seed(0)
    model = nn.Sequential(*(m for _ in range(6) for m in (nn.Linear(64, 64), nn.Tanh())), nn.Linear(64, 5))
    x = torch.randn(256, 64) * 3
    lsuv_(model, x, tol=0.1)
    outs = []
    hooks = [m.register_forward_hook(lambda mod, a, o: outs.append(float(o.var()))) for m in model
             if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    assert len(outs) == 7 and all(abs(v - 1) < 0.1 for v in outs), outs


def test_identity_recurrent_and_forget_bias():
    rnn = identity_recurrent_(nn.RNN(3, 5, nonlinearity="relu"))
    torch.testing.assert_close(rnn.weight_hh_l0.detach(), torch.eye(5))
    assert float(rnn.bias_hh_l0.detach().abs().max()) == 0.0
    lstm = forget_gate_bias_(nn.LSTM(3, 5, num_layers=2))
    for layer in (0, 1):
        total = getattr(lstm, f"bias_ih_l{layer}") + getattr(lstm, f"bias_hh_l{layer}")
        torch.testing.assert_close(total[5:10].detach(), torch.ones(5))  # gate order i, f, g, o
    with pytest.raises(gm.GradmedicError, match="no nn.RNN"):
        identity_recurrent_(nn.LSTM(3, 5))
    with pytest.raises(gm.GradmedicError, match="no LSTM"):
        forget_gate_bias_(nn.GRU(3, 5))


def test_fixup_makes_each_block_the_identity():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 3))
    model = add_residual(model, rezero=False)
    fixup_(model)
    x = torch.randn(4, 16)
    for block in model:
        if isinstance(block, gm.remedies.Residual):
            torch.testing.assert_close(block(x), x)
    with pytest.raises(gm.GradmedicError, match="no residual branch"):
        fixup_(nn.Linear(2, 2))
