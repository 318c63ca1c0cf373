"""Factories for the CLI tests: ways a user's factory goes wrong."""

import torch
from torch import nn


def raises():
    raise RuntimeError("broken factory")


def not_a_dict():
    return nn.Linear(2, 2)


def wrong_shape():
    return {"model": nn.Linear(3, 2), "inputs": torch.randn(4, 5)}
