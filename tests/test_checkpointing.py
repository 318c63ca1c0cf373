"""Activation checkpointing: a checkpointed forward runs again inside the backward, with its forward hooks.

The trace of a checkpointed model must be the trace of the same model without checkpointing: the
non-reentrant kind (torch's and Hugging Face's default) ran the first forward with gradients on, so its
repeat must not count twice; the reentrant kind ran it under ``no_grad``, so the repeat is the only forward
with a graph, and a NaN made inside a checkpointed block must still be placed there, not at the first layer
after the block that passed it on. The reference is the unchanged model run without checkpointing (the
recomputation runs the same kernels on the same values, so the traces agree to float rounding, rtol 1e-5).
"""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradmedic as gm

MODES = (None, "non-reentrant", "reentrant")


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.act = nn.ReLU()
        self.lin2 = nn.Linear(width, width)
        self.act2 = nn.Tanh()

    def forward(self, x):
        return self.act2(self.lin2(self.act(self.lin(x))))


class Sqrt(nn.Module):
    """A NaN where its input is negative: made here, inside a checkpointed block."""

    def __init__(self, width: int):
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x):
        return torch.sqrt(self.lin(x))


class Net(nn.Module):
    def __init__(self, mode, nan: bool, width: int = 32):
        super().__init__()
        middle = Sqrt(width) if nan else Block(width)
        self.blocks = nn.ModuleList([Block(width), Block(width), middle, Block(width)])
        self.head = nn.Linear(width, 1)
        self.mode = mode

    def forward(self, x):
        for block in self.blocks:
            x = block(x) if self.mode is None else checkpoint(block, x, use_reentrant=self.mode == "reentrant")
        return self.head(x)


def trace_of(mode, nan=False, steps=3):
    torch.manual_seed(0)
    model = Net(mode, nan)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = gm.Monitor(model, optimizer, preset="full")
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 32, generator=gen), torch.randn(16, 1, generator=gen)
        x.requires_grad_(mode == "reentrant")  # reentrant checkpointing needs an input with a gradient
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        monitor.step(loss)
        optimizer.step()
        optimizer.zero_grad()
    monitor.close()
    return monitor.trace


def same_trace(got, want):
    assert got.layers == want.layers and got.metrics == want.metrics
    for metric in want.metrics:
        if metric == "skip_path":
            # whether a block adds its input back, read once from its graph: reentrant checkpointing recomputes each
            # block from a fresh leaf, so it can also read the first block, whose input in the plain run (the data)
            # has no graph; where both read it, the same
            known = ~np.isnan(want.metric(metric))
            np.testing.assert_array_equal(got.metric(metric)[known], want.metric(metric)[known])
            continue
        np.testing.assert_allclose(got.metric(metric), want.metric(metric), rtol=1e-5, atol=1e-7,
                                   err_msg=metric)


@pytest.mark.parametrize("mode", MODES[1:])
def test_checkpointed_model_has_the_trace_of_the_plain_one(mode):
    want, got = trace_of(None), trace_of(mode)
    same_trace(got, want)
    # each ReLU call counted once (twice before: the recomputation's forward hooks added a second call)
    assert np.nanmax(got.metric("dead_units_seen")) == 32


@pytest.mark.parametrize("mode", MODES[1:])
def test_nan_born_inside_a_checkpointed_block_is_placed_there(mode):
    want, got = trace_of(None, nan=True), trace_of(mode, nan=True)
    first = [(e["phase"], e["module"]) for e in want.events if e["step"] == 0]
    assert first[0] == ("forward", "blocks.2")  # the sqrt's module, not the head after the blocks
    assert got.events == want.events
    same_trace(got, want)


def test_gpt2_gradient_checkpointing_reads_as_without(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=16,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))

    def run(kwargs):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(config)
        model.config.use_cache = False
        if kwargs is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        monitor = gm.Monitor(model, optimizer, preset="full")
        for _ in range(2):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            monitor.step(loss)
            optimizer.step()
            optimizer.zero_grad()
        monitor.close()
        return monitor.trace

    want = run(None)
    for kwargs in ({"use_reentrant": False}, {"use_reentrant": True}):
        got = run(kwargs)
        assert got.layers == want.layers
        for metric in ("act_mean", "act_std", "backward_rms", "grad_norm", "forward_index"):
            np.testing.assert_allclose(got.metric(metric), want.metric(metric), rtol=1e-4, atol=1e-7,
                                       err_msg=f"{metric} {kwargs}")


def test_check_of_a_reentrant_checkpointed_model_reads_as_the_plain_one():
    """``gm.check`` takes gradients with ``torch.autograd.grad``, which reentrant checkpointing refuses part-way
    through the backward: it looks again with a plain backward, and still leaves the model's .grad and RNG."""
    torch.manual_seed(0)
    plain = Net(None, nan=False)
    model = Net("reentrant", nan=False)
    model.load_state_dict(plain.state_dict())
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(2)).requires_grad_()
    y = torch.randn(16, 1, generator=torch.Generator().manual_seed(3))
    mine = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, g in zip(model.parameters(), mine, strict=True):
        p.grad = g
    rng = torch.get_rng_state()
    want = gm.check(plain, x, targets=y)
    got = gm.check(model, x, targets=y)
    assert all(p.grad is g and bool((g == 7.0).all()) for p, g in zip(model.parameters(), mine, strict=True))
    assert torch.equal(torch.get_rng_state(), rng)
    assert [f.kind for f in got.findings] == [f.kind for f in want.findings]
    for metric in ("grad_norm", "backward_rms", "act_mean", "dead_units_seen"):
        np.testing.assert_allclose(got.trace.metric(metric), want.trace.metric(metric), rtol=1e-5, atol=1e-7,
                                   err_msg=metric)


def test_check_of_a_model_whose_backward_fails_says_so_in_one_line():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            y = self.lin(x).sigmoid()
            y.mul_(2)  # sigmoid's output is saved for its backward: modified in place, the backward refuses
            return y

    with pytest.raises(gm.GradmedicError, match=r"^The model's backward failed \(RuntimeError: .*\); check") as info:
        gm.check(Broken(), torch.randn(3, 4))
    assert "\n" not in str(info.value)
