"""``no_gradient``: trainable layers that no gradient reaches at any measured step (``p.grad`` None, not a zero
gradient). A layer that runs in the forward but is cut off from the loss is a warning; one that does not run is
information; under ``gm.check``'s stand-in loss (the first output alone) a cut layer is information too. None of
them reads as ``stalled_updates`` (a learning rate too small), which is how its zero updates used to read."""

import pytest
import torch
from torch import nn

import gradmedic as gm


class Cut(nn.Module):
    """``side`` runs on a detached input and its output is dropped; ``unused`` never runs; ``frozen`` runs with
    its parameters frozen; ``a`` and ``b`` carry the loss."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.side, self.unused, self.frozen = (nn.Linear(8, 8) for _ in range(5))
        self.frozen.requires_grad_(False)

    def forward(self, x):
        h = torch.tanh(self.a(self.frozen(x)))
        self.side(h.detach())
        return self.b(h)


def train(model, steps=6, preset="full", lr=1e-3):
    gen = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    with gm.Monitor(model, optimizer, preset=preset) as monitor:
        for _ in range(steps):
            loss = model(torch.randn(16, 8, generator=gen)).pow(2).mean()
            loss.backward()
            monitor.step(loss)
            optimizer.step()
            optimizer.zero_grad()
    return gm.diagnose(monitor.trace)


def by_severity(report):
    return {f.severity: f for f in report.findings if f.kind == "no_gradient"}


def test_a_cut_layer_warns_and_an_unused_one_informs():
    torch.manual_seed(0)
    report = train(Cut())
    found = by_severity(report)
    assert found["warning"].layers == ["side"]
    assert found["warning"].message.startswith("'side' runs in the forward but no gradient reaches it (6 measured "
                                               "steps)")
    assert found["warning"].evidence == {"steps": 6, "layers": 1, "ran_in_forward": 1}
    assert found["info"].layers == ["unused"]
    assert "does not run in the forward" in found["info"].message
    assert found["warning"].remedies == [] and found["info"].remedies == []
    # frozen parameters are not meant to train: not a finding; nor are the cut and unused layers stalled
    assert not any("frozen" in f.layers for f in report.findings)
    assert not [f for f in report.findings if f.kind == "stalled_updates"]
    assert not report.healthy
    assert "no_gradient" in report.to_json()


def test_without_the_forward_order_an_ungraded_layer_is_information():
    # the cheap preset reads gradients only (every 50 steps): whether a layer ran is not known, so no warning
    torch.manual_seed(0)
    report = train(Cut(), steps=51, preset="cheap")
    found = by_severity(report)
    assert set(found) == {"info"}
    assert found["info"].layers == ["side", "unused"]
    assert "ran_in_forward" not in found["info"].evidence and found["info"].evidence["steps"] == 2


def test_a_layer_with_a_gradient_at_some_steps_is_not_flagged():
    # one branch per step in turn: each gets a gradient at a third of the steps (an expert routed to now and then)
    class Turns(nn.Module):
        def __init__(self):
            super().__init__()
            self.branches = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return self.branches[self.calls % 3](x)

    torch.manual_seed(0)
    assert not [f for f in train(Turns(), steps=9).findings if f.kind == "no_gradient"]


def test_a_tiny_learning_rate_is_still_stalled_not_cut():
    torch.manual_seed(0)
    report = train(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)), steps=6, lr=1e-12)
    assert [f for f in report.findings if f.kind == "stalled_updates"]
    assert not [f for f in report.findings if f.kind == "no_gradient"]


def test_check_stand_in_loss_informs_only_where_the_model_returned_several_outputs():
    # one output: the stand-in loss reads all of it, so a layer it does not reach is cut (a warning)
    torch.manual_seed(0)
    model, x = Cut(), torch.randn(16, 8)
    report = gm.check(model, x)
    assert report.trace.meta["check"]["loss_from"] == "projection"
    assert by_severity(report)["warning"].layers == ["side"]
    assert by_severity(report)["warning"].evidence["steps"] == 1

    class TwoOutputs(Cut):  # side feeds a second output, which the stand-in loss leaves out
        def forward(self, x):
            h = torch.tanh(self.a(self.frozen(x)))
            return self.b(h), self.side(h)

    report = gm.check(TwoOutputs(), x)
    assert report.trace.meta["check"]["loss_from"] == "projection_of_first"
    stand_in = [f for f in report.findings if f.kind == "no_gradient" and "stand-in" in f.message]
    assert stand_in and stand_in[0].layers == ["side"] and stand_in[0].severity == "info"
    report = gm.check(TwoOutputs(), x, loss_fn=lambda out, _: out[0].pow(2).mean())
    assert report.trace.meta["check"]["loss_from"] == "given"
    assert by_severity(report)["warning"].layers == ["side"]


def test_a_layer_frozen_after_the_monitor_was_built_is_not_flagged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with gm.Monitor(model, optimizer, preset="full") as monitor:
        model[0].requires_grad_(False)  # staged freezing, inside the user's loop
        for _ in range(4):
            loss = model(torch.randn(16, 8)).pow(2).mean()
            loss.backward()
            monitor.step(loss)
            optimizer.step()
            optimizer.zero_grad()
    assert monitor.trace.meta["frozen"] == ["0"]
    assert not [f for f in monitor.diagnose().findings if f.kind in ("no_gradient", "stalled_updates")]


def test_bert_pooler_under_the_stand_in_loss_keeps_the_report_healthy():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100, max_position_embeddings=32)
    report = gm.check(transformers.BertModel(config), torch.randint(0, 100, (2, 12)))
    assert report.healthy
    cut = [f for f in report.findings if f.kind == "no_gradient"]
    assert len(cut) == 1 and cut[0].layers == ["pooler.dense"] and cut[0].severity == "info"


class FeatureUnderNoGrad(nn.Module):
    """A three-layer feature extractor run under no_grad (meant to be frozen, but its parameters still train)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        with torch.no_grad():
            h = self.features(x)
        return self.head(h)


def test_the_message_counts_every_cut_layer_not_only_the_first():
    torch.manual_seed(0)
    found = by_severity(train(FeatureUnderNoGrad()))["warning"]
    assert found.layers == ["features.0", "features.2", "features.4"]
    assert found.message.startswith("'features.0' (and 2 more layers) runs in the forward but no gradient reaches it")


class ModeParameter(nn.Module):
    """Owns a parameter used only in a mode the run never enters (XLNet's mask_emb, used with target_mapping)."""

    def __init__(self):
        super().__init__()
        self.mask = nn.Parameter(torch.zeros(8))
        self.inner = nn.Linear(8, 8)

    def forward(self, x, masked=False):
        return self.inner(x + self.mask if masked else x)


def test_a_parameter_its_own_forward_does_not_use_is_information_not_a_cut_output():
    torch.manual_seed(0)
    model = nn.Sequential(ModeParameter(), nn.Tanh(), nn.Linear(8, 1))
    found = [f for f in train(model).findings if f.kind == "no_gradient"]
    assert [(f.severity, f.layers) for f in found] == [("info", ["0"])]
    assert found[0].message.startswith("'0' gets a gradient at its output, but none reaches the parameters it owns")


class OnePositionAttention(nn.Module):
    """Self-attention over a single position: the softmax of one score is 1 whatever the query and key, so both
    get a gradient of exactly zero at every step (MobileViT at 64 px, a CvT layer whose only read token is cls)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(8, 8) for _ in range(4))

    def forward(self, x):  # (B, 8) -> one position
        h = x.unsqueeze(1)
        weights = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2), dim=-1)
        return self.out((weights @ self.v(h)).squeeze(1)).sum(dim=1, keepdim=True)


def test_a_gradient_exactly_zero_at_every_step_is_no_gradient_not_stalled():
    torch.manual_seed(0)
    model = OnePositionAttention()
    params = list(model.parameters())
    grads = torch.autograd.grad(model(torch.randn(4, 8)).pow(2).mean(), params)
    assert all(float(g.abs().max()) == 0.0 for g in grads[:4])  # the independent path: q and k get exactly 0
    report = train(model)
    found = [f for f in report.findings if f.kind == "no_gradient"]
    assert [(f.severity, f.layers, f.evidence.get("exactly_zero")) for f in found] == [("warning", ["q", "k"], 1)]
    assert not report.of_kind("stalled_updates")  # was: an error, with learning-rate remedies


class ZeroInitAfter(nn.Module):
    """A layer followed by a zero-initialised one (LoRA's B, a zero-init residual's last gamma): its gradient is
    exactly zero at init by design, and the first update ends it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 1)
        nn.init.zeros_(self.b.weight)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_a_gradient_zero_by_design_at_init_only_is_not_flagged():
    torch.manual_seed(0)
    model = ZeroInitAfter()
    assert not gm.check(model, torch.randn(16, 8)).of_kind("no_gradient")  # one look: cannot tell, says nothing
    torch.manual_seed(0)
    assert not train(ZeroInitAfter()).of_kind("no_gradient")  # zero at step 0 only
