"""Time one training step of the code on PYTHONPATH, for an A/B of two checkouts run alternately.

    PYTHONPATH=<checkout> python scripts/step_ab.py harness CELLS HIDDEN REPEATS   # the bench's step
    PYTHONPATH=<checkout> python scripts/step_ab.py music CELL K CORPUS            # a study population's

`harness`: the bench's training step at seq 200, batch 32, input 88 (random piano rolls), each
cell and hidden size interleaved round-robin, median ms per step; on a checkout from before the
population trainer (9e3b190) it times that code's harness step (bench._harness_step), on a later one
the population of one (bench._step). `music`: the study's own population step (K members at the
study_music protocol, their lr 1e-4 * (k + 1)) on the corpus's first 10 training batches, 1 thread,
ms per step over two passes after two warm-up steps. One JSON line on stdout. Timings only: a
process alone on the machine, alternated with the other checkout's (a machine shared with other work
drifts by tens of percent). RNNBENCH_DATA_DIR must hold the corpus for `music`.

It reads the bench's own step builders (private names) on purpose: the old checkout has no public
way to build its harness step, and timing anything but the bench's step would compare other code.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

from rnnbench.cpu_memory import keep_freed_memory


def harness(cells: list[str], hidden: list[int], repeats: int) -> dict[str, float]:
    from rnnbench import bench

    torch.set_num_threads(int(os.environ.get("THREADS", "2")))  # the bench's setting on this machine
    opts = bench.Options(devices=["cpu"], seq_len=200, batch=32, input_size=88, hidden=hidden)
    old = hasattr(bench, "_harness_step")
    fns = {f"{c}@{H}": (bench._harness_step(c, H, opts, "cpu") if old else bench._step(c, "cpu", H, opts)[1])
           for H in hidden for c in cells}
    for f in fns.values():
        f(), f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {"code": "old harness" if old else "population of one", **{k: 1e3 * statistics.median(v) for k, v in times.items()}}


def music(cell: str, K: int, corpus: str) -> dict[str, float]:
    from rnnbench.config import Config
    from rnnbench.training.population import TrainBatches, build

    torch.set_num_threads(1)
    base = {"model": {"cell": cell, "budget": "music", "budget_convention": "recurrent", "init": "uniform",
                      "init_scale": 0.1, "forget_bias": 0.0},
            "task": {"name": corpus, "layout": "chung", "first_frame": "zero"},
            "train": {"optimizer": "rmsprop", "momentum": 0.9, "rmsprop_alpha": 0.95, "rmsprop_floor": 0.01,
                      "weight_noise": 0.075, "grad_clip": 1.0, "batch_size": 8, "gradient_flow": False, "progress_bar": False}}
    configs = []
    for k in range(K):
        d = {s: dict(v) for s, v in base.items()}
        d["train"].update(lr=1e-4 * (k + 1), seed=k)
        configs.append(Config.from_dict(d))
    pop = build(configs, torch.device("cpu"), torch.float32)
    pop.setup_optimizer()
    batches = [pop.on_device(b) for _, b in zip(range(10), TrainBatches(pop))]
    for b in batches[:2]:
        pop.train_step(b)
    passes = []
    for _ in range(2):
        t0 = time.perf_counter()
        for b in batches:
            pop.train_step(b)
        passes.append(1e3 * (time.perf_counter() - t0) / len(batches))
    return {"cell": cell, "K": K, "corpus": corpus, "ms_per_step": passes}


if __name__ == "__main__":
    keep_freed_memory()
    torch.set_flush_denormal(True)
    kind, *args = sys.argv[1:]
    if kind == "harness":
        out = harness(args[0].split(","), [int(h) for h in args[1].split(",")], int(args[2]))
    else:
        out = music(args[0], int(args[1]), args[2])
    print(json.dumps(out))
