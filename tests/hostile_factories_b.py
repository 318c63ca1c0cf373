"""Factories for the part-B CLI tests (issue 31): names with escape sequences, a model that exits the process."""

from __future__ import annotations

import os

import torch
from torch import nn

# clear screen, set the window title, the C1 CSI byte, a bidi override, a formula for a spreadsheet
ESCAPES = ("cls\x1b[2J", "title\x1b]0;pwned\x07", "csi\x9b31m", "bidi\u202eevil", "=HYPERLINK(1)")


class Escapes(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleDict({name: nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for name in ESCAPES})

    def forward(self, x):
        for layer in self.layers.values():
            x = layer(x)
        return x


def escape_names():
    torch.manual_seed(0)
    return {"model": Escapes(), "inputs": torch.randn(16, 8), "targets": torch.randn(16, 8)}


class ExitsInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        os._exit(0)  # no atexit, no finally: the process is gone with status 0


def exits_in_forward():
    return {"model": ExitsInForward(), "inputs": torch.randn(2, 4)}


class RaisesValueError(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        raise ValueError("custom backward refuses")


class CustomBackward(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return RaisesValueError.apply(self.linear(x))


def custom_backward_raises():
    return {"model": CustomBackward(), "inputs": torch.randn(2, 4), "targets": torch.randn(2, 4)}


class WaitsInForward(nn.Module):
    """Writes a file when its forward starts (the test's cue to press Ctrl-C), then waits; with ``swallow`` it
    catches the KeyboardInterrupt and goes on, as some libraries' retry loops do."""

    def __init__(self, swallow: bool):
        super().__init__()
        self.layer, self.swallow = nn.Linear(4, 4), swallow

    def forward(self, x):
        import pathlib
        import time

        pathlib.Path(os.environ["GRADMEDIC_TEST_CUE"]).write_text("in forward")
        try:
            time.sleep(60)
        except KeyboardInterrupt:
            if not self.swallow:
                raise
        return self.layer(x)


def waits_in_forward():
    return {"model": WaitsInForward(swallow=False), "inputs": torch.randn(2, 4)}


def swallows_ctrl_c():
    return {"model": WaitsInForward(swallow=True), "inputs": torch.randn(2, 4)}
