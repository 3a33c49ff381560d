"""The uniform interface of a task: data from a seed, a loss to train on, exact metric sums to report.

A task owns its data and its output layer's meaning; the model is always
cell -> Linear(hidden, task.output_size) applied at every time step.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch.utils.data import Dataset

Batch = dict[str, torch.Tensor]  # at least "x": (B, T, input_size) float; tasks add targets and masks


class TaskOptions(BaseModel):
    """Options of one task; each task subclasses this with its own fields (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    name: str


class Task:
    """Base class. Subclasses set `name`, `Options`, `primary_metric` and implement the methods.

    Metrics are returned as (sum, count) pairs so a split's value is sum over batches / count over
    batches: every counted element weighs the same however the split is batched (the BL 2012
    per-time-step convention, and no averaging over padding).
    """

    name: ClassVar[str]
    Options: ClassVar[type[TaskOptions]]
    primary_metric: ClassVar[str]  # minimised; early stopping watches val_<primary_metric>

    input_size: int
    output_size: int

    def __init__(self, options: TaskOptions, seed: int) -> None:
        self.options = options
        self.seed = seed

    @classmethod
    def check_data(cls, options: TaskOptions) -> None:
        """Make sure the task's data files are present and intact, cheaply (a hash check, no parsing),
        or raise a one-line RnnbenchError. Called before any run is created; synthetic tasks have none."""

    def datasets(self) -> dict[str, Dataset]:
        """{'train', 'val', 'test'} -> Dataset whose items `collate` turns into a Batch."""
        raise NotImplementedError

    def collate(self, items: list) -> Batch:
        raise NotImplementedError

    def loss(self, out: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Scalar training loss from the head's output (B, T, output_size)."""
        raise NotImplementedError

    def metric_sums(self, out: torch.Tensor, batch: Batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """name -> (sum, count) over the valid elements of this batch; must include primary_metric."""
        raise NotImplementedError

    def loss_and_sums(self, out: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """The training loss and the (detached) metric sums of one training batch, as `loss` and
        `metric_sums` give them. Tasks whose loss is one of their metrics override it to compute that
        once (the music and speech NLLs are most of a Chung-size model's output-side cost)."""
        return self.loss(out, batch), self.metric_sums(out.detach(), batch)

    def baselines(self, split: str) -> dict[str, float]:
        """Reference values for `split` ('train'/'val'/'test'), logged as `<split>_<key>` beside the metrics.

        E.g. copy: {'ce_baseline': 10 ln 8 / (T + 20)}; music: {'nll_marginal': ..., 'nll_markov': ...}.
        """
        return {}

    def describe(self) -> dict[str, str]:
        """Facts that qualify every result of this task (e.g. frame layout), logged as params."""
        return {}

    def time_steps(self, batch: Batch) -> int:
        """Number of recurrent time steps processed for this batch (for steps-per-second figures)."""
        x = batch["x"]
        return int(x.shape[0] * x.shape[1])
