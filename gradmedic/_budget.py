"""How many steps a Monitor may keep on the device between flushes: bounded by the memory its buffers take.

Each probe preallocates a (flush_every + 1, layers, metrics) buffer on the model's device when the Monitor is made
(``probes.base.StepBuffer``), so ``flush_every`` multiplies memory that is taken before the first step:
``flush_every=100_000`` on a 200-module MLP took 3 GiB, and a larger value failed inside torch's allocator with its
own message. The bound is on the bytes, not on the count, because the cost is the product with the model's size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gradmedic._errors import GradmedicError

__all__ = ["BUFFER_BUDGET", "DEFAULT_FLUSH_EVERY", "check_flush_every"]

# The most the probes' buffers may take together. A quarter of a GiB is small next to the model's own memory on
# any card a model of a few hundred layers trains on (8 GiB and more), and ~80x what the default flush_every
# takes for a 200-module MLP with the standard preset (3.1 MiB, 20 metrics): flush_every up to ~8000 there.
BUFFER_BUDGET = 256 * 2**20
DEFAULT_FLUSH_EVERY = 100  # Monitor's default; never refused, whatever the model's size (it is what the user got)


def buffer_bytes(flush_every: int, rows: int, metrics: Sequence[int], itemsize: int) -> int:
    """Bytes the probes' step buffers take: (flush_every + 1) x rows x metrics per probe."""
    return (flush_every + 1) * rows * sum(metrics) * itemsize


def check_flush_every(flush_every: int, rows: int, metrics: Sequence[int], dtype: torch.dtype) -> None:
    """Raise a one-line GradmedicError when ``flush_every`` would make the buffers exceed BUFFER_BUDGET."""
    if flush_every <= DEFAULT_FLUSH_EVERY or not rows or not sum(metrics):
        return
    itemsize = torch.empty((), dtype=dtype).element_size()
    need = buffer_bytes(flush_every, rows, metrics, itemsize)
    if need <= BUFFER_BUDGET:
        return
    largest = max(BUFFER_BUDGET // (rows * sum(metrics) * itemsize) - 1, DEFAULT_FLUSH_EVERY)
    raise GradmedicError(
        f"Argument flush_every should be at most {largest} for this model, but given {flush_every}: the probes keep "
        f"{flush_every + 1} steps of {rows} layers on the device between flushes, {need / 2**30:.2f} GiB, more than "
        f"the {BUFFER_BUDGET // 2**20} MiB gradmedic allows (gradmedic._budget.BUFFER_BUDGET). A smaller flush_every "
        "costs one device-to-host copy per flush, nothing else.")
