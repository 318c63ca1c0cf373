"""Factories for the CLI tests: ways a user's factory goes wrong."""

import torch
from torch import nn


def raises():
    raise RuntimeError("broken factory")


def not_a_dict():
    return nn.Linear(2, 2)


def wrong_shape():
    return {"model": nn.Linear(3, 2), "inputs": torch.randn(4, 5)}



class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=12, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # (B, T, 8)
        return self.head(self.encoder(x)[:, -1])


def transformer():
    """A 12-block transformer encoder: layer names like encoder.layers.11.self_attn.out_proj, longer than
    a piped 80-column table had room for."""
    torch.manual_seed(0)
    return {"model": _Encoder(), "inputs": torch.randn(2, 6, 8), "targets": torch.tensor([0, 2])}
