"""Critical init: the mean-field numbers against closed forms, Monte Carlo and a simulated wide net."""

import math

import pytest
import torch
from torch import nn

from gradmedic.remedies.critical import critical_, critical_scale, gradient_gain


@pytest.fixture(autouse=True)
def one_thread():
    """Many small tensor ops: one thread, so two threads do not contend on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_relu_is_he_in_closed_form():
    # chi = sigma_w^2 E[1{z > 0}] = sigma_w^2 / 2 at every depth (He et al. 2015)
    for depth in (1, 7, 40):
        assert critical_scale(nn.ReLU(), depth) == pytest.approx(2.0, rel=1e-6)
        assert gradient_gain(nn.ReLU(), 3.0, depth) == pytest.approx(1.5**depth, rel=1e-6)
    assert gradient_gain(None, 1.2, 5) == pytest.approx(1.2**5, rel=1e-9)  # linear: sigma_w^2 per layer


def test_tanh_expectation_against_monte_carlo():
    # one layer: gain = sigma^2 E[tanh'(sqrt(sigma^2 q0) z)^2]; 4M samples in float64, standard error < 0.05%
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(4_000_000, generator=gen, dtype=torch.float64)
    for sigma2 in (0.5, 1.0, 9.0, 100.0):
        expected = sigma2 * float((1 - torch.tanh(math.sqrt(sigma2) * z) ** 2).pow(2).mean())
        assert gradient_gain(nn.Tanh(), sigma2, 1) == pytest.approx(expected, rel=2e-3)


def test_tanh_critical_scale_approaches_one_with_depth_and_stays_below_torchs_gain():
    scales = [critical_scale(nn.Tanh(), d) for d in (5, 40, 200)]
    assert scales[0] > scales[1] > scales[2] > 1.0
    assert scales[2] < 1.25  # toward the order-to-chaos boundary at zero bias variance, sigma_w^2 = 1 (1.21 here)
    assert scales[1] < (5 / 3) ** 2


def _wide_tanh_gain(sigma2: float, depth: int, width: int = 1024, seed: int = 0) -> float:
    """||dL/dh_1||^2 / ||dL/dh_{L+1}||^2 through a simulated wide tanh net, by autograd."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, width, generator=gen, dtype=torch.float64)
    h1 = (x @ torch.randn(width, width, generator=gen, dtype=torch.float64) * math.sqrt(sigma2 / width))
    h1.requires_grad_(True)
    h = h1
    for _ in range(depth):
        h = torch.tanh(h) @ torch.randn(width, width, generator=gen, dtype=torch.float64) * math.sqrt(sigma2 / width)
    g_out = torch.randn(h.shape, generator=gen, dtype=torch.float64)
    (g_in,) = torch.autograd.grad(h, h1, g_out)
    return float(g_in.pow(2).sum() / g_out.pow(2).sum())


def test_gradient_gain_predicts_a_simulated_wide_net():
    for sigma2, depth in ((1.3, 10), (2.0, 10)):
        predicted = gradient_gain(nn.Tanh(), sigma2, depth)
        measured = _wide_tanh_gain(sigma2, depth)
        assert measured == pytest.approx(predicted, rel=0.25), (sigma2, depth)  # width 1024: finite-width error


@pytest.mark.parametrize("act", [nn.Tanh, nn.Sigmoid, nn.ReLU])
def test_critical_init_keeps_the_gradient_through_a_deep_net(act):
    torch.manual_seed(0)
    widths = [32] + [128] * 30
    layers = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b), act()]
    model = nn.Sequential(*layers, nn.Linear(128, 4)).double()
    x = torch.randn(256, 32, dtype=torch.float64)
    critical_(model, x)
    grads = {}

    def keep(module, args, out, i):  # the gradient reaching each Linear's output, by autograd
        out.register_hook(lambda g: grads.__setitem__(i, float(g.pow(2).mean())))

    hooks = [m.register_forward_hook(lambda mod, a, o, i=i: keep(mod, a, o, i))
             for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    model(x).pow(2).sum().backward()
    for hook in hooks:
        hook.remove()
    ratio = grads[0] / grads[2 * 29]  # the first hidden layer against the last hidden one
    assert 0.1 < ratio < 10, (act, ratio)

