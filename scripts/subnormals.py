"""Time a training step with subnormal floats kept and flushed, side by side (results/bench/MEASURED_NOTES.md).

    python scripts/subnormals.py [T ...]

One population of one per cell on the adding task (the study's ~20K recurrent parameters, batch 20,
one thread), its step timed alternately in both modes after warm-up; prints the median seconds and
their ratio. Run it on an idle machine; the ratio is what counts.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from rnnbench.config import load_config
from rnnbench.training.population import TrainBatches, build

CELLS = ("tanh", "lstm", "gru")


def main(lengths: list[int]) -> None:
    torch.set_num_threads(1)
    print("| T | cell | kept (s) | flushed (s) | kept / flushed |\n|---|---|---|---|---|")
    for T in lengths:
        for cell in CELLS:
            config = load_config(None, [f"task.name=adding", f"task.seq_len={T}", f"model.cell={cell}", "model.budget=20000",
                                        "model.budget_convention=recurrent", "task.n_train=400", "train.batch_size=20"])
            pop = build([config], torch.device("cpu"), torch.float32)
            batches = list(zip(range(8), TrainBatches(pop)))
            times: dict[bool, list[float]] = {False: [], True: []}
            for i, batch in batches:  # the first two steps warm up; then the modes alternate
                flush = i % 2 == 1
                torch.set_flush_denormal(flush)
                start = time.perf_counter()
                pop.train_step(batch)
                if i >= 2:
                    times[flush].append(time.perf_counter() - start)
            kept, flushed = statistics.median(times[False]), statistics.median(times[True])
            print(f"| {T} | {cell} | {kept:.3f} | {flushed:.3f} | {kept / flushed:.1f} |")
    torch.set_flush_denormal(False)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [50, 200, 400])
