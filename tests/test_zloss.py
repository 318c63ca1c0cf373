"""z-loss (``gradmedic.remedies.z_loss``, ``ZLoss``): the value against a float64 computation written out with
``math``, the gradient against ``torch.autograd.grad`` and against its closed form 2 coef log Z softmax / rows, the
mask, the wrapper around a loss function and around a Hugging Face-like output; and it pulls log Z back toward 0."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from gradmedic import GradmedicError
from gradmedic.remedies import ZLoss, z_loss


def by_hand(logits: torch.Tensor, coef: float, mask=None) -> float:
    """coef * mean over the rows of (log sum_j exp x_j)^2, with the max taken out, in Python floats."""
    rows = logits.double().reshape(-1, logits.shape[-1]).tolist()
    keep = mask.reshape(-1).tolist() if mask is not None else [True] * len(rows)
    total, count = 0.0, 0
    for row, k in zip(rows, keep, strict=True):
        if not k:
            continue
        top = max(row)
        log_z = top + math.log(sum(math.exp(v - top) for v in row))
        total += log_z * log_z
        count += 1
    return coef * total / count


def test_value_against_float64_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(4, 7, 11) * 5 + 30  # drifted: log Z near 32
    assert float(z_loss(logits, 1e-4)) == pytest.approx(by_hand(logits, 1e-4), rel=1e-6)
    mask = torch.rand(4, 7) > 0.4
    assert float(z_loss(logits, 2e-3, mask)) == pytest.approx(by_hand(logits, 2e-3, mask), rel=1e-6)
    # float16 logits are read in float32: no overflow of exp at 30
    assert float(z_loss(logits.half(), 1e-4)) == pytest.approx(by_hand(logits.half().float(), 1e-4), rel=1e-5)
    # float64 stays float64
    assert z_loss(logits.double(), 1e-4).dtype == torch.float64


def test_gradient_against_autograd_and_closed_form():
    torch.manual_seed(0)
    logits = (torch.randn(6, 9, dtype=torch.float64) * 3).requires_grad_()
    coef = 1e-2
    (grad,) = torch.autograd.grad(z_loss(logits, coef), logits)
    # autograd of the same quantity written with exp and log (not logsumexp)
    x = logits.detach().clone().requires_grad_()
    reference = coef * torch.log(torch.exp(x).sum(-1)).pow(2).mean()
    (expected,) = torch.autograd.grad(reference, x)
    torch.testing.assert_close(grad, expected)
    # closed form: d/dx coef (log Z)^2 / rows = 2 coef log Z softmax(x) / rows
    log_z = torch.logsumexp(logits.detach(), -1, keepdim=True)
    torch.testing.assert_close(grad, 2 * coef * log_z * logits.detach().softmax(-1) / logits.shape[0])


def test_wrapper_adds_it_to_the_loss_and_skips_ignored_positions():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 8) + 4
    targets = torch.randint(0, 8, (3, 5))
    targets[0, :2] = -100

    def flat_ce(out, y):
        return F.cross_entropy(out.reshape(-1, 8), y.reshape(-1), ignore_index=-100)
    wrapped = ZLoss(flat_ce, coef=1e-3)
    expected = float(flat_ce(logits, targets)) + by_hand(logits, 1e-3, targets != -100)
    assert float(wrapped(logits, targets)) == pytest.approx(expected, rel=1e-6)
    # outputs carrying .logits and their own .loss (a Hugging Face model given labels): loss_fn=None takes .loss
    outputs = SimpleNamespace(loss=torch.tensor(2.5), logits=logits)
    assert float(ZLoss(coef=1e-3)(outputs)) == pytest.approx(2.5 + by_hand(logits, 1e-3), rel=1e-6)
    # no default loss fits a tensor without targets: the error says what to pass
    with pytest.raises(GradmedicError):
        ZLoss(coef=1e-3)(SimpleNamespace(loss=None, hidden=logits))
    with pytest.raises(GradmedicError, match="coef"):
        ZLoss(flat_ce, coef=-1.0)


def test_it_pulls_log_z_back_to_zero():
    """Cross-entropy's gradient sums to 0 over the classes, so it never moves the logits together; the z-loss's sums
    to 2 coef log Z per row and pulls log Z toward 0."""
    x, y = torch.randn(64, 10, generator=torch.Generator().manual_seed(0)), torch.arange(64) % 10

    def train(loss_fn) -> float:
        bias = torch.full((10,), 20.0, requires_grad=True)  # every logit shifted by 20: log Z about 22
        optimizer = torch.optim.SGD([bias], lr=10.0)
        for _ in range(50):
            optimizer.zero_grad()
            loss_fn(x + bias, y).backward()
            optimizer.step()
        return float(torch.logsumexp(x + bias.detach(), -1).mean())
    plain, with_z = train(F.cross_entropy), train(ZLoss(F.cross_entropy, coef=1e-2))
    assert plain > 20 and with_z < 0.5 * plain
