"""Accumulated gradients equal the large-batch gradient (float64, 1e-6), uneven last micro-batch included."""

import pytest
import torch
from torch import nn

import gradmedic as gm
from gradmedic.remedies import accumulate


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("sizes", [(5, 5), (4, 4, 2), (7, 3), (1, 9)])
def test_samples_equal_the_large_batch(sizes):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
    nn.functional.cross_entropy(model(x), y).backward()
    want = grads(model)
    model.zero_grad()
    parts = list(zip(x.split(list(sizes)), y.split(list(sizes)), strict=True))
    loss = accumulate(model, nn.functional.cross_entropy, parts)
    for g, w in zip(grads(model), want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=0)
    with torch.no_grad():
        whole = float(nn.functional.cross_entropy(model(x), y))
    assert float(loss) == pytest.approx(whole, abs=1e-9)


def test_tokens_with_padding_equal_the_large_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 20)).double()
    tokens = torch.randint(0, 20, (6, 5))
    targets = torch.randint(0, 20, (6, 5))
    targets[0, 2:] = -100  # padding: micro-batches hold different numbers of real tokens
    targets[4, 1:] = -100

    def loss_fn(logits, t):
        return nn.functional.cross_entropy(logits.reshape(-1, 20), t.reshape(-1), ignore_index=-100)

    loss_fn(model(tokens), targets).backward()
    want = grads(model)
    model.zero_grad()
    parts = list(zip(tokens.split([2, 3, 1]), targets.split([2, 3, 1]), strict=True))
    accumulate(model, loss_fn, parts, unit="tokens", ignore_index=-100)
    for g, w in zip(grads(model), want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=0)


def test_batchnorm_warns_and_bad_unit_errors():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    parts = [(torch.randn(4, 3), torch.randint(0, 2, (4,)))] * 2
    with pytest.warns(gm.GradmedicWarning, match="BatchNorm"):
        accumulate(model, nn.functional.cross_entropy, parts)
    with pytest.raises(gm.GradmedicError, match="Argument unit"):
        accumulate(model, nn.functional.cross_entropy, parts, unit="bytes")
