"""Backward-signal probe: RMS of dL/d(output) against autograd.grad on the same intermediates."""

import math

import pytest
import torch
from torch import nn

import gradmedic as gm
from gradmedic.probes import BackwardSignalProbe


def rms(t: torch.Tensor) -> float:
    return float(t.double().square().mean().sqrt())


@pytest.mark.parametrize("inplace", [False, True])
def test_matches_autograd_grad_of_outputs(inplace):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(inplace=inplace), nn.Linear(6, 6), nn.ReLU(inplace=inplace),
                          nn.Linear(6, 3))
    x, y = torch.randn(10, 8), torch.randn(10, 3)
    # independent path: run the layers by hand and ask autograd for dL/d(each Linear output)
    z0 = model[0](x)
    z2 = model[2](torch.relu(z0))
    z4 = model[4](torch.relu(z2))
    want = torch.autograd.grad(nn.functional.mse_loss(z4, y), [z0, z2, z4])

    mon = gm.Monitor(model, probes=[BackwardSignalProbe()])
    nn.functional.mse_loss(model(x), y).backward()
    mon.step()
    got = mon.trace.last("backward_rms")
    for name, g in zip(("0", "2", "4"), want, strict=True):
        assert got[name] == pytest.approx(rms(g), rel=1e-6)


def test_module_called_twice_pools_both_calls():
    torch.manual_seed(0)
    shared = nn.Linear(5, 5)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = shared

        def forward(self, x):
            return self.shared(torch.tanh(self.shared(x)))

    model = Twice()
    x = torch.randn(4, 5)
    a = shared(x)
    b = shared(torch.tanh(a))
    ga, gb = torch.autograd.grad(b.square().sum(), [a, b])
    want = math.sqrt((float(ga.double().square().sum()) + float(gb.double().square().sum())) / (a.numel() + b.numel()))

    mon = gm.Monitor(model, probes=[BackwardSignalProbe()])
    model(x).square().sum().backward()
    mon.step()
    assert mon.trace.last("backward_rms")["shared"] == pytest.approx(want, rel=1e-6)


def test_no_grad_forward_and_eval_are_ignored():
    model = nn.Sequential(nn.Linear(3, 3))
    mon = gm.Monitor(model, probes=[BackwardSignalProbe()])
    with torch.no_grad():
        model(torch.randn(2, 3))
    mon.step()
    assert "backward_rms" not in mon.trace.metrics


def test_a_module_whose_first_output_gets_no_gradient_is_skipped_not_fatal():
    """A module returning (a, b) of which only b reaches the loss: the hook on its first output gets no gradient.
    A tensor hook was called with None there, and the probe failed and switched itself off for the run."""
    import warnings

    class Pair(nn.Module):  # owns its weight, so the probe hooks its output
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(6, 6) / 6**0.5)

        def forward(self, x):
            a, b = (x @ self.weight).split(3, dim=1)
            return a, b

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair, self.head = Pair(), nn.Linear(3, 2)

        def forward(self, x):
            _, b = self.pair(x)
            return self.head(b)

    torch.manual_seed(0)
    net, x = Net(), torch.randn(5, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a probe that fails warns
        with gm.Monitor(net, preset="full") as monitor:
            for _ in range(2):
                net(x).pow(2).sum().backward()
                monitor.step()
                net.zero_grad()
    assert not any(p.failed for p in monitor.probes)
    rms = monitor.trace.last("backward_rms")
    # the head's output gradient: d(sum out^2)/d out = 2 out, checked against autograd
    out = net(x)
    (grad,) = torch.autograd.grad(out.pow(2).sum(), out)
    assert rms["head"] == pytest.approx(grad.pow(2).mean().sqrt().item(), rel=1e-5)
