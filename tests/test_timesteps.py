"""Time-step probe: per-step RMS of dL/dx_t against autograd.grad with respect to the input."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import gradmedic as gm
from gradmedic.probes import TimeStepProbe
from gradmedic.probes.timesteps import SERIES


def per_step_rms(g: torch.Tensor, time_axis: int) -> np.ndarray:
    dims = tuple(d for d in range(g.dim()) if d != time_axis)
    return g.double().square().mean(dim=dims).sqrt().numpy()


@pytest.mark.parametrize("cls", [nn.RNN, nn.LSTM, nn.GRU])
@pytest.mark.parametrize("batch_first", [False, True])
def test_series_matches_input_gradient(cls, batch_first):
    torch.manual_seed(0)
    rnn = cls(3, 8, num_layers=2, batch_first=batch_first)
    x = torch.randn(4, 12, 3) if batch_first else torch.randn(12, 4, 3)
    time_axis = 1 if batch_first else 0

    def loss_of(out):
        last = out[:, -1] if batch_first else out[-1]
        return last.square().sum()  # loss at the last step only

    x_req = x.clone().requires_grad_()
    (want,) = torch.autograd.grad(loss_of(copy.deepcopy(rnn)(x_req)[0]), [x_req])

    mon = gm.Monitor(rnn, probes=[TimeStepProbe()])
    loss_of(rnn(x)[0]).backward()
    mon.step()
    steps, values = mon.trace.series(SERIES)[""]
    np.testing.assert_allclose(values[0], per_step_rms(want, time_axis), rtol=1e-5)
    assert mon.trace.last("time_grad_ratio")[""] == pytest.approx(values[0][0] / values[0][-1])


def test_unrolled_cell_call_index_is_time():
    torch.manual_seed(0)
    cell = nn.RNNCell(2, 5)
    xs = torch.randn(6, 3, 2)

    def unroll(c, inputs):
        h = torch.zeros(3, 5)
        for x in inputs:
            h = c(x, h)
        return h.sum()

    x_req = xs.clone().requires_grad_()
    (want,) = torch.autograd.grad(unroll(copy.deepcopy(cell), x_req.unbind(0)), [x_req])
    mon = gm.Monitor(cell, probes=[TimeStepProbe()])
    unroll(cell, xs.unbind(0)).backward()
    mon.step()
    _, values = mon.trace.series(SERIES)[""]
    np.testing.assert_allclose(values[0], per_step_rms(want, 0), rtol=1e-5)


def test_upstream_gradients_are_unchanged():
    # input that requires grad (from an embedding): the probe must not cut or change the graph
    torch.manual_seed(0)
    model = nn.Sequential()
    emb, lstm = nn.Embedding(10, 4), nn.LSTM(4, 6, batch_first=True)
    tokens = torch.randint(0, 10, (2, 7))

    def loss(e, r):
        return r(e(tokens))[0][:, -1].sum()

    ref_e, ref_r = copy.deepcopy(emb), copy.deepcopy(lstm)
    loss(ref_e, ref_r).backward()
    model.add_module("emb", emb)
    model.add_module("lstm", lstm)
    mon = gm.Monitor(model, probes=[TimeStepProbe()])
    loss(emb, lstm).backward()
    mon.step()
    torch.testing.assert_close(emb.weight.grad, ref_e.weight.grad, rtol=0, atol=0)
    assert "lstm" in mon.trace.series(SERIES)


def test_tanh_rnn_decay_is_visible():
    torch.manual_seed(0)
    rnn = nn.RNN(1, 32, batch_first=True)
    with torch.no_grad():
        rnn.weight_hh_l0.mul_(0.5)  # contracting recurrence: gradients vanish through time
    mon = gm.Monitor(rnn, probes=[TimeStepProbe()])
    rnn(torch.randn(8, 60, 1))[0][:, -1].sum().backward()
    mon.step()
    assert mon.trace.last("time_grad_ratio")[""] < 1e-6


@pytest.mark.parametrize("input_requires_grad", [False, True])
def test_check_without_a_copy_reads_the_per_step_gradient(input_requires_grad):
    """``gm.check`` (steps=0) takes the gradients with ``torch.autograd.grad`` over the parameters, which computes
    no gradient for an input the probe made a leaf: the per-step series must still be read (it was missing, and the
    finding said "the first of None time steps"). Checked against autograd on the input (float64, rtol 1e-6)."""

    class LastStep(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(3)
            self.rnn, self.out = nn.RNN(2, 16, batch_first=True).double(), nn.Linear(16, 1).double()

        def forward(self, x):
            return self.out(self.rnn(x)[0][:, -1]).squeeze(-1)

    model = LastStep()
    x = torch.randn(8, 40, 2, dtype=torch.float64).requires_grad_(input_requires_grad)
    y = torch.randn(8, dtype=torch.float64)
    report = gm.check(model, x, y)
    steps, series = report.trace.series("time_grad_rms")["rnn"]
    leaf = x.detach().requires_grad_()
    (grad,) = torch.autograd.grad(nn.functional.mse_loss(model(leaf), y), leaf)
    np.testing.assert_allclose(series[0], grad.square().mean(dim=(0, 2)).sqrt().numpy(), rtol=1e-6)
    for finding in report.of_kind("vanishing_through_time"):
        assert finding.evidence["length"] == 40 and "None" not in finding.message
    assert x.grad is None
