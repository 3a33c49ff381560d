"""Starting the real `rnnbench` command in a subprocess for the kill and stop tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

RNNBENCH = [sys.executable, "-m", "rnnbench.cli"]


def start_and_wait(args: list[str], cwd: Path, reached: Callable[[], bool], timeout: float = 240) -> subprocess.Popen:
    """Start `rnnbench *args` in its own session (stderr to cwd/stderr.txt) and wait until `reached()`;
    fail the test (the process group killed) if it ends or times out first."""
    err = open(cwd / "stderr.txt", "w")
    proc = subprocess.Popen(RNNBENCH + args, cwd=cwd, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=err,
                            start_new_session=True)
    err.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if reached():
            return proc
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    pytest.fail(f"never reached mid-training (exit {proc.poll()}): {(cwd / 'stderr.txt').read_text()[-2000:]}")
