"""Writing a file the user asked for: whole or not at all, durable once we say it is written, and never
anywhere else than the path given.

``write_atomic`` is the one way gradmedic writes a result file (traces, HTML reports). The bytes go to a
temporary file made by ``tempfile.mkstemp`` in the target's own directory: a random name opened with
O_CREAT | O_EXCL, so a symbolic link planted at a predictable name cannot redirect the write onto another
file. The temporary file is flushed and fsynced, renamed over the target with ``os.replace``, and then the
directory is fsynced so that the rename itself survives a power loss: SQLite's and git's practice. Without
the first fsync a crash shortly after the rename can leave an empty file under the final name (ext4 with
delalloc, XFS); without the second the old file can come back.

A target that is a symbolic link is replaced by the new file, never written through: rename acts on the
link itself, so ``out.html -> ~/.bashrc`` leaves ``.bashrc`` alone. The new file gets the permissions a
plain ``open()`` would give it (0666 less the umask), or those of the regular file it replaces, and never
world-writable.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path

__all__ = ["write_atomic"]

# errors of fsync on a directory that mean "not supported here", not "the data is not on disk"
_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EBADF}


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and durably (see the module docstring); returns the path.

    Raises OSError (the caller says it in one line); on any failure the temporary file is removed and an
    existing file at ``path`` is left as it was."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    mode = _mode_for(target)
    # the name cut so that the temporary's stays under NAME_MAX (255) however long the target's is
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name[:200]}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            _chmod(f.fileno(), tmp, mode)
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)  # and the rename is on disk before we say it is written
    return target


def _mode_for(target: Path) -> int:
    """The permissions of the file we replace (when it is a regular file), else 0666 less the umask; never
    world-writable, and never setuid/setgid."""
    try:
        st = os.lstat(target)
    except OSError:
        st = None
    if st is not None and stat.S_ISREG(st.st_mode):
        mode = stat.S_IMODE(st.st_mode) & 0o777
    else:
        mode = 0o666 & ~_umask()
    return mode & ~0o002


def _umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux >= 4.7)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and put back at once
    os.umask(mask)
    return mask


def _chmod(fd: int, name: str, mode: int) -> None:
    try:
        os.fchmod(fd, mode)
    except AttributeError:  # Windows: no fchmod, and only the read-only bit means anything
        os.chmod(name, mode)


def _fsync_directory(directory: Path) -> None:
    """fsync a directory, so that a rename in it is durable. Windows cannot open a directory (and its
    rename is durable with the file); a file system that refuses fsync on a directory (EINVAL: some network
    and FUSE file systems) has nothing more we could do."""
    if os.name == "nt":
        return
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(directory, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in _FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


