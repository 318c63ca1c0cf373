"""Per-layer gradient norm, weight norm, their ratio, and the update/weight ratio.

A "layer" here is a module that owns trainable parameters. All norms come from a handful of fused
``torch._foreach_norm`` calls (one per device/dtype group), then an ``index_add_`` folds the
per-parameter squares into per-layer sums: the kernel count does not grow with the parameter count.

The update/weight ratio ||W_s - W_{s-1}|| / ||W_{s-1}|| is measured from the parameters themselves
(a snapshot taken at the step before a scheduled one), so it is right for any optimizer, Adam's
per-coordinate steps and weight decay included. Exactly one ``optimizer.step()`` happens between two
``Monitor.step()`` calls whichever order the user calls them in, so the snapshot brackets one update.

A tensor larger than ``update_sample`` entries is snapshotted on a fixed sample of that many entries:
64 contiguous blocks spread evenly through it (contiguous, so only the sampled cache lines are read; a
strided sample would stream the whole tensor through memory). Its squared norms are scaled by
numel / sample. Copying, subtracting and norming a whole 2M-parameter MLP at every step costs ~10% of
its training step on a CPU; the sample costs a few percent of that and estimates the ratio within a
few percent (see the tests). The weight norms (of ``weight_norm`` and ``grad_to_weight``) of such
tensors come from the same sample: a second full pass over the weights would cost as much as the
gradient's. Gradient norms are always exact. ``update_sample=None`` measures every entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradmedic.probes.base import LayerIndex, Probe

__all__ = ["GradientProbe", "local_tensor"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
UPDATE_SAMPLE = 16384  # entries per tensor for the update ratio (see the module docstring)


SAMPLE_BLOCKS = 64  # contiguous blocks per sampled tensor


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: the local shard of a DTensor (FSDP2), else the tensor itself.

    Norms are taken of the local part only, with no collective; the Monitor combines the shards'
    squares across ranks at a flush (``gradmedic.integrations.distributed``)."""
    if hasattr(t, "to_local") and hasattr(t, "placements"):
        with torch.no_grad():
            return t.to_local()
    return t


def _sample_view(p: torch.Tensor, size: int | None) -> torch.Tensor:
    """A (blocks, block) view of evenly spread contiguous blocks of ``p``, or ``p`` itself if small."""
    p = p.detach()
    n = p.numel()
    if size is None or n <= size or not p.is_contiguous():
        return p
    block = max(size // SAMPLE_BLOCKS, 1)
    blocks = size // block
    spacing = (n - block) // max(blocks - 1, 1)
    return p.view(-1).as_strided((blocks, block), (spacing, 1))


@dataclass
class _Plan:
    """How a list of tensors splits into foreach groups, and which layer row each belongs to."""

    groups: list[list[int]]  # indices into the parameter list, one list per (device, dtype)
    order: torch.Tensor  # (P,) the same indices flattened, in group order
    owner: torch.Tensor  # (P,) layer row of each tensor, in group order
    rows: torch.Tensor  # (R,) distinct rows present
    count_per_row: torch.Tensor  # (R,) how many tensor elements each present row holds


class GradientProbe(Probe):
    name = "gradients"
    metrics = ("grad_norm", "weight_norm", "grad_to_weight", "update_to_weight", "grad_zero_frac",
               "total_grad_norm")

    def __init__(self, every: int = 1, update_ratio: bool = True, zero_fraction: bool | str = "auto",
                 update_sample: int | None = UPDATE_SAMPLE):
        super().__init__(every)
        if update_sample is not None and (not isinstance(update_sample, int) or update_sample < 1):
            from gradmedic._errors import bad_argument

            raise bad_argument("update_sample", "a positive int or None (every entry)", update_sample)
        self.update_sample = update_sample
        if zero_fraction not in (True, False, "auto"):
            from gradmedic._errors import bad_argument

            raise bad_argument("zero_fraction", 'True, False or "auto" (float16/bfloat16 models only)',
                               zero_fraction)
        self.update_ratio = update_ratio
        # fraction of gradient entries that are exactly 0: how float16 underflow shows itself
        self.zero_fraction = zero_fraction

    def attach(self, layers: LayerIndex, capacity: int) -> None:
        super().attach(layers, capacity)
        self._params = [p for ps in layers.params for p in ps]
        self._tensors = [local_tensor(p) for p in self._params]  # what this rank holds (a shard under FSDP2)
        self._sharded = any(t is not p for t, p in zip(self._tensors, self._params, strict=True))
        self._owner = [row for row, ps in enumerate(layers.params) for _ in ps]
        self._plans: dict[tuple[bool, ...], _Plan] = {}
        self._all_plan = self._plan(tuple(True for _ in self._params)) if self._params else None
        self._snapshot: list[torch.Tensor] | None = None
        self._snapshot_step: int | None = None
        self._snapshot_norm: torch.Tensor | None = None
        # the factor numel / sampled entries, per parameter
        self._scale = torch.tensor([p.numel() / _sample_view(p, self.update_sample).numel() for p in self._tensors],
                                   dtype=self.dtype, device=self.device)
        self._views: tuple[tuple[int, ...], list[torch.Tensor]] | None = None
        self._current: list[torch.Tensor] | None = None  # this step's sample, contiguous
        self._current_step: int | None = None
        self._weight_sample_norm: tuple[int, torch.Tensor] | None = None  # (step, per-row norms, all params)
        # embedding tables: their gradient's all-zero rows are unused rows (see _zero_denominator)
        self._row_wise = [isinstance(layers.modules[row], (torch.nn.Embedding, torch.nn.EmbeddingBag)) and p.dim() == 2
                          for p, row in zip(self._tensors, self._owner, strict=True)]
        low = any(p.dtype in _LOW_PRECISION for p in self._tensors)
        self._zeros = self.zero_fraction is True or (self.zero_fraction == "auto" and low)

    # --- planning (host only, cached by which parameters have a gradient) -----------------------
    def _plan(self, present: tuple[bool, ...]) -> _Plan:
        plan = self._plans.get(present)
        if plan is not None:
            return plan
        by_key: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, (p, has) in enumerate(zip(self._tensors, present, strict=True)):
            if has:
                by_key.setdefault((p.device, p.dtype), []).append(i)
        groups = list(by_key.values())
        order = [i for g in groups for i in g]
        owner = [self._owner[i] for i in order]
        rows = sorted(set(owner))
        counts = {r: 0 for r in rows}
        for i in order:
            counts[self._owner[i]] += self._tensors[i].numel()
        plan = _Plan(
            groups=groups,
            order=torch.tensor(order, dtype=torch.long, device=self.device),
            owner=torch.tensor(owner, dtype=torch.long, device=self.device),
            rows=torch.tensor(rows, dtype=torch.long, device=self.device),
            count_per_row=torch.tensor([counts[r] for r in rows], dtype=self.dtype, device=self.device),
        )
        self._plans[present] = plan
        return plan

    def _norms(self, tensors: list[torch.Tensor], plan: _Plan, ord: float = 2.0) -> torch.Tensor:
        """Per-tensor norms, in plan order, as one vector in the buffer's dtype and device."""
        parts = []
        for group in plan.groups:
            ts = [tensors[i] for i in group]
            low = ts[0].dtype in _LOW_PRECISION
            norms = torch._foreach_norm(ts, ord, dtype=torch.float32) if low else torch._foreach_norm(ts, ord)
            parts.append(torch.stack(norms).to(self.device, self.dtype, non_blocking=True))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _per_row(self, per_tensor: torch.Tensor, plan: _Plan, squares: bool = True) -> torch.Tensor:
        """Fold per-tensor norms into per-layer norms (sqrt of the summed squares)."""
        acc = torch.zeros(len(self.layers), dtype=self.dtype, device=self.device)
        acc.index_add_(0, plan.owner, per_tensor.square() if squares else per_tensor)
        picked = acc.index_select(0, plan.rows)
        return picked.sqrt() if squares else picked

    # --- measurement ------------------------------------------------------------------------------
    def collect(self, step: int) -> None:
        if not self._params:
            return
        present = tuple(p.grad is not None for p in self._params)
        measured_update = self.update_ratio and self._snapshot_step == step - 1
        if not any(present) and not measured_update:
            return
        slot = self.buffer.open(step)
        if any(present):
            plan = self._plan(present)
            grads = [local_tensor(p.grad) if p.grad is not None else t for p, t in zip(self._params, self._tensors,
                                                                                      strict=True)]
            grad_norms = self._norms(grads, plan)
            grad = self._per_row(grad_norms, plan)
            # the gradient norm is exact; the weight norm of a large tensor comes from the update sample
            # (a second full pass over the weights would cost as much as the gradient's)
            weight = self._sampled_norms(self._gather(step), plan)
            if plan is self._all_plan:
                self._weight_sample_norm = (step, weight)
            ratio = torch.where(weight > 0, grad / weight, torch.full_like(grad, float("nan")))
            self.buffer.write(slot, plan.rows, "grad_norm", grad)
            self.buffer.write(slot, plan.rows, "weight_norm", weight)
            self.buffer.write(slot, plan.rows, "grad_to_weight", ratio)
            root = torch.zeros(1, dtype=torch.long, device=self.device)
            self.buffer.write(slot, root, "total_grad_norm", grad_norms.square().sum().sqrt().reshape(1))
            if self._zeros:
                nonzero = self._per_row(self._norms(grads, plan, ord=0.0), plan, squares=False)
                self.buffer.write(slot, plan.rows, "grad_zero_frac", 1.0 - nonzero / self._zero_denominator(plan))
        if measured_update:
            self._write_update(slot)

    def _zero_denominator(self, plan: _Plan) -> torch.Tensor:
        """Entries per layer that could be non-zero: an embedding's rows that no input used have an exact
        zero gradient in any precision (unused tokens, positions beyond the sequence, padding), so they are
        structure, not underflow, and are left out. A layer whose gradient is zero in every row counts whole."""
        order = [i for group in plan.groups for i in group]  # host ints, as plan.order holds them
        if not any(self._row_wise[i] for i in order):
            return plan.count_per_row
        per_tensor = []
        for i in order:
            p = self._tensors[i]
            if self._row_wise[i]:
                g = local_tensor(self._params[i].grad).reshape(p.shape[0], -1)
                live = (g != 0).any(dim=1).sum().to(self.dtype) * g.shape[1]
                per_tensor.append(torch.where(live > 0, live, torch.full_like(live, float(p.numel()))))
            else:
                per_tensor.append(self.host_tensor([p.numel()], self.dtype).reshape(()))
        return self._per_row(torch.stack(per_tensor).to(self.device), plan, squares=False)

    def _sampled(self) -> list[torch.Tensor]:
        """Views of the sampled entries, rebuilt whenever a parameter's storage has been replaced."""
        if self._sharded:
            self._tensors = [local_tensor(p) for p in self._params]  # FSDP2 may swap a shard's storage
        key = tuple(p.data_ptr() for p in self._tensors)
        if self._views is None or self._views[0] != key:
            self._views = (key, [_sample_view(p, self.update_sample) for p in self._tensors])
        return self._views[1]

    def _gather(self, step: int) -> list[torch.Tensor]:
        """This step's sampled entries in a contiguous buffer (a norm over strided views is ~4x slower)."""
        if self._current is not None and self._current_step == step:
            return self._current
        views = self._sampled()
        if self._current is None:
            self._current = [v.clone(memory_format=torch.contiguous_format) for v in views]
        else:
            assert self._all_plan is not None
            for group in self._all_plan.groups:
                torch._foreach_copy_([self._current[i] for i in group], [views[i] for i in group])
        self._current_step = step
        return self._current

    def _sampled_norms(self, tensors: list[torch.Tensor], plan: _Plan) -> torch.Tensor:
        """Per-layer norms estimated from the samples: squares scaled by numel / sample."""
        squares = self._norms(tensors, plan).square() * self._scale.index_select(0, plan.order)
        return self._per_row(squares.sqrt(), plan)

    def _write_update(self, slot: int) -> None:
        plan = self._all_plan
        assert plan is not None and self._snapshot is not None and self._snapshot_norm is not None
        params = self._gather(self._snapshot_step + 1 if self._snapshot_step is not None else -1)
        for group in plan.groups:  # snapshot <- W_{s-1} - W_s, in place (the buffer is recycled after)
            torch._foreach_sub_([self._snapshot[i] for i in group], [params[i] for i in group])
        change = self._sampled_norms(self._snapshot, plan)
        before = self._snapshot_norm
        ratio = torch.where(before > 0, change / before, torch.full_like(change, float("nan")))
        self.buffer.write(slot, plan.rows, "update_to_weight", ratio)
        self._snapshot_step = None

    def after_step(self, step: int, next_scheduled: bool) -> None:
        if not (self.update_ratio and next_scheduled and self._params):
            return
        plan = self._all_plan
        assert plan is not None
        current = self._gather(step)
        if self._weight_sample_norm is not None and self._weight_sample_norm[0] == step:
            self._snapshot_norm = self._weight_sample_norm[1]  # the same sample, unchanged since collect()
        else:
            self._snapshot_norm = self._sampled_norms(current, plan)
        # this step's sample becomes the snapshot; the old snapshot's buffer is refilled next time
        self._snapshot, self._current, self._current_step = current, self._snapshot, None
        self._snapshot_step = step

    def detach(self) -> None:
        super().detach()
        self._views = None
        self._current = None
        self._snapshot = None
        self._snapshot_norm = None
