"""The host-side plan of the gradient probe: how a step's parameters split into foreach groups and which layer row
each belongs to; and the views of a tensor that norms are taken of (a sparse gradient's stored entries, a DTensor's
local shard)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from gradmedic.probes.buffer import to_device

__all__ = ["Plan", "local_tensor", "stored_entries"]


def stored_entries(g: torch.Tensor) -> torch.Tensor:
    """The entries a sparse gradient holds, as a dense tensor with the same norm and the same non-zero count: for
    ``nn.Embedding(sparse=True)``'s COO gradient, its rows used (coalesced: a token seen twice is two entries until
    they are summed), for a compressed layout its values. Coalescing sorts the indices; on CUDA it reads their
    number on the host, so a model with sparse gradients pays one sync per measured step (dense ones none)."""
    if g.layout is torch.sparse_coo:
        return g.coalesce().values()
    return g.values()


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: the local shard of a DTensor (FSDP2), else the tensor itself.

    Norms are taken of the local part only, with no collective; the Monitor combines the shards'
    squares across ranks at a flush (``gradmedic._distributed``)."""
    if hasattr(t, "to_local") and hasattr(t, "placements"):
        with torch.no_grad():
            return t.to_local()
    return t


@dataclass
class Plan:
    """How a list of tensors splits into foreach groups, and which layer row each belongs to.

    A collect needs only the groups (host lists of parameter indices). The index tensors, which ``finish`` needs,
    are made on the device at their first use: at a flush, where copies from the host belong. A set of parameters
    with a gradient not seen before (an expert of a mixture that got tokens for the first time) then makes no
    tensor from host data at the step, which on CUDA would be a blocking copy."""

    groups: list[list[int]]  # indices into the parameter list, one list per (device, dtype)
    owner_rows: list[int]  # layer row of each tensor, in group order
    present_rows: list[int]  # distinct rows present, sorted
    counts: list[int]  # how many tensor elements each present row holds
    device: torch.device
    dtype: torch.dtype
    # index tensors derived from the above (owner, rows, count_per_row, GradientProbe._fold, _layout), made at first
    # use; kept here so that they go with the plan when it is dropped from the cache
    derived: dict[tuple[str, int | bool], Any] = field(default_factory=dict)

    def _tensor(self, name: str, values: list[int], dtype: torch.dtype) -> torch.Tensor:
        made = self.derived.get((name, 0))
        if made is None:
            made = self.derived[(name, 0)] = to_device(values, dtype, self.device)
        return made

    @property
    def owner(self) -> torch.Tensor:
        """(P,) layer row of each tensor, in group order."""
        return self._tensor("owner", self.owner_rows, torch.long)

    @property
    def rows(self) -> torch.Tensor:
        """(R,) distinct rows present."""
        return self._tensor("rows", self.present_rows, torch.long)

    @property
    def count_per_row(self) -> torch.Tensor:
        """(R,) how many tensor elements each present row holds, in the buffer's dtype."""
        return self._tensor("counts", self.counts, self.dtype)
