"""Run a suite's grid in worker processes, writing each finished run to the Store as it arrives.

Results are written by the parent, one transaction per run, as soon as a worker returns one, so an
interrupted suite (Ctrl-C, or a worker killed) keeps every finished run; running it again skips them.
Workers are spawned (not forked: a forked copy of a process that already started torch's thread pools
can hang) and use one intra-op thread each, so N workers use N cores without oversubscribing them.

Workers never outlive the parent: each asks the kernel for SIGKILL when its parent dies (Linux prctl
PR_SET_PDEATHSIG) and also watches its parent's pid from a thread (every platform), so a ``kill -9`` of
``gradmedic lab run`` leaves no idle worker behind. Ctrl-C is the parent's to handle: workers are
started with SIGINT ignored; the parent keeps every result that had arrived, stops the workers at once
and leaves the suite resumable. SIGTERM, what systemd, Kubernetes and SLURM send before SIGKILL, is
handled the same way (``Terminated``, a KeyboardInterrupt): without it the parent died at once, said
nothing, and left multiprocessing's semaphores to its resource tracker. One suite at a time runs on a
database (``Store.exclusive``).
"""

from __future__ import annotations

import fnmatch
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from gradmedic._errors import GradmedicError, bad_argument, first_line
from gradmedic.lab.backends import make_executor
from gradmedic.lab.experiment import run_experiment
from gradmedic.lab.store import Store, run_key
from gradmedic.lab.suites import Suite

__all__ = ["RunSummary", "Terminated", "run_suite", "select"]

_LABELS = ("experiment", "label")


# How often a worker checks that its parent is alive where the kernel cannot tell it (not Linux): a
# kill -9 of the parent leaves the workers idle for at most this long.
PARENT_POLL_S = 0.5


class Terminated(KeyboardInterrupt):
    """SIGTERM reached the process running a suite: it stops as on Ctrl-C (see the module docstring). A
    KeyboardInterrupt, so that every place that keeps what finished on Ctrl-C keeps it here too."""


@dataclass
class _SigtermSeen:
    seen: bool = False


@contextmanager
def _sigterm_as_interrupt(state: _SigtermSeen) -> Iterator[None]:
    """Raise ``Terminated`` in the main thread on SIGTERM while the block runs (and note it in ``state``);
    the handler that was there before comes back after it (a second SIGTERM then acts as it did: by
    default, at once)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum: int, frame: Any) -> None:
        state.seen = True
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _init_worker(parent: int) -> None:
    # Ctrl-C reaches the whole process group: the parent decides. Ignored from the start where the platform
    # passes it on (see _sigint_deferred), and here for the others.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent)
    torch.set_num_threads(1)


def _die_with_parent(parent: int) -> None:
    """Exit when the parent process dies: PR_SET_PDEATHSIG where the kernel has it, a watching thread always
    (the kernel's signal fires when the parent's spawning thread exits, and does not exist off Linux)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes  # Linux only

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the request above was in place
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="gradmedic-parent-watch", daemon=True).start()


@contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Start worker processes with SIGINT ignored, without losing a Ctrl-C that comes meanwhile.

    An ignored disposition is inherited across exec (a blocked mask is not: the spawn resets it), so the
    workers ignore Ctrl-C from their first instruction: no traceback from each of them while they import
    torch. The parent blocks SIGINT for that time as well, so a Ctrl-C is kept pending (Linux keeps a
    blocked signal pending even while it is ignored) and raised here, after the workers exist and can be
    stopped. multiprocessing's resource tracker is started first: starting it unblocks SIGINT. SIGTERM is
    held back the same way (not ignored: the workers keep its default action)."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    from multiprocessing import resource_tracker  # only where the process pool runs

    resource_tracker.ensure_running()
    held = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)  # a pending Ctrl-C or SIGTERM is raised here


def _run_one(config: dict[str, Any]) -> dict[str, Any]:
    return run_experiment({k: v for k, v in config.items() if k not in _LABELS})


@dataclass
class RunSummary:
    suite: str
    total: int
    skipped: int  # already in the store
    finished: int = 0  # finished in this call
    failed: list[tuple[str, str]] = field(default_factory=list)  # (run label, one-line error)

    @property
    def complete(self) -> bool:
        return self.skipped + self.finished == self.total


def _name(config: dict[str, Any]) -> str:
    return f"{config['experiment']}: {config['label']} (seed {config['seed']})"


def select(suite: Suite, only: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The configurations of ``suite`` whose name (``experiment: label (seed N)``, as the progress bar and
    failures print it) matches one of the shell patterns ``only`` (every one when it is empty), in the suite's
    order. For a budget that cannot hold a whole suite: the depth suite runs its 1000-block cells before its 96-
    and 384-block ones (the claim's runs first), and ``only`` runs the cheaper cells without reordering it. A
    pattern that matches no run is a typo, refused in one line rather than running nothing."""
    if not only:
        return list(suite.configs)
    names = [_name(c) for c in suite.configs]
    for pattern in only:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise GradmedicError(f"No run of suite {suite.name!r} matches {pattern!r}; a run is named like "
                                 f"{names[0]!r} (gradmedic lab list).")
    return [c for c, n in zip(suite.configs, names, strict=True) if any(fnmatch.fnmatchcase(n, p) for p in only)]


def run_suite(suite: Suite, store: Store, workers: int | None = None, progress: bool = True,
              on_result: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
              backend: str = "process", address: str | None = None, only: tuple[str, ...] = ()) -> RunSummary:
    """Run every configuration of ``suite`` not yet in ``store`` (of those ``only`` selects: see ``select``);
    returns what happened, counted over the selected runs.

    ``backend``: ``"process"`` (a local process pool, the default) or ``"ray"`` (Ray tasks on a local
    instance, or on the cluster at ``address``); see ``gradmedic.lab.backends``.

    A run that raises is reported in ``summary.failed`` and not stored (a rerun tries it again). A worker
    that dies (killed, out of memory) stops the suite with a GradmedicError; what finished is kept.
    """
    if workers is None:
        workers = max(1, min(os.cpu_count() or 1, 8))
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise bad_argument("workers", "a positive int", workers)
    configs = select(suite, tuple(only))
    done = store.finished(suite.name)
    if all(run_key(c) in done for c in configs):  # nothing to do: no lock needed to say so
        return RunSummary(suite.name, len(configs), len(configs))
    with store.exclusive():
        done = store.finished(suite.name)  # again, now that no other run can add to it
        pending = [c for c in configs if run_key(c) not in done]
        summary = RunSummary(suite.name, len(configs), len(configs) - len(pending))
        if pending:
            _run_pending(suite, store, pending, workers, progress, on_result, summary, backend, address)
    return summary


def _run_pending(suite: Suite, store: Store, pending: list[dict[str, Any]], workers: int, progress: bool,
                 on_result: Callable[[dict[str, Any], dict[str, Any]], None] | None, summary: RunSummary,
                 backend: str = "process", address: str | None = None) -> None:
    bar = _Bar(suite, len(pending), progress)
    futures: dict[Future, dict[str, Any]] = {}
    stored: set[Future] = set()

    def keep(future: Future) -> None:
        """Store a finished run's result, or note its failure."""
        stored.add(future)
        config = futures[future]
        try:
            result = future.result()
        except BrokenProcessPool:
            raise
        except Exception as error:  # the run itself failed: report it, keep going
            error = getattr(error, "cause", None) or error  # Ray wraps the run's own exception
            summary.failed.append((_name(config), f"{type(error).__name__}: {first_line(error)}"))
        else:
            store.put(suite.name, config, result, result["wall_s"])
            summary.finished += 1
            if on_result is not None:
                on_result(config, result)
        bar.advance(_name(config))

    executor: Any = None
    interrupted = False
    sigterm = _SigtermSeen()
    try:
        with _sigterm_as_interrupt(sigterm):
            with _sigint_deferred():  # the pool's processes (and multiprocessing's resource tracker) start here
                executor = make_executor(backend, min(workers, len(pending)), address, initializer=_init_worker,
                                         initargs=(os.getpid(),))
                futures = {executor.submit(_run_one, c): c for c in pending}
            with bar:
                waiting = set(futures)
                while waiting:
                    finished, waiting = wait(waiting, return_when=FIRST_COMPLETED)
                    for future in finished:
                        keep(future)
    except BrokenProcessPool:
        if sigterm.seen:  # SIGTERM to the whole group: its workers died of it before our handler ran
            interrupted = True
            raise Terminated from None
        saved = summary.skipped + summary.finished
        raise GradmedicError(f"A lab worker process died during suite {suite.name!r}; {saved}"
                             f" of {summary.total} runs are saved in {store.path}. Run the same command again to "
                             "resume.") from None
    except KeyboardInterrupt:
        interrupted = True
        for future in futures:  # results that arrived while we were interrupted are kept too
            if future not in stored and future.done() and not future.cancelled():
                try:
                    keep(future)
                except BaseException:  # noqa: BLE001,S110 - a broken pool or a second Ctrl-C: keep the rest
                    pass
        raise
    finally:
        # futures are not cancelled here: the pool's own thread marks what is left (cancelling beside it
        # races with it: InvalidStateError on a cancelled future when the pool breaks)
        if executor is not None:
            if interrupted:  # do not wait for runs in flight: stop their workers now
                for process in list((getattr(executor, "_processes", None) or {}).values()):
                    process.kill()
            executor.shutdown(wait=True, cancel_futures=True)


class _Bar:
    """A rich progress bar on stderr, or nothing."""

    def __init__(self, suite: Suite, total: int, enabled: bool):
        self.progress = None
        if enabled:
            # rich on first use: `import gradmedic` stays light
            # rich on first use: `import gradmedic` stays light
            from gradmedic._rich import BarColumn, Console, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn(f"[bold]{suite.name}[/]"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("{task.description}"),
                                     console=Console(stderr=True))
            self.task = self.progress.add_task("", total=total)

    def __enter__(self) -> _Bar:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()

    def advance(self, text: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, description=text)
