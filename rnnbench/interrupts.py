"""Stopping a command from outside: SIGTERM does what Ctrl-C does, and one line says what was kept.

`rnnbench` turns SIGTERM into KeyboardInterrupt (`stop_on_sigterm`), so a `kill`, a scheduler's
time-out or a container stop run the same cleanup as Ctrl-C: runs closed KILLED with their
checkpoints, temporary downloads removed. Code that stopped runs raises `Interrupted`, whose two
parts the command line prints with the command that carries on.
"""

from __future__ import annotations

import signal
from typing import Any

_received: dict[str, int | None] = {"signal": None}


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C or SIGTERM that stopped runs. `kept`: what was marked KILLED and kept; `again`: what
    running the same command again does (printed before the command itself)."""

    def __init__(self, kept: str, again: str) -> None:
        super().__init__(kept, again)  # args match __init__: it survives pickling from a worker process
        self.kept = kept
        self.again = again


def _raise_interrupt(signum: int, frame: Any) -> None:
    if _received["signal"] is not None:
        return  # a second SIGTERM must not cut short the cleanup the first one started
    _received["signal"] = signum
    raise KeyboardInterrupt


def stop_on_sigterm() -> None:
    """From now on SIGTERM raises KeyboardInterrupt in the main thread (once; repeats are ignored)."""
    signal.signal(signal.SIGTERM, _raise_interrupt)


def exit_status() -> int:
    """The shell's status for the signal that stopped us: 143 after SIGTERM, 130 after Ctrl-C."""
    return 128 + (_received["signal"] or signal.SIGINT)
