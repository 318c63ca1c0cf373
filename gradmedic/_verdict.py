"""The gradmedic command's exit status: ``gradmedic check`` as a CI gate (no verdict, no pass), and a reader of its
output that went away (``| head``, ``| true``), which is no traceback and leaves the status the command's own.

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
from typing import Any

__all__ = ["EXIT_BROKEN_PIPE", "EXIT_INTERRUPTED", "broken_pipe", "reader_gone", "run_command", "with_verdict"]

# 128 + SIGPIPE: the status of a command that wrote to a pipe nobody reads (what `yes | head` gives `yes`)
EXIT_BROKEN_PIPE = 141
# 128 + SIGINT: the shell's status for a command ended by Ctrl-C
EXIT_INTERRUPTED = 130


def run_command(run: Callable[[Any], int], args: Any) -> int:
    """``run(args)`` with its output flushed here, so that a reader gone away is a BrokenPipeError caught here (not
    Python's "Exception ignored" at exit): EXIT_BROKEN_PIPE, unless the command returned its own status first."""
    try:
        code = run(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        return reader_gone(EXIT_BROKEN_PIPE)


def broken_pipe() -> None:
    """For rich's ``Console.on_broken_pipe``, whose own exits with status 1 (a healthy check then failed a gate)."""
    raise BrokenPipeError("the reader of gradmedic's output has gone")


def reader_gone(code: int) -> int:
    """stdout's reader has gone: what remains for it goes to /dev/null, so that Python's own flush at exit does not
    print "Exception ignored ... BrokenPipeError" (the recipe of Python's signal documentation). Returns ``code``."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return code


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
    # Ctrl-C reaches both processes (one process group). The parent ignores it and waits for the child's verdict; the
    # child notes it before raising, so an interrupt that the user's code or a library swallowed, or turned into
    # another error, still ends the command as interrupted (it gave 0 or 2 before).
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: signals cannot be handled here, nor a verdict awaited safely
        return run()
    pid = os.fork()
    if pid == 0:  # the child: the check, then the verdict, then nothing else (no atexit, no parent's finally)
        code, interrupted = 2, []

        def _interrupt(signum: int, frame: Any) -> None:
            interrupted.append(signum)
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, _interrupt)
        try:
            os.close(read)
            code = run()
        except KeyboardInterrupt:
            interrupted.append(signal.SIGINT)  # raised by the code itself, not by the handler: the same ending
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 2
        except BaseException as error:  # noqa: BLE001 - one line; the parent must hear a verdict
            if not interrupted:
                print(f"gradmedic: error: {type(error).__name__}: "
                      f"{str(error).splitlines()[0] if str(error) else ''}", file=sys.stderr)
            code = 2
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the verdict short
            if interrupted:
                print("gradmedic: interrupted", file=sys.stderr)
                code = EXIT_INTERRUPTED
            _flush()
            try:
                os.write(write, bytes([code & 0xFF]))
            finally:
                os._exit(code & 0xFF)
    try:
        return _await_verdict(pid, read, write, what)
    finally:
        signal.signal(signal.SIGINT, previous)


def _await_verdict(pid: int, read: int, write: int, what: str) -> int:
    """The parent's side of ``with_verdict``: the status the child wrote, or 2 with one line when it wrote none."""
    os.close(write)
    verdict = b""
    while True:  # SIGINT is ignored here: the child says its own one line and status
        try:
            chunk = os.read(read, 1)
        except InterruptedError:
            continue
        if not chunk:
            break
        verdict += chunk
    os.close(read)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
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
