"""What gm.check reads from the loss's graph and the optimizer (issue 28 classes 1, 2, 3, 5, 8, 9), on models small
enough that the expected answer is plain from their code."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradmedic as gm
from gradmedic._graph import GraphReader
from gradmedic.diagnosis.findings import KINDS
from gradmedic.diagnosis.rules._path import off_path
from gradmedic.diagnosis.rules.dynamics import POST_LN_UNTESTED_BLOCKS


def _read(model: nn.Module, loss_of) -> dict[str, list[str]]:
    with GraphReader(model) as reader:
        loss = loss_of(model)
    return reader.read(loss)


@pytest.mark.parametrize("loss_fn,matched", [
    (lambda p, y: F.binary_cross_entropy(p, y), ["1"]),
    (lambda p, y: F.binary_cross_entropy(p, y, reduction="sum") / 8 + 0.1 * p.sum(), ["1"]),  # a sum of losses
    (lambda p, y: F.mse_loss(p, y), []),  # MSE does not cancel sigmoid': saturation loses gradient there
    (lambda p, y: F.binary_cross_entropy(torch.sigmoid(torch.log(p / (1 - p))), y), []),  # BCE reads another sigmoid
])
def test_a_loss_that_cancels_the_sigmoid_is_read(loss_fn, matched):
    model = nn.Sequential(nn.Linear(4, 1), nn.Sigmoid())
    x, y = torch.randn(8, 4), torch.ones(8, 1)
    assert _read(model, lambda m: loss_fn(m(x), y))["matched"] == matched


def test_saturation_the_loss_cancels_is_information():
    # a sigmoid head pushed into saturation: a warning under MSE, information under BCE (same model, same outputs)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1), nn.Sigmoid())
    with torch.no_grad():
        model[2].weight.mul_(50)
    x = torch.randn(64, 8)
    y = (x[:, :1] > 0).float()
    mse = gm.check(model, x, y, loss_fn=F.mse_loss).of_kind("saturated_units")
    bce = gm.check(model, x, y, loss_fn=F.binary_cross_entropy).of_kind("saturated_units")
    assert mse and mse[0].severity != "info"
    assert bce and all(f.severity == "info" for f in bce) and bce[0].evidence["loss_cancels"]


class _Additive(nn.Module):
    """Bahdanau: scores from W, U, v; the softmax over positions mixes the encoder's states."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.enc = nn.Linear(4, d)
        self.W, self.U, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 1)
        self.out = nn.Linear(d, 3)

    def forward(self, x):  # (B, T, 4)
        keys = self.enc(x)
        scores = self.v(torch.tanh(self.W(keys.mean(1))[:, None] + self.U(keys))).squeeze(-1)
        return self.out(torch.bmm(torch.softmax(scores, -1)[:, None], keys).squeeze(1))


def test_layers_behind_an_attention_softmax_only_score_and_its_values_are_attended():
    model, x = _Additive(), torch.randn(2, 5, 4)
    graph = _read(model, lambda m: F.cross_entropy(m(x), torch.tensor([0, 1])))
    assert graph["scoring"] == ["U", "W", "v"]  # enc and out reach the loss without the softmax
    assert graph["attended"] == ["enc"]


def test_a_softmax_at_the_output_makes_no_layer_a_scorer():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.Softmax(-1))
    x = torch.randn(6, 4)
    graph = _read(model, lambda m: F.nll_loss(torch.log(m(x)), torch.zeros(6, dtype=torch.long)))
    assert graph["scoring"] == [] and graph["attended"] == []


class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
        self.a = nn.Linear(8, 1)
        self.b1, self.b2 = nn.Linear(8, 8), nn.Linear(8, 1)

    def forward(self, x):
        h = self.trunk(x)
        return self.a(h) * self.b2(torch.relu(self.b1(h)))


def test_parallel_heads_and_their_branches_leave_the_trunk():
    model, x = _TwoHeads(), torch.randn(6, 4)
    assert _read(model, lambda m: m(x).pow(2).mean())["branches"] == ["a", "b1", "b2"]
    chain = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    assert _read(chain, lambda m: m(x).pow(2).mean())["branches"] == []  # one head: a chain


def test_layers_no_optimizer_holds_are_not_stalled():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model[0].parameters(), lr=1e-12)  # only the first layer, and far too slowly
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = gm.check(model, torch.randn(32, 4), torch.randn(32, 1), optimizer=opt, steps=2)
    assert report.trace.meta["optimized"] == ["0"]
    stalled = report.of_kind("stalled_updates")
    assert stalled and stalled[0].layers == ["0"]


def test_a_container_owning_parameters_beside_parameterised_children_is_off_the_path():
    trace = SimpleNamespace(meta={"params": {"0": 80, "2": 4160, "8": 10, "8.decoder": 640, "": 4}},
                            layers=["", "0", "2", "8", "8.decoder"])
    assert off_path(trace) == {"8", ""}


def _post_ln(layers: int, norm_first: bool) -> nn.Module:
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


@pytest.mark.parametrize("layers,norm_first,said", [
    (POST_LN_UNTESTED_BLOCKS, False, True), (POST_LN_UNTESTED_BLOCKS - 1, False, False),
    (POST_LN_UNTESTED_BLOCKS, True, False)])
def test_check_says_what_a_deep_post_ln_stack_at_init_cannot_show(layers, norm_first, said):
    torch.manual_seed(0)
    report = gm.check(_post_ln(layers, norm_first), torch.randn(2, 6, 16))
    found = report.of_kind("untested_dynamics")
    assert bool(found) == said, repr(report)
    if said:
        assert found[0].severity == "info" and "steps=" in found[0].message and "Monitor" in found[0].message
        assert "No findings" not in str(report)
    # a new kind is added after the contract's ten, whose names and order stay
    assert KINDS.index("untested_dynamics") > KINDS.index("no_gradient")
