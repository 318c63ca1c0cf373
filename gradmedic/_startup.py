"""Ctrl-C while the ``gradmedic`` command is still importing torch: one line and the shell's 130, not a traceback.

The console script runs ``from gradmedic.cli import main`` before ``main()``'s own ``try``, and importing the package
imports torch (1.5-2.5 s): an interrupt then printed a 30-line traceback from inside torch. The package's
``__init__`` catches KeyboardInterrupt around its imports and, only when this process is the gradmedic command (its
console script, or ``python -m gradmedic.cli``), ends it the way ``main()`` would. A program that imports gradmedic
gets its KeyboardInterrupt as before. Standard library only: this runs before anything else is imported.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

__all__ = ["interrupted_while_importing", "interrupt_ends_the_command"]

_SCRIPT_NAMES = ("gradmedic", "gradmedic.exe", "gradmedic-script.py")


def _is_the_command() -> bool:
    if sys.argv and os.path.basename(sys.argv[0]) in _SCRIPT_NAMES:
        return True
    argv = list(getattr(sys, "orig_argv", []))  # Python 3.10+: the interpreter's own arguments
    return "-m" in argv and argv[argv.index("-m") + 1:argv.index("-m") + 2] in (["gradmedic.cli"], ["gradmedic"])


def interrupted_while_importing() -> None:
    """Called on KeyboardInterrupt during ``import gradmedic``: exits with 130 and one line when this process is the
    gradmedic command; returns (and the caller re-raises) otherwise."""
    if _is_the_command():
        try:
            print("gradmedic: interrupted", file=sys.stderr, flush=True)
        finally:
            raise SystemExit(130)


@contextlib.contextmanager
def interrupt_ends_the_command() -> Iterator[None]:
    """While the gradmedic command imports torch, Ctrl-C ends it at once with one line and 130: a KeyboardInterrupt
    raised inside an import can be swallowed by a library's bare ``except`` (the command then went on and passed,
    exit 0, as if never interrupted). Any other program keeps its own handler; the previous one is put back after."""
    if not _is_the_command() or threading.current_thread() is not threading.main_thread():
        yield
        return

    def end(_signum: int, _frame: object) -> None:
        os.write(2, b"gradmedic: interrupted\n")
        os._exit(130)

    previous = signal.signal(signal.SIGINT, end)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
