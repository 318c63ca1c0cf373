"""A progress bar for the calls that can take more than a few seconds (``treat(..., verify_steps=N)``,
``check(steps=N)``, the Trainer callbacks' diagnosis at the end of a run).

Why these rules:
- only on a terminal: a log file, a pipe, CI or a notebook's output cell would keep every redraw as text;
- only after ``DELAY_S``: a call that ends sooner draws nothing, so a quick check stays one clean report;
- gone when done (``transient``): what stays on screen is the result, not a finished bar;
- one bar at a time: rich allows one live display, so a call made while another bar is up (a check inside
  ``treat``, a ``treat`` inside the demo's own training bar) adds nothing and never fails.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["DELAY_S", "Step", "held", "progress"]

DELAY_S = 1.0  # seconds before a bar appears: below that, a bar is a flicker
_busy = False  # a bar (ours) is up in this process


def _console() -> Any:
    """The console bars draw on (stdout, as the results); tests replace it with a forced terminal."""
    from gradmedic._rich import Console  # rich on first use: `import gradmedic` stays light

    return Console()


class Step:
    """What a long call holds: ``advance()`` after each unit of work, ``describe()`` when the stage changes."""

    def __init__(self, description: str, total: int | None, console: Any | None):
        self.description, self.total, self.done = description, total, 0
        self._console, self._bar, self._task = console, None, None
        self._start = time.monotonic()

    def describe(self, description: str) -> None:
        self.description = description
        if self._bar is not None:
            self._bar.update(self._task, description=description)
        self._show()

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
        self._show()

    def _show(self) -> None:
        global _busy
        if self._bar is not None or self._console is None or _busy or time.monotonic() - self._start < DELAY_S:
            return
        # rich on first use: `import gradmedic` stays light
        from gradmedic._rich import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = [TextColumn("{task.description}"), BarColumn()]
        if self.total is not None:
            columns.append(MofNCompleteColumn())
        bar = Progress(*columns, TimeElapsedColumn(), console=self._console, transient=True)
        try:
            bar.start()
        except Exception:  # noqa: BLE001 - another live display (the user's own rich bar): draw nothing
            self._console = None
            return
        _busy = True
        self._bar = bar
        self._task = bar.add_task(self.description, total=self.total, completed=self.done)

    def close(self) -> None:
        global _busy
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
            _busy = False


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Around a bar of gradmedic's own that is not a ``progress()`` (the demo's training bar): calls made
    inside draw none, since two live displays on one terminal overwrite each other."""
    global _busy
    before, _busy = _busy, True
    try:
        yield
    finally:
        _busy = before


@contextlib.contextmanager
def progress(description: str, total: int | None = None) -> Iterator[Step]:
    """A bar for ``total`` units of work (None: a stage line and the time, no count). ``GRADMEDIC_PROGRESS=0``
    turns every bar off."""
    console = None
    if not _busy and os.environ.get("GRADMEDIC_PROGRESS", "1") != "0":
        console = _console()
        if not console.is_terminal:
            console = None
    step = Step(description, total, console)
    try:
        yield step
    finally:
        step.close()
