"""Factories for the CLI contract tests: user code that exits, is interrupted, prints, or names its
modules like markup."""

import os
import sys

import torch
from torch import nn


def exits_0():
    sys.exit(0)


def exits_3():
    sys.exit(3)


def interrupted():
    raise KeyboardInterrupt


class Chatty(nn.Module):
    """Prints from Python and writes to file descriptor 1 directly, as C code or a subprocess would."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        print("forward says hello")
        os.write(1, b"raw fd 1 says hello\n")
        return self.fc(x)


def prints():
    print("factory says hello")
    torch.manual_seed(0)
    return {"model": Chatty(), "inputs": torch.randn(8, 4)}


HOSTILE = ("[/]", "[bold red]x", "a$\\frac{1}{$", ":thumbs_up:", "_hidden")


class Named(nn.Module):
    """Layers whose names are markup in rich and mathtext in matplotlib."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleDict({name: nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for name in HOSTILE})

    def forward(self, x):
        for layer in self.layers.values():
            x = layer(x)
        return x


def hostile_names():
    torch.manual_seed(0)
    return {"model": Named(), "inputs": torch.randn(16, 8), "targets": torch.randn(16, 8)}
