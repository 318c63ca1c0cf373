"""Residual blocks are known by name (``architecture.is_block``: ``...Block``, ``...EncoderLayer``), but a user's
class named ``Block`` may be a plain conv-BN-ReLU stack. The backward probe reads, once per block, whether the
block's graph adds anything back (``x + f(x)``); when none of a model's blocks does, the block outputs still make
the depth profile, but as a plain stack: its message names no residual stream, and explosion is judged by the plain
threshold (15x), not the stream's (100x) (``plain_blocks``)."""

import torch
from torch import nn

import gradmedic as gm
from gradmedic.diagnosis.rules._common import plain_blocks
from gradmedic.probes.backward import has_addition


class Block(nn.Module):
    def __init__(self, width: int, residual: bool, inplace: bool = False):
        super().__init__()
        self.conv, self.norm, self.act = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()
        self.residual, self.inplace = residual, inplace

    def forward(self, x):
        y = self.act(self.norm(self.conv(x)))
        if not self.residual:
            return y
        if self.inplace:
            y += x
            return y
        return x + y


def net(residual: bool, depth: int = 12, name: str = "Block", sigmoid: bool = False) -> nn.Module:
    torch.manual_seed(0)
    kind = type(name, (Block,), {})
    blocks = [kind(8, residual) for _ in range(depth)]
    if sigmoid:
        for b in blocks:
            b.act, b.norm = nn.Sigmoid(), nn.Identity()
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), *blocks, nn.Flatten(), nn.Linear(8 * 8 * 8, 4))


def test_an_addition_is_found_in_a_residual_block_and_not_in_a_plain_one():
    x = torch.randn(2, 8, 8, 8, requires_grad=True)
    h = x * 1.0  # an input with a node of its own, as inside a model
    for residual, inplace, expected in [(True, False, True), (True, True, True), (False, False, False)]:
        block = Block(8, residual, inplace)
        assert has_addition(h, block(h)) is expected
    assert has_addition(torch.randn(2, 8, 8, 8), Block(8, True)(torch.randn(2, 8, 8, 8))) is None  # no graph


def test_plain_blocks_named_block_read_as_the_plain_stack_they_are():
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    report = gm.check(net(False, sigmoid=True), x, y)
    (finding,) = report.of_kind("vanishing_gradients")
    assert "residual stream" not in finding.message and "at the output of block '1'" in finding.message
    assert set(report.trace.last("skip_path").values()) == {0.0}
    residual = gm.check(net(True, sigmoid=True), x, y)
    assert all("residual stream" in f.message for f in residual.of_kind("vanishing_gradients"))
    assert plain_blocks(report.trace) and not plain_blocks(residual.trace)  # which explosion threshold applies


def test_residual_blocks_named_block_are_still_the_stream():
    report = gm.check(net(True), torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,)))
    assert report.context["blocks"] == 12
    assert set(report.trace.last("skip_path").values()) == {1.0}


class InPlace(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.branch = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))

    def forward(self, x):
        x += self.branch(torch.tanh(x))  # in place: the input is the output, its node the addition (tanh saves its
        return x  # own output, so x may change)


class ResMLP(nn.Module):
    """The skip added by the caller, ``x = x + block(x)``: the blocks (``Sequential``s) hold no addition."""

    def __init__(self, width: int = 16, depth: int = 6):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(width, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
                                    for _ in range(depth))
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def test_an_in_place_skip_and_a_skip_added_by_the_caller_are_skips():
    x = torch.randn(4, 16, requires_grad=True) * 1.0
    assert has_addition(x, InPlace(16)(x)) is True
    torch.manual_seed(0)
    stack = nn.Sequential(nn.Linear(16, 16), *[InPlace(16) for _ in range(4)], nn.Linear(16, 1))
    report = gm.check(stack, torch.randn(8, 16))
    assert set(report.trace.last("skip_path").values()) == {1.0} and not plain_blocks(report.trace)
    report = gm.check(ResMLP(), torch.randn(8, 16), torch.randn(8, 1))
    skip = report.trace.last("skip_path")
    assert [skip[f"blocks.{i}"] for i in range(5)] == [1.0] * 5 and not plain_blocks(report.trace)
