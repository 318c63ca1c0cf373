"""Layers whose weight is a parametrization (``torch.nn.utils.parametrizations.weight_norm``, ``spectral_norm``):
the weight lives in ``layer.parametrizations.weight.original`` (``original0``/``original1``) and is computed at every
use. Those modules are the weight's arithmetic, not layers: gradmedic reads the same layers as for the plain model,
each with the parameters its parametrization holds, and the same diagnosis. Gradient norms are checked against
``torch.autograd.grad`` over each layer's own parameters (float64 sums, rtol 1e-5)."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import gradmedic as gm

PARAMETRIZE = {"plain": lambda m: m, "weight_norm": parametrizations.weight_norm,
               "spectral_norm": parametrizations.spectral_norm}


def stack(kind: str, activation=nn.Sigmoid, depth: int = 8, conv: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(depth):
        layer = nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1) if conv else nn.Linear(16, 16, bias=i % 2 == 0)
        layers += [PARAMETRIZE[kind](layer), activation()]
    head = [nn.Flatten(), nn.Linear(8 * 6 * 6, 4)] if conv else [nn.Linear(16, 4)]
    return nn.Sequential(*layers, *head)


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm"])
def test_a_parametrized_layer_is_one_layer_with_all_its_parameters(kind):
    model = stack(kind)
    x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
    report = gm.check(model, x, y)
    plain = gm.check(stack("plain"), x, y)
    assert report.trace.layers == plain.trace.layers  # no 'parametrizations' rows
    assert not any("parametrizations" in name for name in report.trace.layers)
    assert report.trace.meta["types"]["0"] == "Linear"
    loss = nn.functional.cross_entropy(model(x), y)
    for index in (0, 2, 14):  # with a bias, without one (its only parameters are the parametrization's), the head
        params = list(model[index].parameters())
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        true = torch.cat([g.double().flatten() for g in grads]).norm().item()
        assert report.trace.last("grad_norm")[str(index)] == pytest.approx(true, rel=1e-5)
    kinds = [(f.kind, f.severity, f.layers[0]) for f in report.findings]
    assert ("vanishing_gradients", "error", "0") in kinds, kinds  # a sigmoid stack vanishes, as the plain one does
    assert [f.kind for f in report.findings] == [f.kind for f in plain.findings]


def test_a_healthy_parametrized_stack_stays_healthy_and_a_conv_stack_reads_convolutional():
    x = torch.randn(16, 3, 6, 6)
    report = gm.check(stack("spectral_norm", nn.ReLU, depth=3, conv=True), x, torch.randint(0, 4, (16,)))
    assert report.context["model_kind"] == "convolutional"  # its class is ParametrizedConv2d
    assert not any(f.severity != "info" and f.kind in ("vanishing_gradients", "exploding_gradients")
                   for f in report.findings), report.findings
    model = stack("weight_norm", nn.Tanh, depth=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with gm.Monitor(model, opt, preset="full") as monitor:
        for _ in range(4):
            loss = model(torch.randn(8, 16)).square().mean()
            loss.backward()
            monitor.step(loss)
            opt.step()
            opt.zero_grad()
    ratio = monitor.trace.last("update_to_weight")
    assert set(ratio) == {"0", "2", "4", "6", "8"} and all(v > 0 for v in ratio.values())


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm"])
def test_init_remedies_change_a_parametrized_weight_through_its_parametrization(kind):
    """An init written into a computed weight would change a temporary: the remedies write through the
    parametrization, so the layer's weight (as it computes it) is the new one, and the follow-up activation is
    found through the parametrization's modules."""
    from gradmedic.remedies import critical, init

    model = stack(kind, nn.ReLU, depth=4)
    x = torch.randn(64, 16)
    plain = stack("plain", nn.ReLU, depth=4)
    assert [type(a) for a in init.following_activations(model, x).values()] == [
        type(a) for a in init.following_activations(plain, x).values()]
    before = model[0].weight.detach().clone()
    torch.manual_seed(3)
    init.he_(model, x)
    after = model[0].weight.detach()
    assert not torch.allclose(before, after)
    if kind == "weight_norm":  # weight norm holds any weight: exactly He's draw (std sqrt(2 / fan_in))
        torch.manual_seed(3)
        init.he_(plain, x)
        assert torch.allclose(after, plain[0].weight, atol=1e-6)
    critical.critical_(model, x)
    assert torch.isfinite(model[0].weight).all() and not torch.allclose(model[0].weight, after)


def test_a_weight_a_parametrization_cannot_hold_is_refused_and_the_layer_kept():
    from gradmedic.remedies._weights import writable_weight

    layer = parametrizations.weight_norm(nn.Linear(4, 4))
    before = layer.weight.detach().clone()
    with pytest.raises(gm.GradmedicError, match="cannot be stored through its parametrization"):
        with writable_weight(layer) as weight:
            nn.init.zeros_(weight)  # weight norm of zero is 0/0
    assert torch.equal(layer.weight, before)
