"""Keeping torch.compile (dynamo) away from gradmedic's hooks.

Dynamo inlines module hooks into the graph it compiles, guards on them, and by default
(``skip_nnmodule_hook_guards``) keeps running whichever version it compiled first: hooks traced into a
graph would be recompiled as they come and go, or would keep firing after ``close()``. So while any
Monitor has hooks armed, the compiler's stance is ``force_eager``: compiled code runs as plain Python
with the hooks, and the compiled graph (built on a step without hooks) is used on every other step.

One process-wide count, so that two Monitors arming and disarming in any order restore the stance the
user had, and a Monitor dropped without ``close()`` gives its share back when it is collected.

Nothing happens until dynamo is loaded (``torch.compile`` loads it): importing ``torch._dynamo`` takes
seconds, which a user who never compiles should not pay. So create the Monitor after
``torch.compile(model)`` (``Monitor(torch.compile(model))``); a model compiled later is covered from the
Monitor's next step on.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import torch

__all__ = ["EagerWhileArmed"]

_lock = threading.Lock()
_users = 0
_prior: Any = None  # the set_stance object whose __exit__ restores the user's stance


def _acquire() -> None:
    global _users, _prior
    with _lock:
        if _users == 0:
            set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
            if set_stance is None:
                return
            _prior = set_stance("force_eager")  # in effect from now on
        _users += 1


def _release() -> None:
    global _users, _prior
    with _lock:
        if _users == 0:
            return
        _users -= 1
        if _users == 0 and _prior is not None:
            prior, _prior = _prior, None
            prior.__exit__(None, None, None)


class EagerWhileArmed:
    """One Monitor's share of the eager stance: ``hold(True)`` while its hooks are armed."""

    def __init__(self) -> None:
        self.held = False

    def hold(self, on: bool) -> None:
        if on == self.held:
            return
        if on:
            if "torch._dynamo" not in sys.modules or torch.compiler.is_compiling():
                return  # nothing is compiled yet (tried again at the next arm); or inside a compiled region
            _acquire()
        else:
            _release()
        self.held = on

    def __del__(self) -> None:  # a Monitor dropped without close()
        if self.held and sys.meta_path is not None:  # not at interpreter shutdown: nothing to restore then
            try:
                _release()
            except Exception:  # noqa: BLE001,S110 - a destructor must not raise
                pass
