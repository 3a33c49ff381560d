"""Keep freed CPU memory for reuse instead of handing it back to the OS after every training step.

A CPU training step allocates the same large activation buffers every time (K models trained together:
hundreds of MB per step). glibc's malloc serves blocks above its mmap threshold (adaptive, at most
32 MiB) with fresh pages from the OS and unmaps them on free, so each step pays a page fault for
every 4 KiB it touches again. Raising the threshold (and the heap-trim threshold) makes malloc keep
and reuse that memory, as tcmalloc or jemalloc would (what it gained: results/bench/MEASURED_NOTES.md).

The process's resident memory then stays near its peak until it exits: fine for a training process.
`RNNBENCH_KEEP_FREED_MEMORY=0` turns it off; other C libraries (macOS, musl) are left alone.
"""

from __future__ import annotations

import ctypes
import os
import platform

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
_state: dict[str, bool] = {}


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds high, once per process; True when they are set."""
    if "done" in _state:
        return _state["done"]
    done = False
    if os.environ.get("RNNBENCH_KEEP_FREED_MEMORY", "1") != "0" and platform.libc_ver()[0] == "glibc":
        try:
            mallopt = ctypes.CDLL(None).mallopt
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            # Newer glibc refuses an mmap threshold above half its largest heap (32 MiB): try high, then that.
            done = bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30) or mallopt(_M_MMAP_THRESHOLD, 32 << 20))
            done = bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)) and done
        except (OSError, AttributeError):
            done = False
    _state["done"] = done
    return done
