"""The loss sentinel (gradmedic/_sentinel.py): a NaN loss, a held loss spike and a diverging loss are said live at the
step they are seen, not at the next flush; its decisions equal the rules run on the trace cut at every step; healthy
runs flush on schedule only; the CUDA ring never blocks and gives values back in step order."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import gradmedic as gm
from gradmedic._sentinel import LossReader, Sentinel
from gradmedic.diagnosis.context import Context
from gradmedic.diagnosis.rules import training
from gradmedic.diagnosis.rules.training import SPIKE_CONFIRM
from gradmedic.probes.base import Chunk
from tests import training_runs as corpus

RANKS = {None: -1, "info": -1, "warning": 0, "error": 1}  # info is not said live


def _trace(loss: np.ndarray) -> gm.Trace:
    trace = gm.Trace({"modules": [""], "types": {"": "Sequential"}, "params": {}})
    trace.extend(Chunk(np.zeros(0, np.int64), [], [], np.zeros((0, 0, 0)),
                       scalars={"loss": (np.arange(len(loss)), np.asarray(loss, dtype=float))}))
    return trace


def _by_the_rules(loss: np.ndarray) -> list[tuple[int, str]]:
    """When the sentinel should fire, from the rules run on the trace cut at every step (the independent path): a
    non-finite loss after a finite one; a loss_spike warning for a spike not warned of before; a divergence whose
    severity rises above the highest it had since it last said nothing."""
    out, said_spikes, top = [], set(), -1
    for t in range(len(loss)):
        if not math.isfinite(loss[t]) and (t == 0 or math.isfinite(loss[t - 1])):
            out.append((t, "nonfinite"))
        cut = _trace(loss[:t + 1])
        spike = [f for f in training.loss_spike(cut, Context()) if f.severity == "warning"]
        if spike and spike[0].evidence["step"] not in said_spikes:
            said_spikes.add(spike[0].evidence["step"])
            out.append((t, "loss_spike"))
        div = training.divergence(cut, Context())
        rank = RANKS[div[0].severity] if div else -1
        if rank < 0:
            top = -1
        elif rank > top:
            top = rank
            out.append((t, "divergence"))
    return out


def _series(seed: int) -> np.ndarray:
    """A learning curve with batch noise, then by seed: spikes that recover or hold, NaN stretches, a divergence."""
    rng = np.random.default_rng(seed)
    n = 160
    loss = np.linspace(2.3, 0.4, n) * (1 + 0.05 * rng.standard_normal(n))
    for _ in range(rng.integers(1, 4)):
        at, width = int(rng.integers(25, n - 5)), int(rng.integers(1, 4))
        loss[at:at + width] *= rng.choice([3.0, 10.0, 100.0])
    if seed % 3 == 0:
        at = int(rng.integers(30, n - 10))
        loss[at:at + int(rng.integers(1, 15))] = rng.choice([np.nan, np.inf])
    if seed % 4 == 1:
        at = int(rng.integers(60, n - 20))
        loss[at:] = loss[at:] * np.geomspace(1, 20, n - at)
    if seed % 5 == 2:
        loss[:3] = np.nan  # NaNs before the divergence rule's start is known
    return loss


@pytest.mark.parametrize("seed", range(12))
def test_decisions_equal_the_rules_on_the_trace_cut_at_every_step(seed):
    loss = _series(seed)
    sentinel = Sentinel(lambda *a, **k: None)
    for step, value in enumerate(loss):
        sentinel.see(step, float(value))
    assert sentinel.alarms == _by_the_rules(loss)


def test_the_series_above_reach_every_kind():
    # the test above is not vacuous: over its seeds every kind fires, and some seeds fire none
    fired = [set(k for _, k in _by_the_rules(_series(s))) for s in range(12)]
    assert set().union(*fired) == {"nonfinite", "loss_spike", "divergence"}


# --- live, at the step ------------------------------------------------------------------------------------------------
def _train(steps: int, poison_at: int | None = None, lr_spike_at: int | None = None, **monitor_kwargs):
    """A ReLU MLP learning a fixed teacher (tanh of a linear map, a little noise), SGD; an inf input from
    ``poison_at`` on, or the lr x1000 at ``lr_spike_at``. Returns the Monitor (closed), the caught warnings and
    {step at return: findings said by then}."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(512, 8, generator=gen)
    y = torch.tanh(x @ torch.randn(8, 1, generator=gen)) + 0.05 * torch.randn(512, 1, generator=gen)  # learnable
    said = []
    mon = gm.Monitor(model, opt, on_finding=said.append, **monitor_kwargs)
    by_step = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(steps):
            idx = torch.randint(0, 512, (32,), generator=gen)
            xb = x[idx].clone()
            if poison_at is not None and step >= poison_at:
                xb[0, 0] = math.inf
            opt.param_groups[0]["lr"] = 50.0 if step == lr_spike_at else 0.05
            loss = nn.functional.mse_loss(model(xb), y[idx])
            loss.backward()
            mon.step(loss)
            by_step[step] = [(f.kind, f.severity) for f in said]
            opt.step()
            opt.zero_grad()
        mon.close()
    found = [str(w.message) for w in caught if issubclass(w.category, gm.GradmedicFindingWarning)]
    return mon, found, by_step


def test_a_nan_loss_is_said_at_its_step_and_the_nan_probe_looks_at_the_next():
    k = 37  # between the default flushes (every 100) and off the NaN probe's period (100)
    mon, found, by_step = _train(60, poison_at=k)
    assert ("nonfinite", "error") not in by_step[k - 1]
    assert ("nonfinite", "error") in by_step[k]  # on_finding called before step(k) returned
    assert any(text.startswith(f"gradmedic at step {k}: error nonfinite") for text in found), found
    assert mon._sentinel.alarms[0] == (k, "nonfinite")
    # the NaN/Inf probe measured step k + 1, off its schedule: the inf comes with the batch (the model's input), and
    # the first module it went through is named after it
    events = [e for e in mon.trace.events if e.get("kind") == "nonfinite"]
    assert events and min(e["step"] for e in events) == k + 1
    assert events[0]["phase"] == "input" and events[1]["module"] == "0"
    # one episode, one alarm of its kind, though the loss stays non-finite to the end
    assert [kind for _, kind in mon._sentinel.alarms].count("nonfinite") == 1


def test_an_lr_spike_is_said_within_one_step_of_the_spike():
    k = 61
    mon, found, by_step = _train(80, lr_spike_at=k)
    losses = mon.trace.scalar("loss")[1]
    # the spike itself, measured independently: the first step whose loss is 10x the median of the 20 before it
    spike = next(s for s in range(20, len(losses)) if not losses[s] <= 10 * np.median(losses[s - 20:s]))
    assert spike in (k, k + 1)  # the lr of step k moves the weights; the loss of step k + 1 shows it
    said = next(s for s in sorted(by_step) if any(kind in ("loss_spike", "divergence", "nonfinite")
                                                   for kind, _ in by_step[s]))
    assert said - spike <= SPIKE_CONFIRM - 1, (said, spike)
    assert any(f"at step {said}:" in text for text in found), found


def test_a_run_that_stays_healthy_flushes_on_schedule_only():
    mon, found, _ = _train(150)
    assert mon._sentinel.alarms == [] and found == []


@pytest.mark.parametrize("name", [
    "healthy_mlp_adam", "healthy_mlp_sgd_cosine", "healthy_weight_decay_late_rise", "healthy_adamw_logits",
    pytest.param("healthy_recovered_spike", marks=pytest.mark.slow),
    pytest.param("healthy_cnn_adam_warmup", marks=pytest.mark.slow),
])
def test_healthy_corpus_runs_give_no_early_flush_and_say_nothing(name):
    monitors = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        corpus.watched(name, monitors)
    assert monitors[0]._sentinel.alarms == []
    assert [str(w.message) for w in caught if issubclass(w.category, gm.GradmedicFindingWarning)] == []


def test_under_distributed_there_is_no_sentinel(monkeypatch):
    # an early flush would be a collective on one rank: the Monitor builds no sentinel when a combiner is in use
    import gradmedic.monitor as monitor_module

    monkeypatch.setattr(monitor_module, "combiner_for", lambda *a, **k: object())
    mon = gm.Monitor(nn.Linear(2, 2))
    assert mon._sentinel is None
    mon._combiner = None  # closing needs no collective here
    mon.close()


def test_a_failing_sentinel_warns_once_and_the_step_goes_on():
    mon = gm.Monitor(nn.Linear(2, 1))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon.step(torch.tensor(1.0))
        mon._sentinel._reader.put = lambda *a: (_ for _ in ()).throw(RuntimeError("boom"))
        mon.step(torch.tensor(2.0))
        mon.step(torch.tensor(3.0))
    texts = [str(w.message) for w in caught if "watching the loss" in str(w.message)]
    assert len(texts) == 1 and "your training step is unaffected" in texts[0]
    assert mon.step_count == 3
    mon.close()
    assert mon.trace.scalar("loss")[1].tolist() == [1.0, 2.0, 3.0]


# --- the ring of the CUDA path ----------------------------------------------------------------------------------------
class FakeEvent:
    """A CUDA event whose copy is done when the test says so."""

    def __init__(self):
        self.done = True

    def record(self):
        self.done = False

    def query(self):
        return self.done


def test_ring_gives_values_in_step_order_when_their_copies_are_done():
    events = []

    def new_event():
        events.append(FakeEvent())
        return events[-1]

    reader = LossReader(new_event, deferred=True, slots=3)
    assert reader.put(0, torch.tensor(1.5)) == []  # in flight: nothing yet, and nothing waited for
    assert reader.put(1, torch.tensor([2.5, 9.0])) == []  # a loss per sample: its first entry
    assert reader.put(2, 3.5) == []  # a float is known at once but waits behind the copies in flight
    events[1].done = True
    assert reader.put(3, None) == []  # step 0's copy is not done: step 1's waits behind it
    events[0].done = True
    assert reader.put(4, torch.tensor(4.5)) == [(0, 1.5), (1, 2.5), (2, 3.5)]
    assert reader.put(5, torch.tensor(5.5)) == []
    assert reader.put(6, torch.tensor(6.5)) == []  # three copies in flight: every slot
    assert reader.put(7, torch.tensor(7.5)) == []  # no slot free: skipped, not waited for
    assert reader.skipped == 1
    for e in events:
        e.done = True
    assert reader.put(8, None) == [(4, 4.5), (5, 5.5), (6, 6.5)]
    assert reader.put(9, torch.tensor(float("nan"))) == []  # slots are reused after they are read
    for e in events:
        e.done = True
    (step, value), = reader.put(10, None)
    assert step == 9 and math.isnan(value)
    assert len(events) == 3  # one event per slot, recorded again on reuse


def test_ring_values_reach_the_sentinel_late_and_it_fires_on_them():
    events = []

    def new_event():
        events.append(FakeEvent())
        return events[-1]

    sentinel = Sentinel(lambda *a, **k: None, LossReader(new_event, deferred=True))
    assert sentinel.see(0, torch.tensor(1.0)) is False
    assert sentinel.see(1, torch.tensor(float("nan"))) is False  # in flight: not yet known
    for e in events:
        e.done = True
    assert sentinel.see(2, None) is True  # read a step late, named with its own step
    assert sentinel.alarms == [(1, "nonfinite")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the ring is tested above with fake events")
def test_cuda_losses_are_read_without_a_sync():
    reader = LossReader()
    got = []
    for step in range(20):
        got += reader.put(step, torch.tensor(float(step), device="cuda") * 2)
    torch.cuda.synchronize()
    got += reader.put(20, None)
    assert [s for s, _ in got] == sorted(s for s, _ in got)
    assert all(v == 2 * s for s, v in got)
    assert len(got) + reader.skipped == 20
