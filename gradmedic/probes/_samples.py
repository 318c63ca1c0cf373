"""A fixed sample of every parameter tensor, gathered at a step into a few flat buffers.

The gradient probe reads weight norms and the update ratio ||W_s - W_{s-1}|| / ||W_{s-1}|| from a sample
of each tensor larger than ``size`` entries (see ``probes.gradients``). On a CPU a ``torch._foreach_*`` call
is a loop of one dispatched kernel per tensor (~2.5 us each, whatever the tensor's size): with a weight and
a bias per layer, every per-tensor pass over a 50-layer MLP cost ~0.25 ms, and the probe made four of them
per step. Here the samples of one (device, dtype) group live in one flat buffer: the (blocks, block)
sample views of the large tensors, all of one shape, stacked into it with one ``torch.cat``, and the small
tensors (taken whole) concatenated after them with another. The buffer has a second row for the change
since the previous sample, so that copying, subtracting and summing the squares of both cost a handful
of kernels per step (one segmented reduction for the sums), whatever the number of tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["SAMPLE_BLOCKS", "SampleSet", "memory_flat", "sample_view"]

# contiguous blocks per sampled tensor: 16 float32 entries each (a 64-byte cache line) at the default
# sample of 4096. The error of a sampled norm follows the number of blocks more than their length (rows and
# columns of a weight differ in scale; blocks are what spreads over them): over 10 seeds of a 784-512-512-10
# MLP, Adam and SGD, 64 blocks of 256 read the update ratio within 6.4%, 256 blocks of 16 within 3.1%
SAMPLE_BLOCKS = 256
GOLDEN = (5**0.5 - 1) / 2  # the block stride's fraction of a row (_spacing)
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _spacing(n: int, block: int, blocks: int, row: int) -> int:
    """The stride between sampled blocks: as wide as the tensor allows, and never a whole number of rows.

    Evenly spread blocks whose stride is a multiple of the row length all sit in the same columns (a
    256x256 weight read in 256 blocks would give 256 times columns 0-15), and a weight's columns differ
    systematically (an input feature's scale sets its column's gradient and Adam step). So the stride is
    a whole number of rows plus the golden-ratio fraction of a row (made coprime with the row length): the
    block starts' columns then follow the golden-ratio sequence, the most evenly spread there is (Weyl),
    while the rows stay evenly spread."""
    widest = (n - block) // max(blocks - 1, 1)
    if row > widest or row <= block:  # rows longer than the stride (no aliasing), or rows shorter than a block
        return widest
    shift = max(int(round(GOLDEN * row)) % row, 1)
    while math.gcd(shift, row) != 1:  # coprime with the row: every column can start a block (rows of 2^k)
        shift += 1
    rows = widest // row
    stride = rows * row + shift if rows * row + shift <= widest else (rows - 1) * row + shift
    return stride if stride >= block else widest  # blocks must not overlap (a few narrow rows)


def memory_flat(p: torch.Tensor) -> torch.Tensor | None:
    """A 1-d view of ``p``'s entries in memory order when they fill one block of memory without gaps:
    contiguous, but also channels_last or transposed weights; None for a tensor with gaps (a slice).
    A norm or a uniform sample does not care about the order of the entries, only that each is read once."""
    if p.is_contiguous():
        return p.view(-1)
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(p.stride(), p.shape, strict=True) if sz > 1):
        if stride != expected:
            return None
        expected *= size
    return p.as_strided((p.numel(),), (1,))


def sample_view(p: torch.Tensor, size: int | None, blocks: int | None = None) -> torch.Tensor:
    """A (blocks, block) view of spread contiguous blocks of ``p`` (see ``_spacing``), or ``p`` if small (or
    with gaps in memory: read whole)."""
    p = p.detach()
    n = p.numel()
    flat = memory_flat(p) if size is not None and n > size else None
    if flat is None:
        return p
    block = max(size // (blocks or SAMPLE_BLOCKS), 1)  # type: ignore[operator]
    blocks = size // block  # type: ignore[operator]
    row = n // p.shape[0] if p.dim() > 1 else n
    return flat.as_strided((blocks, block), (_spacing(n, block, blocks, row), 1))


@dataclass
class _Group:
    """The tensors of one (device, dtype): ``big`` have a (blocks, block) sample, ``small`` are taken whole."""

    big: list[int]
    small: list[int]
    sizes: list[int]  # entries of each small tensor: the segments of the flat buffer after the samples
    lengths: torch.Tensor  # the same on the device
    split: int  # where the small tensors start in the flat buffer (the big tensors' samples come first)


class SampleSet:
    """Samples of ``tensors`` (``size`` entries each at most), gathered into flat buffers per device/dtype.

    The buffers have ``frames`` rows: ``gather(slot)`` fills one row with this step's samples;
    ``difference(snapshot, current)`` turns the snapshot's row into the change since it (in place: a snapshot is
    read once); ``squares(slot)`` gives the estimated sum of squares of each whole tensor (sampled squares
    scaled by numel / sample) of one row, or of every row at once. Two rows hold this step's sample and the
    change next to each other, so both sums cost the kernels of one; memory stays two samples, as a sample
    and a separate snapshot would be. Views are rebuilt when a tensor's storage moves.
    """

    def __init__(self, tensors: list[torch.Tensor], size: int | None, dtype: torch.dtype, device: torch.device,
                 frames: int = 2):
        self.size = size
        self.dtype = dtype  # of the squares returned
        self.device = device
        self._tensors = list(tensors)
        views = [sample_view(t, size) for t in self._tensors]
        by_key: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, t in enumerate(self._tensors):
            by_key.setdefault((t.device, t.dtype), []).append(i)
        self._groups = []
        for members in by_key.values():
            big = [i for i in members if views[i].shape != self._tensors[i].shape]  # sampled: (blocks, block)
            taken = set(big)
            small = [i for i in members if i not in taken]
            device = self._tensors[members[0]].device
            sizes = [self._tensors[i].numel() for i in small]
            split = sum(views[i].numel() for i in big)
            self._groups.append(_Group(big, small, sizes, torch.tensor(sizes, dtype=torch.long, device=device), split))
        # per group, on its own device and in its own dtype: (frames, sampled entries + small tensors' entries)
        self._buffers = [torch.zeros(frames, g.split + sum(g.sizes), dtype=self._tensors[(g.big or g.small)[0]].dtype,
                                     device=self._tensors[(g.big or g.small)[0]].device) for g in self._groups]
        self.order = [i for g in self._groups for i in (*g.big, *g.small)]  # the order of squares()
        scale = [self._tensors[i].numel() / max(views[i].numel(), 1) for i in self.order]
        self._scale = torch.tensor(scale, dtype=dtype, device=device)
        self._unorder = torch.tensor(sorted(range(len(self.order)), key=self.order.__getitem__), dtype=torch.long,
                                     device=device)
        self._tiled: dict[tuple[int, int], torch.Tensor] = {}  # (group, k) -> segment lengths
        self._key: tuple[int, ...] | None = None
        self._views: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []

    def retarget(self, tensors: list[torch.Tensor]) -> None:
        """The same parameters, possibly in new storage (FSDP2 swaps a shard's); shapes must not change."""
        self._tensors = list(tensors)

    def _current_views(self) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
        key = tuple(t.data_ptr() for t in self._tensors)
        if key != self._key:
            # a small tensor is read whole through a view of its memory; one with gaps cannot be viewed flat
            # and is kept as it is, to be flattened (copied) afresh at every gather: a flat copy made once
            # would go on showing its first values
            self._views = [([sample_view(self._tensors[i], self.size) for i in g.big],
                            [self._flat_or_self(self._tensors[i]) for i in g.small]) for g in self._groups]
            self._key = key
        return self._views

    @staticmethod
    def _flat_or_self(t: torch.Tensor) -> torch.Tensor:
        flat = memory_flat(t.detach())
        return flat if flat is not None else t.detach()

    def gather(self, slot: int) -> int:
        """This step's samples into row ``slot`` of every group's buffer: the big tensors' blocks, then the small
        tensors flat (two ``torch.cat`` into it). Returns ``slot``."""
        for group, buffer, (big, small) in zip(self._groups, self._buffers, self._current_views(), strict=True):
            if any(t.dim() != 1 for t in small):  # a tensor with gaps: flattened (copied) afresh, the rest as is
                small = [t.reshape(-1) for t in small]
            row = buffer[slot]
            if big:
                torch.cat(big, out=row[:group.split].view(-1, big[0].shape[-1]))
            if small:
                torch.cat(small, out=row[group.split:])
        return slot

    def difference(self, snapshot: int, current: int) -> None:
        """Row ``snapshot`` <- snapshot - current (W_{s-1} - W_s: the update, sign aside), in place."""
        for buffer in self._buffers:
            buffer[snapshot].sub_(buffer[current])

    def squares(self, slot: int | None = None, tensor_order: bool = True) -> torch.Tensor:
        """Estimated sum of squares of each tensor, from row ``slot`` ((1, len(tensors))) or from every row at once
        ((frames, len(tensors)), in row order), in ``tensors`` order, or in ``self.order`` with
        ``tensor_order=False`` (one index_select fewer, for a caller that folds by its own index). Rows are
        reduced together: a norm per sampled block row (vectorised), and one segmented reduction over the small
        tensors (``segment_reduce`` is not vectorised: ~0.6 ns an entry, so it is kept to the small tensors' few
        entries)."""
        parts = []
        for group, buffer in zip(self._groups, self._buffers, strict=True):
            rows = buffer if slot is None else buffer[slot:slot + 1]
            k = rows.shape[0]
            if group.big:
                x = rows[:, :group.split].view(k, len(group.big), -1)
                low = torch.float32 if x.dtype in _LOW_PRECISION else None
                parts.append(torch.linalg.vector_norm(x, dim=-1, dtype=low).to(self.device, self.dtype).square())
            if group.small:
                x = rows[:, group.split:]
                x = x.float() if x.dtype in _LOW_PRECISION else x
                sums = self._segment_sums((x * x).reshape(-1), group, k)
                parts.append(sums.to(self.device, self.dtype).view(k, -1))
        joined = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        scaled = joined * self._scale
        return scaled.index_select(1, self._unorder) if tensor_order else scaled

    def _segment_sums(self, x: torch.Tensor, group: _Group, k: int = 1) -> torch.Tensor:
        """Sums of consecutive segments of ``x`` (``k`` copies of the group's small tensors end to end): one
        ``segment_reduce`` on a CPU or CUDA (on a CPU 3-5x faster than an ``index_add_`` by a per-entry index:
        5.6 us against 15 us for 12 segments of 5k entries, 34 us against 171 us for 100 of 64k), elsewhere one
        reduction per segment."""
        if x.device.type in ("cpu", "cuda"):
            lengths = group.lengths
            if k > 1:
                lengths = self._tiled.get((id(group), k))
                if lengths is None:  # made once, from the device tensor (no host data at a step)
                    lengths = self._tiled[(id(group), k)] = group.lengths.repeat(k)
            # unsafe=True: the lengths are ours and valid; the checked path reads them on the host (.item()) at
            # every call, a blocking copy per step on CUDA
            return torch.segment_reduce(x, "sum", lengths=lengths, unsafe=True)
        return torch.stack([part.sum() for part in x.split(group.sizes * k)])
