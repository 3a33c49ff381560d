"""The whole population step (forward, backward, clipping, optimizer, metric sums) in a CUDA graph.

A population's step on a GPU is latency-bound: thousands of small kernels whose launches, not their
arithmetic, set the time. A CUDA graph replays them all with one launch. A graph holds fixed shapes
and fixed memory, so:

* batches are padded to a multiple of BUCKET time steps (`bucket`), one graph per (batch size,
  padded length): a few graphs per corpus, at most BUCKET - 1 padded steps per batch. Padding
  changes no number (rnnbench/training/population.py), and the recurrence runs over the padded
  length for every member (no per-member lengths read on the host: that would synchronise);
* each batch is copied into the graph's static input tensors, then the graph is replayed;
* the population's tensors must stay where they are: when members leave (`Population.keep` makes
  new, smaller tensors) the graphs are dropped and captured again at the next batches;
* the first WARMUP batches of each shape run eagerly (real training steps) on a side stream, as
  torch.cuda.graphs asks, so lazily made state (the optimizer's scratch tensors, cuBLAS workspaces)
  exists before capture.

`capture` is injectable: on CUDA `cuda_capture` (torch.cuda.CUDAGraph); the tests run the same
bookkeeping on the CPU with `eager_capture`, which replays by calling the step again on the static
inputs (tests/test_population.py: the graphed path's numbers equal the plain step's).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from rnnbench.tasks.base import Batch

BUCKET = 32
WARMUP = 2


def bucket(steps: int) -> int:
    """The padded length a batch of `steps` time steps runs at."""
    return BUCKET * math.ceil(steps / BUCKET)


Replay = Callable[[], None]  # a captured step: calling it runs the step again on its static inputs


def cuda_capture(step: Callable[[], None]) -> Replay:
    """Capture `step` in a CUDA graph (after the caller's warm-up); nothing runs during capture."""
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def eager_capture(step: Callable[[], None]) -> Replay:
    """A stand-in for cuda_capture where there is no GPU: the same bookkeeping, eager steps."""
    return step


class StepGraphs:
    """Population.train_step through one graph per batch shape (see the module docstring)."""

    def __init__(self, population: Any, capture: Callable[[Callable[[], None]], Replay] = cuda_capture,
                 warmup: int = WARMUP) -> None:
        self.pop, self.capture, self.warmup = population, capture, warmup
        self.graphs: dict[tuple[Any, ...], tuple[Replay, Batch]] = {}
        self.seen: dict[tuple[Any, ...], int] = {}
        self.captures = 0  # graphs captured so far (kept across resets)

    def reset(self) -> None:
        """Forget every graph (the population's tensors were replaced)."""
        self.graphs.clear()
        self.seen.clear()

    def step(self, batch: Batch) -> None:
        """Train on one stacked batch, padded to a bucket length by the caller (TrainBatches)."""
        key = tuple((name, tuple(v.shape), v.dtype) for name, v in sorted(batch.items()))
        found = self.graphs.get(key)
        if found is None:
            n = self.seen.get(key, 0)
            self.seen[key] = n + 1
            if n < self.warmup:
                self._eager(batch)
                return
            static = {name: v.clone() for name, v in batch.items()}
            self.captures += 1
            found = self.graphs[key] = (self.capture(lambda: self.pop.train_step(static, graphed=True)), static)
        replay, static = found
        for name, v in batch.items():
            static[name].copy_(v)
        replay()

    def _eager(self, batch: Batch) -> None:
        if self.pop.device.type != "cuda":
            self.pop.train_step(batch, graphed=True)
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.pop.train_step(batch, graphed=True)
        torch.cuda.current_stream().wait_stream(side)
