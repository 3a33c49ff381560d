"""How a run uses the CPU: how many threads its step uses (train.threads), and subnormal floats."""

from __future__ import annotations

import os

from rnnbench.config import Config


# One model's step products are tiny at Chung's sizes, and the compiled CPU loops split a forward
# pass over threads only where gates x H x H >= 16384 (rnnbench/cells/csrc/fast_rnn.cpp, "threads").
# On a busy machine a second thread makes a small model's epoch several times slower (the threads
# fight other processes for the cores and wait on each other); bigger models gain from a free core
# and lose when there is none (results/bench/MEASURED_NOTES.md). Results do not depend on the count.
PARALLEL_PRODUCT = 16384  # gates x H x H from which a second thread can pay


def auto_threads(cell: str, input_size: int, hidden_size: int, cap: int) -> int:
    """train.threads=auto: 1 for a model below PARALLEL_PRODUCT; else the cores the 1-minute load
    average leaves free, at least 1 and at most `cap` (torch's setting: a sweep worker's share)."""
    from rnnbench.budget import count_params

    gates_times_hidden = count_params(cell, 2, hidden_size) - count_params(cell, 1, hidden_size)  # one input column
    if gates_times_hidden * hidden_size < PARALLEL_PRODUCT:
        return 1
    free = (os.cpu_count() or 1) - os.getloadavg()[0]
    return max(1, min(cap, round(free)))


def use_threads(config: Config, input_size: int, hidden_size: int) -> int:
    """Set torch's CPU threads for this run (train.threads, or auto_threads) and return the number."""
    import torch

    wanted = config.train.threads
    threads = auto_threads(config.model.cell, input_size, hidden_size, torch.get_num_threads()) if wanted == "auto" else wanted
    torch.set_num_threads(threads)
    return threads


def flush_subnormals() -> None:
    """Make the CPU treat subnormal floats (below ~1.2e-38 in float32) as zero in this process.

    Why: gradients that vanish through hundreds of steps (a tanh-RNN or a GRU on adding at T = 400)
    pass through the subnormal range, where x86 arithmetic is tens of times slower; measured here, a
    T = 400 step of those cells ran 5-8x slower than with subnormals flushed, and the LSTM's not at
    all (results/bench/MEASURED_NOTES.md). A value that small adds nothing to a float32 sum of
    normal numbers, so no result moves; it is the flush-to-zero mode GPUs run in by default.
    """
    import torch

    torch.set_flush_denormal(True)
