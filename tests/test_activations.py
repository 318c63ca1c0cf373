"""Activation probe: hand-built pre-activations with known saturated/dead counts, and numpy stats."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradmedic as gm
from gradmedic.probes import ActivationProbe


def measure(model, *inputs):
    mon = gm.Monitor(model, probes=[ActivationProbe()])
    out = model(*inputs)
    out.float().sum().backward()
    mon.step()
    mon.close()
    return mon.trace


def fixed_linear(weights, bias=None):
    w = torch.tensor(weights, dtype=torch.float32).reshape(-1, 1)
    lin = nn.Linear(1, w.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(torch.tensor(bias))
    return lin


def test_tanh_saturation_and_moments_by_hand():
    # pre-activations for x = 1: 0, 0.5, 3, -5 -> tanh' = 1, 0.79, 0.0099, 0.00018: two below 0.05
    model = nn.Sequential(fixed_linear([0.0, 0.5, 3.0, -5.0]), nn.Tanh())
    trace = measure(model, torch.ones(1, 1))
    y = np.tanh([0.0, 0.5, 3.0, -5.0])
    assert trace.last("saturated_frac")["1"] == pytest.approx(0.5)
    assert trace.last("act_mean")["1"] == pytest.approx(y.mean(), rel=1e-6)
    assert trace.last("act_std")["1"] == pytest.approx(y.std(), rel=1e-6)


def test_sigmoid_saturation_threshold():
    # sigmoid'(z)/0.25 < 0.05 <=> |z| > 4.36: z = 4.0 is not saturated, z = 4.7 is
    model = nn.Sequential(fixed_linear([4.0, 4.7, -4.7, 0.0]), nn.Sigmoid())
    assert measure(model, torch.ones(1, 1)).last("saturated_frac")["1"] == pytest.approx(0.5)


def test_dead_relu_units_2d():
    # unit 0 has bias -10 and weight 1, inputs in [0, 1): never positive -> dead; units 1, 2 alive
    model = nn.Sequential(nn.Linear(1, 3), nn.ReLU(inplace=True))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.copy_(torch.tensor([-10.0, 0.5, 0.1]))
    trace = measure(model, torch.rand(16, 1))
    assert trace.last("dead_frac")["1"] == pytest.approx(1 / 3)


def test_conv_channels_are_units():
    conv = nn.Conv2d(1, 4, 1)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.copy_(torch.tensor([-10.0, -10.0, 0.0, 1.0]))
    model = nn.Sequential(conv, nn.ReLU())
    trace = measure(model, torch.rand(2, 1, 5, 5))
    assert trace.last("dead_frac")["1"] == pytest.approx(0.5)


def test_conv1d_three_dims_use_channel_axis():
    # (B, C, L) after Conv1d: C = 3 channels, channel 1 dead; L = 7 positions all alive on other channels
    conv = nn.Conv1d(1, 3, 1)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.copy_(torch.tensor([1.0, -10.0, 1.0]))
    model = nn.Sequential(conv, nn.ReLU())
    trace = measure(model, torch.rand(2, 1, 7))
    assert trace.last("dead_frac")["1"] == pytest.approx(1 / 3)


def test_sequence_features_are_last_axis():
    # (B, T, C) after Linear: C = 4 features, one dead; T = 6 must not be taken for the feature axis
    lin = nn.Linear(1, 4)
    with torch.no_grad():
        lin.weight.fill_(1.0)
        lin.bias.copy_(torch.tensor([1.0, 1.0, -10.0, 1.0]))
    model = nn.Sequential(lin, nn.ReLU())
    trace = measure(model, torch.rand(3, 6, 1))
    assert trace.last("dead_frac")["1"] == pytest.approx(1 / 4)


def test_one_relu_reused_after_two_layers_counts_each_call():
    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(1, 2)
            self.b = nn.Linear(2, 4)
            self.act = nn.ReLU()
            with torch.no_grad():
                self.a.weight.fill_(1.0)
                self.a.bias.copy_(torch.tensor([1.0, -10.0]))  # call 1: 1 of 2 dead
                self.b.weight.zero_()
                self.b.bias.copy_(torch.tensor([1.0, 1.0, 1.0, -1.0]))  # call 2: 1 of 4 dead

        def forward(self, x):
            return self.act(self.b(self.act(self.a(x))))

    trace = measure(Reuse(), torch.rand(8, 1))
    assert trace.last("dead_frac")["act"] == pytest.approx(2 / 6)


def test_functional_activations_are_booked_under_the_layer_they_follow():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = fixed_linear([0.0, 3.0, -5.0, 1.0])
            self.head = nn.Linear(4, 1)

        def forward(self, x):
            return self.head(torch.tanh(self.lin(x)))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Functional()
            self.relu = nn.ReLU()

        def forward(self, x):
            return F.relu(self.relu(self.inner(x)))

    class Cell(nn.Module):  # multiplies its own parameter: no layer ran inside it before the call
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.full((1, 4), -1.0))

        def forward(self, x):
            return torch.relu(x * self.w)

    trace = measure(Block(), torch.ones(8, 1))
    # the units of the layer the call follows: torch.tanh(self.lin(x)) is lin's, the F.relu of Block follows
    # inner.head (the last layer that ran inside Block's forward); F.relu inside nn.ReLU is not double counted
    assert trace.last("saturated_frac")["inner.lin"] == pytest.approx(0.5)
    assert set(trace.last("saturated_frac")) == {"inner.lin"}
    assert set(trace.last("dead_frac")) == {"inner.head", "relu"}
    assert set(measure(nn.Sequential(nn.Linear(1, 1), Cell()), torch.ones(8, 1)).last("dead_frac")) == {"1"}


def test_functional_watch_leaves_no_mode_behind_after_an_error():
    class Breaks(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            torch.sigmoid(self.lin(x))
            raise KeyError("user bug")

    model = Breaks()
    mon = gm.Monitor(model, probes=[ActivationProbe()])
    with pytest.raises(KeyError):
        model(torch.ones(1, 2))
    assert not torch.overrides._is_torch_function_mode_enabled()
    mon.close()


def test_half_precision_activations():
    model = nn.Sequential(fixed_linear([0.0, 3.0]), nn.Tanh()).half()
    trace = measure(model, torch.ones(1, 1, dtype=torch.float16))
    assert trace.last("saturated_frac")["1"] == pytest.approx(0.5)


# (module, saturated where, from the pre-activation z in float64): the derivative below SATURATED_DERIVATIVE of
# its peak, or on a flat part; derived by hand, independent of the probe's output-side tests
SATURATION_TABLE = [
    (nn.Tanh(), lambda z: 1 - np.tanh(z) ** 2 < 0.05),
    (nn.Sigmoid(), lambda z: (s := 1 / (1 + np.exp(-z))) * (1 - s) < 0.25 * 0.05),
    (nn.Softsign(), lambda z: 1 / (1 + np.abs(z)) ** 2 < 0.05),
    (nn.Hardsigmoid(), lambda z: np.abs(z) >= 3),
    (nn.Hardtanh(-2.0, 0.5), lambda z: (z <= -2.0) | (z >= 0.5)),
    (nn.ReLU6(), lambda z: z >= 6),
]


class Gain(nn.Module):
    """x times a parameter of 1: a model with something to train, whose activation sees x exactly."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.gain


@pytest.mark.parametrize(("act", "saturated"), SATURATION_TABLE, ids=[type(a).__name__ for a, _ in SATURATION_TABLE])
@pytest.mark.parametrize("shape", [(3, 7), (32, 16, 9, 9)], ids=["small", "conv-map"])
def test_saturated_share_matches_float64_count(act, saturated, shape):
    # the count runs on float marks (activations._tally), not a bool mask: it must agree with an exact count
    # of the pre-activations in float64, for a small tensor and a 41k-entry map; z spread over every region
    z = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 4
    z.view(-1)[:4] = torch.tensor([6.0, -2.0, 0.5, 3.0], dtype=torch.float64)  # exact edges count for the flat ones
    model = nn.Sequential(Gain(), act)
    expected = saturated(z.numpy()).mean()
    assert 0 < expected < 1  # both sides are exercised
    share = measure(model, z.float()).last("saturated_frac")["1"]
    # the probe reads the float32 output; an entry within float32 rounding of an edge may read either way
    assert share == pytest.approx(expected, abs=2 / z.numel() + 1e-12)


# --- outputs autograd keeps are reduced at the collect (activations.SAVES_OUTPUT) -----------------------------
def _stats(model, x, steps=3):
    mon = gm.Monitor(model, probes=[ActivationProbe()])
    for _ in range(steps):
        model(x).pow(2).mean().backward()
        mon.step()
    mon.close()
    return {m: mon.trace.metric(m) for m in ("act_mean", "act_std", "saturated_frac", "dead_frac")}, mon


@pytest.mark.parametrize("act", [nn.Tanh, nn.Sigmoid, nn.ReLU])
def test_held_outputs_read_as_the_hook_reads_them(act, monkeypatch):
    from gradmedic.probes import activations

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), act(), nn.Linear(32, 32), act(), nn.Linear(32, 4))

    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1)) * 3
    held, mon = _stats(make(), x)
    assert mon.probes[0]._unheld == set()
    monkeypatch.setattr(activations, "HOLD_BYTES", 0)  # reduce every output in its hook, as before
    hook, _ = _stats(make(), x)
    for metric, values in held.items():
        np.testing.assert_array_equal(values, hook[metric], err_msg=metric)  # the same kernels on the same values
    assert np.isfinite(held["act_mean"]).sum() == 6  # 2 activations x 3 steps


def test_an_output_changed_in_place_after_its_forward_is_not_measured_then_reduced_in_the_hook():
    class SideBranch(nn.Module):
        """A tanh branch the loss does not use, zeroed in place after its forward: autograd never reads it back, so
        nothing stops the change, and a held output would show the zeros instead of what the forward made."""

        def __init__(self):
            super().__init__()
            self.lin, self.act, self.head = nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)

        def forward(self, x):
            h = self.act(self.lin(x))
            with torch.no_grad():
                h.mul_(0.0)
            return self.head(x)

    torch.manual_seed(0)
    model = SideBranch()
    mon = gm.Monitor(model, probes=[ActivationProbe()])
    x = torch.randn(16, 8)
    for _ in range(2):
        model(x).sum().backward()
        mon.step()
    mon.close()
    row = mon.trace.layers.index("act")
    mean = mon.trace.metric("act_mean")[:, row]
    assert np.isnan(mean[0])  # held, then changed: not measured, rather than read as 0
    with torch.no_grad():
        expected = torch.tanh(model.lin(x)).mean().item()
    assert mean[1] == pytest.approx(expected, rel=1e-5)  # reduced in the hook from then on: what the forward made
    assert mon.probes[0]._unheld == {mon.probes[0].layers.row[id(model.act)]}


def test_nothing_is_held_under_saved_tensor_hooks_or_beyond_the_budget(monkeypatch):
    from gradmedic.probes import activations

    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    probe = ActivationProbe()
    mon = gm.Monitor(model, probes=[probe])
    seen = []
    original = ActivationProbe._reduce_held

    def spy(self):
        seen.append(len(self._held))
        original(self)

    monkeypatch.setattr(ActivationProbe, "_reduce_held", spy)
    x = torch.randn(8, 16)
    with torch.autograd.graph.save_on_cpu():  # offloading: autograd does not keep the output itself
        model(x).sum().backward()
    mon.step()
    monkeypatch.setattr(activations, "HOLD_TENSOR_BYTES", 8 * 32 * 4 - 1)  # one byte short of the tanh output
    model(x).sum().backward()
    mon.step()
    monkeypatch.setattr(activations, "HOLD_TENSOR_BYTES", 8 * 32 * 4)
    model(x).sum().backward()
    mon.step()
    mon.close()
    assert [n for n in seen if n] == [1]  # only the last step's tanh output was held (reduced in its backward)
    assert np.isfinite(mon.trace.metric("act_mean")[:, mon.trace.layers.index("1")]).all()


def test_held_outputs_are_reduced_in_the_backward_not_in_the_step(monkeypatch):
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    probe = ActivationProbe()
    mon = gm.Monitor(model, probes=[probe])
    model(torch.randn(8, 16)).sum()  # a forward without a backward (its step is never taken)
    loss = model(torch.randn(8, 16)).sum()
    assert len(probe._held) == 4
    loss.backward()
    assert probe._held == []  # reduced when the backward reached the first held output's node
    mon.step()
    mon.close()
    assert np.isfinite(mon.trace.metric("act_mean")).sum() == 2  # the two tanh layers, the step's calls pooled
