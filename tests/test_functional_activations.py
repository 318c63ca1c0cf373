"""Models whose activations are function calls (``torch.sigmoid(self.fc(x))``, ``F.relu``), not modules: the
diagnosis, its ranking of remedies and the remedies see them as they see ``nn.Sigmoid``/``nn.ReLU`` modules.
Each case is compared with the same network written with activation modules."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradmedic as gm
from gradmedic.remedies import dormant_units, following_activations, he_


class Functional(nn.Module):
    def __init__(self, act, depth: int = 8, width: int = 32, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.act = act
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.out = nn.Linear(width, 4)

    def forward(self, x):
        for layer in self.layers:
            x = self.act(layer(x))
        return self.out(x)


def modular(act_module, depth: int = 8, width: int = 32, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = [m for _ in range(depth) for m in (nn.Linear(width, width), act_module())]
    return nn.Sequential(*layers, nn.Linear(width, 4))


X = torch.randn(128, 32, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 4, (128,), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("func,module", [(torch.sigmoid, nn.Sigmoid), (F.relu, nn.ReLU), (torch.tanh, nn.Tanh),
                                         (lambda x: F.leaky_relu(x, 0.2), nn.LeakyReLU)])
def test_the_activation_after_each_layer_is_found_for_function_calls(func, module):
    follows = following_activations(Functional(func), X)
    assert [type(a) for a in follows.values()] == [module] * 8 + [type(None)]
    if module is nn.LeakyReLU:
        assert all(a.negative_slope == 0.2 for a in list(follows.values())[:-1])


def test_he_init_uses_relus_gain_for_a_functional_relu():
    """He's sigma_w^2 = 2 before a ReLU, whether it is a module or F.relu (it read 1, the linear gain, and the
    forward signal shrank 200x over 12 layers)."""
    functional, module = Functional(F.relu, depth=12), modular(nn.ReLU, depth=12)
    torch.manual_seed(7)
    he_(functional, X)
    torch.manual_seed(7)
    he_(module, X)
    for a, b in zip(functional.layers, module[:-1:2], strict=True):
        assert torch.equal(a.weight, b.weight)


def test_sigmoid_calls_rank_the_saturating_remedies_and_are_located_per_layer():
    functional, module = gm.check(Functional(torch.sigmoid, depth=10), X, Y), gm.check(modular(nn.Sigmoid, 10), X, Y)
    assert functional.context["saturating"] and not functional.context["relu"]
    (f,) = functional.of_kind("vanishing_gradients")
    (m,) = module.of_kind("vanishing_gradients")
    assert f.remedies == m.remedies and f.severity == m.severity
    assert set(functional.trace.last("saturated_frac")) == {f"layers.{i}" for i in range(10)}


def test_dead_units_behind_a_functional_relu_are_found_at_their_layer_and_recycled():
    model = Functional(F.relu, depth=5, width=64)
    with torch.no_grad():
        model.layers[2].bias.fill_(-5.0)
    x = torch.randn(128, 64, generator=torch.Generator().manual_seed(3))
    report = gm.check(model, x, torch.randint(0, 4, (128,)))
    (dead,) = report.of_kind("dead_units")
    assert dead.layers[0] == "layers.2", dead.layers
    masks = dormant_units(model, x)
    assert masks[model.layers[2]].float().mean() > 0.9
    treated = gm.treat(model, report, inputs=x, targets=torch.randint(0, 4, (128,)), verify_steps=20, trained=True)
    assert [name for name, *_ in treated.applied] == ["recycle_dormant"] and treated.report.healthy


def test_a_smooth_activation_of_another_library_is_not_read_through_its_formula():
    """transformers' NewGELUActivation computes 0.5 x (1 + tanh(...)): its torch.tanh is part of GELU's formula, not a
    layer of saturating units. It read 83% saturated (an error, swap_activation first) on a Phi model at a hot lr."""
    pytest.importorskip("transformers")
    from transformers.activations import NewGELUActivation

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), NewGELUActivation(), nn.Linear(32, 2))
    x = torch.randn(64, 8) * 50  # large pre-activations: the tanh inside GELU is at +-1 for most units
    inner = torch.tanh(0.7978845608 * (model[0](x) + 0.044715 * model[0](x) ** 3))
    assert (inner.abs() > 0.975).float().mean() > 0.5  # independent: the formula's tanh is saturated
    report = gm.check(model, x)
    assert not report.of_kind("saturated_units"), repr(report)
    assert "1" in report.trace.last("act_std")  # the GELU is still measured, as a smooth activation (mean, std)
