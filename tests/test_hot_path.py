"""What the full preset's hot path does to stay cheap, each part against an independent computation:
the flat parameter samples (SampleSet) against float64 sums, the sampled zero count against an exact
count, the block spacing against a weight whose columns differ, the zero fraction's "auto" switch, the
horizon's period, fused buffer writes, and a trace that holds no more than its own numbers."""

from __future__ import annotations

import gc
import math
import tracemalloc

import numpy as np
import pytest
import torch
from torch import nn

import gradmedic as gm
from gradmedic.probes import BackwardSignalProbe, GradientProbe, TimeStepProbe
from gradmedic.probes._samples import SampleSet, sample_view
from gradmedic.probes.base import StepBuffer


def _exact_squares(tensors):
    return [float(t.detach().double().square().sum()) for t in tensors]


# --- SampleSet ------------------------------------------------------------------------------------------------
def test_sample_set_reads_small_tensors_exactly_and_scales_samples():
    torch.manual_seed(0)
    tensors = [torch.randn(300, 200), torch.randn(200), torch.randn(64, 64), torch.randn(7), torch.randn(50, 90)]
    samples = SampleSet(tensors, 4096, torch.float64, torch.device("cpu"))
    squares = samples.squares(samples.gather(0))[0].tolist()
    exact = _exact_squares(tensors)
    for i, t in enumerate(tensors):
        if t.numel() <= 4096:  # taken whole: exact up to float32 summation (~1e-6 relative)
            assert squares[i] == pytest.approx(exact[i], rel=1e-5)
        else:  # i.i.d. entries: 4096 of them estimate the sum within a few percent (sd ~ sqrt(2/4096) = 2.2%)
            assert squares[i] == pytest.approx(exact[i], rel=0.08)


def test_sample_set_estimate_is_the_mean_square_of_the_sampled_entries():
    # independent recomputation of the estimator itself: numel x mean of the sampled entries' squares
    torch.manual_seed(1)
    t = torch.randn(513, 300)
    samples = SampleSet([t], 4096, torch.float64, torch.device("cpu"))
    view = sample_view(t, 4096)
    assert view.shape == (256, 16)
    want = t.numel() * float(view.double().square().mean())
    assert samples.squares(samples.gather(0)).item() == pytest.approx(want, rel=1e-6)


def test_sample_set_sums_sample_and_change_together_by_segments():
    # update_sample=None takes every tensor whole (segments of the flat small buffer); the snapshot's row
    # becomes the change, and both rows are summed in one pass, row by row
    torch.manual_seed(10)
    tensors = [torch.randn(40, 30), torch.randn(30), torch.randn(5, 5, 3)]
    samples = SampleSet(tensors, None, torch.float64, torch.device("cpu"))
    old = _exact_squares(tensors)
    samples.gather(0)
    with torch.no_grad():
        for t in tensors:
            t.mul_(3.0)  # in place: change = -2 x the old values
    samples.gather(1)
    samples.difference(0, 1)
    both = samples.squares()
    assert both.shape == (2, 3)
    assert both[1].tolist() == pytest.approx(_exact_squares(tensors), rel=1e-5)  # row 1: this sample
    assert both[0].tolist() == pytest.approx([4 * v for v in old], rel=1e-5)  # row 0: the change
    assert samples.squares(1)[0].tolist() == pytest.approx(both[1].tolist())
    unordered = samples.squares(1, tensor_order=False)[0].tolist()
    assert [unordered[samples.order.index(i)] for i in range(3)] == pytest.approx(both[1].tolist())


def test_sample_set_keeps_two_samples_of_memory_and_one_without_update():
    tensors = [torch.randn(300, 300), torch.randn(300)]
    entries = 4096 + 300
    assert [tuple(b.shape) for b in SampleSet(tensors, 4096, torch.float64, torch.device("cpu"))._buffers] == \
        [(2, entries)]
    one = SampleSet(tensors, 4096, torch.float64, torch.device("cpu"), frames=1)
    assert [tuple(b.shape) for b in one._buffers] == [(1, entries)]
    whole = SampleSet(tensors, None, torch.float64, torch.device("cpu"))
    assert sum(b.numel() for b in whole._buffers) == 2 * sum(t.numel() for t in tensors)


def test_sample_set_follows_new_storage_and_subtracts():
    torch.manual_seed(2)
    a = [torch.randn(100, 100), torch.randn(100)]
    samples = SampleSet(a, 4096, torch.float64, torch.device("cpu"))
    samples.gather(0)
    with torch.no_grad():
        for t in a:
            t.add_(1.0)  # in place: the same storage, new values
    samples.gather(1)
    samples.difference(0, 1)
    diff = samples.squares(0)[0].tolist()
    assert diff == pytest.approx([float(t.numel()) for t in a], rel=1e-5)  # every entry moved by exactly 1
    b = [t.clone() + 1.0 for t in a]  # new storage: the views follow it
    samples.retarget(b)
    samples.gather(0)
    samples.difference(1, 0)
    assert samples.squares(1)[0].tolist() == pytest.approx([float(t.numel()) for t in a], rel=1e-5)


def test_sample_set_handles_half_tensors_in_float32():
    torch.manual_seed(3)
    tensors = [torch.randn(128, 128).half(), torch.randn(128).half()]
    samples = SampleSet(tensors, 4096, torch.float64, torch.device("cpu"))
    squares = samples.squares(samples.gather(0))[0].tolist()
    exact = _exact_squares(tensors)
    assert squares[1] == pytest.approx(exact[1], rel=1e-4)
    assert squares[0] == pytest.approx(exact[0], rel=0.1)


@pytest.mark.parametrize("shape", [(300, 20), (300, 200), (256, 256), (64, 3, 3, 3, 20), (5000,)])
def test_sampled_blocks_are_in_bounds_and_never_overlap(shape):
    t = torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape)
    view = sample_view(t, 4096)
    taken = view.reshape(-1).tolist()  # entries are their own flat index
    assert len(set(taken)) == len(taken) == 4096
    assert max(taken) < t.numel()


def test_block_spacing_does_not_alias_with_rows():
    # a 256x256 weight whose columns differ by 100x: blocks spaced by whole rows would all sit in the same
    # 16 columns (the first, the smallest here) and read the norm 10x too low
    torch.manual_seed(4)
    scale = torch.logspace(-1, 1, 256)
    w = torch.randn(256, 256) * scale
    view = sample_view(w, 4096)
    starts = (torch.arange(view.shape[0]) * view.stride(0)) % 256
    assert len(set(starts.tolist())) > 200  # block starts spread over the columns
    samples = SampleSet([w], 4096, torch.float64, torch.device("cpu"))
    assert samples.squares(samples.gather(0)).item() == pytest.approx(_exact_squares([w])[0], rel=0.1)


# --- the zero fraction --------------------------------------------------------------------------------------
def test_sampled_zero_fraction_estimates_the_exact_share():
    # a 512x512 float16 weight whose gradient is zero in a known share of its columns (inputs that are 0)
    torch.manual_seed(5)
    lin = nn.Linear(512, 512).half()
    x = torch.randn(32, 512).half()
    x[:, torch.randperm(512)[:300]] = 0  # 300 of 512 columns of dW = dY^T x are exactly zero
    monitor = gm.Monitor(lin, probes=[GradientProbe(zero_fraction=True)])
    lin(x).float().square().mean().backward()
    monitor.step()
    exact = float((lin.weight.grad == 0).double().mean() * lin.weight.numel() + (lin.bias.grad == 0).sum()) / (
        lin.weight.numel() + lin.bias.numel())
    got = monitor.trace.last("grad_zero_frac")[""]
    assert exact == pytest.approx(300 / 512, abs=0.01)
    assert got == pytest.approx(exact, abs=0.06)  # the sample's stated accuracy (probes.gradients ZERO_SAMPLE)


def test_zero_fraction_auto_counts_only_where_the_backward_is_16_bit():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(4, 8)
    plain = gm.Monitor(model, probes=[GradientProbe(), BackwardSignalProbe()])
    model(x).mean().backward()
    plain.step()
    assert np.isnan(plain.trace.metric("grad_zero_frac")).all()  # float32 throughout: nothing reads it, none paid
    plain.close()
    model.zero_grad()
    mixed = gm.Monitor(model, probes=[GradientProbe(), BackwardSignalProbe()])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().mean().backward()
    mixed.step()
    assert np.isfinite(mixed.trace.metric("grad_zero_frac")).any()  # the backward probe saw 16-bit outputs
    mixed.close()


# --- the horizon's period and fused writes --------------------------------------------------------------------
def test_horizon_is_measured_every_kth_step():
    torch.manual_seed(7)
    rnn = nn.LSTM(4, 8, batch_first=True)
    probe = TimeStepProbe(horizon=True, horizon_every=3)
    monitor = gm.Monitor(rnn, probes=[probe])
    x = torch.randn(2, 5, 4)
    for _ in range(7):
        rnn(x)[0].sum().backward()
        monitor.step()
    steps, _ = monitor.trace.series("horizon_rms")[""]
    assert steps.tolist() == [0, 3, 6]
    assert np.isfinite(monitor.trace.metric("time_grad_ratio")).all()  # the per-step ratio is still every step


def test_horizon_every_is_checked():
    with pytest.raises(gm.GradmedicError, match="horizon_every"):
        TimeStepProbe(horizon=True, horizon_every=0)


def test_write_columns_writes_adjacent_metrics_and_refuses_others():
    buf = StepBuffer(2, ["a", "b", "c"], ["x", "y", "z"], torch.device("cpu"), torch.float64)
    slot = buf.open(0)
    rows = torch.tensor([0, 2])
    buf.write_columns(slot, rows, ("y", "z"), (torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])))
    got = buf.values[0].numpy()
    assert got[0, 1:].tolist() == [1.0, 3.0] and got[2, 1:].tolist() == [2.0, 4.0]
    assert np.isnan(got[1]).all() and np.isnan(got[:, 0]).all()
    with pytest.raises(ValueError, match="adjacent"):
        buf.write_columns(slot, rows, ("x", "z"), (torch.zeros(2), torch.zeros(2)))


# --- memory: a long run holds its trace and nothing more ------------------------------------------------------
def test_long_run_keeps_no_more_than_its_trace():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    monitor = gm.Monitor(model, opt, preset="full", flush_every=50)
    x, y = torch.randn(8, 16), torch.randn(8, 4)

    def train(steps):
        for _ in range(steps):
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            monitor.step(loss)
            opt.step()
            opt.zero_grad()

    train(200)  # caches, plans and index tensors are made in the first steps
    gc.collect()
    tracemalloc.start()
    before, kept_before = tracemalloc.take_snapshot(), monitor.trace.nbytes
    train(400)
    gc.collect()
    after, kept_after = tracemalloc.take_snapshot(), monitor.trace.nbytes
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    kept = kept_after - kept_before
    assert kept > 0
    # numpy arrays are traced too: the growth is the trace's own numbers plus per-chunk bookkeeping (lists of
    # names, dicts), not per-step leftovers; 2x + 64 kB is far below what a leak of one small object a step shows
    assert grown <= 2 * kept + 64 * 1024, (grown, kept)
    monitor.close()


def test_trace_nbytes_counts_the_recorded_numbers():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    monitor = gm.Monitor(model, preset="full")
    for _ in range(3):
        model(torch.randn(2, 4)).mean().backward()
        monitor.step(1.0)
    trace = monitor.trace
    grids = sum(c.values.nbytes + c.steps.nbytes for c in trace._chunks)
    assert trace.nbytes >= grids > 0
    monitor.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs the check itself")
def test_cuda_sync_check_says_so_without_a_gpu(capsys, monkeypatch):
    from benchmarks import cuda_syncs

    monkeypatch.setattr("sys.argv", ["cuda_syncs.py"])
    cuda_syncs.main()
    assert "No CUDA device here" in capsys.readouterr().out


# --- found in review: parameters laid out other than row-major, the Trainer's order, NaN outputs ---------------
def _hand_ratios(model, layer, steps, record_first, every=1):
    """Update ratio and weight norm of one layer by hand in float64, next to a Monitor's."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = gm.Monitor(model, opt, probes=[GradientProbe(every=every)])
    params = list(model.get_submodule(layer).parameters())
    want_update, want_weight, before = {}, {}, None
    for s in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 3, 8, 8)).square().mean().backward()
        now = torch.cat([p.detach().double().reshape(-1) for p in params])
        if s % every == 0:
            want_weight[s] = float(now.norm())
            if before is not None:
                want_update[s] = float((before - now).norm() / before.norm())
        if (s + 1) % every == 0:
            before = now.clone()  # the weights the next measured step's update starts from
        if record_first:  # a Trainer: gradients recorded at the end of backward, step() after the optimizer
            monitor.record_gradients()
            opt.step()
            monitor.step()
        else:
            monitor.step()
            opt.step()
    monitor.flush()
    j = monitor.trace.layers.index(layer)
    steps_seen = monitor.trace.steps.tolist()
    got_update = {s: monitor.trace.metric("update_to_weight")[i, j] for i, s in enumerate(steps_seen)}
    got_weight = {s: monitor.trace.metric("weight_norm")[i, j] for i, s in enumerate(steps_seen)}
    monitor.close()
    return want_update, got_update, want_weight, got_weight


@pytest.mark.parametrize("layout", ["channels_last", "gapped"])
def test_parameters_not_row_major_are_read_live(layout):
    # a channels_last conv weight (dense, not contiguous) and a weight with gaps (a view of every other column
    # of a bigger tensor): once, a flat copy of such a tensor was made at the first step and read ever after
    torch.manual_seed(11)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.Flatten(), nn.Linear(8 * 6 * 6, 1))
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        assert not model[0].weight.is_contiguous()
    else:
        wide = torch.randn(1, 2 * 8 * 6 * 6) * 0.05
        model[2].weight = nn.Parameter(wide[:, ::2])
        assert not model[2].weight.is_contiguous()
    layer = "0" if layout == "channels_last" else "2"
    want_u, got_u, want_w, got_w = _hand_ratios(model, layer, 4, record_first=False)
    for s, w in want_w.items():
        assert got_w[s] == pytest.approx(w, rel=1e-5)
    for s, u in want_u.items():
        assert got_u[s] == pytest.approx(u, rel=1e-4)


@pytest.mark.parametrize("every", [1, 3])
def test_update_ratio_in_the_trainers_order(every):
    # record_gradients() before optimizer.step(), step() after it (the Hugging Face callback): the snapshot for
    # a measured step must be taken where that step's gradients are read, or no update lies between them
    torch.manual_seed(12)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 1))
    want_u, got_u, _, _ = _hand_ratios(model, "0", 10, record_first=True, every=every)
    assert want_u
    for s, u in want_u.items():
        assert u > 0 and got_u[s] == pytest.approx(u, rel=1e-4)


def test_nan_outputs_are_not_counted_as_saturated():
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    monitor = gm.Monitor(model, preset="full")
    x = torch.randn(8, 4)
    x[0, 0] = float("nan")
    model(x).mean().backward()
    monitor.step()
    assert np.isnan(monitor.trace.last("saturated_frac").get("1", float("nan")))
    monitor.close()
