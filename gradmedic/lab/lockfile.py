"""The lock file beside a lab database (``<db>.lock``): one ``gradmedic lab run`` at a time per database.

The lock is the OS's (flock on POSIX, msvcrt on Windows), so a process that dies, even by kill -9, releases
it. The holder writes its pid into the file, so the file is opened without following a symbolic link and must
be a regular file with one link: a link planted there (``lab.db.lock -> victim.txt``, or a hard link to it)
would otherwise have had us truncate another file. A FIFO is refused too (and opened without blocking).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Any

from gradmedic._errors import GradmedicError

__all__ = ["open_lock", "try_lock"]


def open_lock(lock_path: Path) -> Any:
    """The lock file, opened read-write without following a link (see the module docstring)."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    flags |= getattr(os, "O_CLOEXEC", 0)
    fix = "remove it (gradmedic makes its own) or give another --db path"
    if not hasattr(os, "O_NOFOLLOW") and lock_path.is_symlink():  # Windows: looked at, not atomic
        raise GradmedicError(f"the lock file {str(lock_path)!r} is a symbolic link; {fix}.")
    try:
        fd = os.open(lock_path, flags, 0o644)
    except OSError as error:
        if error.errno == errno.ELOOP or lock_path.is_symlink():
            raise GradmedicError(f"the lock file {str(lock_path)!r} is a symbolic link, which gradmedic does not "
                                 f"follow (it writes its pid there); {fix}.") from None
        raise GradmedicError(f"cannot create the lock {str(lock_path)!r}: {error.strerror or error}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
        os.close(fd)
        what = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"a file with {st.st_nlink} hard links"
        raise GradmedicError(f"the lock file {str(lock_path)!r} is {what}, which gradmedic would overwrite; {fix}.")
    return os.fdopen(fd, "r+")


def try_lock(handle: Any) -> bool:
    """A non-blocking exclusive lock on an open file: flock on POSIX, msvcrt on Windows."""
    try:
        import fcntl  # POSIX only
    except ImportError:  # Windows
        import msvcrt  # Windows only

        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True
