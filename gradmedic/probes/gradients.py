"""Per-layer gradient norm, weight norm, their ratio, and the update/weight ratio.

A "layer" here is a module that owns trainable parameters. All norms come from a handful of fused
``torch._foreach_norm`` calls (one per device/dtype group), kept per tensor at a step; at the flush one
``index_add_`` per layout folds the per-parameter squares of all the steps into per-layer sums
(``Probe.defer``): the kernel count does not grow with the parameter count, and a step pays for the passes
over the parameters, not for the arithmetic on a few dozen numbers.

The update/weight ratio ||W_s - W_{s-1}|| / ||W_{s-1}|| is measured from the parameters themselves
(a snapshot taken at the step before a scheduled one), so it is right for any optimizer, Adam's
per-coordinate steps and weight decay included. Exactly one ``optimizer.step()`` happens between two
``Monitor.step()`` calls whichever order the user calls them in, so the snapshot brackets one update.

A tensor larger than ``update_sample`` entries is snapshotted on a fixed sample of that many entries:
256 contiguous blocks of 16 spread through it (contiguous, so only the sampled cache lines are read; a
strided sample would stream the whole tensor through memory; ``probes._samples`` says where they sit and
how the samples of all tensors share a few flat buffers). Its squared norms are scaled by numel / sample.
Copying, subtracting and norming a whole 2M-parameter MLP at every step costs ~10% of its training step on
a CPU; the sample costs a small part of that. It reads the update ratio of an MLP within ~6% (10 seeds,
Adam and SGD), of GPT-2, BERT and Llama configs within 1% at the median layer and 4-10% at the worst (an
embedding table whose used rows are few), and of a CNN trained with SGD, whose updates are heavy-tailed,
within ~15%: enough for the rules, whose thresholds are orders of magnitude apart (diagnosis.rules.updates
STALLED_*). The weight norms (of ``weight_norm`` and ``grad_to_weight``) of such tensors come from the same
sample, within ~3.5%: a second full pass over the weights would cost as much as the gradient's. Gradient
norms are always exact. ``update_sample=None`` measures every entry.

The share of exactly-zero gradient entries (``grad_zero_frac``, how float16 underflow shows) is counted on
a sample of the same kind (ZERO_SAMPLE entries) of each larger tensor: counting zeros is a kernel that a
CPU does not vectorise, and a whole-tensor count cost more than all the norms together.
"""

from __future__ import annotations

import math

import torch

from gradmedic._errors import bad_argument
from gradmedic.probes._gradient_plan import Plan, local_tensor, stored_entries
from gradmedic.probes._samples import SampleSet, sample_view
from gradmedic.probes.base import LayerIndex, Probe

__all__ = ["GradientProbe", "local_tensor", "stored_entries"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
UPDATE_SAMPLE = 4096  # entries per tensor for the update ratio and weight norms (see the module docstring)
# plans kept, one per set of parameters that had a gradient at a step: one in most models; a mixture of experts
# whose experts get no token at some steps makes a new set at most steps, and its plans are dropped beyond this
# many (each holds a few index tensors the size of the parameter list)
PLAN_CACHE = 32


# entries per tensor for the zero fraction: its rule reads shares of 50% and 99% (diagnosis.rules
# UNDERFLOW_*); 4096 entries in 64 blocks estimate a share to within ~1% (binomial), ~6% if whole blocks
# were all zero or all not (64 independent draws), which still tells 50% from 99%. Fewer, longer blocks
# than for the norms: counting over a strided view costs per block row (1.1 ms a step with 256 blocks of
# 16 at depth 50, about half with 64 of 64)
ZERO_SAMPLE = 4096
ZERO_BLOCKS = 64


class GradientProbe(Probe):
    name = "gradients"
    metrics = ("grad_norm", "weight_norm", "grad_to_weight", "update_to_weight", "grad_zero_frac",
               "total_grad_norm")

    def __init__(self, every: int = 1, update_ratio: bool = True, zero_fraction: bool | str = "auto",
                 update_sample: int | None = UPDATE_SAMPLE):
        super().__init__(every)
        if update_sample is not None and (not isinstance(update_sample, int) or update_sample < 1):
            raise bad_argument("update_sample", "a positive int or None (every entry)", update_sample)
        self.update_sample = update_sample
        if zero_fraction not in (True, False, "auto"):
            raise bad_argument("zero_fraction", 'True, False or "auto" (float16/bfloat16 models only)',
                               zero_fraction)
        self.update_ratio = update_ratio
        # fraction of gradient entries that are exactly 0: how float16 underflow shows itself ("auto": where the
        # backward runs in 16 bits, see _counts_zeros)
        self.zero_fraction = zero_fraction

    def attach(self, layers: LayerIndex, capacity: int) -> None:
        super().attach(layers, capacity)
        self._params = [p for ps in layers.params for p in ps]
        self._tensors = [local_tensor(p) for p in self._params]  # what this rank holds (a shard under FSDP2)
        self._sharded = any(t is not p for t, p in zip(self._tensors, self._params, strict=True))
        self._owner = [row for row, ps in enumerate(layers.params) for _ in ps]
        self._plans: dict[tuple[bool, ...], Plan] = {}
        self._all_plan = self._plan(tuple(True for _ in self._params)) if self._params else None
        if self._all_plan is not None:  # made now: a step that writes the update ratio alone reads its rows
            _ = self._all_plan.owner, self._all_plan.rows, self._all_plan.count_per_row
        # two rows of samples when the update is read (this step's and the snapshot's), else one
        self._samples = SampleSet(self._tensors, self.update_sample, self.dtype, self.device,
                                  frames=2 if self.update_ratio else 1)
        self._snapshot: int | None = None  # the SampleSet row holding the snapshot W_{s-1}
        self._snapshot_step: int | None = None
        self._snapshot_squares: torch.Tensor | None = None  # per-tensor squares of the snapshot (SampleSet order)
        self._current: int | None = None  # the SampleSet row holding this step's sample
        self._current_step: int | None = None
        # the last collect: (step, update measured, SampleSet squares (rows, tensors), the row of that step's sample,
        # the snapshot's squares or None): reused by a second collect of the same step, and by after_step when this
        # step's sample becomes the snapshot
        self._collected: tuple[int, bool, torch.Tensor, int, torch.Tensor | None] | None = None
        self._deferred_present: tuple[bool, ...] = ()  # which parameters had a gradient at the last deferred collect
        # the layer row of each tensor, in the order of the SampleSet's squares (tensor_order=False)
        self._owner_sampled = torch.tensor([self._owner[i] for i in self._samples.order], dtype=torch.long,
                                           device=self.device)
        # embedding tables: their gradient's all-zero rows are unused rows (see _zero_denominator)
        self._row_wise = [isinstance(layers.modules[row], (torch.nn.Embedding, torch.nn.EmbeddingBag)) and p.dim() == 2
                          for p, row in zip(self._tensors, self._owner, strict=True)]
        self._low = any(p.dtype in _LOW_PRECISION for p in self._tensors)

    # --- planning (host lists, cached by which parameters have a gradient; device tensors made lazily) --
    def _plan(self, present: tuple[bool, ...]) -> Plan:
        plan = self._plans.get(present)
        if plan is not None:
            return plan
        if len(self._plans) >= PLAN_CACHE:  # keep the plan of all parameters, the usual one
            self._plans = {k: v for k, v in self._plans.items() if v is self._all_plan}
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
        plan = Plan(groups=groups, owner_rows=owner, present_rows=rows, counts=[counts[r] for r in rows],
                     device=self.device, dtype=self.dtype)
        self._plans[present] = plan
        return plan

    def _norms(self, tensors: list[torch.Tensor], plan: Plan, ord: float = 2.0, convert: bool = True) -> torch.Tensor:
        """Per-tensor norms, in plan order, as one vector on the buffer's device; in the buffer's dtype, or with
        ``convert=False`` in the tensors' own (float32 at least), for a caller that converts later."""
        parts = []
        for group in plan.groups:
            ts = [tensors[i] for i in group]
            low = ts[0].dtype in _LOW_PRECISION
            norms = torch._foreach_norm(ts, ord, dtype=torch.float32) if low else torch._foreach_norm(ts, ord)
            norms = torch.stack(norms)
            if convert or norms.device != self.device:
                norms = norms.to(self.device, self.dtype, non_blocking=True)
            parts.append(norms)
        return torch.cat(parts) if len(parts) > 1 else parts[0]  # cat promotes mixed dtypes

    def _per_row(self, per_tensor: torch.Tensor, plan: Plan, squares: bool = True) -> torch.Tensor:
        """Fold per-tensor norms into per-layer norms (sqrt of the summed squares)."""
        acc = torch.zeros(len(self.layers), dtype=self.dtype, device=self.device)
        acc.index_add_(0, plan.owner, per_tensor.square() if squares else per_tensor)
        picked = acc.index_select(0, plan.rows)
        return picked.sqrt() if squares else picked

    # --- measurement ------------------------------------------------------------------------------
    def collect(self, step: int) -> None:
        """The step's norms, kept raw (per tensor) for ``finish``, which folds them into layers at the flush: a
        collect makes the passes over the parameters (the gradient norms, the sample and its change) and little
        else. Called again at the same step (``Monitor.record_gradients`` after each backward of an accumulated
        step), it reads the gradients again and keeps the sample, the change and the snapshot of the first call
        (the weights have not moved in between), so its entry replaces the earlier one whole."""
        if not self._params:
            return
        present = tuple(p.grad is not None for p in self._params)
        again = self._collected is not None and self._collected[0] == step
        if again:
            _, measured_update, squares, current, snapshot = self._collected  # type: ignore[misc]
        else:
            measured_update = self.update_ratio and self._snapshot_step == step - 1
        if not any(present) and not measured_update:
            return
        slot = self.buffer.open(step)
        if not any(present):
            if not again:
                self._write_update(slot)
            return
        plan = self._plan(present)
        if self._sharded:
            grads = [local_tensor(p.grad) if p.grad is not None else t for p, t in zip(self._params, self._tensors,
                                                                                      strict=True)]
        else:  # a parameter that is not a DTensor has no DTensor gradient: no per-tensor test
            grads = [p.grad if p.grad is not None else p for p in self._params]
        if any(g.layout is not torch.strided for g in grads):
            grads = [g if g.layout is torch.strided else stored_entries(g) for g in grads]
        grad_norms = self._norms(grads, plan, convert=False)  # converted once per flush, in finish
        if not again:
            # the gradient norm is exact; the weight norm of a large tensor comes from the update sample (a second
            # full pass over the weights would cost as much as the gradient's), and so does the update W_{s-1} - W_s
            current = self._gather(step)
            snapshot = None
            if measured_update:
                assert self._snapshot is not None and self._snapshot_squares is not None
                self._samples.difference(self._snapshot, current)  # the snapshot's row <- W_{s-1} - W_s
                squares = self._samples.squares(tensor_order=False)  # both rows in one pass: sample and change
                snapshot = self._snapshot_squares
                self._snapshot_step = None
            else:
                squares = self._samples.squares(current, tensor_order=False)
                current = 0
            self._collected = (step, measured_update, squares, current, snapshot)
        # every row's update is read, also of a layer without a gradient this step (momentum and weight decay
        # move it): folded with the rest when every layer has one (the usual case), written now otherwise
        fused = measured_update and plan is self._all_plan
        if again and any(before and not now for before, now in zip(self._deferred_present, present, strict=True)):
            # a parameter lost its gradient since the step's earlier call (set to None in between): that call's
            # entry is written now, so that its rows keep their values, as an immediate write's would
            self.settle()
        self._deferred_present = present
        if fused:
            self.defer(slot, (present, current, True), grad_norms, squares, snapshot)
        else:
            self.defer(slot, (present, 0, False), grad_norms, squares[current:current + 1])
            if measured_update:
                self._write_ratio(slot, self._row_norms(squares[1 - current]))
        if self._counts_zeros():
            self.buffer.write(slot, plan.rows, "grad_zero_frac",
                              1.0 - self._nonzero(grads, plan) / self._zero_denominator(plan, grads))

    def finish(self, layout: tuple[tuple[bool, ...], int, bool], slots: torch.Tensor, grad_norms: torch.Tensor,
               squares: torch.Tensor, snapshot: torch.Tensor | None = None) -> None:
        """grad_norm, weight_norm, grad_to_weight[, update_to_weight] of every present row and the total norm of
        the deferred steps of one layout, with one ``index_add_`` (``_fold``) and one write."""
        present, current, fused = layout
        plan = self._plan(present)
        sample = squares[:, current]
        parts = [sample, squares[:, 1 - current], snapshot] if fused else [sample]
        norms = self._fold(plan, grad_norms.to(self.dtype).square(), parts)
        steps, layers = len(slots), len(self.layers)  # type: ignore[arg-type]
        # per present row: grad, weight (change, snapshot); the ratios over the same rows in one division
        per_row = norms[:, :-1].view(steps, len(parts) + 1, layers).index_select(2, plan.rows)
        if fused:
            ratios = per_row[:, ::2] / torch.where(per_row[:, 1::2] > 0, per_row[:, 1::2], math.nan)
        else:
            ratios = per_row[:, :1] / torch.where(per_row[:, 1:2] > 0, per_row[:, 1:2], math.nan)
        values = torch.cat([per_row[:, :2].reshape(steps, -1), ratios.reshape(steps, -1), norms[:, -1:]], dim=1)
        self.buffer.put_steps(slots, self._layout(plan, fused), values)

    def _fold(self, plan: Plan, grad_squares: torch.Tensor, sample_squares: list[torch.Tensor]) -> torch.Tensor:
        """Per-tensor squares of several steps -> per-layer norms with one ``index_add_``: per step [grad (layers),
        then each of ``sample_squares`` (layers each), total gradient norm (1)]."""
        sets, layers = len(sample_squares), len(self.layers)  # type: ignore[arg-type]
        key = ("fold", sets)
        index = plan.derived.get(key)
        if index is None:  # built from device tensors once per layout
            index = plan.derived[key] = torch.cat(
                [plan.owner, *(self._owner_sampled + (j + 1) * layers for j in range(sets)),
                 torch.full_like(plan.owner, (sets + 1) * layers)])
        acc = torch.zeros(len(grad_squares), (sets + 1) * layers + 1, dtype=self.dtype, device=self.device)
        acc.index_add_(1, index, torch.cat([grad_squares, *sample_squares, grad_squares], dim=1))
        return acc.sqrt_()

    def _layout(self, plan: Plan, update: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) of each value ``collect`` writes, in its order (see StepBuffer.put_steps); made once."""
        key = ("layout", update)
        cached = plan.derived.get(key)
        if cached is None:
            names = ("grad_norm", "weight_norm", "grad_to_weight") + (("update_to_weight",) if update else ())
            # from device fills only (no tensor from host data: the first update may come at any step)
            rows = torch.cat([plan.rows.repeat(len(names)), plan.rows.new_zeros(1)])
            cols = torch.cat([torch.full_like(plan.rows, self.buffer.col[m]) for m in names]
                             + [plan.rows.new_full((1,), self.buffer.col["total_grad_norm"])])
            cached = (rows, cols)
            plan.derived[key] = cached
        return cached  # type: ignore[return-value]

    def _counts_zeros(self) -> bool:
        """``zero_fraction="auto"``: only where the backward runs in 16 bits, where a zero can be underflow (the
        only thing the rules read it for): 16-bit weights, or 16-bit layer outputs seen by the backward probe
        (autocast; ``LayerIndex.low_precision_seen``). Counting zeros costs more than all the norms together."""
        if self.zero_fraction == "auto":
            return self._low or bool(self.layers is not None and self.layers.low_precision_seen)
        return bool(self.zero_fraction)

    def _nonzero(self, grads: list[torch.Tensor], plan: Plan) -> torch.Tensor:
        """Non-zero gradient entries per layer: counted exactly in tensors of up to ZERO_SAMPLE entries and in
        embedding tables, estimated from ZERO_SAMPLE entries (ZERO_BLOCKS spread contiguous blocks) beyond, scaled by
        numel / sample. An exact count reads every entry with a kernel that is not vectorised on a CPU
        (``_foreach_norm`` of order 0: 5x the gradient norm's own pass, +7% of an MLP's step)."""
        views = list(grads)
        scale = []
        for group in plan.groups:
            for i in group:
                if not self._row_wise[i]:  # an embedding's unused rows are counted apart (_zero_denominator)
                    views[i] = sample_view(grads[i], ZERO_SAMPLE, ZERO_BLOCKS)
                scale.append(grads[i].numel() / max(views[i].numel(), 1))
        counts = self._norms(views, plan, ord=0.0) * self.host_tensor(scale, self.dtype)
        return self._per_row(counts, plan, squares=False)

    def _zero_denominator(self, plan: Plan, grads: list[torch.Tensor]) -> torch.Tensor:
        """Entries per layer that could be non-zero: an embedding's rows that no input used have an exact
        zero gradient in any precision (unused tokens, positions beyond the sequence, padding), so they are
        structure, not underflow, and are left out. A layer whose gradient is zero in every row counts whole.
        ``grads`` are what ``collect`` read (a sparse gradient's stored rows, ``stored_entries``)."""
        order = [i for group in plan.groups for i in group]
        if not any(self._row_wise[i] for i in order):
            return plan.count_per_row
        per_tensor = []
        for i in order:
            p = self._tensors[i]
            if self._row_wise[i]:
                g = grads[i].reshape(grads[i].shape[0], -1)  # a sparse gradient's stored rows: the rows used
                live = (g != 0).any(dim=1).sum().to(self.dtype) * g.shape[1]
                per_tensor.append(torch.where(live > 0, live, torch.full_like(live, float(p.numel()))))
            else:
                per_tensor.append(self.host_tensor([p.numel()], self.dtype).reshape(()))
        return self._per_row(torch.stack(per_tensor).to(self.device), plan, squares=False)

    def _gather(self, step: int) -> int:
        """This step's sampled entries, copied into the SampleSet row not holding the snapshot (once per step)."""
        if self._current is not None and self._current_step == step:
            return self._current
        if self._sharded:  # FSDP2 may swap a shard's storage
            self._tensors = [local_tensor(p) for p in self._params]
            self._samples.retarget(self._tensors)
        self._current = self._samples.gather(0 if self._snapshot is None else 1 - self._snapshot)
        self._current_step = step
        return self._current

    def _row_norms(self, squares: torch.Tensor) -> torch.Tensor:
        """(layers,) norms from per-tensor sums of squares (the SampleSet's order); 0 for rows without parameters."""
        acc = torch.zeros(len(self.layers), dtype=self.dtype, device=self.device)  # type: ignore[arg-type]
        return acc.index_add_(0, self._owner_sampled, squares).sqrt()

    def _write_update(self, slot: int) -> None:
        """The update ratio alone, at a step whose parameters have no gradient (collect does it otherwise)."""
        assert self._snapshot is not None
        current = self._gather(self._snapshot_step + 1 if self._snapshot_step is not None else -1)
        self._samples.difference(self._snapshot, current)
        self._write_ratio(slot, self._row_norms(self._samples.squares(self._snapshot, tensor_order=False)[0]))
        self._snapshot_step = None

    def _write_ratio(self, slot: int, change: torch.Tensor) -> None:
        """update_to_weight of every layer with parameters, from (layers,) norms of W_{s-1} - W_s, now."""
        plan = self._all_plan
        assert plan is not None and self._snapshot_squares is not None
        before = self._row_norms(self._snapshot_squares).index_select(0, plan.rows)
        ratio = change.index_select(0, plan.rows) / torch.where(before > 0, before, math.nan)
        self.buffer.write(slot, plan.rows, "update_to_weight", ratio)

    def after_step(self, step: int, next_scheduled: bool) -> None:
        if not (self.update_ratio and next_scheduled and self._params):
            return
        current = self._gather(step)
        if self._collected is not None and self._collected[0] == step:
            _, _, squares, row, _ = self._collected  # the same sample, unchanged since collect()
            self._snapshot_squares = squares[row]
        else:
            self._snapshot_squares = self._samples.squares(current, tensor_order=False)[0]
        # this step's sample becomes the snapshot; the other row is refilled at the next gather
        self._snapshot, self._current, self._current_step = current, None, None
        self._snapshot_step = step

    def detach(self) -> None:
        super().detach()
        self._current = None
        self._snapshot = None
        self._snapshot_squares = None
        self._collected = None
