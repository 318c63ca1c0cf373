"""Rank-aware monitoring under ``torch.distributed`` (DDP, FSDP2, any data-parallel job).

Each rank's Monitor measures what its process sees: its own micro-batch's loss, activations and
backward signal, and, under FSDP2 (``fully_shard``), only its shard of every parameter and gradient.
At each flush the ranks exchange their host-side chunks in ONE collective (``all_gather_object`` on a
gloo group of gradmedic's own, so a NCCL job's streams are never touched and a timeout is ours to set),
and every rank combines them the same way:

- per-layer gradient and weight norms of sharded parameters: the square root of the summed squares of
  the shards (the norm of the whole parameter); of replicated parameters (DDP, whose gradients are
  already averaged by its all-reduce): rank 0's value, since every rank holds the same numbers.
  Ratios (``grad_to_weight``, ``update_to_weight``) and the total norm are recomputed from the
  combined norms, not averaged;
- RMS statistics (backward signal, per-time-step gradients): the root of the mean of squares, i.e. the
  RMS over every rank's samples (equal micro-batches assumed);
- means (loss, activation means, saturated fractions): the mean over ranks; activation std: pooled;
- NaN/Inf flags: the maximum (any rank); dead units: the minimum over ranks, an upper bound on the
  units dead for every sample of the global batch (a unit is dead globally only if dead on each rank).

A rank that fails or lags never hangs the others for long: the group's collectives time out after
``timeout`` seconds, and then the Monitor warns once and goes on with local numbers. Rank 0 alone
writes trace files (``Trace.save`` is a no-op elsewhere unless ``rank_files=True``).

This module imports nothing but torch; the Monitor imports it only when a process group is initialised.
"""

from __future__ import annotations

import warnings
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from gradmedic._errors import GradmedicWarning
from gradmedic.probes.base import Chunk, LayerIndex

__all__ = ["COMBINE", "RankCombiner", "active", "combiner_for"]

# How each metric is combined across ranks (see the module docstring). Metrics not listed (a custom
# probe's) are averaged.
COMBINE: dict[str, str] = {
    "grad_norm": "norm", "weight_norm": "norm", "grad_to_weight": "ratio", "update_to_weight": "update",
    "grad_zero_frac": "shard_mean", "total_grad_norm": "total",
    "backward_rms": "rms", "backward_norm": "root_sum_squares", "forward_index": "first",
    "act_mean": "mean", "act_std": "pooled_std", "saturated_frac": "mean", "dead_frac": "min",
    "dead_units_seen": "first",
    "nonfinite_forward": "max", "nonfinite_backward": "max", "nonfinite_input": "max",
    "forward_gain": "mean", "backward_gain": "mean", "time_grad_ratio": "geomean",
    # run scalars
    "loss": "mean", "lr": "first",
}
SERIES_COMBINE = "rms"  # per-time-step gradient RMS
DEFAULT_TIMEOUT_S = 120.0  # a flush waits this long for the other ranks before going local


def active() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _is_sharded(p: torch.Tensor) -> bool:
    placements = getattr(p, "placements", None)
    return bool(placements) and any(getattr(pl, "is_shard", lambda: False)() for pl in placements)


class RankCombiner:
    """Combines the chunks of every rank at a flush: one collective per flush."""

    def __init__(self, layers: LayerIndex, wrapper: str, timeout: float | None = None):
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.backend = str(dist.get_backend())
        self.wrapper = wrapper
        self.sharded = {name for name, ps in zip(layers.names, layers.params, strict=True)
                        if any(_is_sharded(p) for p in ps)}
        self.timeout = DEFAULT_TIMEOUT_S if timeout is None else timeout
        self.collectives = 0  # how many collectives gradmedic has issued (one per combined flush)
        self.failed: str | None = None
        self._group: Any = None
        try:
            # gradmedic's own gloo group, made here (a fixed point in every rank's program, like DDP's own
            # constructor) rather than at a flush: host-side objects, a timeout of our own, NCCL untouched
            self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout))
        except Exception as error:  # noqa: BLE001 - a monitor must never break (or hang) training
            self._fail(error)

    def describe(self) -> dict[str, Any]:
        """What the trace's meta says about ranks and how numbers were combined."""
        if self.sharded:
            gradients = "sharded (FSDP2): per-layer norms are the norms of the whole parameter, from the shards"
        elif self.wrapper == "DistributedDataParallel":
            gradients = "already averaged by DDP's all-reduce: identical on every rank, not reduced again"
        else:
            gradients = "each rank's own gradients; rank 0's are recorded"
        return {"world_size": self.world_size, "rank": self.rank, "backend": self.backend,
                "wrapper": self.wrapper, "gradients": gradients, "sharded_layers": len(self.sharded),
                "combined": dict(COMBINE), "series": SERIES_COMBINE, "collectives": self.collectives,
                "local_only": self.failed}

    # --- the one collective ------------------------------------------------------------------------
    def _gather(self, payload: Any) -> list[Any] | None:
        if self.failed is not None:
            return None
        try:
            out: list[Any] = [None] * self.world_size
            self.collectives += 1
            dist.all_gather_object(out, payload, group=self._group)
            return out
        except Exception as error:  # noqa: BLE001 - a monitor must never break (or hang) training
            self._fail(error)
            return None

    def _fail(self, error: BaseException) -> None:
        text = str(error).strip().splitlines()
        self.failed = f"{type(error).__name__}: {text[0] if text else ''}"
        warnings.warn(f"gradmedic: combining statistics across ranks failed on rank {self.rank} ({self.failed});"
                      " this rank's Monitor goes on with its own numbers.", GradmedicWarning, stacklevel=5)

    def combine(self, chunks: dict[str, Chunk]) -> dict[str, Chunk]:
        """Every rank's chunks, keyed by probe, combined; this rank's own if the exchange failed."""
        everyone = self._gather(chunks)
        if everyone is None:
            return chunks
        keys = list(dict.fromkeys(k for ranks in everyone for k in ranks))
        out = {}
        for key in keys:
            parts = [ranks[key] for ranks in everyone if key in ranks]
            out[key] = self._combine_chunks(parts)
        return out

    # --- combining (host numpy, the same on every rank) ----------------------------------------------
    def _combine_chunks(self, parts: list[Chunk]) -> Chunk:
        steps = np.unique(np.concatenate([c.steps for c in parts])).astype(np.int64)
        layers: list[str] = []
        metrics: list[str] = []
        for c in parts:
            layers += [x for x in c.layers if x not in layers]
            metrics += [m for m in c.metrics if m not in metrics]
        stacked = np.full((len(parts), len(steps), len(layers), len(metrics)), np.nan)
        li = {x: i for i, x in enumerate(layers)}
        mi = {m: j for j, m in enumerate(metrics)}
        for r, c in enumerate(parts):
            if c.layers:
                stacked[np.ix_([r], np.searchsorted(steps, c.steps), [li[x] for x in c.layers],
                               [mi[m] for m in c.metrics])] = c.values[None]
        values = np.full(stacked.shape[1:], np.nan)
        sharded = np.array([x in self.sharded for x in layers], dtype=bool)
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: not measured anywhere
            for m, j in mi.items():
                values[:, :, j] = _reduce(COMBINE.get(m, "mean"), stacked[..., j], sharded)
            _recompute_ratios(values, stacked, mi, sharded)
        events = [dict(e, rank=r) for r, c in enumerate(parts) for e in c.events]
        series: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        for name in dict.fromkeys(n for c in parts for n in c.series):
            series[name] = {}
            for layer in dict.fromkeys(x for c in parts for x in c.series.get(name, {})):
                pieces = [c.series[name][layer] for c in parts if layer in c.series.get(name, {})]
                if len({p[1].shape for p in pieces}) != 1 or any(not np.array_equal(p[0], pieces[0][0])
                                                                   for p in pieces):
                    series[name][layer] = pieces[0]  # shapes differ across ranks: rank 0's own
                    continue
                series[name][layer] = (pieces[0][0], np.sqrt(np.nanmean(np.stack([p[1] for p in pieces]) ** 2,
                                                                         axis=0)))
        scalars = {}
        for name in dict.fromkeys(n for c in parts for n in c.scalars):
            pieces = [c.scalars[name] for c in parts if name in c.scalars]
            s_steps = np.unique(np.concatenate([p[0] for p in pieces])).astype(np.int64)
            grid = np.full((len(pieces), len(s_steps)), np.nan)
            for r, (st, va) in enumerate(pieces):
                grid[r, np.searchsorted(s_steps, st)] = va
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                scalars[name] = (s_steps, _reduce(COMBINE.get(name, "mean"), grid, np.zeros(0, dtype=bool)))
        return Chunk(steps=steps, layers=layers, metrics=metrics, values=values, series=series, events=events,
                     scalars=scalars)


def _first(x: np.ndarray) -> np.ndarray:
    """Along axis 0, the first rank's value that is not NaN."""
    measured = ~np.isnan(x)
    idx = np.argmax(measured, axis=0)
    picked = np.take_along_axis(x, idx[None], axis=0)[0]
    return np.where(measured.any(axis=0), picked, np.nan)


def _reduce(rule: str, x: np.ndarray, sharded: np.ndarray) -> np.ndarray:
    """Combine along axis 0 (ranks); ``sharded`` marks the layers (last axis of x) that are sharded."""
    if rule in ("norm", "shard_mean", "update", "ratio", "total"):
        # recomputed or per-layer rules: sharded layers are combined below or in _recompute_ratios;
        # replicated layers keep rank 0's value
        first = _first(x)
        if rule == "norm" and sharded.any():
            summed = np.sqrt(np.nansum(x ** 2, axis=0))
            return np.where(sharded, np.where(np.isnan(first), np.nan, summed), first)
        if rule == "shard_mean" and sharded.any():
            return np.where(sharded, np.nanmean(x, axis=0), first)
        return first
    if rule == "first":
        return _first(x)
    if rule == "rms":
        return np.sqrt(np.nanmean(x ** 2, axis=0))
    if rule == "root_sum_squares":
        return np.sqrt(np.nansum(x ** 2, axis=0)) * np.where(np.isnan(x).all(axis=0), np.nan, 1.0)
    if rule == "max":
        return np.nanmax(x, axis=0)
    if rule == "min":
        return np.nanmin(x, axis=0)
    if rule == "geomean":
        return np.exp(np.nanmean(np.log(x), axis=0))
    return np.nanmean(x, axis=0)  # "mean", "pooled_std" (fixed up below) and unknown metrics


def _recompute_ratios(values: np.ndarray, stacked: np.ndarray, mi: dict[str, int], sharded: np.ndarray) -> None:
    """Ratios and totals from the combined norms (for sharded layers); pooled std from per-rank moments."""
    if "act_std" in mi and "act_mean" in mi:
        mean, std = stacked[..., mi["act_mean"]], stacked[..., mi["act_std"]]
        pooled = np.nanmean(std ** 2 + mean ** 2, axis=0) - values[:, :, mi["act_mean"]] ** 2
        values[:, :, mi["act_std"]] = np.sqrt(np.clip(pooled, 0.0, None))
    if not sharded.any() or "grad_norm" not in mi:
        return
    grad = values[:, :, mi["grad_norm"]]
    if "weight_norm" in mi:
        weight = values[:, :, mi["weight_norm"]]
        if "grad_to_weight" in mi:
            ratio = np.where(weight > 0, grad / np.where(weight > 0, weight, 1.0), np.nan)
            values[:, :, mi["grad_to_weight"]] = np.where(sharded, ratio, values[:, :, mi["grad_to_weight"]])
        if "update_to_weight" in mi:
            # ||dW|| of each shard is its ratio times its weight norm; the whole parameter's is their root sum
            # of squares (the shard's weight norm at the same step stands in for the one before the update)
            change = np.sqrt(np.nansum((stacked[..., mi["update_to_weight"]] * stacked[..., mi["weight_norm"]]) ** 2,
                                       axis=0))
            update = np.where(weight > 0, change / np.where(weight > 0, weight, 1.0), np.nan)
            measured = ~np.isnan(stacked[..., mi["update_to_weight"]]).all(axis=0)
            values[:, :, mi["update_to_weight"]] = np.where(sharded & measured, update,
                                                            values[:, :, mi["update_to_weight"]])
    if "total_grad_norm" in mi:
        # per-layer norms add up to the model's (tied parameters count once), so the total is their root sum
        total = np.sqrt(np.nansum(grad ** 2, axis=1))
        has_total = ~np.isnan(values[:, :, mi["total_grad_norm"]])
        values[:, :, mi["total_grad_norm"]] = np.where(has_total, total[:, None], np.nan)


def combiner_for(layers: Any, model: Any, trace: Any, distributed: bool | None,
                 rank_files: bool) -> RankCombiner | None:
    """A RankCombiner when this process is one rank of several (and not told otherwise), else None; on ranks other
    than 0 the trace writes nothing (or, with ``rank_files``, ``NAME.rankN.EXT``)."""
    if distributed is False or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    if not active():
        return None
    combiner = RankCombiner(layers, type(model).__name__)
    if combiner.rank != 0:
        trace.rank_suffix = f".rank{combiner.rank}" if rank_files else ""
    trace.meta["distributed"] = combiner.describe()
    return combiner
