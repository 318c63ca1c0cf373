"""Faults inside the Monitor and changes around it: validation passes, a probe failing inside torch's
function mode, a trace or a disarm that raises, modules added later. None of it reaches the user's step."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import gradmedic as gm
from gradmedic.probes import ActivationProbe, GradientProbe, NonFiniteProbe, Probe
from tests.helpers import hook_state, sigmoid_mlp


class FunctionalTanh(nn.Module):
    """A user module whose activation is a function call, seen only through the TorchFunctionMode."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.tanh(self.fc(x))


def tanh_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), FunctionalTanh(), nn.Linear(8, 2))


def _mode_stack_depth() -> int:
    return torch._C._len_torch_function_stack()


# --- item 3: forwards that build no graph are not training steps ------------------------------------
def _validation(kind: str, model: nn.Module, x: torch.Tensor) -> None:
    if kind == "no_grad":
        with torch.no_grad():
            model(x)
    elif kind == "inference_mode":
        with torch.inference_mode():
            model(x)
    elif kind == "eval + no_grad":
        model.eval()
        with torch.no_grad():
            model(x)
        model.train()
    elif kind == "eval with grad on":
        model.eval()
        model(x)  # builds a graph that nobody back-propagates
        model.train()


def _saturation_run(validation: str | None, probes) -> gm.Trace:
    model = tanh_net()
    torch.manual_seed(1)
    x, y = torch.randn(32, 8) * 0.1, torch.randn(32, 2)
    huge = torch.randn(256, 8) * 1e3  # saturates every tanh unit, and a NaN for the NaN probe
    huge[0, 0] = float("nan")
    with gm.Monitor(model, probes=probes) as mon:
        for step in range(3):
            nn.functional.mse_loss(model(x), y).backward()
            mon.step()
            model.zero_grad()
            if validation is not None and step == 1:
                _validation(validation, model, huge)  # between step 1 and the measured step 2
    return mon.trace


@pytest.mark.parametrize("validation", ["no_grad", "inference_mode", "eval + no_grad", "eval with grad on"])
def test_a_validation_pass_does_not_pollute_the_next_measured_step(validation):
    clean = _saturation_run(None, [ActivationProbe(every=2), NonFiniteProbe(every=2)])
    polluted = _saturation_run(validation, [ActivationProbe(every=2), NonFiniteProbe(every=2)])
    assert list(polluted.steps) == [0, 2]
    rows = [polluted.layers.index(name) for name in clean.layers]
    for metric in ("saturated_frac", "act_mean", "act_std"):
        np.testing.assert_array_equal(polluted.metric(metric)[:, rows], clean.metric(metric))
    assert np.nanmax(clean.metric("saturated_frac")) < 0.05  # the validation batch would read ~1.0
    if validation != "eval with grad on":  # a NaN in a forward that builds a graph is still reported
        assert polluted.events == clean.events == []
        assert gm.diagnose(polluted).healthy and gm.diagnose(clean).healthy


@pytest.mark.parametrize("frozen", ["all", "part"])
def test_a_model_trained_in_eval_mode_or_with_a_frozen_part_is_still_measured(frozen):
    model = tanh_net()
    (model if frozen == "all" else model[2]).eval()  # a whole model, or a part kept in eval mode
    with gm.Monitor(model, probes=[ActivationProbe()]) as mon:
        model(torch.randn(4, 8)).sum().backward()
        mon.step()
    assert np.isfinite(mon.trace.metric("saturated_frac")).sum() == 2  # nn.Tanh and the functional tanh


# --- item 4: the TorchFunctionMode never stays on torch's stack -----------------------------------
def test_a_probe_failing_inside_a_functional_call_leaves_no_mode_behind(monkeypatch):
    def broken(self, *args):
        raise RuntimeError("boom inside the mode")

    monkeypatch.setattr(ActivationProbe, "_measure", broken)
    model = nn.Sequential(FunctionalTanh(), nn.Linear(8, 2))
    assert _mode_stack_depth() == 0
    before = hook_state(model)
    with pytest.warns(gm.GradmedicWarning, match="boom inside the mode"):
        mon = gm.Monitor(model, probes=[ActivationProbe(), GradientProbe()])
        model(torch.randn(4, 8)).sum().backward()
        assert _mode_stack_depth() == 0  # gone at the end of the forward it failed in
        mon.step()
        model(torch.randn(4, 8)).sum().backward()
        mon.step()
        mon.close()
    assert _mode_stack_depth() == 0
    assert hook_state(model) == before
    assert list(mon.trace.steps) == [0, 1]  # the gradient probe went on


def test_the_mode_is_popped_when_the_users_forward_raises():
    class Raising(FunctionalTanh):
        def forward(self, x):
            torch.tanh(x)
            raise ValueError("user bug")

    model = nn.Sequential(Raising())
    with gm.Monitor(model, probes=[ActivationProbe()]):
        with pytest.raises(ValueError, match="user bug"):
            model(torch.randn(2, 8))
        assert _mode_stack_depth() == 0


# --- item 7: internal faults never reach the user's step ------------------------------------------
def _train_watched(model, steps: int = 6, **kwargs) -> gm.Monitor:
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    mon = gm.Monitor(model, preset="full", flush_every=2, **kwargs)
    for _ in range(steps):
        model(x).pow(2).mean().backward()
        mon.step()
        model.zero_grad()
    return mon


def test_a_trace_that_raises_at_a_flush_costs_a_warning_not_the_step(monkeypatch):
    def broken(self, chunk):
        raise RuntimeError("trace refuses\n" + "a dispatcher's table of backends\n" * 50)  # torch's errors run long

    monkeypatch.setattr(gm.Trace, "extend", broken)
    model = sigmoid_mlp()
    before = hook_state(model)
    with pytest.warns(gm.GradmedicWarning, match="trace refuses") as record:
        mon = _train_watched(model)
        mon.close()
    (warning,) = [w for w in record if issubclass(w.category, gm.GradmedicWarning)]
    assert "\n" not in str(warning.message) and "dispatcher" not in str(warning.message)  # one line
    assert hook_state(model) == before


@pytest.mark.parametrize("where", [Probe, GradientProbe, ActivationProbe])
def test_a_disarm_that_raises_leaves_no_hook(monkeypatch, where):
    def broken(self):
        raise RuntimeError("disarm refuses")

    monkeypatch.setattr(where, "disarm", broken)
    model = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), FunctionalTanh(), nn.Linear(8, 2))
    before = hook_state(model)
    with pytest.warns(gm.GradmedicWarning, match="disarm refuses"):
        mon = _train_watched(model, steps=3)
        mon.close()
    assert hook_state(model) == before
    assert _mode_stack_depth() == 0


# --- item 9: modules added after the Monitor was created --------------------------------------------
def test_a_module_added_later_is_named_in_one_warning():
    model = sigmoid_mlp()
    other = nn.Sequential(nn.Linear(2, 2))
    with gm.Monitor(model) as mon:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            other.append(nn.Tanh())  # not the watched model: nothing to say
            model[0] = model[0]  # the same module again: still measured
        with pytest.warns(gm.GradmedicWarning, match=r"module '7' \(Linear\) was added .* not measured") as record:
            model.append(nn.Linear(4, 4))
            model.head = nn.Linear(4, 4)  # a second addition: no second warning
        assert len(record) == 1
        model(torch.randn(2, 16)).sum().backward()
        mon.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.append(nn.Tanh())  # after close: not our business


def test_a_replaced_module_is_named_too():
    model = sigmoid_mlp()
    with gm.Monitor(model):
        with pytest.warns(gm.GradmedicWarning, match="module '1' \\(Tanh\\)"):
            model[1] = nn.Tanh()
