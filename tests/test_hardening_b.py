"""Issue 31, part B: what a Monitor does when the model changes under it or is dropped, bounded buffers and
reports, names shown on a terminal, one-line errors from the CLI, and no pass without a verdict."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradmedic as gm


def mlp(depth: int = 3, width: int = 8) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth)])


# --- item 9: flush_every is bounded by the memory its buffers take ---------------------------------------
@pytest.mark.parametrize("flush_every", [100_000, 10**9])
def test_a_huge_flush_every_is_refused_in_one_line_before_anything_is_allocated(flush_every):
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(200)])
    with pytest.raises(gm.GradmedicError, match=r"flush_every should be at most \d+ for this model") as caught:
        gm.Monitor(model, flush_every=flush_every)
    assert "\n" not in str(caught.value) and "BUFFER_BUDGET" in str(caught.value)
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


def test_the_default_and_a_large_flush_every_on_a_small_model_are_accepted():
    model = mlp()
    gm.Monitor(model, flush_every=5000).close()  # 12 layers: well inside the budget
    gm.Monitor(nn.Sequential(*[nn.Linear(4, 4) for _ in range(5000)])).close()  # the default is never refused
