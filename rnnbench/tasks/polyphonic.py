"""Polyphonic music: next-frame prediction on the four Boulanger-Lewandowski et al. 2012 corpora.

Chung et al. 2014 (§4.1, Table 2) model a piano roll frame by frame: at step t the network reads
frame t - 1 and outputs one logit per key for frame t, read as independent Bernoullis.

The metric is the BL 2012 / Chung Table 2 convention: the negative log-likelihood of a time step,
in nats, summed over keys, averaged over every predicted time step of the split (all steps of all
sequences flattened, so longer sequences weigh more; padding counts for nothing).

Two choices qualify every number and are stated by `describe()`:

* `layout`: `key88` uses the 88 piano keys (column j = MIDI 21 + j). `chung` reproduces the
  released code of Chung et al., which indexed inputs by MIDI pitch from 1 up to the highest pitch
  of the corpus (column j = MIDI 1 + j): 96 / 93 / 105 / 108 inputs for JSB / Nottingham /
  MuseData / Piano-midi. The extra columns below MIDI 21 are always off, so they add a small
  (learnable, near-zero) term to the NLL.
* `first_frame`: `zero` predicts frame 1 from a zero input (every frame of the split is
  predicted); `skip` uses frame 1 only as input (each sequence contributes T - 1 steps).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch.utils.data import Dataset

from rnnbench.cells import bernoulli_nll
from rnnbench.errors import RnnbenchError
from rnnbench.tasks import register_task
from rnnbench.tasks.base import Batch, MetricSums, Task, TaskOptions, longest_first, member_sums

FirstFrame = Literal["zero", "skip"]
KEY88_LOWEST_MIDI = 21  # column 0 of a key88 roll
SPLITS = {"train": "train", "val": "valid", "test": "test"}  # task split -> corpus split


class PolyphonicOptions(TaskOptions):
    name: str = "jsb"
    layout: Literal["key88", "chung"] = Field(
        "key88", description="key88: MIDI 21-108; chung: MIDI 1 up to the corpus's highest pitch (Chung's code)"
    )
    first_frame: FirstFrame = Field("zero", description="zero: predict frame 1 from a zero input; skip: don't")
    max_sequences: int | None = Field(None, ge=1, description="keep the first N sequences of each split")
    source: Literal["mat", "pickle"] = Field("mat", description="which staged file to read (pickle: JSB only)")


# --- the metric, shared by the model's outputs and the baselines ---------------------------------
def bernoulli_step_nll(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """NLL of each time step, nats, summed over keys; exactly 0 at padded steps.

    logits, targets: (..., T, D); mask: (..., T) bool. Padded steps are selected away with
    `torch.where`, so whatever the padding holds (even inf or NaN) cannot reach the sums.
    """
    nll = bernoulli_nll(logits, targets)  # binary_cross_entropy_with_logits summed over keys, fused on the CPU
    return torch.where(mask, nll, torch.zeros((), dtype=nll.dtype, device=nll.device))


def packed_targets(y: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The targets y (K, B, T, D) of the valid steps mask (K, B, T), as rows of a (N, D) view and the
    index of each valid step's row (in the order of y[mask]): targets.index_select(0, rows) is y[mask].
    A batch shared by all members (broadcast: y's member stride 0) is indexed in its one copy."""
    K, B, T, D = y.shape
    k, b, t = mask.nonzero(as_tuple=True)
    if y.stride(0) == 0:
        return y[0].reshape(B * T, D), b * T + t
    return y.reshape(K * B * T, D), (k * B + b) * T + t


def _rolls_nll(rolls: list[np.ndarray], logits: list[np.ndarray], first_frame: FirstFrame) -> float:
    """Mean NLL per predicted step of `rolls` under per-frame `logits` (same shapes), via the metric."""
    start = 1 if first_frame == "skip" else 0
    y = torch.from_numpy(np.concatenate([r[start:] for r in rolls]).astype(np.float64))
    z = torch.from_numpy(np.concatenate([q[start:] for q in logits]))
    if len(y) == 0:
        return float("nan")
    return float(bernoulli_step_nll(z, y, torch.ones(len(y), dtype=torch.bool)).sum() / len(y))


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p) - np.log1p(-p)


def _marginal_logit(train_rolls: list[np.ndarray]) -> np.ndarray:
    """Per-key log-odds of 'on' over all train frames, Laplace-smoothed: (n_on + 1) / (n + 2)."""
    frames = np.concatenate(train_rolls).astype(np.float64)
    return _logit((frames.sum(0) + 1.0) / (len(frames) + 2.0))


def marginal_bernoulli_nll(
    train_rolls: list[np.ndarray], eval_rolls: list[np.ndarray], first_frame: FirstFrame = "zero"
) -> float:
    """Mean NLL per predicted step of a per-key Bernoulli fitted on train (Laplace smoothing).

    A model with no memory at all; rolls are (T, D) 0/1 arrays in the same layout.
    """
    z = _marginal_logit(train_rolls)
    return _rolls_nll(eval_rolls, [np.broadcast_to(z, r.shape) for r in eval_rolls], first_frame)


def markov_nll(train_rolls: list[np.ndarray], eval_rolls: list[np.ndarray], first_frame: FirstFrame = "zero") -> float:
    """Mean NLL per predicted step of a per-key first-order Markov chain fitted on train.

    P(key on at t | same key on/off at t - 1), counted over within-sequence transitions and
    Laplace-smoothed; the first frame of a sequence (scored only when first_frame='zero') uses
    the smoothed marginal.
    """
    n_on_after = np.zeros((2, train_rolls[0].shape[1]))  # [previous state, key]: transitions to 'on'
    n_after = np.zeros((2, train_rolls[0].shape[1]))  # [previous state, key]: all transitions
    for r in train_rolls:
        prev, cur = r[:-1].astype(bool), r[1:].astype(np.float64)
        for state, sel in ((0, ~prev), (1, prev)):
            n_on_after[state] += (cur * sel).sum(0)
            n_after[state] += sel.sum(0)
    z_trans = _logit((n_on_after + 1.0) / (n_after + 2.0))  # (2, D)
    z_first = _marginal_logit(train_rolls)
    logits = []
    for r in eval_rolls:
        z = np.empty(r.shape)
        z[0] = z_first
        prev = r[:-1].astype(bool)
        z[1:] = np.where(prev, z_trans[1], z_trans[0])
        logits.append(z)
    return _rolls_nll(eval_rolls, logits, first_frame)


# --- data -----------------------------------------------------------------------------------------
def to_layout(roll: np.ndarray, layout: Literal["key88", "chung"], chung_size: int) -> np.ndarray:
    """A key88 roll (T, 88) in the requested layout; chung: (T, chung_size), column j = MIDI 1 + j."""
    if layout == "key88":
        return roll
    # MIDI pitch p sits in key88 column p - 21 and in chung column p - 1.
    keep = chung_size - (KEY88_LOWEST_MIDI - 1)
    if roll[:, keep:].any():
        raise RnnbenchError(f"chung layout of size {chung_size} would drop notes above MIDI {chung_size}")
    out = np.zeros((roll.shape[0], chung_size), dtype=roll.dtype)
    out[:, KEY88_LOWEST_MIDI - 1 :] = roll[:, :keep]
    return out


class RollDataset(Dataset):
    """Piano rolls, one (T, D) uint8 tensor per item; `PolyphonicTask.collate` makes x/y/mask."""

    def __init__(self, rolls: list[np.ndarray]) -> None:
        self.rolls = [torch.tensor(r, dtype=torch.uint8) for r in rolls]  # a copy: the readers' arrays are read-only

    def __len__(self) -> int:
        return len(self.rolls)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.rolls[i]


class PolyphonicTask(Task):
    """Next-frame prediction of a piano roll with D independent Bernoullis (Chung et al. 2014 §4.1).

    A member's batch (`collate`): x (B, T, D) float, the previous frame (zeros before frame 1 when
    first_frame='zero'); y (B, T, D) float, the frame to predict; mask (B, T) bool; lengths (B,)
    predicted steps. Losses and sums take the stacked layout (leading K, see Task); the mask
    carries both the within-batch padding and the padding of stacking.
    Subclasses set only `name`, `corpus`, `chung_size` and `Options`.
    """

    corpus: ClassVar[str]  # name for rnnbench.datasets.load_polyphonic
    chung_size: ClassVar[int]  # highest MIDI pitch of the corpus = input size of Chung's code
    Options: ClassVar[type[PolyphonicOptions]] = PolyphonicOptions
    primary_metric = "nll"

    def __init__(self, options: PolyphonicOptions, seed: int) -> None:
        super().__init__(options, seed)
        self.options: PolyphonicOptions = options
        self.input_size = self.output_size = 88 if options.layout == "key88" else self.chung_size
        self._rolls: dict[str, list[np.ndarray]] | None = None
        self._baselines: dict[str, dict[str, float]] = {}

    @classmethod
    def check_data(cls, options: TaskOptions) -> None:
        """The corpus's files are present and match their SHA-256 (fetch: verified, or downloaded)."""
        from rnnbench.datasets import fetch
        from rnnbench.datasets.sources import get_source

        get_source(cls.corpus).file(getattr(options, "source", "mat"))  # e.g. only jsb has a pickle
        fetch(cls.corpus)

    def rolls(self) -> dict[str, list[np.ndarray]]:
        """{'train','val','test'} -> the split's rolls in this task's layout (read once, cached)."""
        if self._rolls is None:
            from rnnbench.datasets import load_polyphonic

            o = self.options
            raw = load_polyphonic(self.corpus, source=o.source)
            self._rolls = {
                split: [to_layout(r, o.layout, self.chung_size) for r in raw[corpus_split][: o.max_sequences]]
                for split, corpus_split in SPLITS.items()
            }
        return self._rolls

    def datasets(self) -> dict[str, Dataset]:
        # Under 'skip' a one-frame sequence predicts nothing; drop it (no corpus has one).
        min_len = 2 if self.options.first_frame == "skip" else 1
        return {s: RollDataset([r for r in rolls if len(r) >= min_len]) for s, rolls in self.rolls().items()}

    def collate(self, items: list[torch.Tensor]) -> Batch:
        items = longest_first(items, len)
        skip = self.options.first_frame == "skip"
        lengths = torch.tensor([len(r) - skip for r in items])
        B, T, D = len(items), int(lengths.max()), items[0].shape[1]
        x = torch.zeros(B, T, D)
        y = torch.zeros(B, T, D)
        for b, r in enumerate(items):
            r = r.float()
            n = int(lengths[b])
            if skip:
                x[b, :n], y[b, :n] = r[:-1], r[1:]
            else:  # frame 1 is predicted from a zero input
                x[b, 1:n], y[b, :n] = r[:-1], r
        mask = torch.arange(T)[None, :] < lengths[:, None]
        return {"x": x, "y": y, "mask": mask, "lengths": lengths}

    def member_nll(self, out: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(K,) NLL summed over each member's valid steps and (K,) the number of those steps."""
        mask = batch["mask"]
        return bernoulli_step_nll(out, batch["y"], mask).sum((1, 2)), mask.sum((1, 2))

    def loss(self, out: torch.Tensor, batch: Batch) -> torch.Tensor:
        """(K,) mean NLL per valid step of each member's batch (the metric, per batch)."""
        nll, n = self.member_nll(out, batch)
        return nll / n

    def metric_sums(self, out: torch.Tensor, batch: Batch) -> MetricSums:
        nll, n = self.member_nll(out, batch)
        return {"nll": (nll, n.to(nll.dtype))}

    def loss_and_sums(self, out: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, MetricSums]:
        """`loss` and `metric_sums` from one NLL computation (the same numbers as calling both)."""
        nll, n = self.member_nll(out, batch)
        return nll / n, {"nll": (nll.detach(), n.to(nll.dtype))}

    def packed_rows(self, batch: Batch) -> torch.Tensor:
        return batch["mask"]

    def packed_loss_and_sums(self, out: torch.Tensor, batch: Batch, counts: torch.Tensor) -> tuple[torch.Tensor, MetricSums]:
        """The NLL of `loss_and_sums` over the valid steps only (out: their logits, packed)."""
        targets, rows = packed_targets(batch["y"], batch["mask"])
        nll_rows = bernoulli_nll(out, targets, target_rows=rows)  # y[mask] without gathering it
        nll = member_sums(nll_rows, counts)
        n = counts.to(out.device, nll.dtype)
        return nll / n, {"nll": (nll.detach(), n)}

    def baselines(self, split: str) -> dict[str, float]:
        """nll_marginal and nll_markov: fitted on this task's train split, scored on `split`."""
        if split not in self._baselines:
            rolls, ff = self.rolls(), self.options.first_frame
            self._baselines[split] = {
                "nll_marginal": marginal_bernoulli_nll(rolls["train"], rolls[split], ff),
                "nll_markov": markov_nll(rolls["train"], rolls[split], ff),
            }
        return dict(self._baselines[split])

    def describe(self) -> dict[str, str]:
        o = self.options
        return {"layout": o.layout, "first_frame": o.first_frame, "input_size": str(self.input_size)}


# --- the four corpora -----------------------------------------------------------------------------
class JSBOptions(PolyphonicOptions):
    name: str = "jsb"


class NottinghamOptions(PolyphonicOptions):
    name: str = "nottingham"


class MuseDataOptions(PolyphonicOptions):
    name: str = "musedata"


class PianoMidiOptions(PolyphonicOptions):
    name: str = "pianomidi"


@register_task
class JSBTask(PolyphonicTask):
    """JSB Chorales (quarter-note frames)."""

    name = corpus = "jsb"
    chung_size = 96
    Options = JSBOptions


@register_task
class NottinghamTask(PolyphonicTask):
    """Nottingham folk tunes (eighth-note frames)."""

    name = corpus = "nottingham"
    chung_size = 93
    Options = NottinghamOptions


@register_task
class MuseDataTask(PolyphonicTask):
    """MuseData classical pieces (eighth-note frames)."""

    name = corpus = "musedata"
    chung_size = 105
    Options = MuseDataOptions


@register_task
class PianoMidiTask(PolyphonicTask):
    """Piano-midi.de classical piano (eighth-note frames)."""

    name = corpus = "pianomidi"
    chung_size = 108
    Options = PianoMidiOptions
