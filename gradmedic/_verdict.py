"""``gradmedic check`` as a CI gate: no verdict, no pass.

The user's model runs inside the check, and ``os._exit(0)`` there (or a library that calls it) ended the process with
status 0 and no output: ``--fail-on error`` passed on a check that never ran. Nothing inside a process runs after
``os._exit``, so the gradmedic command forks before running the user's code: the child runs the check and, as its last
act, writes its exit status to a pipe (the verdict); the parent returns that status, or fails with one line when the
child ended without writing it (``os._exit``, a signal, the OOM killer).

Fork, not a fresh interpreter: the parent has imported torch already, and a second import would cost seconds. A fork
is safe here because the parent has run no torch operation yet: a process whose OpenMP threads have run hangs in a
forked child's first parallel region (libgomp is not fork-safe). Hence only the command forks (``main()`` with no
argument list, from its console script); ``main([...])`` called from a Python program runs in that process, as does
any platform without ``os.fork``.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

__all__ = ["with_verdict"]


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: what was not written is lost either way
            pass


def with_verdict(run: Callable[[], int], what: str) -> int:
    """``run()``'s exit status, computed in a forked child; 2 with one line on stderr when the child ended without
    one. ``what`` names the run in that line."""
    if not hasattr(os, "fork"):
        return run()
    _flush()  # or what is buffered would be written twice, by both processes
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the check, then the verdict, then nothing else (no atexit, no parent's finally)
        code = 2
        try:
            os.close(read)
            code = run()
        except KeyboardInterrupt:
            print("gradmedic: interrupted", file=sys.stderr)
            code = 130
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 2
        except BaseException as error:  # noqa: BLE001 - one line; the parent must hear a verdict
            print(f"gradmedic: error: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
                  file=sys.stderr)
            code = 2
        finally:
            _flush()
            try:
                os.write(write, bytes([code & 0xFF]))
            finally:
                os._exit(code & 0xFF)
    os.close(write)
    verdict = b""
    while True:  # Ctrl-C reaches the child too (same process group): wait for its own one line and status
        try:
            chunk = os.read(read, 1)
        except KeyboardInterrupt:
            continue
        if not chunk:
            break
        verdict += chunk
    os.close(read)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except KeyboardInterrupt:
            continue
    if verdict:
        return verdict[0]
    if os.WIFSIGNALED(status):
        how = f"was killed by signal {signal.Signals(os.WTERMSIG(status)).name}"
    else:
        how = f"exited with status {os.WEXITSTATUS(status)} from inside the user's code (os._exit?)"
    print(f"gradmedic: error: {what} ended without a verdict: the process {how}; a check that did not finish "
          "cannot pass", file=sys.stderr)
    return 2
