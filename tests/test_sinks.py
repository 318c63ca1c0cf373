"""Monitor(log_to=...): TensorBoard event files read back with TensorBoard's own reader, plain callables,
wandb/mlflow-shaped callables, no host sync between flushes, a failing sink never breaks training."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import gradmedic as gm
from tests.helpers import count_host_syncs

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from gradmedic.integrations.tensorboard import write_trace  # noqa: E402


class SeqNet(nn.Module):
    """A sigmoid MLP head on a tanh RNN: per-layer scalars and per-time-step curves."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.RNN(3, 8, batch_first=True)
        self.head = nn.Sequential(nn.Linear(8, 8), nn.Sigmoid(), nn.Linear(8, 2))

    def forward(self, x):  # (B, T, 3)
        return self.head(self.rnn(x)[0][:, -1])


def train(steps=7, **monitor_kwargs):
    model = SeqNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = gm.Monitor(model, opt, preset="full", **monitor_kwargs)
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        loss = model(torch.randn(4, 5, 3, generator=gen)).square().mean()
        loss.backward()
        mon.step(loss)
        opt.step()
        opt.zero_grad()
    mon.close()
    return mon


def read_events(logdir):
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_summary_writer_gets_every_number_with_readable_tags(tmp_path):
    writer = SummaryWriter(log_dir=str(tmp_path))
    mon = train(log_to=writer, flush_every=3)
    writer.close()
    acc = read_events(tmp_path)
    tags = set(acc.Tags()["scalars"])
    trace = mon.trace
    assert {"gradmedic/loss", "gradmedic/lr", "gradmedic/total_grad_norm", "gradmedic/grad_norm/rnn",
            "gradmedic/grad_norm/head.0", "gradmedic/backward_rms/head.2", "gradmedic/saturated_frac/head.1"} <= tags
    steps, loss = trace.scalar("loss")
    events = acc.Scalars("gradmedic/loss")
    assert [e.step for e in events] == list(steps) == list(range(7))
    np.testing.assert_allclose([e.value for e in events], loss, rtol=1e-6)  # TensorBoard stores float32
    for layer in ("rnn", "head.0", "head.2"):
        events = acc.Scalars(f"gradmedic/grad_norm/{layer}")
        column = trace.metric("grad_norm")[:, trace.layers.index(layer)]
        assert [e.step for e in events] == list(trace.steps)
        np.testing.assert_allclose([e.value for e in events], column, rtol=1e-6)
    # per-time-step curve of the RNN at step 0: x axis is the time step 1..5
    curve = acc.Scalars("gradmedic/time_grad_rms/rnn/step_0")
    _, values = trace.series("time_grad_rms")["rnn"]
    assert [e.step for e in curve] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([e.value for e in curve], values[0], rtol=1e-6)
    # the findings, as text, at close
    assert "gradmedic/findings/text_summary" in acc.Tags()["tensors"]


def test_a_plain_callable_receives_the_same_numbers(tmp_path):
    got = {}
    mon = train(log_to=lambda step, metrics: got.setdefault(step, {}).update(metrics), flush_every=3)
    trace = mon.trace
    assert sorted(got) == list(range(7))
    steps, loss = trace.scalar("loss")
    assert [got[int(s)]["gradmedic/loss"] for s in steps] == list(loss)  # exact: the same float64
    column = trace.metric("grad_norm")[:, trace.layers.index("head.0")]
    assert [got[s]["gradmedic/grad_norm/head.0"] for s in range(7)] == list(column)
    assert "gradmedic/forward_index/head.0" not in got[0]  # bookkeeping, not a measurement


def test_wandb_and_mlflow_shaped_callables_work_unchanged():
    seen = []

    def log(data, step=None, commit=None, sync=None):  # wandb.log's signature
        seen.append(("wandb", step, data["gradmedic/loss"]))

    def log_metrics(metrics, step=None, synchronous=None, run_id=None, timestamp=None):  # mlflow.log_metrics'
        seen.append(("mlflow", step, metrics["gradmedic/loss"]))

    for fn in (log, log_metrics):
        train(steps=2, log_to=fn)
    assert [(who, step) for who, step, _ in seen] == [("wandb", 0), ("wandb", 1), ("mlflow", 0), ("mlflow", 1)]
    assert all(isinstance(v, float) for _, _, v in seen)


def test_values_reach_the_sink_only_at_flushes_without_host_syncs():
    got = []
    model = SeqNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = gm.Monitor(model, opt, preset="full", flush_every=5, log_to=lambda step, m: got.append(step))
    x = torch.randn(4, 5, 3)

    def train(steps):
        for _ in range(steps):
            loss = model(x).square().mean()
            loss.backward()
            mon.step(loss)
            opt.step()
            opt.zero_grad()

    train(16)  # the probes' index tensors are built (once), the first looks flush (gradmedic._first_look)
    assert got == list(range(16))  # each step once, at the flushes up to step 15
    got.clear()
    with count_host_syncs() as syncs:
        train(3)  # steps 16-18: the next flush is at 20 (flush_every=5)
    assert dict(syncs) == {} and got == []
    mon.close()
    assert got == [16, 17, 18]


def test_a_failing_sink_warns_once_and_training_goes_on():
    def broken(step, metrics):
        raise ConnectionError("server gone")

    with pytest.warns(gm.GradmedicWarning, match="log_to failed .*server gone"):
        mon = train(log_to=broken, flush_every=2)
    assert len(mon.trace.steps) == 7


def test_bad_log_to_is_a_one_line_error():
    with pytest.raises(gm.GradmedicError, match="Argument log_to should be a TensorBoard SummaryWriter"):
        gm.Monitor(SeqNet(), log_to="runs/")


def test_saved_trace_to_tensorboard(tmp_path):
    mon = train()
    path = mon.trace.save(tmp_path / "run.gmtrace")
    trace = gm.Trace.load(path)
    write_trace(trace, tmp_path / "tb")
    acc = read_events(tmp_path / "tb")
    np.testing.assert_allclose([e.value for e in acc.Scalars("gradmedic/grad_norm/head.0")],
                               trace.metric("grad_norm")[:, trace.layers.index("head.0")], rtol=1e-6)
    assert "gradmedic/findings/text_summary" in acc.Tags()["tensors"]


def test_import_gradmedic_imports_no_framework():
    # (gradmedic.integrations.huggingface and .lightning import their framework: they subclass its callback)
    code = ("import sys, gradmedic, gradmedic.integrations, gradmedic.integrations.tensorboard, gradmedic.report; "
            "print(sorted(m for m in ('transformers', 'lightning', 'pytorch_lightning', 'tensorboard', "
            "'torch.utils.tensorboard', 'wandb', 'mlflow', 'accelerate', 'rich', 'nbformat', 'IPython') if m in "
            "sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
