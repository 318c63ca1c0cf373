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

The gradient horizon (``horizon=True``): with a loss at every step (a language model), dL/dx_t sums the
gradients of the losses at t, t+1, ..., so it stays flat (``time_grad_ratio`` ~ 2) even when nothing of
the last step's loss reaches the first input. The horizon is measured apart, in the layer's forward: the
gradient of a fixed random projection of the layer's *last* output with respect to its inputs at every
t (one extra backward through the recurrent layer, with ``torch.autograd.grad``), recorded as the series
``horizon_rms`` and the ratio ``horizon_ratio`` = RMS at t = 0 over RMS at t = T - 1: how far back a late
output can learn from. An exact 0 is a dependency that cannot be learned at all.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from gradmedic._errors import bad_argument
from gradmedic.probes.base import Chunk, LayerIndex, Probe

__all__ = ["TimeStepProbe"]

SERIES = "time_grad_rms"
HORIZON_SERIES = "horizon_rms"
HORIZON_SEED = 0  # the fixed projection of the last output


class TimeStepProbe(Probe):
    name = "timesteps"
    # time_grad_ratio = RMS of dL/dx at the first step over that at the last: << 1 vanishing, >> 1 exploding
    metrics = ("time_grad_ratio", "horizon_ratio")
    series = (SERIES, HORIZON_SERIES)
    uses_hooks = True

    def __init__(self, every: int = 1, horizon: bool = False, horizon_every: int = 1):
        super().__init__(every)
        if not isinstance(horizon_every, int) or isinstance(horizon_every, bool) or horizon_every < 1:
            raise bad_argument("horizon_every", "a positive int (measure the horizon at every k-th measured step)",
                               horizon_every)
        self.horizon = horizon
        # the horizon costs one more backward through each recurrent layer (+40% of a 2-layer LSTM's step at
        # T=50), and it moves slowly: a preset that measures every step reads it every horizon_every-th one
        self.horizon_every = horizon_every
        self._measured = 0  # steps collected so far: the horizon is taken when this is a multiple of horizon_every

    def attach(self, layers: LayerIndex, capacity: int) -> None:
        super().attach(layers, capacity)
        self._capacity = capacity
        self._rows = [r for r, m in enumerate(layers.modules)
                      if isinstance(m, (nn.RNNBase, nn.RNNCellBase))]
        self._parts: dict[int, list[tuple[int, torch.Tensor, int]]] = {}  # row -> (offset, sq, count)
        self._calls: dict[int, int] = {}
        self._series: dict[int, torch.Tensor] = {}  # row -> (capacity, T) NaN-padded
        self._series_steps: dict[int, list[int]] = {}
        self._horizon: dict[int, torch.Tensor] = {}  # row -> (T,) RMS of d(last output)/dx_t, this step
        self._horizon_series: dict[int, list[tuple[int, torch.Tensor]]] = {}  # row -> [(step, (T,))]
        self._in_horizon = False
        self._horizon_inputs: dict[int, tuple[torch.Tensor, int]] = {}  # row -> (x_in, time axis) for the horizon
        self._inputs: list[torch.Tensor] = []  # this step's rewired inputs (gradient_inputs)

    def arm(self) -> None:
        assert self.layers is not None
        for row in self._rows:
            module = self.layers.modules[row]
            hook = self._make_pre_hook(row)
            self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            if self.horizon and isinstance(module, nn.RNNBase):
                # prepend: run before other probes hook the output, so the extra backward reaches none of them
                self._handles.append(module.register_forward_hook(self.guard(self._measure_horizon, row),
                                                                  prepend=True))

    def gradient_inputs(self) -> list[torch.Tensor]:
        return list(self._inputs)

    def reset(self) -> None:
        super().reset()
        self._inputs.clear()
        self._horizon_inputs.clear()
        self._horizon.clear()
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
        self._inputs.append(x_in)
        if isinstance(module, nn.RNNCellBase):
            t = self._calls.get(row, 0)
            self._calls[row] = t + 1
            x_in.register_hook(self.step_guard(self._on_grad, row, None, t))
        else:
            time_axis = 1 if (module.batch_first and x.dim() == 3) else 0
            x_in.register_hook(self.step_guard(self._on_grad, row, time_axis, 0))
            if x.dim() == 3:
                self._horizon_inputs[row] = (x_in, time_axis)
        if in_args:
            return (x_in, *args[1:]), kwargs
        return args, {**kwargs, "input": x_in}

    def _measure_horizon(self, row: int, module: nn.Module, args: Any, output: Any) -> None:
        pending = self._horizon_inputs.pop(row, None)
        out = output[0] if isinstance(output, tuple) else output
        if (self._measured % self.horizon_every or pending is None or not isinstance(out, torch.Tensor)
                or not out.requires_grad or out.dim() != 3):
            return
        x_in, time_axis = pending
        last = out.select(time_axis, -1)  # (B, H): the layer's last output
        gen = torch.Generator(device=last.device).manual_seed(HORIZON_SEED)
        projection = torch.randn(last.shape, generator=gen, device=last.device, dtype=last.dtype)
        self._in_horizon = True
        try:
            (g,) = torch.autograd.grad((last * projection).sum(), x_in, retain_graph=True, allow_unused=True)
        finally:
            self._in_horizon = False
        if g is None:
            return
        g = g.detach().float()
        others = tuple(d for d in range(g.dim()) if d != time_axis)
        self._horizon[row] = g.square().mean(dim=others).sqrt().to(self.dtype)

    def _on_grad(self, row: int, time_axis: int | None, offset: int, grad: torch.Tensor) -> None:
        if self._in_horizon:
            return  # the horizon's own backward, not the loss's
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
        self._measured += 1
        if self._horizon:
            slot = self.buffer.open(step)
            rows = self.host_tensor(list(self._horizon), torch.long)
            ratio = torch.stack([rms[0] / rms[-1] for rms in self._horizon.values()])
            self.buffer.write(slot, rows, "horizon_ratio", ratio)
            for row, rms in self._horizon.items():
                self._horizon_series.setdefault(row, []).append((step, rms))
            self._horizon.clear()
        self._inputs.clear()
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
            den = self.host_tensor([max(c, 1) for c in counts], self.dtype)
            rms = (total / den).sqrt()
            self._store_series(row, step, rms)
            rows.append(row)
            # over the last step that got any gradient: a next-token loss never uses the last output, so
            # dL/dx at the last step is an exact, structural zero
            steps_with = (rms > 0).to(self.dtype) * torch.arange(1, length + 1, dtype=self.dtype, device=self.device)
            # index_select, not rms[tensor]: indexing by a 0-d tensor reads it on the host (a sync per step)
            ratios.append(rms[0] / rms.index_select(0, steps_with.argmax().reshape(1)).squeeze(0))
        index = self.host_tensor(rows, torch.long)
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
        horizon: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for row, pairs in self._horizon_series.items():
            if pairs:
                width = max(v.shape[0] for _, v in pairs)
                values = np.full((len(pairs), width), np.nan)
                for i, (_, v) in enumerate(pairs):
                    values[i, : v.shape[0]] = v.cpu().numpy()
                horizon[self.layers.names[row]] = (np.asarray([s for s, _ in pairs], dtype=np.int64), values)
        self._horizon_series.clear()
        if horizon:
            chunk.series[HORIZON_SERIES] = horizon
        return chunk

    def detach(self) -> None:
        super().detach()
        self._series.clear()
