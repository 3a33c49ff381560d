"""What a sweep will cost before it starts: points x epochs x a measured time per epoch.

The time per epoch is measured here, on this machine, for each distinct model and task of the sweep:
a few real training steps (forward, loss, backward, optimiser step, with the threads `train()` would
use) on real batches, scaled to an epoch's batches by their padded lengths (a batch costs about its
longest sequence: on MuseData an epoch's batches run from tens to thousands of steps, so a count of
batches times the first few batches' cost was 10x low). It is an upper bound of a run's cost because
it assumes every run goes to `train.max_epochs`; early stopping usually ends runs sooner.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

from rnnbench.config import Config

WARN_CORE_HOURS = 8.0
"""A sweep estimated above this many hours of one core prints a warning before it starts (and goes on:
scripts must not block, and Ctrl-C stops a sweep safely; the same command resumes it)."""

ESTIMATE_FROM_RUN_EPOCHS = 1000
"""A real sweep times its models for the estimate only from this many run-epochs to do (runs x
max_epochs): timing costs ~5 s (lightning's import, a few steps per model), more than a small sweep
itself; `--dry-run` always estimates."""

TIMED_STEPS = 3  # after one untimed step (first-call costs: allocations, compiled-loop loading)
EVAL_SHARE = 0.5  # a validation batch (forward only) costs about half a training step


@dataclass(frozen=True)
class Estimate:
    runs: int
    seconds: float  # all runs one after another, each to max_epochs
    per_epoch: dict[str, float]  # model/task description -> measured seconds per epoch
    unmeasured: int = 0  # runs whose model could not be timed here (they will fail as they would anyway)

    @property
    def core_hours(self) -> float:
        return self.seconds / 3600

    def lines(self, workers: int | None = None) -> list[str]:
        """'N runs: at most X core-hours ...' and the measured seconds per epoch."""
        if not self.runs:
            return ["nothing to run"]
        parallel = f", about {_hours(self.seconds / workers)} with --workers {workers}" if workers and workers > 1 else ""
        out = [f"{self.runs} runs to do: at most {_hours(self.seconds)} of one core{parallel} "
               "(every run to train.max_epochs at the time per epoch measured here just now; "
               "early stopping usually ends runs sooner)"]
        out += [f"  {what}: {s:.3g} s per epoch" for what, s in sorted(self.per_epoch.items())]
        if self.unmeasured:
            out.append(f"  {self.unmeasured} runs could not be timed here and are not counted")
        return out


def _hours(seconds: float) -> str:
    if seconds >= 360:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 60:.1f} minutes" if seconds >= 60 else f"{seconds:.0f} seconds"


def _model_key(config: Config) -> str:
    """What decides the time per epoch: the model, the task's options, batch size, limits, precision."""
    c = config.to_dict()
    t = c["train"]
    keep = {"model": {k: v for k, v in c["model"].items() if k not in ("init", "init_scale", "forget_bias")},
            "task": c["task"],
            "train": {k: t[k] for k in ("batch_size", "limit_train_batches", "limit_eval_batches", "precision", "device",
                                        "threads")}}
    return json.dumps(keep, sort_keys=True)


def worth_estimating(configs: list[Config]) -> bool:
    """Enough run-epochs to do that the estimate is worth its own few seconds (ESTIMATE_FROM_RUN_EPOCHS)."""
    return sum(c.train.max_epochs for c in configs) >= ESTIMATE_FROM_RUN_EPOCHS


def estimate(configs: list[Config]) -> Estimate:
    """The cost of training every config, each to its max_epochs (or max_steps)."""
    measured: dict[str, tuple[float, float, int, str] | None] = {}
    total = 0.0
    per_epoch: dict[str, float] = {}
    unmeasured = 0
    for config in configs:
        key = _model_key(config)
        if key not in measured:
            try:
                measured[key] = _measure(config)
            except Exception:  # noqa: BLE001 - an estimate must never stop a sweep; the run reports its own error
                measured[key] = None
            if (timing := measured[key]) is not None:
                per_epoch[timing[3]] = max(per_epoch.get(timing[3], 0.0), timing[0])
        timing = measured[key]
        if timing is None:
            unmeasured += 1
            continue
        seconds, final, batches, _ = timing
        t = config.train
        epochs = t.max_epochs if t.max_steps < 0 else min(t.max_epochs, math.ceil(t.max_steps / max(batches, 1)))
        if t.readout == "ridge":  # one pass over train and val fits the readout (rnnbench/training/ridge.py)
            epochs = 1
        total += epochs * seconds + final
    return Estimate(len(configs), total, per_epoch, unmeasured)


def _measure(config: Config) -> tuple[float, float, int, str]:
    """(seconds per epoch, seconds of the final evaluation, training batches per epoch, label) from a
    few timed steps of the real training step (a population of one, rnnbench/training)."""
    import torch

    from rnnbench.training.population import TrainBatches, build
    from rnnbench.training.threads import flush_subnormals, use_threads

    t = config.train
    use_cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    dtype = torch.float64 if t.precision == "64" else torch.float32
    before = torch.get_num_threads()
    try:
        pop = build([config], device, dtype)
        hidden = pop.sizes[1]
        label = f"{config.task.name} {config.model.cell} hidden {hidden} batch {t.batch_size}"
        use_threads(pop.configs[0], pop.sizes[0], hidden)
        flush_subnormals()  # as train() runs
        data = pop.data
        train_batches = len(data.train[0]) if t.limit_train_batches is None else min(len(data.train[0]), t.limit_train_batches)
        # each split's padded lengths, batch by batch: what an epoch's steps cost in proportion to
        train_steps = _padded_lengths(data.train[0], train_batches)
        val_steps = _padded_lengths(data.eval["val"][data.data_key[0]], t.limit_eval_batches)
        # the best weights scored on test, val and train once at the end (rnnbench/training/loop.py)
        final_steps = (_padded_lengths(data.eval["test"][data.data_key[0]], None) + val_steps
                       + _padded_lengths(data.eval["final_train"][data.data_key[0]], None))
        steps = min(TIMED_STEPS + 1, train_batches)
        seconds: list[float] = []
        lengths: list[int] = []
        for i, batch in zip(range(steps), TrainBatches(pop)):
            batch = pop.on_device(batch)
            start = time.perf_counter()
            pop.train_step(batch)
            if use_cuda:
                torch.cuda.synchronize()
            if i > 0 or steps == 1:
                seconds.append(time.perf_counter() - start)
                lengths.append(int(batch["x"].shape[2]))
    finally:
        torch.set_num_threads(before)
    per_step = sum(seconds) / sum(lengths)  # seconds per padded time step of a training batch
    return (per_step * (train_steps + EVAL_SHARE * val_steps), per_step * EVAL_SHARE * final_steps,
            train_batches, label)


def _padded_lengths(loader: Any, limit: int | None) -> int:
    """The sum over a loader's batches (the first `limit`) of each batch's padded length."""
    total = 0
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            break
        total += int(batch["x"].shape[1])
    return total
