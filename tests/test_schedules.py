"""Schedules: torch's schedulers, configured; the learning rate follows the closed forms."""

import math

import pytest
import torch

import gradmedic as gm
from gradmedic.remedies import exponential_decay, step_decay, warm_restarts


def lrs(scheduler, steps):
    out = []
    for _ in range(steps):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def opt(lr=0.1):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_warm_restarts_follow_the_cosine_and_restart():
    got = lrs(warm_restarts(opt(), period=4, mult=2), 13)
    # SGDR: lr_t = 0.1 * (1 + cos(pi * t_cur / T_i)) / 2, with T = 4 then 8
    want = [0.05 * (1 + math.cos(math.pi * t / 4)) for t in range(4)] + \
           [0.05 * (1 + math.cos(math.pi * t / 8)) for t in range(8)] + [0.1]
    assert got == pytest.approx(want)


def test_decays():
    assert lrs(step_decay(opt(), every=2, factor=0.5), 5) == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])
    assert lrs(exponential_decay(opt(), factor=0.9), 3) == pytest.approx([0.1, 0.09, 0.081])
    with pytest.raises(gm.GradmedicError, match="Argument period"):
        warm_restarts(opt(), period=0)
    with pytest.raises(gm.GradmedicError, match="Argument optimizer"):
        step_decay("sgd")
