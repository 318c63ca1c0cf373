"""TensorBoard: a Monitor's numbers as TensorBoard scalars, live or from a saved trace.

Live: ``gm.Monitor(model, optimizer, log_to=SummaryWriter(logdir))``; the writer receives each flush
(``gradmedic._sinks`` turns flushed arrays into tags). Afterwards:
``write_trace(trace, logdir)`` writes the same tags from a saved ``.gmtrace``, with the findings as text.

Tags: ``gradmedic/<metric>/<layer>`` per layer (``gradmedic/grad_norm/transformer.h.0.attn.c_attn``),
``gradmedic/total_grad_norm``, ``gradmedic/loss``, ``gradmedic/lr``; per-time-step curves of recurrent
layers as ``gradmedic/time_grad_rms/<layer>/step_<s>`` with the time step on the x axis; text under
``gradmedic/findings`` and ``gradmedic/events``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gradmedic._errors import GradmedicError
from gradmedic._sinks import WriterSink, findings_text
from gradmedic.diagnosis import diagnose
from gradmedic.probes.base import Chunk

__all__ = ["TensorBoardSink", "summary_writer", "write_trace"]

TensorBoardSink = WriterSink  # the sink Monitor(log_to=writer) builds around a SummaryWriter


def summary_writer(logdir: str | os.PathLike) -> Any:
    """torch's ``SummaryWriter`` on ``logdir``, or a one-line error saying what to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional: the tensorboard extra
    except ImportError:
        raise GradmedicError("Writing TensorBoard logs needs the tensorboard package: "
                             "pip install 'gradmedic[tensorboard]'") from None
    return SummaryWriter(log_dir=str(logdir))


def write_trace(trace: Any, logdir: str | os.PathLike, findings: bool = True) -> Path:
    """Write a whole trace (and, with ``findings``, its diagnosis as text) as TensorBoard events."""
    writer = summary_writer(logdir)
    try:
        sink = WriterSink(writer)
        steps, layers, metrics, values = trace.steps, trace.layers, trace.metrics, trace.values
        chunk = Chunk(steps=steps, layers=layers, metrics=metrics, values=values, events=trace.events,
                      series={name: trace.series(name) for name in trace.series_names},
                      scalars={name: trace.scalar(name) for name in trace.scalar_names})
        sink.write([chunk])
        if findings:
            sink.text("findings", findings_text(diagnose(trace).findings), int(steps[-1]) if len(steps) else 0)
    finally:
        writer.close()
    return Path(logdir)
