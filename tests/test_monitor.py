"""Monitor: schedules, presets, clean detach, failure isolation, host syncs, odd outputs."""

import contextlib
import copy
import gc
import weakref
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

import gradmedic as gm
from gradmedic._first_look import FIRST_LOOKS
from gradmedic.probes import PRESETS, GradientProbe, Probe
from tests.helpers import aten_host_reads, count_host_syncs, hook_state, sigmoid_mlp


def train(model, steps=6, monitor_kwargs=None, data_seed=2, dtype=torch.float32):
    """A small SGD loop; with monitor_kwargs the Monitor watches it. Returns losses and the monitor."""
    torch.manual_seed(data_seed)
    x, y = torch.randn(16, 16, dtype=dtype), torch.randn(16, 4, dtype=dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    mon = gm.Monitor(model, opt, **monitor_kwargs) if monitor_kwargs is not None else None
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if mon is not None:
            mon.step(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, mon


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_run_and_close_leaves_no_hook(preset):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.LSTM(8, 8, batch_first=True))
    before = hook_state(model)
    mon = gm.Monitor(model, preset=preset, every=2)
    for _ in range(5):
        model(torch.randn(2, 3, 4))[0].sum().backward()
        mon.step()
    mon.close()
    assert hook_state(model) == before
    looks = set(FIRST_LOOKS) if PRESETS[preset]["gradients"].get("update_ratio", True) else set()
    assert list(mon.trace.steps) == sorted({0, 2, 4} | {s for s in looks if s < 5})  # the first looks' updates too


def test_context_manager_and_schedule():
    model = sigmoid_mlp()
    before = hook_state(model)
    with gm.Monitor(model, probes=[GradientProbe(every=3)]) as mon:
        for _ in range(7):
            model(torch.randn(2, 16)).sum().backward()
            mon.step()
    assert hook_state(model) == before
    assert list(mon.trace.steps) == [0, 1, 3, 6]  # every 3rd, and the first looks' updates (steps 1, 3)


def test_monitored_training_is_bit_identical_to_unmonitored():
    plain_model = sigmoid_mlp()
    watched_model = copy.deepcopy(plain_model)
    plain, _ = train(plain_model)
    watched, mon = train(watched_model, monitor_kwargs={"preset": "full"})
    assert plain == watched
    for a, b in zip(plain_model.parameters(), watched_model.parameters(), strict=True):
        assert torch.equal(a, b)
    steps, losses = mon.trace.scalar("loss")
    assert list(steps) == list(range(6))
    np.testing.assert_allclose(losses, watched, rtol=1e-7)  # the loss passed to step(), every step
    _, lrs = mon.trace.scalar("lr")
    assert set(lrs) == {0.5}


class Exploding(Probe):
    """A probe that raises in one chosen phase."""

    name = "exploding"
    metrics = ("x",)
    uses_hooks = True

    def __init__(self, phase):
        super().__init__(every=1)
        self.phase = phase

    def arm(self):
        if self.phase == "arm":
            raise RuntimeError("boom in arm")
        module = self.layers.modules[1]
        self._handles.append(module.register_forward_hook(self.guard(self._fwd)))

    def _fwd(self, module, args, output):
        if self.phase == "forward":
            raise RuntimeError("boom in forward hook")
        output.register_hook(self.guard(self._bwd))

    def _bwd(self, grad):
        if self.phase == "backward":
            raise RuntimeError("boom in backward hook")

    def collect(self, step):
        if self.phase == "collect":
            raise RuntimeError("boom in collect")

    def flush(self):
        if self.phase == "flush":
            raise RuntimeError("boom in flush")
        return super().flush()


@pytest.mark.parametrize("phase", ["arm", "forward", "backward", "collect", "flush"])
def test_failing_probe_warns_once_and_leaves_training_intact(phase):
    plain_model = sigmoid_mlp()
    watched_model = copy.deepcopy(plain_model)
    before = hook_state(watched_model)
    plain, _ = train(plain_model)
    with pytest.warns(gm.GradmedicWarning, match="exploding") as record:
        watched, mon = train(watched_model, monitor_kwargs={"probes": [Exploding(phase), GradientProbe()],
                                                            "flush_every": 2})
        mon.close()
    # once for the failing probe; counted by its message, since a Monitor an earlier test left in a reference cycle
    # may be collected here and say so in a GradmedicWarning of its own (a flaky count of 2 in a full run)
    failed = [w for w in record if issubclass(w.category, gm.GradmedicWarning) and "exploding" in str(w.message)]
    assert len(failed) == 1, [str(w.message) for w in record]
    assert plain == watched
    for a, b in zip(plain_model.parameters(), watched_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert hook_state(watched_model) == before
    assert len(mon.trace.steps) == 6  # the healthy probe kept recording


def test_zero_host_syncs_between_flushes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 16), nn.Tanh(), nn.Linear(16, 3))
    rnn = nn.GRU(3, 5, batch_first=True)
    both = nn.ModuleDict({"cnn": model, "rnn": rnn})
    opt = torch.optim.Adam(both.parameters(), lr=1e-3)
    mon = gm.Monitor(both, opt, preset="full", flush_every=1000)
    x, seq = torch.randn(8, 1, 6, 6), torch.randn(8, 5, 3)

    def train(steps):
        for _ in range(steps):
            loss = model(x).square().mean() + rnn(seq)[0].square().mean()
            loss.backward()
            mon.step(loss)
            opt.step()
            opt.zero_grad()

    train(1)  # the first measured step builds the probes' index tensors (Probe.host_tensor), once
    train(max(FIRST_LOOKS))  # the first looks flush (gradmedic._first_look)
    with count_host_syncs() as syncs:
        train(10)
    assert dict(syncs) == {}, f"host syncs from gradmedic between flushes: {dict(syncs)}"
    with count_host_syncs() as syncs:
        mon.flush()
    assert sum(syncs.values()) >= 1  # the flush is where the copies happen (and the counter works)


class _LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(6, 16, num_layers=2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


_SYNC_MODELS = {
    "mlp": lambda: (nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5)),
                    torch.randn(16, 20)),
    "cnn_bn": lambda: (nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                                     nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.GELU(), nn.Flatten(),
                                     nn.Linear(8 * 8 * 8, 4)), torch.randn(8, 3, 8, 8)),
    "lstm": lambda: (_LSTMNet(), torch.randn(4, 12, 6)),
}


@pytest.mark.parametrize("preset", ["cheap", "standard", "full"])
@pytest.mark.parametrize("workload", sorted(_SYNC_MODELS))
def test_no_host_sync_or_host_copy_between_flushes(preset, workload):
    """Neither a device-to-host read nor a tensor made from host data (a blocking copy on CUDA) between
    flushes, for every preset, over enough steps that every probe of the preset measures twice."""
    torch.manual_seed(0)
    model, x = _SYNC_MODELS[workload]()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    mon = gm.Monitor(model, opt, preset=preset, flush_every=1000)
    lrs = []

    def train(steps):
        for i in range(steps):
            loss = model(x).square().mean()
            loss.backward()
            lrs.append(opt.param_groups[0]["lr"])
            mon.step(loss if i % 2 else loss.item())  # a tensor loss stays on the device; a float on the host
            opt.step()
            sched.step()
            opt.zero_grad()

    with count_host_syncs() as first:
        train(1)  # the first measured step builds each probe's index and count tensors (Probe.host_tensor)
    assert set(first) <= {"host->device: torch.tensor"}, dict(first)
    train(max(FIRST_LOOKS))  # the first looks flush (gradmedic._first_look)
    every = max(kw.get("every", 1) * kw.get("horizon_every", 1) for kw in PRESETS[preset].values())
    with count_host_syncs() as syncs:
        train(every + 2)
    assert dict(syncs) == {}, f"host syncs or copies from gradmedic between flushes: {dict(syncs)}"
    with count_host_syncs() as at_flush:
        mon.flush()
    assert sum(at_flush.values()) >= 1  # the flush is where the copies happen (and the counter works)
    steps, values = mon.trace.scalar("lr")
    assert steps.tolist() == list(range(len(lrs)))  # every step, the first looks' flushes included
    assert values.tolist() == lrs  # kept on the host: exactly the optimizer's floats
    assert len(mon.trace.scalar("loss")[0]) == len(lrs)
    mon.close()


class _Experts(nn.Module):
    """A mixture of experts routed by a fixed schedule: which experts get tokens, so which parameters have a
    gradient, changes from step to step, as in a sparse MoE whose router sends no token to some experts."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.experts = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))
        self.out = nn.Linear(16, 3)
        self.route: tuple[int, ...] = (0,)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(sum(self.experts[i](h) for i in self.route))


def test_no_host_copy_between_flushes_when_the_parameters_with_a_gradient_change():
    """A set of parameters with a gradient not seen before (an expert that got tokens for the first time) is planned
    on the host; its device index tensors are made at the flush, which reduces the step, not at the step."""
    torch.manual_seed(0)
    model, x = _Experts(), torch.randn(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = gm.Monitor(model, opt, preset="full", flush_every=1000)
    mon._sentinel = None  # the loss rises as fresh experts join: a divergence flush, not the steps this test counts
    routes = [(0,), (0,), (1, 2), (3,), (0, 3), (1,), (2, 3)]

    def train(steps):
        for route in steps:
            model.route = route
            loss = model(x).square().mean()
            loss.backward()
            mon.step(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)

    train(routes[:1] * (max(FIRST_LOOKS) + 1))  # past the first looks' flushes, with expert 0 alone
    with count_host_syncs() as syncs:
        train(routes[1:])  # expert sets not seen before
    assert dict(syncs) == {}, f"host syncs or copies from gradmedic between flushes: {dict(syncs)}"
    mon.flush()
    grad, layers = mon.trace.metric("grad_norm"), mon.trace.layers
    start = max(FIRST_LOOKS)
    assert mon.trace.steps.tolist() == list(range(start + len(routes)))
    for step, route in enumerate(routes, start):  # each step's experts measured, the others not
        assert [not np.isnan(grad[step, layers.index(f"experts.{i}")]) for i in range(4)] == [
            i in route for i in range(4)]
    mon.close()


@pytest.mark.parametrize("preset", ["cheap", "standard", "full"])
@pytest.mark.parametrize("workload", sorted(_SYNC_MODELS))
def test_no_host_read_inside_torch_operators_between_flushes(preset, workload):
    """What count_host_syncs cannot see: a value read to the host inside an ATen operator (a checked
    segment_reduce reads its lengths). A monitored loop makes exactly as many as the same loop unmonitored."""
    torch.manual_seed(0)
    model, x = _SYNC_MODELS[workload]()
    plain = copy.deepcopy(model)
    runs = []
    for net, monitored in ((model, True), (plain, False)):
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        mon = gm.Monitor(net, opt, preset=preset, flush_every=1000) if monitored else None

        def train(steps, net=net, opt=opt, mon=mon):
            for _ in range(steps):
                loss = net(x).square().mean()
                loss.backward()
                if mon is not None:
                    mon.step(loss)
                opt.step()
                opt.zero_grad()

        train(2)  # layouts built, the update snapshot taken
        every = max(kw.get("every", 1) * kw.get("horizon_every", 1) for kw in PRESETS[preset].values())
        runs.append(aten_host_reads(lambda train=train, every=every: train(every + 2)))
        if mon is not None:
            mon.close()
    assert runs[0] == runs[1], f"monitored {runs[0]} host reads inside operators, plain {runs[1]}"


def test_aten_host_read_counter_sees_an_operator_that_reads():
    lengths = torch.tensor([2, 3])
    data = torch.arange(5.0)
    assert aten_host_reads(lambda: torch.segment_reduce(data, "sum", lengths=lengths)) >= 1
    assert aten_host_reads(lambda: torch.segment_reduce(data, "sum", lengths=lengths, unsafe=True)) == 0


def test_host_tensor_is_made_once_and_the_counter_sees_it():
    probe = GradientProbe()
    probe.attach(gm.probes.base.LayerIndex(sigmoid_mlp()), 4)
    with count_host_syncs() as made:
        a = probe.host_tensor([3, 1, 2], torch.long)
    with count_host_syncs() as again:
        b = probe.host_tensor([3, 1, 2], torch.long)
        c = probe.host_tensor([3, 1, 2], torch.float64)
    assert dict(made) == {"host->device: torch.tensor": 1}
    assert dict(again) == {"host->device: torch.tensor": 1}  # the float64 one is new, the long one reused
    assert b is a and a.tolist() == [3, 1, 2] and c.dtype == torch.float64


def test_no_graph_or_activation_is_kept_after_the_step():
    model = sigmoid_mlp()
    mon = gm.Monitor(model, preset="full")
    out = model(torch.randn(4, 16))
    ref = weakref.ref(out)
    out.sum().backward()
    mon.step()
    del out
    gc.collect()
    assert ref() is None


@dataclass
class Output:
    logits: torch.Tensor
    hidden: tuple


class HFStyle(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return {"out": Output(logits=self.head(h), hidden=(h,))}


def test_dict_and_dataclass_outputs():
    model = HFStyle()
    with gm.Monitor(model, preset="full") as mon:
        model(torch.randn(8, 4))["out"].logits.sum().backward()
        mon.step()
    assert set(mon.trace.last("backward_rms")) == {"body", "head"}
    assert set(mon.trace.last("dead_frac")) == {"body"}  # the functional relu, under the layer it follows


@pytest.mark.parametrize("kwargs,match", [
    ({"preset": "fast"}, "Argument preset should be one of"),
    ({"every": 0}, "Argument every should be a positive int"),
    ({"flush_every": -1}, "Argument flush_every should be"),
    ({"probes": ["gradients"]}, "Argument probes should be"),
    ({"optimizer": "adam"}, "Argument optimizer should be"),
])
def test_bad_arguments_have_one_line_errors(kwargs, match):
    with pytest.raises(gm.GradmedicError, match=match) as info:
        gm.Monitor(sigmoid_mlp(), **kwargs)
    assert "\n" not in str(info.value)


def test_not_a_module_and_step_after_close():
    with pytest.raises(gm.GradmedicError, match="Argument model should be a torch.nn.Module"):
        gm.Monitor(lambda x: x)
    mon = gm.Monitor(sigmoid_mlp())
    mon.close()
    mon.close()  # idempotent
    with pytest.raises(gm.GradmedicError, match="after close"):
        mon.step()


def test_float64_model_full_preset():
    model = sigmoid_mlp(dtype=torch.float64)
    _, mon = train(model, monitor_kwargs={"preset": "full"}, dtype=torch.float64)
    mon.close()
    assert mon.trace.meta["dtype"] == "float64"
    assert np.isfinite(mon.trace.metric("grad_norm")).any()


def _gan():
    torch.manual_seed(0)
    generator = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 8))
    discriminator = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    return generator, discriminator


@pytest.mark.parametrize("pause", [True, False])
def test_a_generator_step_inside_paused_is_not_pooled_into_the_discriminators_next_step(pause):
    """A GAN loop: the generator's loss runs backward through the discriminator after the discriminator's step.
    Inside ``monitor.paused()`` that pass is not measured, so the discriminator's backward signal is its own loss's
    (learning rate 0: the same at every step, checked against autograd). Without it, the pass pools into the next
    step, as the micro-batches of gradient accumulation do (what paused() is for)."""
    generator, discriminator = _gan()
    opt_d = torch.optim.SGD(discriminator.parameters(), lr=0.0)
    opt_g = torch.optim.SGD(generator.parameters(), lr=0.0)
    real, noise = torch.randn(16, 8, generator=torch.Generator().manual_seed(1)), torch.randn(16, 4)
    hooks = hook_state(discriminator)
    with gm.Monitor(discriminator, opt_d, preset="full") as monitor:
        for _ in range(3):
            opt_d.zero_grad()
            loss_d = discriminator(real).mean() - discriminator(generator(noise).detach()).mean()
            loss_d.backward()
            monitor.step(loss_d)
            opt_d.step()
            with monitor.paused() if pause else contextlib.nullcontext():
                assert (hook_state(discriminator) == hooks) == pause  # no hook of ours inside
                opt_g.zero_grad()
                loss_g = -discriminator(generator(noise)).mean()
                loss_g.backward()
                opt_g.step()
    measured = monitor.trace.metric("backward_rms")[:, monitor.trace.layers.index("0")]
    out = {}
    discriminator[0].register_forward_hook(lambda m, a, o: out.setdefault("y", []).append(o))
    loss_d = discriminator(real).mean() - discriminator(generator(noise).detach()).mean()
    grads = torch.autograd.grad(loss_d, out["y"])
    true = (sum(g.double().square().sum() for g in grads) / sum(g.numel() for g in grads)).sqrt().item()
    if pause:
        assert measured == pytest.approx([true] * 3, rel=1e-5)
    else:
        assert measured[0] == pytest.approx(true, rel=1e-5) and abs(measured[1] / true - 1) > 1e-3


def test_a_step_inside_paused_leaves_compiled_code_compiled():
    """While paused no hook is on the model, so compiled code need not run eagerly, also after a step() inside."""
    model = sigmoid_mlp()
    with gm.Monitor(model, preset="full") as monitor:
        stances = []
        real = monitor._eager.hold
        monitor._eager.hold = lambda on: (stances.append(on), real(on))[1]
        with monitor.paused():
            model(torch.randn(4, model[0].in_features)).sum().backward()
            monitor.step()
        assert stances[0] is False and True not in stances[:-1] and stances[-1] is True  # eager again on leaving
