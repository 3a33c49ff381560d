"""Adding problem (Hochreiter & Schmidhuber 1997; the form of Le et al. 2015 and Arjovsky et al. 2016).

Two input channels over T steps: values drawn from U(0, 1), and a marker channel with exactly two
ones, one uniform in each half. The target is the sum of the two marked values, read at the last
step; loss is the mean squared error. Always predicting 1 scores Var(a + b) = 1/6 ≈ 0.167.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch.utils.data import TensorDataset

from rnnbench.tasks import register_task
from rnnbench.tasks.base import Batch, MetricSums, Task, TaskOptions, batch_steps


class AddingOptions(TaskOptions):
    name: str = "adding"
    seq_len: int = Field(100, ge=2, description="T: sequence length")
    n_train: int = Field(10_000, ge=1)
    n_val: int = Field(1_000, ge=1)
    n_test: int = Field(1_000, ge=1)


def make_adding(n: int, seq_len: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs (n, T, 2), targets (n,))."""
    values = torch.rand(n, seq_len, generator=generator)
    half = seq_len // 2
    first = torch.randint(0, half, (n,), generator=generator)
    second = torch.randint(half, seq_len, (n,), generator=generator)
    markers = torch.zeros(n, seq_len)
    rows = torch.arange(n)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    target = values[rows, first] + values[rows, second]
    return torch.stack([values, markers], dim=-1), target


@register_task
class AddingTask(Task):
    name = "adding"
    Options = AddingOptions
    primary_metric = "mse"
    seeded_data = True  # datasets() draws every split from the seed
    input_size = 2
    output_size = 1
    bidirectional_outputs = "last_step"  # the inputs hold no target
    ridge_readout = "identity"

    def datasets(self) -> dict[str, TensorDataset]:
        o = self.options
        out = {}
        for offset, (split, n) in enumerate([("train", o.n_train), ("val", o.n_val), ("test", o.n_test)]):
            g = torch.Generator().manual_seed(self.seed * 1000 + offset)
            out[split] = TensorDataset(*make_adding(n, o.seq_len, g))
        return out

    def collate(self, items: list) -> Batch:
        return {"x": torch.stack([i[0] for i in items]), "y": torch.stack([i[1] for i in items])}

    def last_step_se(self, out: torch.Tensor, batch: Batch) -> torch.Tensor:
        """(K, B) squared error of the output at each member's own last step (steps[k] - 1)."""
        K = out.shape[0]
        last = batch_steps(batch) - 1
        prediction = out[torch.arange(K, device=out.device), :, last, 0]  # (K, B)
        return (prediction - batch["y"].to(out.dtype)) ** 2

    def readout_targets(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The output at each member's last step regresses the sum."""
        K, B, T = batch["x"].shape[:3]
        rows = (torch.arange(T, device=batch["x"].device) == batch_steps(batch)[:, None] - 1)[:, None, :].expand(K, B, T)
        targets = batch["y"].to(batch["x"].dtype)[:, :, None, None].expand(K, B, T, 1)
        return rows, targets

    def loss(self, out: torch.Tensor, batch: Batch) -> torch.Tensor:
        """(K,) mean squared error of each member's batch, read at the last step."""
        return self.last_step_se(out, batch).mean(1)

    def metric_sums(self, out: torch.Tensor, batch: Batch) -> MetricSums:
        se = self.last_step_se(out, batch)
        K, B = se.shape
        return {"mse": (se.sum(1), torch.full((K,), float(B), dtype=se.dtype, device=se.device))}

    def baselines(self, split: str) -> dict[str, float]:
        return {"mse_baseline": ADDING_BASELINE}


ADDING_BASELINE = 1 / 6  # MSE of always predicting 1: Var(U + U) = 2/12
