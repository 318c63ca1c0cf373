"""Trace: round trips without pickle, exports, a readable summary, safe writes."""

import csv
import io
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

import gradmedic as gm


@pytest.fixture(scope="module")
def trace():
    torch.manual_seed(0)
    model = nn.ModuleDict({"mlp": nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)),
                           "rnn": nn.RNN(2, 3, batch_first=True)})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gm.Monitor(model, opt, preset="full", flush_every=2) as mon:
        for step in range(5):
            x = torch.randn(4, 3)
            if step == 3:
                x[0, 0] = float("nan")
            loss = model["mlp"](x).sum() + model["rnn"](torch.randn(4, 6, 2))[0][:, -1].sum()
            loss.backward()
            mon.step(loss)
            opt.step()
            opt.zero_grad()
    return mon.trace


def test_shape_and_content(trace):
    assert list(trace.steps) == [0, 1, 2, 3, 4]
    assert trace.values.shape == (5, len(trace.layers), len(trace.metrics))
    assert trace.layers.index("mlp.0") < trace.layers.index("mlp.2") < trace.layers.index("rnn")
    steps, values = trace.series("time_grad_rms")["rnn"]
    assert list(steps) == [0, 1, 2, 3, 4] and values.shape == (5, 6)
    assert {(e["step"], e["phase"], e["module"]) for e in trace.events} >= {(3, "forward", "mlp.0")}


def test_save_load_round_trip_without_pickle(trace, tmp_path):
    path = trace.save(tmp_path / "run.gmtrace")
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            if name.endswith(".npy"):
                np.load(io.BytesIO(zf.read(name)), allow_pickle=False)  # raises if an object array slipped in
    loaded = gm.Trace.load(path)
    assert loaded.layers == trace.layers and loaded.metrics == trace.metrics
    np.testing.assert_array_equal(loaded.steps, trace.steps)
    np.testing.assert_array_equal(loaded.values, trace.values)
    np.testing.assert_array_equal(loaded.series("time_grad_rms")["rnn"][1], trace.series("time_grad_rms")["rnn"][1])
    assert loaded.events == trace.events
    for name in ("loss", "lr"):
        np.testing.assert_array_equal(loaded.scalar(name)[1], trace.scalar(name)[1])
    assert loaded.meta == trace.meta


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(gm.GradmedicError, match="No trace file"):
        gm.Trace.load(tmp_path / "missing.gmtrace")
    bad = tmp_path / "bad.gmtrace"
    bad.write_text("hello")
    with pytest.raises(gm.GradmedicError, match="not a readable gradmedic trace") as info:
        gm.Trace.load(bad)
    assert "\n" not in str(info.value)


def test_failed_save_keeps_the_old_file(trace, tmp_path, monkeypatch):
    path = trace.save(tmp_path / "run.gmtrace")
    good = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", broken)
    with pytest.raises(OSError):
        trace.save(path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["run.gmtrace"]


def test_to_pandas_and_csv(trace, tmp_path):
    frame = trace.to_pandas()
    assert frame.index.names == ["step", "layer"]
    want = trace.metric("grad_norm")[2, trace.layers.index("mlp.0")]
    assert frame.loc[(2, "mlp.0"), "grad_norm"] == pytest.approx(want)
    rows = list(csv.DictReader(open(trace.to_csv(tmp_path / "run.csv"))))
    assert len(rows) == len(frame)
    first = next(r for r in rows if r["step"] == "2" and r["layer"] == "mlp.0")
    assert float(first["grad_norm"]) == frame.loc[(2, "mlp.0"), "grad_norm"]


def test_summary_is_readable(trace):
    text = trace.summary()
    assert "mlp.0" in text and "|grad|" in text and "first nan in the forward pass at 'mlp.0'" in text
    assert "Trace(steps=5" in repr(trace)
    with pytest.raises(gm.GradmedicError, match="No metric 'nope'"):
        trace.metric("nope")
