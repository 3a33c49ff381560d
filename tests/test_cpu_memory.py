"""rnnbench.cpu_memory: glibc's thresholds are set once per process, and the switch turns it off."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

PROBE = "from rnnbench.cpu_memory import keep_freed_memory as k; print(k(), k())"


def _probe(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "RNNBENCH_KEEP_FREED_MEMORY"}
    if env_value is not None:
        env["RNNBENCH_KEEP_FREED_MEMORY"] = env_value
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout.split()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only: other C libraries are left alone")
def test_sets_glibc_thresholds_once() -> None:
    assert _probe(None) == ["True", "True"]


def test_switched_off_by_the_environment() -> None:
    assert _probe("0") == ["False", "False"]
