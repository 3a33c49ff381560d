"""Copy memory task (Arjovsky, Shah & Bengio 2016).

Alphabet of 10: symbols 0..7 are data, 8 is blank, 9 is the delimiter. Input length T + 20:
10 symbols drawn uniformly from 0..7, T - 1 blanks, the delimiter, 10 blanks. Target: T + 10
blanks, then the 10 symbols. Loss: mean cross-entropy over all T + 20 steps. A memoryless model
that outputs blank, then uniform over 0..7 on the recall steps, scores 10 ln 8 / (T + 20).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch.utils.data import TensorDataset

from rnnbench.tasks import register_task
from rnnbench.tasks.base import Batch, MetricSums, Task, TaskOptions, batch_steps, valid_steps

N_DATA, BLANK, DELIM, N_SYMBOLS, N_RECALL = 8, 8, 9, 10, 10


class CopyOptions(TaskOptions):
    name: str = "copy"
    seq_len: int = Field(100, ge=1, description="T: the delay between the last symbol and the delimiter + 1")
    n_train: int = Field(10_000, ge=1)
    n_val: int = Field(1_000, ge=1)
    n_test: int = Field(1_000, ge=1)


def make_copy(n: int, seq_len: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) as integer symbols, each (n, seq_len + 20)."""
    length = seq_len + 2 * N_RECALL
    symbols = torch.randint(0, N_DATA, (n, N_RECALL), generator=generator)
    x = torch.full((n, length), BLANK, dtype=torch.long)
    x[:, :N_RECALL] = symbols
    x[:, N_RECALL + seq_len - 1] = DELIM
    y = torch.full((n, length), BLANK, dtype=torch.long)
    y[:, -N_RECALL:] = symbols
    return x, y


@register_task
class CopyTask(Task):
    name = "copy"
    Options = CopyOptions
    primary_metric = "ce"
    seeded_data = True  # datasets() draws every split from the seed
    input_size = N_SYMBOLS
    output_size = N_SYMBOLS
    bidirectional_outputs = "per_step"  # the inputs hold no target
    ridge_readout = "softmax"

    def datasets(self) -> dict[str, TensorDataset]:
        o = self.options
        out = {}
        # A separate stream per split, all derived from the run's seed: same seed, same data.
        for offset, (split, n) in enumerate([("train", o.n_train), ("val", o.n_val), ("test", o.n_test)]):
            g = torch.Generator().manual_seed(self.seed * 1000 + offset)
            out[split] = TensorDataset(*make_copy(n, o.seq_len, g))
        return out

    def collate(self, items: list) -> Batch:
        x = torch.stack([i[0] for i in items])
        y = torch.stack([i[1] for i in items])
        # One-hot at batch time: storing one-hot data for T = 1000 would cost gigabytes.
        return {"x": F.one_hot(x, N_SYMBOLS).float(), "y": y}

    def member_ce(self, out: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(K,) cross-entropy summed over each member's T + 20 steps of all B sequences, and (K,) B * steps[k].

        Steps past a member's own length (padding of stacking; none when all members share seq_len)
        are selected away.
        """
        y = batch["y"]
        K, B, T = y.shape
        ce = F.cross_entropy(out.reshape(-1, N_SYMBOLS), y.reshape(-1), reduction="none").reshape(K, B, T)
        valid = valid_steps(batch)[:, None, :]
        total = torch.where(valid, ce, torch.zeros((), dtype=ce.dtype, device=ce.device)).sum((1, 2))
        return total, (B * batch_steps(batch)).to(ce.dtype)

    def readout_targets(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Every step within a member's length regresses the one-hot of its target symbol."""
        y = batch["y"]
        K, B, T = y.shape
        return valid_steps(batch)[:, None, :].expand(K, B, T), F.one_hot(y, N_SYMBOLS).to(batch["x"].dtype)

    def loss(self, out: torch.Tensor, batch: Batch) -> torch.Tensor:
        """(K,) mean cross-entropy over all T + 20 steps of each member's batch."""
        total, n_steps = self.member_ce(out, batch)
        return total / n_steps

    def metric_sums(self, out: torch.Tensor, batch: Batch) -> MetricSums:
        ce, n_steps = self.member_ce(out, batch)
        return self.sums_from_ce(out.detach(), batch, ce, n_steps)

    def loss_and_sums(self, out: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, MetricSums]:
        """`loss` and `metric_sums` from one cross-entropy computation (the same numbers as calling both)."""
        ce, n_steps = self.member_ce(out, batch)
        return ce / n_steps, self.sums_from_ce(out.detach(), batch, ce.detach(), n_steps)

    def sums_from_ce(self, out: torch.Tensor, batch: Batch, ce: torch.Tensor, n_steps: torch.Tensor) -> MetricSums:
        """The metric sums, given member_ce's (K,) sums and counts."""
        y = batch["y"]
        K, B, T = y.shape
        # The recall steps are the last N_RECALL of each member's own sequence.
        t = torch.arange(T, device=y.device)
        steps = batch_steps(batch)[:, None]
        recall = ((t >= steps - N_RECALL) & (t < steps))[:, None, :]  # (K, 1, T)
        hits = ((out.argmax(-1) == y) & recall).sum((1, 2)).to(ce.dtype)
        n_recall = torch.full((K,), float(B * N_RECALL), dtype=ce.dtype, device=ce.device)
        return {"ce": (ce, n_steps), "recall_acc": (hits, n_recall)}

    def baselines(self, split: str) -> dict[str, float]:
        return {"ce_baseline": copy_baseline(self.options.seq_len), "recall_acc_baseline": 1 / N_DATA}


def copy_baseline(seq_len: int) -> float:
    """Memoryless cross-entropy 10 ln 8 / (T + 20)."""
    return N_RECALL * math.log(N_DATA) / (seq_len + 2 * N_RECALL)
