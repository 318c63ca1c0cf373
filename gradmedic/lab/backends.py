"""Where a suite's runs execute: a local process pool (the default) or Ray tasks.

Both look the same to the runner: ``submit(fn, config)`` returns a ``concurrent.futures.Future`` and
``shutdown(wait, cancel_futures)`` ends the backend, so the runner's loop (progress bar, one store
transaction per finished run written by the driver, resume by skipping what is stored) is one piece of
code for both. Each run pins torch to one intra-op thread, so its numbers do not depend on where it ran.

Ray (``pip install "gradmedic[ray]"``) is imported only when asked for. ``address=None`` starts a local
Ray instance that lives as long as the driver (Ray's own fate sharing: a killed driver takes its local
instance with it); an address (``"auto"``, ``"ray://host:10001"``) joins an existing cluster, whose nodes
need gradmedic installed. The driver, not the workers, writes the SQLite store, so the store can live on
the driver's disk and a restarted driver resumes exactly as with the process pool.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

import torch

from gradmedic._errors import GradmedicError, bad_argument

__all__ = ["BACKENDS", "make_executor"]

BACKENDS = ("process", "ray")


def _pin_threads() -> None:
    torch.set_num_threads(1)


def make_executor(backend: str, workers: int, address: str | None = None,
                  initializer: Callable[..., None] = _pin_threads, initargs: tuple[Any, ...] = ()) -> Any:
    """An executor with ``submit`` and ``shutdown`` for ``backend`` (see the module docstring).
    ``initializer(*initargs)`` starts each pool worker (the runner's: one thread, SIGINT left to the
    parent, exit with the parent); Ray tasks pin themselves to one thread."""
    if backend not in BACKENDS:
        raise bad_argument("backend", f"one of {BACKENDS}", backend)
    if backend == "process":
        if address is not None:
            raise bad_argument("address", "None with the process backend (an address is for --backend ray)",
                               address)
        # spawned, not forked: a forked copy of a process that already started torch's threads can hang
        return ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=initializer,
                                   initargs=initargs)
    return RayExecutor(workers, address)


def _pinned(fn: Callable[[dict[str, Any]], dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    _pin_threads()
    return fn(config)


class RayExecutor:
    """The process pool's interface over Ray tasks (one CPU each, no automatic retries: a failed run
    is reported by the runner and retried by the next ``lab run``)."""

    def __init__(self, workers: int, address: str | None):
        try:
            import ray  # optional: the ray extra
        except ImportError:
            raise GradmedicError('The Ray backend needs Ray: pip install "gradmedic[ray]" (or run without '
                                 "--backend ray).") from None
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            options: dict[str, Any] = {"address": address, "include_dashboard": False, "log_to_driver": False,
                                       "configure_logging": False}
            if address is None:
                options["num_cpus"] = workers  # a local instance: as many parallel runs as asked for
            try:
                ray.init(**options)
            except Exception as error:  # noqa: BLE001 - one line, not Ray's traceback
                where = f"the Ray cluster at {address!r}" if address else "a local Ray instance"
                raise GradmedicError(f"Could not start or reach {where} ({type(error).__name__}: "
                                     f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}); "
                                     "check --address, or run without --backend ray.") from None
            self._started = True
        self._task = ray.remote(num_cpus=1, max_retries=0)(_pinned)
        self._refs: list[Any] = []

    def submit(self, fn: Callable[[dict[str, Any]], dict[str, Any]], config: dict[str, Any]) -> Future:
        ref = self._task.remote(fn, config)
        self._refs.append(ref)
        future: Future = ref.future()
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        ray = self._ray
        if cancel_futures:
            _, pending = ray.wait(self._refs, num_returns=len(self._refs), timeout=0) if self._refs else ([], [])
            for ref in pending:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001,S110 - already finished or gone
                    pass
        self._refs = []
        if self._started:
            ray.shutdown()
