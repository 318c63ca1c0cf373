"""Adam's second moment against its epsilon, per layer: where the gradient's RMS nears eps, updates collapse.

Adam steps by m_hat / (sqrt(v_hat) + eps), v_hat = v / (1 - beta2^t) (Kingma & Ba 2015). While sqrt(v_hat) >> eps
the step is about lr per entry whatever the gradient's scale; where sqrt(v_hat) falls to eps and below, eps takes over
and the step shrinks with the gradient, as plain SGD at lr / eps would take it (Wortsman et al. 2023, sec. 3.4: the
update RMS falls as the gradient RMS nears eps, and a smaller eps restores it). Per layer, over the entries of its
weight matrices (2-D and more: linear, conv, embedding; as Wortsman et al. read them) that ever had a gradient
(v > 0; an entry with v = 0 never moves):

- ``adam_eps_share``: the share of entries whose sqrt(v_hat) is below eps (eps more than half of their step);
- ``adam_rms_to_eps``: the geometric mean of sqrt(v_hat) / eps over them, the typical entry's margin (it drifts
  geometrically as the gradients shrink, so the rules forecast it: ``rules/_trend.py``).

A tensor larger than ``SAMPLE`` entries is read on a fixed sample of them (``probes._samples.sample_view``, the
gradient probe's spread contiguous blocks): both statistics are means, estimated within ~1% from 4096 entries.
The state is read where the optimizer keeps it; nothing leaves the device before the flush.

The probe needs the optimizer: ``bind(optimizer)``; until bound it waits for the first ``optimizer.step()`` of an
optimizer that holds one of the model's parameters (a global step hook, removed once it has bound). Optimizers
without ``exp_avg_sq`` (SGD, Adagrad) have nothing to read: the probe writes nothing.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from gradmedic.probes._samples import sample_view
from gradmedic.probes.base import LayerIndex, Probe

__all__ = ["AdamStateProbe"]

SAMPLE = 4096  # entries read per tensor (see the module docstring)


def _waiting_hook(probe: weakref.ref) -> Any:
    """The global step hook of an unbound probe. It holds the probe weakly: a Monitor dropped without ``close()``
    leaves a hook that does nothing, not the model; a bound probe's does nothing until the next collect removes it."""

    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        target = probe()
        if target is None or target.optimizer is not None or target.failed:
            return
        try:
            target._offer(optimizer)
        except Exception as error:  # noqa: BLE001 - a monitor must never break training
            target.fail(error)

    return hook


class AdamStateProbe(Probe):
    name = "adam"
    metrics = ("adam_eps_share", "adam_rms_to_eps")

    def __init__(self, every: int = 1):
        super().__init__(every)
        self.optimizer: torch.optim.Optimizer | None = None
        self._waiting: Any = None  # the global step hook, until bound

    def attach(self, layers: LayerIndex, capacity: int) -> None:
        super().attach(layers, capacity)
        # the weight matrices (see the module docstring) and their layers' rows, in a fixed order; the index tensors
        # of the usual layout (every one of them has a state) are made now, not at the first step that has a state
        self._weights = [(p, row) for row, ps in enumerate(layers.params) for p in ps if p.dim() >= 2]
        self._ids = {id(p) for ps in layers.params for p in ps}
        self._layouts: dict[tuple[tuple[int, ...], tuple[int, ...]], tuple[torch.Tensor, ...]] = {}
        # the usual layout: every weight read, its state shaped as the weight
        self._layout(tuple(range(len(self._weights))), tuple(sample_view(p, SAMPLE).numel() for p, _ in self._weights))
        self._groups: dict[int, dict[str, Any]] = {}
        if self.optimizer is not None:
            self.bind(self.optimizer)
        elif self._waiting is None:
            self._waiting = register_optimizer_step_post_hook(_waiting_hook(weakref.ref(self)))

    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        """Read this optimizer's state (the Monitor's ``optimizer``, where it has one)."""
        self.optimizer = optimizer
        self._groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}

    def _offer(self, optimizer: torch.optim.Optimizer) -> None:
        """An optimizer has stepped: bind it if it holds one of the model's weights. Called by the global step hook,
        inside torch's loop over those hooks: it never removes the hook here (that would break the user's
        ``optimizer.step()`` with "OrderedDict mutated during iteration"); the next collect does."""
        ours = self._ids
        if any(id(q) in ours for group in optimizer.param_groups for q in group["params"]):
            self.bind(optimizer)

    def _stop_waiting(self) -> None:
        if self._waiting is not None:
            self._waiting.remove()
            self._waiting = None

    def _layout(self, read: tuple[int, ...], sizes: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        """For the weights ``read`` (indices into ``_weights``) and their states' sampled entries ``sizes``: their rows,
        the distinct rows sorted, the sizes and numel / sample, as tensors made once per layout."""
        cached = self._layouts.get((read, sizes))
        if cached is None:
            rows = [self._weights[i][1] for i in read]
            scale = [self._weights[i][0].numel() / max(n, 1) for i, n in zip(read, sizes, strict=True)]
            cached = self._layouts[read, sizes] = (
                self.host_tensor(rows, torch.long), self.host_tensor(sorted(set(rows)), torch.long),
                self.host_tensor(sizes, self.dtype), self.host_tensor(scale, self.dtype))
        return cached

    def collect(self, step: int) -> None:
        if self.optimizer is None:
            return
        self._stop_waiting()  # outside the optimizer's step: the global hook can go
        read, sizes, below, logs, counts = [], [], [], [], []
        for i, (p, _) in enumerate(self._weights):
            group = self._groups.get(id(p))
            state = self.optimizer.state.get(p)
            if group is None or not state or "exp_avg_sq" not in state or "step" not in state:
                continue
            eps, betas = group.get("eps"), group.get("betas")
            if not isinstance(eps, float) or eps <= 0 or not isinstance(betas, (tuple, list)):
                continue
            v = sample_view(state["exp_avg_sq"], SAMPLE)
            # v_hat < eps^2 <=> v < eps^2 (1 - beta2^t): the bias correction is computed where ``step`` lives (a CPU
            # tensor, a device one under capturable/fused Adam, or a number); a 0-d CPU tensor acts as a scalar on
            # any device, so nothing is copied from the host
            correction = 1 - betas[1] ** state["step"]
            log_floor = (correction.log() if isinstance(correction, torch.Tensor) else math.log(correction)) \
                + 2 * math.log(eps)
            seen = torch.count_nonzero(v)  # entries that ever had a gradient (v = 0: never moved)
            read.append(i)
            sizes.append(v.numel())
            below.append((v < eps * eps * correction).sum())  # with the zeros, taken off below
            # 2 log(sqrt(v_hat) / eps) = log v - log floor, summed over the entries with v > 0 (log 1 = 0 for the rest)
            logs.append(torch.where(v > 0, v, 1.0).log().sum() - seen * log_floor)
            counts.append(seen)
        if not read:
            return
        index, present, numel, scale = self._layout(tuple(read), tuple(sizes))
        below_seen = torch.stack(below).to(self.dtype) - (numel - torch.stack(counts).to(self.dtype))
        sums = torch.stack([below_seen, torch.stack(logs).to(self.dtype) * 0.5, torch.stack(counts).to(self.dtype)])
        per_row = torch.zeros(3, len(self.layers), dtype=self.dtype, device=self.device)  # type: ignore[arg-type]
        per_row.index_add_(1, index, sums * scale)  # a sample stands for its tensor: x numel / sample
        below_n, log_sum, n = per_row.index_select(1, present)
        n = torch.where(n > 0, n, torch.nan)
        slot = self.buffer.open(step)
        self.buffer.write_columns(slot, present, ("adam_eps_share", "adam_rms_to_eps"),
                                  (below_n / n, (log_sum / n).exp()))

    def detach(self) -> None:
        super().detach()
        self._stop_waiting()
