"""Factories for the CLI tests: ways a user's factory goes wrong."""

import torch
from torch import nn


def raises():
    raise RuntimeError("broken factory")


def not_a_dict():
    return nn.Linear(2, 2)


def wrong_shape():
    return {"model": nn.Linear(3, 2), "inputs": torch.randn(4, 5)}


def gpt2():
    """A 12-block GPT-2 (random weights from a config): long layer names, as users' models have."""
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=8, n_layer=12, n_head=2)
    ids = torch.randint(0, 32, (2, 8))
    return {"model": transformers.GPT2LMHeadModel(config), "inputs": {"input_ids": ids, "labels": ids}}
