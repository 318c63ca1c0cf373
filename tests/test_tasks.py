"""Lab tasks: shapes, structure and the stated baselines, checked independently."""

import math

import pytest
import torch
from torch import nn

import gradmedic as gm
from gradmedic.lab import adding, copy_task, digits, sequential_digits


def test_digits_split_and_prior_baseline():
    task = digits(seed=0)
    assert task.x_train.shape[1] == 64 and len(task.x_train) + len(task.x_test) == 1797
    assert 0.0 <= float(task.x_train.min()) and float(task.x_train.max()) <= 1.0
    # stratified: every class is in the test split in about the same share (classes have 174-183 images)
    counts = torch.bincount(task.y_test, minlength=10)
    assert int(counts.min()) >= 43 and int(counts.max()) <= 46
    # the prior's cross-entropy computed through nn.functional.cross_entropy on constant logits
    prior = torch.bincount(task.y_train, minlength=10).float() / len(task.y_train)
    logits = prior.log().expand(len(task.y_train), 10)
    assert task.baseline == pytest.approx(float(nn.functional.cross_entropy(logits, task.y_train)), rel=1e-5)
    assert task.baseline == pytest.approx(math.log(10), abs=0.01)
    again = digits(seed=0)
    assert torch.equal(again.x_test, task.x_test)  # seeded


def test_sequential_and_permuted_digits():
    flat = digits(seed=1)
    pixels = sequential_digits(seed=1)
    rows = sequential_digits(seed=1, pixelwise=False)
    permuted = sequential_digits(seed=1, permuted=True)
    assert pixels.x_train.shape[1:] == (64, 1) and rows.x_train.shape[1:] == (8, 8)
    assert torch.equal(pixels.x_train.reshape(len(pixels.x_train), 64), flat.x_train)
    # one fixed permutation for every image: sorting each image's pixels gives the same multiset
    assert not torch.equal(permuted.x_train, pixels.x_train)
    assert torch.equal(permuted.x_train.sort(dim=1).values, pixels.x_train.sort(dim=1).values)


@pytest.mark.parametrize("length", [2, 20, 101])
def test_adding_problem_structure_and_baseline(length):
    task = adding(length, n_train=20000, n_test=10, seed=0)
    x, y = task.x_train, task.y_train
    assert x.shape == (20000, length, 2)
    mask = x[..., 1]
    half = length // 2
    assert torch.equal(mask[:, :half].sum(1), torch.ones(20000))  # one mark in each half
    assert torch.equal(mask[:, half:].sum(1), torch.ones(20000))
    torch.testing.assert_close(y[:, 0], (x[..., 0] * mask).sum(1))
    # predicting 1 (the mean of U1 + U2): MSE 1/6 up to sampling error (sd of the estimate ~0.0013)
    assert float(((y - 1.0) ** 2).mean()) == pytest.approx(1 / 6, abs=0.006)
    assert task.baseline == pytest.approx(1 / 6)


@pytest.mark.parametrize("delay", [1, 10, 100])
def test_copy_task_structure_and_baseline(delay):
    task = copy_task(delay, n_train=64, n_test=8, seed=0)
    x, y = task.x_train, task.y_train
    total = delay + 20
    assert x.shape == (64, total, 10) and y.shape == (64, total)
    tokens = x.argmax(-1)
    assert torch.equal(y[:, -10:], tokens[:, :10])  # the ten symbols come back at the end
    assert bool((tokens[:, :10] >= 1).all() and (tokens[:, :10] <= 8).all())
    assert bool((tokens[:, 10 + delay - 1] == 9).all())  # the delimiter after T-1 blanks
    assert int((y[:, :-10] != 0).sum()) == 0
    # the memoryless predictor: blank with certainty, then uniform over the 8 symbols
    logits = torch.full((64, total, 9), -1e9)
    logits[:, :-10, 0] = 0.0
    logits[:, -10:, 1:] = 0.0
    ce = nn.functional.cross_entropy(logits.reshape(-1, 9), y.reshape(-1))
    assert task.baseline == pytest.approx(float(ce), rel=1e-5)
    assert task.baseline == pytest.approx(10 * math.log(8) / (delay + 20))


def test_bad_arguments():
    with pytest.raises(gm.GradmedicError, match="Argument length"):
        adding(1)
    with pytest.raises(gm.GradmedicError, match="Argument delay"):
        copy_task(0)
    with pytest.raises(gm.GradmedicError, match="Argument test_fraction"):
        digits(test_fraction=1.5)
