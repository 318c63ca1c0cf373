"""The output softmax's log partition, log Z = logsumexp(logits) over the classes: what z-loss pins near 0.

Wortsman et al. 2023 ("Small-scale proxies for large-scale Transformer training instabilities", sec. 3.2) find
output-logit divergence: with no weight decay on the head (or a high learning rate) log Z drifts away from 0, the
loss stops resolving, and the run diverges; PaLM's z-loss (Chowdhery et al. 2022), 1e-4 * log^2 Z added to the
loss, keeps it there. The probe reads the model's output with one forward hook on the model itself at a scheduled
step: ``log_z`` is the mean of logsumexp over the last dimension (every position of every sample), ``log_z_max``
the largest |log Z| of any of them. Both are reduced on the device and written at the model's row (``""``).

Only outputs that are logits are read: the ``logits`` of a Hugging Face output, else the first floating-point
tensor, with a last dimension of 2 or more (a regression's single output has no softmax). A regression with
several outputs is read too: its rule (``output_logit_drift``) only speaks once log Z is far beyond a classifier's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from gradmedic._tensors import first_float_tensor
from gradmedic.probes.base import LayerIndex, Probe, in_backward

__all__ = ["OutputLogitProbe", "output_logits"]


def output_logits(output: Any) -> torch.Tensor | None:
    """The logits in what a model returned: ``.logits`` / ``["logits"]`` where present (Hugging Face), else the first
    floating-point tensor; None where that has fewer than 2 entries in its last dimension."""
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if not (isinstance(logits, torch.Tensor) and logits.is_floating_point()):
        logits = first_float_tensor(output)
    if logits is None or logits.dim() == 0 or logits.shape[-1] < 2 or logits.numel() == 0:
        return None
    return logits


class OutputLogitProbe(Probe):
    name = "output_logits"
    metrics = ("log_z", "log_z_max")
    uses_hooks = True

    def attach(self, layers: LayerIndex, capacity: int) -> None:
        super().attach(layers, capacity)
        self._row = self.host_tensor([0], torch.long)  # the model's own row, named ""
        self._seen: torch.Tensor | None = None  # (2,) mean log Z, max |log Z| of the step's last forward

    def arm(self) -> None:
        assert self.layers is not None
        model = self.layers.modules[0]
        self._handles.append(model.register_forward_hook(self.guard(self._on_output)))

    def reset(self) -> None:
        super().reset()
        self._seen = None

    def _on_output(self, module: nn.Module, args: Any, output: Any) -> None:
        if in_backward():  # a checkpointed recomputation: the first forward was read
            return
        logits = output_logits(output)
        if logits is None:
            return
        with torch.no_grad():
            log_z = torch.logsumexp(logits.detach().float(), dim=-1)  # (..., ) one per position
            # the last forward of the step is kept (micro-batches of accumulation are alike)
            self._seen = torch.stack([log_z.mean(), log_z.abs().amax()])

    def collect(self, step: int) -> None:
        if self._seen is None:
            return
        slot = self.buffer.open(step)
        self.buffer.write_columns(slot, self._row, ("log_z", "log_z_max"), tuple(self._seen.view(2, 1)))
        self._seen = None
