"""Per-time-step gradient norms through recurrent layers: how the loss's gradient decays over time.

For ``nn.RNN``/``nn.LSTM``/``nn.GRU`` the probe records the RMS of dL/dx_t, the gradient reaching the
layer's input at each time step t. With a loss at the last step, dL/dx_t for early t has travelled
back through T - t recurrent Jacobians, so its decay over t is the vanishing (or growth, exploding)
through time that Hochreiter (1991) and Pascanu et al. (2013) analyse. For the cells
(``nn.RNNCell``/``LSTMCell``/``GRUCell``) unrolled by the user, the k-th call in a forward is time step k.

The input gets a gradient without changing the graph: an input that already requires grad is passed
on as ``x.view_as(x)`` (an identity node whose hook sees only the gradient through this layer); an
input that does not (data) is passed on as ``x.detach().requires_grad_()``, which cuts nothing because
nothing upstream wanted a gradient. Packed sequences are passed through unmeasured.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from gradmedic.probes.base import Chunk, LayerIndex, Probe

__all__ = ["TimeStepProbe"]

SERIES = "time_grad_rms"


class TimeStepProbe(Probe):
    name = "timesteps"
    # time_grad_ratio = RMS of dL/dx at the first step over that at the last: << 1 vanishing, >> 1 exploding
    metrics = ("time_grad_ratio",)
    uses_hooks = True

    def attach(self, layers: LayerIndex, capacity: int) -> None:
        super().attach(layers, capacity)
        self._capacity = capacity
        self._rows = [r for r, m in enumerate(layers.modules)
                      if isinstance(m, (nn.RNNBase, nn.RNNCellBase))]
        self._parts: dict[int, list[tuple[int, torch.Tensor, int]]] = {}  # row -> (offset, sq, count)
        self._calls: dict[int, int] = {}
        self._series: dict[int, torch.Tensor] = {}  # row -> (capacity, T) NaN-padded
        self._series_steps: dict[int, list[int]] = {}

    def arm(self) -> None:
        assert self.layers is not None
        for row in self._rows:
            module = self.layers.modules[row]
            hook = self._make_pre_hook(row)
            self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def reset(self) -> None:
        super().reset()
        self._parts.clear()
        self._calls.clear()

    def _make_pre_hook(self, row: int):
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            if self.failed or not torch.is_grad_enabled():
                return None
            try:
                return self._rewire(row, module, args, kwargs)
            except Exception as error:  # noqa: BLE001 - a monitor must never break training
                self.fail(error)
                return None

        return pre_hook

    def _rewire(self, row: int, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        in_args = bool(args)
        x = args[0] if in_args else kwargs.get("input")
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return None
        x_in = x.view_as(x) if x.requires_grad else x.detach().requires_grad_()
        if isinstance(module, nn.RNNCellBase):
            t = self._calls.get(row, 0)
            self._calls[row] = t + 1
            x_in.register_hook(self.step_guard(self._on_grad, row, None, t))
        else:
            time_axis = 1 if (module.batch_first and x.dim() == 3) else 0
            x_in.register_hook(self.step_guard(self._on_grad, row, time_axis, 0))
        if in_args:
            return (x_in, *args[1:]), kwargs
        return args, {**kwargs, "input": x_in}

    def _on_grad(self, row: int, time_axis: int | None, offset: int, grad: torch.Tensor) -> None:
        g = grad.detach()
        if g.dtype.itemsize < 4:
            g = g.float()
        if time_axis is None:  # one cell call = one time step
            sq, count = g.square().sum().reshape(1), g.numel()
        else:
            others = tuple(d for d in range(g.dim()) if d != time_axis)
            sq, count = g.square().sum(dim=others), g.numel() // max(g.shape[time_axis], 1)
        self._parts.setdefault(row, []).append((offset, sq.to(self.dtype), count))

    def collect(self, step: int) -> None:
        if not self._parts:
            return
        slot = self.buffer.open(step)
        rows, ratios = [], []
        for row, parts in self._parts.items():
            length = max(off + sq.shape[0] for off, sq, _ in parts)
            total = torch.zeros(length, dtype=self.dtype, device=self.device)
            counts = [0] * length
            for off, sq, count in parts:
                total[off:off + sq.shape[0]] += sq
                for t in range(off, off + sq.shape[0]):
                    counts[t] += count
            den = torch.tensor([float(max(c, 1)) for c in counts], dtype=self.dtype, device=self.device)
            rms = (total / den).sqrt()
            self._store_series(row, step, rms)
            rows.append(row)
            ratios.append(rms[0] / rms[-1])
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.buffer.write(slot, index, "time_grad_ratio", torch.stack(ratios))
        self._parts.clear()
        self._calls.clear()

    def _store_series(self, row: int, step: int, rms: torch.Tensor) -> None:
        length = rms.shape[0]
        store = self._series.get(row)
        if store is None or store.shape[1] < length:
            grown = torch.full((self._capacity, length), float("nan"), dtype=self.dtype, device=self.device)
            if store is not None:
                grown[:, : store.shape[1]] = store
            store = self._series[row] = grown
        steps = self._series_steps.setdefault(row, [])
        store[len(steps), :length] = rms
        steps.append(step)

    def flush(self) -> Chunk | None:
        chunk = self.buffer.drain()
        if chunk is None:
            return None
        assert self.layers is not None
        series: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for row, steps in self._series_steps.items():
            if not steps:
                continue
            store = self._series[row]
            host = store[: len(steps)].cpu().numpy().astype(np.float64, copy=True)
            store.fill_(float("nan"))
            series[self.layers.names[row]] = (np.asarray(steps, dtype=np.int64), host)
            self._series_steps[row] = []
        chunk.series[SERIES] = series
        return chunk

    def detach(self) -> None:
        super().detach()
        self._series.clear()
