"""Stopping a command from outside: SIGTERM does what Ctrl-C does, and one line says what was kept.

`rnnbench` (and each sweep worker) answers SIGINT and SIGTERM alike (`stop_on_signals`): a `kill`,
a scheduler's time-out or a container stop run the same cleanup as Ctrl-C (runs closed KILLED with
their checkpoints, temporary downloads removed). While Lightning trains it wraps the SIGTERM
handler; then the stop is handed to Lightning, which ends the fit at the next batch or epoch
boundary (SIGTERMException, after the epoch's checkpoint is written), so a stop never falls between
an epoch's metrics and its checkpoint. Otherwise the handler raises KeyboardInterrupt at once.
Repeated signals are ignored: they must not cut short the cleanup the first one started.

Code that stopped runs raises `Interrupted`, whose two parts the command line prints with the
command that carries on.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

_state: dict[str, Any] = {"signal": None, "idle": None}


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C or SIGTERM that stopped runs. `kept`: what was marked KILLED and kept; `again`: what
    running the same command again does (printed before the command itself); `add_args`: options the
    command needs to carry on (e.g. `--resume RUN_ID`), added where it lacks them."""

    def __init__(self, kept: str, again: str, add_args: tuple[str, ...] = ()) -> None:
        super().__init__(kept, again, add_args)  # args match __init__: it survives pickling from a worker
        self.kept = kept
        self.again = again
        self.add_args = tuple(add_args)


def _request_stop(signum: int, frame: Any) -> None:
    if _state["signal"] is not None:
        return
    _state["signal"] = signum
    if _state["idle"] is not None and _state["idle"]():  # a worker with nothing to stop
        os._exit(128 + signum)
    sigterm = signal.getsignal(signal.SIGTERM)
    if sigterm is not _request_stop and callable(sigterm):  # Lightning is training and calls us from its handler
        if signum != signal.SIGTERM:
            sigterm(signal.SIGTERM, frame)  # Ctrl-C: let Lightning stop at the boundary too
        return
    raise KeyboardInterrupt


def stop_on_signals(idle: Callable[[], bool] | None = None) -> None:
    """Install the handler for SIGINT and SIGTERM (main thread only). `idle`: for a worker process,
    true when it runs no task, so that a signal then simply ends it."""
    _state["idle"] = idle
    signal.signal(signal.SIGINT, _request_stop)
    signal.signal(signal.SIGTERM, _request_stop)


def stop_requested() -> bool:
    """A stop signal came (its KeyboardInterrupt may not have been raised yet, or was absorbed)."""
    return _state["signal"] is not None


def exit_status() -> int:
    """The shell's status for the signal that stopped us: 143 after SIGTERM, 130 after Ctrl-C."""
    return 128 + (_state["signal"] or signal.SIGINT)
