"""The lab's headline orderings, on small seeded configurations (seconds each), and the lab's recorded
gradient ratio checked against an independent autograd computation."""

import pytest
import torch
from torch.nn import functional as F

from gradmedic.lab import run_experiment
from tests.helpers import lab_first_batch


def adding(cell, length=20, steps=500):
    return run_experiment({"task": "adding", "length": length, "model": "rnn", "spec": {"cell": cell, "hidden": 32},
                           "steps": steps, "lr": 1e-2})


def test_tanh_rnn_stays_near_the_adding_baseline_where_lstm_and_gru_go_below():
    tanh, lstm, gru = adding("tanh"), adding("lstm"), adding("gru")
    baseline = tanh["baseline"]  # 1/6
    print({k: r["final_loss"] for k, r in (("tanh", tanh), ("lstm", lstm), ("gru", gru))})
    # measured 0.172 at T=20 (seed 0) and the LSTM/GRU 0.002/0.001 under ATEN_CPU_CAPABILITY default, avx2
    # and avx512 alike: the tanh RNN sits at the baseline, the gated cells 8x below the 0.1 x baseline cut-off
    assert tanh["final_loss"] > 0.85 * baseline
    assert lstm["final_loss"] < 0.1 * baseline and gru["final_loss"] < 0.1 * baseline  # measured 0.002, 0.0006
    # and the reason: at init, the gradient from the last step reaching t=1 is tiny for the tanh RNN
    assert tanh["time"]["ratio_init"] < 1e-2


def test_deep_sigmoid_first_layer_gradient_is_orders_below_the_last():
    r = run_experiment({"model": "mlp", "spec": {"depth": 10, "activation": "sigmoid"}, "steps": 1})
    norms = r["gradients"]["grad_norm"][0]
    assert r["ratio_init"] < 1e-6  # measured 2.5e-9: ~10 sigmoid derivatives (<= 1/4) and small weights
    assert all(b > a for a, b in zip(norms[:-1], norms[1:-1], strict=False))  # rising layer by layer


def test_recorded_ratio_matches_autograd_on_the_same_batch():
    config = {"model": "mlp", "spec": {"depth": 6, "activation": "sigmoid"}, "steps": 1, "batch": 32, "seed": 3}
    r = run_experiment(config)
    model, _, x, y = lab_first_batch(config)
    loss = F.cross_entropy(model(x), y)
    first, last = list(model.stem[0].parameters()), list(model.head.parameters())  # a layer: weight and bias
    grads = torch.autograd.grad(loss, first + last)
    norm = [torch.cat([g.flatten() for g in part]).norm() for part in (grads[:2], grads[2:])]
    expected = float(norm[0] / norm[1])
    assert r["ratio_init"] == pytest.approx(expected, rel=1e-5)  # float32 norms, same batch, same weights


def test_residual_beats_plain_at_depth():
    def mlp(skip):
        return run_experiment({"model": "mlp", "spec": {"depth": 30, "activation": "relu", "skip": skip},
                               "steps": 300, "lr": 1e-3})

    plain, residual = mlp("none"), mlp("residual")
    assert plain["final_loss"] > 0.9 * plain["baseline"]  # measured 2.30: stalled at ln 10
    assert residual["final_loss"] < 0.3 * plain["final_loss"]  # measured 0.086
    assert residual["ratio_init"] > 1e3 * plain["ratio_init"]  # 0.22 vs 1.3e-11


def test_he_init_beats_glorot_for_a_deep_relu_net():
    # A 30-layer plain ReLU net under SGD + momentum is erratic at lr 0.005-0.02: He's final loss ranged
    # 0.29-2.05 over seeds and CPU kernels (ATEN_CPU_CAPABILITY default/avx2/avx512). At lr 0.002 for 800
    # steps it trains on every seed and kernel we ran: final loss 0.098-0.204 over seeds 0-2 x the three
    # capabilities (baseline ln 10 = 2.30), so the cut-off 0.25 x baseline = 0.575 is 2.8x above the worst.
    def mlp(init, seed):
        return run_experiment({"model": "mlp", "spec": {"depth": 30, "activation": "relu", "init": init},
                               "optimizer": "momentum", "lr": 0.002, "steps": 800, "seed": seed})

    glorot = mlp("glorot", 0)
    assert glorot["final_loss"] > 0.9 * glorot["baseline"]  # measured 2.29-2.30 on every kernel: nothing learned
    for seed in (0, 1):
        he = mlp("he", seed)
        assert he["final_loss"] < 0.25 * he["baseline"], (seed, he["final_loss"])
        # He keeps the first/last gradient ratio near 1 (measured 0.59-1.27), Glorot halves the signal each
        # layer (measured 4e-5 to 2.4e-4)
        assert 0.2 < he["ratio_init"] < 5
    assert glorot["ratio_init"] < 1e-2


def test_a_run_is_reproducible():
    config = {"model": "mlp", "spec": {"depth": 3}, "steps": 20}
    a, b = run_experiment(config), run_experiment(config)
    assert a["curve"] == b["curve"] and a["gradients"] == b["gradients"]


@pytest.mark.parametrize("config,match", [
    ({"task": "mnist"}, "Argument task"), ({"steps": 0}, "Argument steps"), ({"lr_": 1}, "Argument config"),
    ({"batch": 10, "accumulate": 3}, "Argument accumulate"), ({"spec": {"depht": 3}}, "Argument spec"),
])
def test_bad_configurations_name_the_key(config, match):
    from gradmedic import GradmedicError

    with pytest.raises(GradmedicError, match=match):
        run_experiment(config)


def test_norm_clipping_tames_an_exploding_recurrence():
    # tanh RNN whose recurrent matrix is orthogonal x 1.5 (it expands), adding problem T=5, SGD lr 0.1. Measured
    # in the quick suite (seeds 0-2, ATEN_CPU_CAPABILITY avx2 and default): unclipped diverges at step 28-32;
    # norm-clipped ends at 0.050-0.059 against a baseline of 1/6, 2x below the cut-off used here
    def rnn(clip):
        return run_experiment({"task": "adding", "length": 5, "model": "rnn",
                               "spec": {"cell": "tanh", "hidden": 32, "recurrent_gain": 1.5}, "optimizer": "sgd",
                               "lr": 0.1, "steps": 500, "clip": clip})

    unclipped, clipped = rnn("none"), rnn("norm")
    assert unclipped["diverged_at"] is not None and unclipped["diverged_at"] < 100
    assert clipped["diverged_at"] is None and clipped["final_loss"] < 0.75 * clipped["baseline"]


def test_n01_init_saturates_a_deep_tanh_net_where_xavier_does_not():
    # the claim "Xavier trains a deep tanh net where N(0, 1) init saturates" reads saturation itself: the
    # share of tanh outputs with a derivative below 5% of its peak at init (measured 0.76 vs 0.04 on every
    # seed under default/avx2/avx512); with N(0, 1) weights and fan-in 64 a pre-activation's std is ~8
    def run(init, seed):
        return run_experiment({"model": "mlp", "spec": {"depth": 20, "activation": "tanh", "init": init},
                               "steps": 1, "seed": seed})

    for seed in (0, 1):
        assert run("normal1", seed)["saturated_init"] > 0.6
        assert run("xavier", seed)["saturated_init"] < 0.2
