"""The uniform interface of a task: data from a seed, a loss to train on, exact metric sums to report.

A task owns its data and its output layer's meaning; the model is always
cell -> Linear(hidden, task.output_size) applied at every time step.

The losses and metrics work on a *population* of K >= 1 members at once (the stacked layout):
each member's batch is collated on its own (B, T, ...) by `collate`, then the K batches of one
step are stacked by `stack_batches` (training: each member its own data, padded along time to the
longest member) or one shared batch is broadcast by `broadcast_batch` (evaluation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch.utils.data import Dataset

# One member's batch from `collate`: at least "x": (B, T, input_size) float; tasks add targets,
# masks and lengths. Stacked (see Task): every tensor gains a leading K, and "steps" (K,) int64.
Batch = dict[str, torch.Tensor]
MetricSums = dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (sum (K,), count (K,))


def time_keys(batches: list[Batch]) -> list[str]:
    """Names of the per-step tensors of these member batches: dim 1 is each member's own T (x's)."""
    keys = []
    for key in batches[0]:
        if all(b[key].dim() >= 2 and b[key].shape[1] == b["x"].shape[1] for b in batches):
            keys.append(key)
    return keys


def stack_batches(batches: list[Batch], length: int | None = None) -> Batch:
    """K members' own batches (each from `collate`, same keys and B) as one stacked Batch.

    Every per-step tensor (dim 1 is the member's T) is padded along time to the longest member,
    or to `length` if given (e.g. a padded-length bucket; at least the longest), with zeros (False
    for masks), then stacked: x (K, B, T_max, D). Other tensors are stacked as they are (e.g.
    lengths (K, B)). Adds "steps": (K,) int64, each member's own unpadded T.
    """
    if not batches:
        raise ValueError("stack_batches needs at least one member batch")
    keys = set(batches[0])
    for k, b in enumerate(batches):
        if set(b) != keys:
            raise ValueError(f"member {k}'s batch has keys {sorted(b)}, member 0's {sorted(keys)}")
        if b["x"].shape[0] != batches[0]["x"].shape[0]:
            raise ValueError(f"member {k}'s batch has {b['x'].shape[0]} items, member 0's {batches[0]['x'].shape[0]}")
    steps = [int(b["x"].shape[1]) for b in batches]
    longest = max(steps)
    if length is not None:
        if length < longest:
            raise ValueError(f"stack_batches: length {length} is shorter than the longest member ({longest} steps)")
        longest = length
    padded = set(time_keys(batches)) if min(steps) < longest else set()
    out: Batch = {}
    for key in batches[0]:
        values = [b[key] for b in batches]
        if key in padded:
            first = values[0]
            stacked = first.new_zeros(len(values), first.shape[0], longest, *first.shape[2:])  # zeros / False
            for k, v in enumerate(values):
                stacked[k, :, : v.shape[1]] = v
            out[key] = stacked
        else:
            out[key] = torch.stack(values)
    out["steps"] = torch.tensor(steps, dtype=torch.int64, device=batches[0]["x"].device)
    return out


def longest_first(items: list[Any], length: Callable[[Any], int]) -> list[Any]:
    """A batch's items longest first (stable): the order a task's `collate` gives them in, so that the
    recurrent loops can drop each sequence at its own end (rnnbench/cells: run's lengths). The order
    inside a batch changes no member's numbers beyond float rounding (its sums' order)."""
    return sorted(items, key=length, reverse=True)


def member_sums(rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(K,) sums of packed per-row values: rows (N,) hold member 0's counts[0] values, then member 1's,
    ... (the order of `Task.packed_rows`)."""
    member = torch.repeat_interleave(torch.arange(len(counts), device=rows.device), counts.to(rows.device))
    return rows.new_zeros(len(counts)).index_add_(0, member, rows)


def broadcast_batch(batch: Batch, K: int) -> Batch:
    """One batch shared by K members (evaluation): each tensor as a (K, ...) view (`expand`, no copy),
    and "steps" = T for every member."""
    out = {key: v.unsqueeze(0).expand(K, *v.shape) for key, v in batch.items() if key != "steps"}
    x = batch["x"]
    out["steps"] = torch.full((K,), x.shape[1], dtype=torch.int64, device=x.device)
    return out


def batch_pieces(batch: Batch, rows: int) -> Iterator[Batch]:
    """A stacked batch as consecutive pieces of at most `rows` items each (slices of dim 1 of every
    (K, B, ...) tensor; "steps" (K,) as it is): the same metric sums in pieces, where the whole batch's
    states would not fit in memory."""
    B = batch["x"].shape[1]
    for a in range(0, B, rows):
        yield {key: v if key == "steps" or not torch.is_tensor(v) else v[:, a : a + rows] for key, v in batch.items()}


def batch_steps(batch: Batch) -> torch.Tensor:
    """The stacked batch's (K,) steps, each member's own T; a clear error for an unstacked batch."""
    if "steps" not in batch:
        raise ValueError("batch has no 'steps': make it with stack_batches or broadcast_batch (stacked layout)")
    return batch["steps"]


def valid_steps(batch: Batch) -> torch.Tensor:
    """(K, T) bool: step t is within member k's own length (t < steps[k]), for tasks without a mask."""
    steps = batch_steps(batch)
    T = batch["x"].shape[2]
    return torch.arange(T, device=steps.device) < steps[:, None]


class TaskOptions(BaseModel):
    """Options of one task; each task subclasses this with its own fields (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    name: str


class Task:
    """Base class. Subclasses set `name`, `Options`, `primary_metric` and implement the methods.

    Layout. `datasets` and `collate` are per member: a Batch of (B, T, ...) tensors. Every method
    that takes `out` or `batch` works on the stacked layout of K >= 1 members: `out` is the head's
    output (K, B, T, output_size) and every batch tensor has a leading K (from `stack_batches` or
    `broadcast_batch`), with batch["steps"] (K,) int64 each member's own T; steps at t >= steps[k]
    are padding and count for nothing. They return per-member tensors: loss (K,), metric sums
    {name: (sum (K,), count (K,))}, time_steps (K,) int64, all computed without a loop over members,
    and member k's numbers are those of its own batch alone (K = 1): neither K nor the batch-mates
    nor the padding change them.

    Metrics are returned as (sum, count) pairs so a split's value is sum over batches / count over
    batches: every counted element weighs the same however the split is batched (the BL 2012
    per-time-step convention, and no averaging over padding).
    """

    name: ClassVar[str]
    Options: ClassVar[type[TaskOptions]]
    primary_metric: ClassVar[str]  # minimised; early stopping watches val_<primary_metric>
    seeded_data: ClassVar[bool] = False  # True: the data are drawn from the run's seed (members' data differ)
    # Whether an output may see the whole input (model.bidirectional). None: the outputs predict each
    # step from the steps before it (next-step prediction), so a bidirectional model is refused.
    # "per_step": every step's output is read; the backward layers' outputs are put back in the
    # input's order (step t sees x_t..x_L backwards). "last_step": only each sequence's output at its
    # last step is read; there the backward layers give their state after reading the whole sequence.
    bidirectional_outputs: ClassVar[Literal["per_step", "last_step"] | None] = None

    # A least-squares readout (train.readout=ridge, an echo-state network): how the head's output
    # becomes the task's prediction. None: the task has no such readout (its loss is not a regression
    # of the head's output on a target, e.g. the music NLL). "identity": the output is the prediction
    # (MSE); "softmax": the output regresses a one-hot target and is read as logits after a scale
    # chosen on validation. With either, the task implements `readout_targets`.
    ridge_readout: ClassVar[Literal["identity", "softmax"] | None] = None

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
        """One member's batch (B, T, ...) from dataset items."""
        raise NotImplementedError

    def stack_batches(self, batches: list[Batch], length: int | None = None) -> Batch:
        """K members' batches as one stacked Batch (base.stack_batches); override if the layout needs it."""
        return stack_batches(batches, length)

    def broadcast_batch(self, batch: Batch, K: int) -> Batch:
        """One batch shared by K members (base.broadcast_batch); override if the layout needs it."""
        return broadcast_batch(batch, K)

    def loss(self, out: torch.Tensor, batch: Batch) -> torch.Tensor:
        """(K,) training loss of each member from the head's output (K, B, T, output_size)."""
        raise NotImplementedError

    def metric_sums(self, out: torch.Tensor, batch: Batch) -> MetricSums:
        """name -> (sum (K,), count (K,)) over each member's valid elements; must include primary_metric."""
        raise NotImplementedError

    def loss_and_sums(self, out: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, MetricSums]:
        """The (K,) training loss and the (detached) metric sums of one training batch, as `loss` and
        `metric_sums` give them. Tasks whose loss is one of their metrics override it to compute that
        once (the music and speech NLLs are most of a Chung-size model's output-side cost)."""
        return self.loss(out, batch), self.metric_sums(out.detach(), batch)

    def packed_rows(self, batch: Batch) -> torch.Tensor | None:
        """(K, B, T) bool: the only head outputs the loss and the metrics read, for a task that can score
        them packed (`packed_loss_and_sums`): the population then runs its output layer and the loss on
        those rows alone. None (the default): the task scores the whole padded output."""
        return None

    def packed_loss_and_sums(self, out: torch.Tensor, batch: Batch, counts: torch.Tensor) -> tuple[torch.Tensor, MetricSums]:
        """`loss_and_sums` from the head's outputs at `packed_rows` only: out (N, output_size), its rows in
        (member, sequence, step) order; counts (K,) int64, each member's number of rows."""
        raise NotImplementedError(f"task {self.name} scores its whole padded output")

    def readout_targets(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """For a least-squares readout: which head outputs the loss reads, rows (K, B, T) bool, and the
        (K, B, T, output_size) float targets they regress on (one-hot classes for "softmax")."""
        raise NotImplementedError(f"task {self.name} has no least-squares readout")

    def baselines(self, split: str) -> dict[str, float]:
        """Reference values for `split` ('train'/'val'/'test'), logged as `<split>_<key>` beside the metrics.

        E.g. copy: {'ce_baseline': 10 ln 8 / (T + 20)}; music: {'nll_marginal': ..., 'nll_markov': ...}.
        """
        return {}

    def describe(self) -> dict[str, str]:
        """Facts that qualify every result of this task (e.g. frame layout), logged as params."""
        return {}

    def time_steps(self, batch: Batch) -> torch.Tensor:
        """(K,) int64: recurrent time steps processed per member, B * steps[k] (for steps-per-second)."""
        return batch["x"].shape[1] * batch_steps(batch)
