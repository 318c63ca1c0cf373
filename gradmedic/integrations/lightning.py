"""Lightning: ``L.Trainer(callbacks=[GradmedicCallback()])``.

- **Gradients before clipping**: ``on_before_optimizer_step`` runs after the last backward of an
  optimizer step and before Lightning clips (``gradient_clip_val``), with the accumulated gradients
  (unscaled under mixed precision); they are measured there.
- **The loss**: ``outputs["loss"]`` in ``on_train_batch_end`` is already divided by
  ``accumulate_grad_batches`` (Lightning scales each micro-batch's loss before backward); it is multiplied
  back and the micro-batches of one optimizer step are averaged: the mean of what ``training_step``
  returned.
- **At the end**: findings printed (global rank 0), the trace saved to ``<log_dir>/gradmedic.gmtrace``
  (the logger's directory, else ``default_root_dir``), with ``report=True`` an HTML report beside it.
- **Logging**: through the Trainer's own loggers (``trainer.loggers``: TensorBoard, CSV, W&B, MLflow...)
  with ``log_metrics``, at the Monitor's flushes; ``log_to`` replaces them with a ``SummaryWriter`` or a
  callable, ``log_to=None`` turns logging off.

Automatic optimization with one optimizer. ``lightning`` is imported when this module is, never by
``import gradmedic``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

import gradmedic as gm
from gradmedic.integrations._common import StopSwitch, cadence, finish_run, offset_sink

__all__ = ["GradmedicCallback"]


class GradmedicCallback(Callback):
    """Watch gradients through ``Trainer.fit``; ``monitor_kwargs`` go to ``gm.Monitor``. Findings are said while it
    trains; ``stop_on="error"`` (or ``"warning"``) stops training at the first such finding (``trainer.should_stop``).
    A run of fewer than ``_common.SHORT_RUN`` steps is measured more often (from ``trainer.max_steps``)."""

    def __init__(self, *, report: bool = False, log_to: Any = "auto", verbose: bool = True, stop_on: str | None = None,
                 **monitor_kwargs: Any):
        self.stop = StopSwitch(stop_on, monitor_kwargs.pop("on_finding", None))
        self.report = report
        self.log_to = log_to
        self.verbose = verbose
        self.monitor_kwargs = monitor_kwargs
        self.monitor: Any = None
        self.result: Any = None
        self._losses: list[torch.Tensor] = []
        self._stepped = False

    def on_train_start(self, trainer, pl_module) -> None:
        self._close()
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        log_to = self.log_to
        if isinstance(log_to, str) and log_to == "auto":
            loggers = list(trainer.loggers)
            log_to = _LoggersSink(loggers) if loggers and trainer.is_global_zero else None
        self.stop.reset()
        self.monitor = gm.Monitor(pl_module, optimizer, log_to=offset_sink(log_to, trainer.global_step),
                                  on_finding=self.stop, **cadence(_max_steps(trainer), self.monitor_kwargs))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.monitor is not None:
            self.monitor.record_gradients()  # accumulated, not yet clipped
            self._stepped = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.monitor is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            # Lightning divided it by accumulate_grad_batches before backward (ClosureResult)
            self._losses.append(loss.detach().reshape(()) * trainer.accumulate_grad_batches)
        if self._stepped:
            self._stepped = False
            mean = torch.stack(self._losses).mean() if self._losses else None
            self._losses = []
            self.monitor.step(mean)
            if self.stop.stopping(self.monitor.step_count - 1):  # the step numbers the findings say
                trainer.should_stop = True  # Lightning ends the fit after this batch

    def on_train_end(self, trainer, pl_module) -> None:
        if self.monitor is None:
            return
        monitor, self.monitor = self.monitor, None
        main = trainer.is_global_zero
        out = (trainer.log_dir or trainer.default_root_dir) if main else None
        self.result = finish_run(monitor, out, self.report, self.verbose and main)
        self._close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._close()  # remove every hook; the trace so far stays readable on self.monitor's trace

    def _close(self) -> None:
        self._losses = []
        self._stepped = False
        if self.monitor is not None:
            self.monitor.close()


class _LoggersSink:
    """``log_metrics`` on each of the Trainer's loggers."""

    def __init__(self, loggers: list[Any]):
        self.loggers = loggers

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)


def _max_steps(trainer: Any) -> int | None:
    """The run's optimizer steps: ``max_steps`` when set, else Lightning's estimate from the epochs (None when it
    cannot tell: an iterable without a length)."""
    if trainer.max_steps and trainer.max_steps > 0:
        return int(trainer.max_steps)
    try:
        steps = trainer.estimated_stepping_batches
    except Exception:  # noqa: BLE001 - an estimate is a nicety; the default schedule applies without it
        return None
    return int(steps) if isinstance(steps, (int, float)) and math.isfinite(steps) else None
