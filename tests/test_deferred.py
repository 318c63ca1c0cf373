"""Steps kept raw until the flush (``Probe.defer``/``settle``): each step's numbers land in its own row, whatever
mix of layouts one flush holds, against references taken by the test's own hooks in float64."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import gradmedic as gm
from gradmedic._first_look import FIRST_LOOKS
from gradmedic.probes import ActivationProbe, BackwardSignalProbe, GradientProbe, NonFiniteProbe


class Varying(nn.Module):
    """A tanh block that runs once or twice per forward, on batches whose size changes: a new layout at each step."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.act = nn.Tanh()
        self.mid = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)
        self.twice = False

    def forward(self, x):
        h = self.act(self.inp(x))
        if self.twice:
            h = self.act(self.mid(h))
        return self.out(h)


def test_layouts_that_change_within_one_flush_land_in_their_own_steps():
    torch.manual_seed(0)
    model = Varying()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = gm.Monitor(model, opt, probes=[ActivationProbe(), BackwardSignalProbe(), GradientProbe(update_sample=None)],
                     flush_every=50)
    grad_norm, weights = {}, [[p.detach().double().clone() for p in model.inp.parameters()]]
    acts, grads = {}, {}  # step -> tanh outputs, dL/d(output of "inp") of that step (float64, our own hooks)

    def on_act(module, args, out):
        acts.setdefault(step, []).append(out.detach().double().reshape(-1))

    def on_inp(module, args, out):
        def on_grad(g):
            grads[step] = g.double().reshape(-1)

        out.register_hook(on_grad)

    model.act.register_forward_hook(on_act)
    model.inp.register_forward_hook(on_inp)
    for step in range(8):
        # layouts come back (batch 3 or 4, one call or two) with other values: the scale grows at every step
        model.twice = step % 3 == 1
        x = torch.randn(3 + step % 2, 6) * (1 + step)
        nn.functional.mse_loss(model(x), torch.randn(3 + step % 2, 2)).backward()
        grad_norm[step] = math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.inp.parameters()))
        mon.step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        weights.append([p.detach().double().clone() for p in model.inp.parameters()])
    mon.close()
    trace = mon.trace
    assert trace.steps.tolist() == list(range(8))
    act, inp = trace.layers.index("act"), trace.layers.index("inp")
    for step in range(8):
        y = torch.cat(acts[step])  # both calls of a step pooled, as the probe does
        assert trace.metric("act_mean")[step, act] == pytest.approx(float(y.mean()), rel=1e-6, abs=1e-9)
        assert trace.metric("act_std")[step, act] == pytest.approx(float(y.std(unbiased=False)), rel=1e-5)
        saturated = float((y.abs() > math.sqrt(1 - 0.05)).double().mean())
        assert trace.metric("saturated_frac")[step, act] == pytest.approx(saturated, abs=1e-12)
        g = grads[step]
        assert trace.metric("backward_rms")[step, inp] == pytest.approx(float(g.square().mean().sqrt()), rel=1e-5)
        assert trace.metric("backward_norm")[step, inp] == pytest.approx(float(g.norm()), rel=1e-5)
        assert trace.metric("grad_norm")[step, inp] == pytest.approx(grad_norm[step], rel=1e-5)
        if step:
            before, after = weights[step - 1], weights[step]
            change = math.sqrt(sum(float((a - b).square().sum()) for a, b in zip(after, before, strict=True)))
            norm = math.sqrt(sum(float(b.square().sum()) for b in before))
            assert trace.metric("update_to_weight")[step, inp] == pytest.approx(change / norm, rel=1e-5)
    mid = trace.layers.index("mid")  # measured only at the steps that ran it
    ran = ~np.isnan(trace.metric("backward_rms")[:, mid])
    assert ran.tolist() == [s % 3 == 1 for s in range(8)]


def test_record_gradients_twice_in_a_step_keeps_the_last_call():
    # gradient accumulation under a Trainer: record_gradients() after each backward; the last one before
    # step() is the accumulated gradient, and the update ratio is read once per step (exact: no sample)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    mon = gm.Monitor(model, opt, probes=[GradientProbe(update_sample=None)])
    want_grad, want_update, weights = {}, {}, [[p.detach().double().clone() for p in model[0].parameters()]]
    for step in range(5):
        for _ in range(2):
            nn.functional.mse_loss(model(torch.randn(4, 5)), torch.randn(4, 3)).backward()
            mon.record_gradients()
        want_grad[step] = math.sqrt(sum(float(p.grad.double().square().sum()) for p in model[0].parameters()))
        opt.step()
        mon.step()
        opt.zero_grad(set_to_none=True)
        weights.append([p.detach().double().clone() for p in model[0].parameters()])
    for step in range(1, 5):  # the update into step s: between the weights at its backward and the step before's
        before, after = weights[step - 1], weights[step]
        change = math.sqrt(sum(float((a - b).square().sum()) for a, b in zip(after, before, strict=True)))
        want_update[step] = change / math.sqrt(sum(float(b.square().sum()) for b in before))
    mon.close()
    trace = mon.trace
    j = trace.layers.index("0")
    for step in range(5):
        assert trace.metric("grad_norm")[step, j] == pytest.approx(want_grad[step], rel=1e-6)
    for step in range(1, 5):
        assert trace.metric("update_to_weight")[step, j] == pytest.approx(want_update[step], rel=1e-6)


class Bomb(nn.Module):
    """Turns its input into NaN or +Inf when armed: the module where the non-finite value is born."""

    armed: str | None = None

    def forward(self, x):
        if self.armed == "nan":
            return x * float("nan")
        return x.abs() * float("inf") if self.armed == "inf" else x


def test_non_finite_steps_and_clean_steps_in_one_flush():
    # NaN or Inf born in one module at some steps, in another at others, none at the rest: each step's event
    # names its own module and value (steps of one layout differ in their values: NaN or Inf)
    model = nn.Sequential(nn.Linear(3, 3), Bomb(), nn.Linear(3, 3), Bomb(), nn.Linear(3, 1))
    mon = gm.Monitor(model, probes=[NonFiniteProbe()], flush_every=20)
    plan = [None, ("3", "nan"), None, ("1", "nan"), ("3", "inf"), ("3", "nan"), ("1", "inf"), None, ("3", "inf")]
    for fault in plan:
        model[1].armed = fault[1] if fault and fault[0] == "1" else None
        model[3].armed = fault[1] if fault and fault[0] == "3" else None
        model(torch.randn(2, 3)).sum().backward()
        mon.step()
        model.zero_grad(set_to_none=True)
    mon.close()
    forward = {e["step"]: (e["module"], e["value"]) for e in mon.trace.events if e["phase"] == "forward"}
    assert forward == {s: fault for s, fault in enumerate(plan) if fault}


def test_record_gradients_at_every_backward_makes_no_host_copy_between_flushes():
    # accumulation under a Trainer: the second call of a step replaces the first's entry, nothing is settled then
    from tests.helpers import count_host_syncs

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = gm.Monitor(model, opt, preset="full", flush_every=300)

    def train(steps):
        for _ in range(steps):
            for _ in range(2):
                nn.functional.mse_loss(model(torch.randn(4, 5)), torch.randn(4, 3)).backward()
                mon.record_gradients()
            opt.step()
            mon.step()
            opt.zero_grad(set_to_none=True)

    train(max(FIRST_LOOKS) + 1)  # the first steps build the probes' index tensors, once; the first looks flush
    with count_host_syncs() as syncs:
        train(40)
    assert dict(syncs) == {}, dict(syncs)
    mon.close()
    assert len(mon.trace.steps) == max(FIRST_LOOKS) + 1 + 40


def test_loss_and_learning_rate_are_the_steps_own_values():
    # a loss accumulator zeroed after each step and a learning rate kept as a tensor that a scheduler updates in
    # place (torch's recipe for compiled optimizers): each step records its own value, not the one at the flush
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    mon = gm.Monitor(model, opt, probes=[GradientProbe()])
    running, losses = torch.zeros(()), []
    for _ in range(4):
        loss = model(torch.randn(8, 3)).square().mean()
        loss.backward()
        running += loss.detach()
        losses.append(float(running))
        mon.step(running)
        running.zero_()
        opt.step()
        sched.step()
        opt.zero_grad()
    mon.close()
    assert mon.trace.scalar("loss")[1].tolist() == pytest.approx(losses, rel=1e-7)
    assert mon.trace.scalar("lr")[1].tolist() == pytest.approx([0.01, 0.005, 0.0025, 0.00125], rel=1e-6)


def test_an_empty_loss_tensor_loses_nothing_else():
    model = nn.Linear(3, 1)
    mon = gm.Monitor(model, torch.optim.SGD(model.parameters(), lr=0.1), probes=[GradientProbe()])
    for step in range(4):
        loss = model(torch.randn(2, 3)).sum()
        loss.backward()
        mon.step(torch.zeros(0) if step == 2 else loss)
    mon.close()
    assert mon.trace.scalar("loss")[0].tolist() == [0, 1, 3]
    assert mon.trace.scalar("lr")[0].tolist() == [0, 1, 2, 3]


def test_a_gradient_dropped_between_two_calls_of_a_step_keeps_the_first_calls_values():
    # record_gradients(), another backward, a layer's gradient set to None, record_gradients() again: the
    # dropped layer keeps what the first call read (as an immediate write would have), the others
    # take the second call's
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = gm.Monitor(model, opt, probes=[GradientProbe(update_sample=None)])
    want = {}
    for step in range(3):
        nn.functional.mse_loss(model(torch.randn(3, 4)), torch.randn(3, 2)).backward()
        mon.record_gradients()
        want[(step, "2")] = math.sqrt(sum(float(p.grad.double().square().sum()) for p in model[2].parameters()))
        nn.functional.mse_loss(model(torch.randn(3, 4)), torch.randn(3, 2)).backward()
        model[2].weight.grad = model[2].bias.grad = None
        mon.record_gradients()
        want[(step, "0")] = math.sqrt(sum(float(p.grad.double().square().sum()) for p in model[0].parameters()))
        opt.step()
        mon.step()
        opt.zero_grad(set_to_none=True)
    mon.close()
    trace = mon.trace
    for (step, layer), norm in want.items():
        assert trace.metric("grad_norm")[step, trace.layers.index(layer)] == pytest.approx(norm, rel=1e-6)
