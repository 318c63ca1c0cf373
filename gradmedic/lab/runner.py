"""Run a suite's grid in worker processes, writing each finished run to the Store as it arrives.

Results are written by the parent, one transaction per run, as soon as a worker returns one, so an
interrupted suite (Ctrl-C, or a worker killed) keeps every finished run; running it again skips them.
Workers are spawned (not forked: a forked copy of a process that already started torch's thread pools
can hang) and use one intra-op thread each, so N workers use N cores without oversubscribing them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

from gradmedic._errors import GradmedicError, bad_argument, first_line
from gradmedic.lab.backends import make_executor
from gradmedic.lab.store import Store, run_key
from gradmedic.lab.suites import Suite

__all__ = ["RunSummary", "run_suite"]

_LABELS = ("experiment", "label")


def _run_one(config: dict[str, Any]) -> dict[str, Any]:
    from gradmedic.lab.experiment import run_experiment

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


def run_suite(suite: Suite, store: Store, workers: int | None = None, progress: bool = True,
              on_result: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
              backend: str = "process", address: str | None = None) -> RunSummary:
    """Run every configuration of ``suite`` not yet in ``store``; returns what happened.

    ``backend``: ``"process"`` (a local process pool, the default) or ``"ray"`` (Ray tasks on a local
    instance, or on the cluster at ``address``); see ``gradmedic.lab.backends``.

    A run that raises is reported in ``summary.failed`` and not stored (a rerun tries it again). A worker
    that dies (killed, out of memory) stops the suite with a GradmedicError; what finished is kept.
    """
    if workers is None:
        workers = max(1, min(os.cpu_count() or 1, 8))
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise bad_argument("workers", "a positive int", workers)
    done = store.finished(suite.name)
    pending = [c for c in suite.configs if run_key(c) not in done]
    summary = RunSummary(suite.name, len(suite.configs), len(suite.configs) - len(pending))
    if not pending:
        return summary
    executor = make_executor(backend, min(workers, len(pending)), address)
    bar = _Bar(suite, len(pending), progress)
    futures: dict[Future, dict[str, Any]] = {}
    try:
        with bar:
            futures = {executor.submit(_run_one, c): c for c in pending}
            waiting = set(futures)
            while waiting:
                finished, waiting = wait(waiting, return_when=FIRST_COMPLETED)
                for future in finished:
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
    except BrokenProcessPool:
        saved = summary.skipped + summary.finished
        raise GradmedicError(f"A lab worker process died during suite {suite.name!r}; {saved}"
                             f" of {summary.total} runs are saved in {store.path}. Run the same command again to "
                             "resume.") from None
    finally:
        for future in futures:
            future.cancel()
        executor.shutdown(wait=True, cancel_futures=True)
    return summary


class _Bar:
    """A rich progress bar on stderr, or nothing."""

    def __init__(self, suite: Suite, total: int, enabled: bool):
        self.progress = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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
