"""What the command line's commands share: a console as wide as the output allows, and one-line errors."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from gradmedic._terminal import printable
from gradmedic._verdict import broken_pipe

__all__ = ["PIPE_WIDTH", "cannot_write", "fail", "make_console"]

# Width given to tables when the output is not a terminal (a pipe, a file, CI logs): wide enough for
# every row on one line, so that `gradmedic check ... | cat` (or grep) shows whole layer names; rich
# would otherwise assume 80 columns and cut GPT-2's names to `transfor…`. COLUMNS, when set, still wins.
PIPE_WIDTH = 10_000


def make_console(stderr: bool = False):
    """A rich Console: the terminal's width on a terminal, PIPE_WIDTH when piped."""
    import os

    from gradmedic._rich import Console

    stream = sys.stderr if stderr else sys.stdout
    piped = not (hasattr(stream, "isatty") and stream.isatty()) and "COLUMNS" not in os.environ
    console = Console(stderr=stderr, width=PIPE_WIDTH if piped else None)
    console.on_broken_pipe = broken_pipe  # rich's own exits with status 1; the command keeps its own
    return console

def fail(message: str) -> int:

    print(f"gradmedic: error: {printable(message, newlines=False)}", file=sys.stderr)
    return 2

def cannot_write(path: Any, error: OSError) -> str:
    """One line saying why ``path`` could not be written: a file where a folder of its path should be ("File
    exists" alone did not say which), else the system's reason."""
    target = Path(str(path))
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"cannot write {path}: {parent} is a file, not a folder; choose another path"
            break
    if target.is_dir():
        return f"cannot write {path}: it is a folder; give a file name"
    return f"cannot write {path}: {error.strerror or error}"
