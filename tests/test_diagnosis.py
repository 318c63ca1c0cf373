"""Diagnosis on a zoo of sick and healthy models: the right kind at the right earliest layer, and
healthy models with no warning or error. All seeded; the whole file runs in seconds."""

import json

import pytest
import torch
from torch import nn

import gradmedic as gm
from gradmedic.diagnosis import REMEDIES, Finding, prescribe
from tests.zoo import Encoder, LastStepRNN, Log, mlp, resnet


def findings(model, inputs, **kwargs):
    torch.manual_seed(1)
    return gm.check(model, inputs, **kwargs)


def relu_rnn_exploding():
    m = LastStepRNN("rnn", nonlinearity="relu")
    with torch.no_grad():
        m.rnn.weight_hh_l0.copy_(torch.eye(32) * 1.3)  # recurrent gain 1.3 per step
        m.rnn.weight_ih_l0.mul_(0.1)
    return m


def nan_in_the_middle():
    base = mlp(3, 16, nn.Tanh)
    return nn.Sequential(base[:2], nn.Sequential(nn.Tanh(), Log()), base[2:])


X = torch.randn(64, 16)
SICK = [
    # (name, model factory, inputs, kind, earliest layer, minimum severity)
    ("sigmoid depth 6", lambda: mlp(6, 32, nn.Sigmoid), X, "vanishing_gradients", "0", "warning"),
    ("sigmoid depth 10", lambda: mlp(10, 32, nn.Sigmoid), X, "vanishing_gradients", "0", "error"),
    ("sigmoid depth 10 wide", lambda: mlp(10, 128, nn.Sigmoid, seed=3), X, "vanishing_gradients", "0", "error"),
    ("relu depth 20 default init", lambda: mlp(20, 64, nn.ReLU), X, "vanishing_gradients", "0", "error"),
    ("tanh N(0,1) init", lambda: mlp(5, 64, nn.Tanh, init="normal1"), X, "saturated_units", "1", "warning"),
    ("relu N(0,1) init", lambda: mlp(8, 64, nn.ReLU, init="normal1"), X, "exploding_gradients", "0", "error"),
    ("tanh rnn T=50", lambda: LastStepRNN("rnn"), torch.rand(16, 50, 2), "vanishing_through_time", "rnn", "error"),
    ("tanh rnn T=200", lambda: LastStepRNN("rnn", hidden=16), torch.rand(8, 200, 2), "vanishing_through_time",
     "rnn", "error"),
    ("relu rnn gain 1.3", relu_rnn_exploding, torch.rand(16, 40, 2), "exploding_through_time", "rnn", "warning"),
    ("log of negatives", nan_in_the_middle, X, "nonfinite", "1.1", "error"),
    ("float16 deep sigmoid", lambda: mlp(10, 32, nn.Sigmoid, dtype=torch.float16), X.half(), "gradient_underflow",
     "0", "warning"),
]


def dead_relu():
    model = mlp(6, 64, nn.ReLU)
    with torch.no_grad():
        model[2].bias.fill_(-4.0)
    return model


SICK.append(("dead relu layer", dead_relu, X, "dead_units", "3", "error"))


def relu_normal_hidden():
    """N(0,1) hidden weights between default-init input and output layers: the backward signal grows ~1e7x toward
    the input, and grad/weight is 1e4-1e7 everywhere. Its profile of min(signal, grad/weight) reads only ~35x (the
    grad/weight ratio is huge but flat), which must not hide the absolute grad/weight error."""
    torch.manual_seed(0)
    layers = [nn.Linear(16, 64), nn.ReLU()]
    for _ in range(10):
        hidden = nn.Linear(64, 64)
        nn.init.normal_(hidden.weight, 0, 1.0)
        layers += [hidden, nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(64, 4))


SICK.append(("relu N(0,1) hidden, default ends", relu_normal_hidden, X, "exploding_gradients", "0", "error"))


@pytest.mark.parametrize("name,build,inputs,kind,earliest,severity", SICK, ids=[s[0] for s in SICK])
def test_pathology_is_found_at_the_right_layer(name, build, inputs, kind, earliest, severity):
    report = findings(build(), inputs)
    matching = report.of_kind(kind)
    assert matching, f"{name}: no {kind} in {report!r}"
    finding = matching[0]
    assert finding.layers[0] == earliest, f"{name}: {finding.layers}"
    assert finding.rank >= ("info", "warning", "error").index(severity)
    assert not report.healthy
    assert finding.remedies and all(r in REMEDIES for r in finding.remedies)
    assert finding.message and "\n" not in finding.message


HEALTHY = [
    ("he relu + batchnorm mlp depth 10", lambda: mlp(10, 64, nn.ReLU, init="he", norm=True), X),
    ("he relu + batchnorm mlp depth 20", lambda: mlp(20, 32, nn.ReLU, init="he", norm=True, seed=2), X),
    ("residual cnn with batchnorm", lambda: resnet(8), torch.randn(16, 1, 12, 12)),
    ("short lstm", lambda: LastStepRNN("lstm"), torch.rand(16, 10, 2)),
    ("short gru", lambda: LastStepRNN("gru"), torch.rand(16, 10, 2)),
    ("pre-layernorm transformer encoder", lambda: Encoder(), torch.randn(8, 10, 32)),
]


@pytest.mark.parametrize("name,build,inputs", HEALTHY, ids=[h[0] for h in HEALTHY])
def test_healthy_models_get_no_warning(name, build, inputs):
    report = findings(build(), inputs)
    assert report.healthy, f"{name}: {report!r}"


def test_stalled_updates_need_training_steps():
    model = mlp(4, 32, nn.ReLU)
    report = findings(model, X, targets=torch.randint(0, 4, (64,)), steps=3,
                      optimizer=torch.optim.SGD(model.parameters(), lr=1e-7))
    stalled = report.of_kind("stalled_updates")
    assert stalled and stalled[0].layers[0] == "0"
    assert findings(model, X).of_kind("stalled_updates") == []  # steps=0: no updates to judge


def test_torch_transformer_encoder_module():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
    report = findings(model, torch.randn(4, 7, 16))
    assert "layers.0.linear1" in report.trace.layers
    json.loads(report.to_json())


def test_hugging_face_model_from_config():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)  # random weights, nothing downloaded
    ids = torch.randint(0, 100, (4, 12))
    report = findings(model, {"input_ids": ids, "labels": torch.tensor([0, 1, 0, 1])})  # uses outputs.loss
    names = dict(model.named_modules())
    assert "bert.encoder.layer.0.attention.self.query" in report.trace.layers
    assert all(layer in names for f in report.findings for layer in f.layers)
    assert not any(f.severity == "error" for f in report.findings), repr(report)


def test_report_json_and_text():
    report = findings(mlp(10, 32, nn.Sigmoid), X)
    doc = json.loads(report.to_json())
    assert doc["healthy"] is False
    assert doc["findings"][0]["kind"] == "vanishing_gradients"
    assert set(doc["findings"][0]) == {"kind", "severity", "layers", "message", "evidence", "remedies", "first_remedy",
                                       "why_first"}
    assert {row["layer"] for row in doc["layers"]} >= {"0", "18"}
    text = str(report)
    assert "vanishing_gradients" in text and "first: xavier_init" in text and "else: add_normalization" in text


def test_findings_validate_their_fields():
    with pytest.raises(ValueError, match="kind"):
        Finding("slow", "error", [], "m")
    with pytest.raises(ValueError, match="severity"):
        Finding("nonfinite", "fatal", [], "m")
    with pytest.raises(ValueError, match="remedies"):
        Finding("nonfinite", "error", [], "m", remedies=["pray"])
    for kind in gm.KINDS:
        assert all(r in REMEDIES for r in prescribe(kind, {}))


def test_prescriptions_follow_the_model():
    assert prescribe("vanishing_gradients", {"saturating": True})[0] == "add_normalization"
    assert prescribe("vanishing_gradients", {"relu": True})[0] == "he_init"
    assert prescribe("vanishing_through_time", {"rnn": True})[0] == "gated_recurrence"
    assert prescribe("vanishing_through_time", {"lstm": True})[0] == "forget_gate_bias"
    assert prescribe("nonfinite", {"low_precision": True})[1] == "loss_scaling"


def _relu_layer_with_dead_units(width, dead, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, 3))
    with torch.no_grad():
        model[0].bias[:dead] = -50.0  # these units are off for every input
    return model


@pytest.mark.parametrize("width,dead,flagged", [
    (4, 1, False),   # one unit of a 4-unit bottleneck (a squeeze-excitation layer in RegNet): 25%, but chance
    (4, 4, True),    # the whole bottleneck
    (64, 32, True),  # half of a wide layer
])
def test_a_dead_share_counts_only_beyond_chance_for_its_width(width, dead, flagged):
    # in a 4-unit layer one unit beyond one spread below zero happens to 1 - 0.841^4 = 50% of layers by chance
    model = _relu_layer_with_dead_units(width, dead)
    x, y = torch.randn(64, 16), torch.randint(0, 3, (64,))
    report = gm.check(model, x, targets=y)
    found = [f for f in report.findings if f.kind == "dead_units" and f.severity != "info"]
    assert bool(found) == flagged, report
    if flagged:
        assert found[0].layers == ["1"]


@pytest.mark.parametrize("n,k", [(4, 1), (4, 4), (16, 7), (64, 18), (500, 130), (1000, 250)])
def test_binomial_tail_of_the_dead_unit_rule_against_exact_integers(n, k):
    from fractions import Fraction
    from math import comb

    from gradmedic.diagnosis.rules.units import binomial_tail as _binomial_tail

    p = Fraction(159, 1000)
    exact = sum(comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1))  # rational arithmetic
    assert _binomial_tail(n, k, 0.159) == pytest.approx(float(exact), rel=1e-9)


def test_binomial_tail_beyond_a_thousand_units_is_an_upper_bound_and_never_overflows():
    from gradmedic.diagnosis.rules.units import binomial_tail as _binomial_tail

    assert _binomial_tail(5000, 1250, 0.159) < 1e-50  # 25% dead of 5000: surely beyond chance
    assert _binomial_tail(100_000, 15_000, 0.159) == 1.0  # below the chance rate


def test_str_of_a_report_keeps_long_layer_names_whole():
    # str(report) goes to logs and files: the table is as wide as its rows, so a name is never folded mid-word
    torch.manual_seed(0)
    long = "a_rather_long_module_name_as_transformers_makes_them_" * 2
    model = nn.Sequential()
    model.add_module(long + "in", nn.Linear(4, 8))
    model.add_module("act", nn.Tanh())
    model.add_module(long + "out", nn.Linear(8, 2))
    text = str(gm.check(model, torch.randn(16, 4)))
    assert long + "in" in text and long + "out" in text
    table = ("┏", "┃", "┡", "│", "└")
    assert max(len(line) for line in text.splitlines() if line.startswith(table)) > 120  # the table widened
    assert all(len(line) <= 120 for line in text.splitlines() if not line.startswith(table))  # the text did not


class _ScaleBackward(torch.autograd.Function):
    """Identity in the forward, times ``c`` in the backward: a drop in the gradient at a known place."""

    @staticmethod
    def forward(ctx, x, c):
        ctx.c = c
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.c, None


class _Drop(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x):
        return _ScaleBackward.apply(x, self.c)


def test_the_steepest_drop_names_the_layer_the_gradient_falls_into():
    torch.manual_seed(0)
    layers = []
    for c in (0.1, 1e-3, 0.1, 0.5, None):  # the 1e-3 drop lies between Linear '2' and Linear '4'
        lin = nn.Linear(32, 32)
        nn.init.orthogonal_(lin.weight)
        nn.init.zeros_(lin.bias)
        layers += [lin, _Drop(c)] if c else [lin]
    model = nn.Sequential(*layers, nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32))
    found = findings(model, torch.randn(16, 32)).of_kind("vanishing_gradients")
    assert found and found[0].evidence["steepest_drop_into"] == "2"  # was '10', a rise toward the loss


def test_vanishing_through_functional_activations_names_no_activation_module():
    """A stack whose activations are functional (``torch.sigmoid`` in the forward) has no activation module to
    name: the message says how many layers, not "layers of its activations"."""

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.layers = nn.ModuleList(nn.Linear(32, 32) for _ in range(10))

        def forward(self, x):
            for layer in self.layers:
                x = torch.sigmoid(layer(x))
            return x

    (finding,) = findings(Functional(), torch.randn(64, 32)).of_kind("vanishing_gradients")
    assert "activations" not in finding.message and "vanishes through 9 layers;" in finding.message


def test_a_steeply_vanishing_stack_has_no_exploding_finding_at_its_last_layer():
    """The profile's scale is the median of the deepest quarter; in a steep vanishing profile the last layer sits
    far above that median. That is the gradient growing toward the output, not an explosion toward the input."""
    torch.manual_seed(0)
    layers = [nn.Linear(20, 48), nn.Tanh()]
    for _ in range(20):
        layers += [nn.Linear(48, 48), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(48, 5))
    with torch.no_grad():
        for layer in model[::2]:
            layer.weight.mul_(0.5)
    x = torch.randn(256, 20)
    report = findings(model, x, targets=x[:, :5].argmax(1))
    assert report.of_kind("vanishing_gradients") and not report.of_kind("exploding_gradients"), repr(report)
