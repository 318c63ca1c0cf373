"""Hugging Face ``Trainer``: ``Trainer(..., callbacks=[GradmedicCallback()])``.

What a plain callback would get wrong, and how this one gets it right:

- **Gradients before clipping.** The only callback point between backward and the optimizer,
  ``on_pre_optimizer_step``, comes after the Trainer clips (``max_grad_norm=1.0`` by default), so a
  growing gradient norm would read 1.0 at every step. Here the gradients are measured at the end of
  each backward (post-accumulate-grad hooks and an autograd-engine callback, armed only on measured
  steps); the last backward of an optimizer step holds the accumulated gradient, before clipping.
- **The loss under gradient accumulation.** Callbacks never see the loss. A forward hook on the model
  reads ``outputs.loss`` of each training micro-batch; like ``Trainer.training_step``: when the model was
  given ``num_items_in_batch`` its loss is already a share of the step's (summed), otherwise it is a
  micro-batch mean (averaged over the step's micro-batches). This is the loss the Trainer logs.
  (A ``compute_loss_func`` or label smoothing computes the loss outside the model: no loss is recorded.)
- **At the end**, the run is diagnosed: findings printed (main process), the trace saved to
  ``<output_dir>/gradmedic.gmtrace``, with ``report=True`` an HTML report beside it.
- **Logging.** ``log_to`` takes a ``SummaryWriter`` or a callable ``(step, metrics)`` (``wandb.log``
  works), on the Trainer's ``global_step`` axis. By default, when the Trainer reports to TensorBoard,
  gradmedic's tags are written to ``<logging dir>/gradmedic`` (``TENSORBOARD_LOGGING_DIR`` or
  ``<output_dir>/runs``), so TensorBoard shows them beside the Trainer's.

``transformers`` is imported when this module is, never by ``import gradmedic``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import TrainerCallback

import gradmedic as gm
from gradmedic.integrations._common import EndOfBackward, StopSwitch, cadence, finish_run, offset_sink
from gradmedic.integrations.tensorboard import summary_writer

__all__ = ["GradmedicCallback"]


class GradmedicCallback(TrainerCallback):
    """Watch gradients through ``Trainer.train()``; ``monitor_kwargs`` go to ``gm.Monitor`` (``preset``,
    ``every``, ``probes``, ``flush_every``, ``on_finding``). Findings are said while it trains; ``stop_on="error"``
    (or ``"warning"``) stops training at the first such finding, through ``control.should_training_stop``. A run of
    fewer than ``_common.SHORT_RUN`` steps is measured more often (from ``max_steps``)."""

    def __init__(self, *, report: bool = False, log_to: Any = "auto", verbose: bool = True, stop_on: str | None = None,
                 **monitor_kwargs: Any):
        self.stop = StopSwitch(stop_on, monitor_kwargs.pop("on_finding", None))
        self.report = report
        self.log_to = log_to
        self.verbose = verbose
        self.monitor_kwargs = monitor_kwargs
        self.monitor: Any = None
        self.result: Any = None  # the diagnosis, after training
        self._backward: EndOfBackward | None = None
        self._loss_hook: Any = None
        self._losses: list[torch.Tensor] = []
        self._scaled = False  # the model was given num_items_in_batch: its losses add up to the step's
        self._writer: Any = None

    # --- the run ----------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._close()
        self.stop.reset()
        self.monitor = gm.Monitor(model, optimizer, log_to=self._sink(args, state), on_finding=self.stop,
                                  **cadence(state.max_steps, self.monitor_kwargs))
        self._backward = EndOfBackward(self.monitor.layers.modules[0], self.monitor.record_gradients)
        self._loss_hook = model.register_forward_hook(self._on_forward, with_kwargs=True)
        self._arm()

    def _sink(self, args, state):
        log_to = self.log_to
        if isinstance(log_to, str) and log_to == "auto":
            log_to = None
            report_to = args.report_to if isinstance(args.report_to, (list, tuple)) else [args.report_to]
            if "tensorboard" in report_to and state.is_world_process_zero:
                logdir = os.getenv("TENSORBOARD_LOGGING_DIR") or os.path.join(args.output_dir, "runs")
                self._writer = log_to = summary_writer(os.path.join(logdir, "gradmedic"))
        # the Monitor counts steps from 0, the Trainer's global_step after the first update is 1
        return offset_sink(log_to, state.global_step + 1)

    @torch.compiler.disable
    def _on_forward(self, module, args, kwargs, output) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return  # evaluation and generation are not training steps
        try:
            loss = output["loss"] if isinstance(output, dict) else getattr(output, "loss", None)
        except (KeyError, TypeError):
            loss = None
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._losses.append(loss.detach().reshape(()))
            self._scaled = kwargs.get("num_items_in_batch") is not None

    def on_optimizer_step(self, args, state, control, **kwargs):
        # after optimizer.step(), before the scheduler steps: the learning rate read is the one used
        if self.monitor is None:
            return
        loss = None
        if self._losses:
            total = torch.stack(self._losses).sum()
            loss = total if self._scaled else total / len(self._losses)
        self._losses = []
        self.monitor.step(loss)
        self._arm()
        if self.stop.stopping(self.monitor.step_count - 1):  # the step numbers the findings say
            control.should_training_stop = True  # the Trainer ends the run after this step, as for max_steps

    def _arm(self) -> None:
        """End-of-backward hooks only on steps whose gradients are measured, and on the step before each: there
        ``record_gradients`` snapshots the weights before the optimizer's step, so that exactly one update lies
        between the snapshot and the measured step (taken after it, at ``Monitor.step``, the snapshot would equal
        the next step's weights and the update ratio would read 0)."""
        if self.monitor.gradients_due():
            self._backward.arm()
        else:
            self._backward.disarm()

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is None:
            return
        monitor = self.monitor
        self._close()
        main = state.is_world_process_zero
        self.result = finish_run(monitor, args.output_dir if main else None, self.report, self.verbose and main)

    def _close(self) -> None:
        if self._backward is not None:
            self._backward.disarm()
            self._backward = None
        if self._loss_hook is not None:
            self._loss_hook.remove()
            self._loss_hook = None
        self._losses = []
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
