"""How many CPU threads a population's step uses (train.threads)."""

from __future__ import annotations

import os

from rnnbench.config import Config


# One model's step products are tiny at Chung's sizes, and the compiled CPU loops split a forward
# pass over threads only where gates x H x H >= 16384 (rnnbench/cells/csrc/fast_rnn.cpp, "threads").
# Measured on this project's 2-core machine while it was busy (load ~2), seconds per JSB epoch,
# 1 vs 2 torch threads: lstm_peephole H=37 0.41 vs 2.84 and 0.37 vs 1.00; gru_reset_before H=46
# 0.33 vs 1.83 and 0.39 vs 0.89; tanh H=101 0.40 vs 0.33 and 0.41 vs 2.79 (two threads fight the
# other processes for the cores and wait on each other). Bigger models gain from a free core and
# lose when there is none: lstm H=256 1.41 vs 0.88 and 1.15 vs 1.04, gru_reset_before H=256 1.12 vs
# 0.91 and 1.11 vs 2.62, lstm_peephole H=512 5.5 vs 7.1. Results do not depend on the thread count.
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
