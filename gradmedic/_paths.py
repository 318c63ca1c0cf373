"""What a path that is not a regular file is, in words: a FIFO or ``/dev/zero`` given as a file read as "no such file",
which sent the user looking for a typo in a path that exists."""

from __future__ import annotations

import os
import stat

__all__ = ["not_a_file"]

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def not_a_file(path: str | os.PathLike, fix: str) -> str:
    """One line for ``path``, which is not a regular file: no such file, or what it is instead; then ``fix``."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"no such file: {path}"
    except OSError as error:
        return f"cannot read {path}: {error.strerror or error}"
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    return f"{path} is {kind}, not a file; {fix}"
