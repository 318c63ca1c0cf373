"""A plain tanh RNN on a long sequence with the loss at the last step: gradients vanish through time.

    gradmedic check examples/tanh_rnn.py:build
"""

import torch
from torch import nn


class LastStep(nn.Module):
    def __init__(self, hidden: int = 64):
        super().__init__()
        self.rnn = nn.RNN(2, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):  # x: (B, T, 2)
        return self.head(self.rnn(x)[0][:, -1]).squeeze(-1)


def build(length: int = 200, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    x = torch.rand(32, length, 2)
    return {"model": LastStep(), "inputs": x, "targets": x[:, :, 0].mean(dim=1)}
