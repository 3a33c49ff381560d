"""Spoken-digit classification on FSDD: a many-to-one task (the model reads a whole utterance, its last
step's output is a softmax over the ten digits).

Input: the raw waveform (int16 / 32768, z-scored with the train split's mean and std) cut into
non-overlapping frames of `frame` samples (80 = 10 ms at 8 kHz), one frame per step; a tail shorter
than a frame is dropped. Raw frames rather than log-mel features: the task then needs no audio
library (torchaudio's wheels are tied to one torch build; librosa pulls numba), and a recurrent
model has to find the spectral structure itself, which is what the cells are compared on.

Metrics: `nll` (cross-entropy per utterance, nats; minimised) and `acc`. References, fitted on train:
`majority` (the train class frequencies: FSDD is balanced, so ln 10 and 0.1) and `linear`, a
multinomial logistic regression (scikit-learn, L2, C = 1) on each utterance's log mean magnitude
spectrum (the frames' |rFFT| averaged over time): what a linear model gets from the average
spectrum alone, without any order in time.

Splits as the speech task (rnnbench/tasks/speech.py): official (index 0-4 test, 5-9 val, the rest
train) or by speaker.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch.utils.data import Dataset

from rnnbench.errors import RnnbenchError
from rnnbench.tasks import register_task
from rnnbench.tasks.base import Batch, MetricSums, Task, TaskOptions, longest_first
from rnnbench.tasks.sequences import label_nll
from rnnbench.tasks.speech import FSDD_SPEAKERS, split_recordings, standardize, waveform

N_DIGITS = 10


class DigitsOptions(TaskOptions):
    name: str = "fsdd_digits"
    frame: int = Field(80, ge=1, description="samples per step (80 = 10 ms at 8 kHz)")
    max_seconds: float | None = Field(None, gt=0, description="crop each utterance to its first S seconds")
    max_recordings: int | None = Field(None, ge=1, description="keep N recordings of each split, every digit and speaker in turn")
    split: Literal["official", "speaker"] = "official"
    test_speaker: str = Field("theo", description="held-out test speaker when split='speaker'")
    val_speaker: str = Field("lucas", description="held-out validation speaker when split='speaker'")

    @model_validator(mode="after")
    def _check(self) -> DigitsOptions:
        for key in ("test_speaker", "val_speaker"):
            if getattr(self, key) not in FSDD_SPEAKERS:
                raise ValueError(f"{key} must be one of {', '.join(FSDD_SPEAKERS)}")
        if self.split == "speaker" and self.test_speaker == self.val_speaker:
            raise ValueError("test_speaker and val_speaker must differ")
        return self


class _Utterances(Dataset):
    def __init__(self, frames: list[torch.Tensor], labels: list[int]) -> None:
        self.frames, self.labels = frames, labels

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.frames[i], self.labels[i]


@register_task
class DigitsTask(Task):
    """FSDD spoken digits, one label per utterance (module docstring). Batch: x (B, T, frame), y (B,),
    mask (B, T), lengths (B,)."""

    name = "fsdd_digits"
    bidirectional_outputs = "last_step"  # one label per utterance, read at its last frame
    ridge_readout = "softmax"
    Options = DigitsOptions
    primary_metric = "nll"

    def __init__(self, options: DigitsOptions, seed: int) -> None:
        super().__init__(options, seed)
        self.options: DigitsOptions = options
        self.input_size, self.output_size = options.frame, N_DIGITS
        self._data: dict[str, _Utterances] | None = None
        self._baselines: dict[str, dict[str, float]] = {}
        self._linear: Any = None  # the logistic-regression reference, fitted on train once

    @classmethod
    def check_data(cls, options: TaskOptions) -> None:
        from rnnbench.datasets import fetch

        fetch("fsdd")

    def datasets(self) -> dict[str, Dataset]:
        if self._data is None:
            from rnnbench.datasets import load_fsdd

            o = self.options
            splits = split_recordings(load_fsdd(), o.split, o.test_speaker, o.val_speaker)
            waves: dict[str, list[np.ndarray]] = {}
            labels: dict[str, list[int]] = {}
            for key, recs in splits.items():
                # by index first: the first N recordings cover every digit and speaker
                recs = sorted(recs, key=lambda r: (r.index, r.speaker, r.digit))[: o.max_recordings]
                crop = None if o.max_seconds is None else int(round(o.max_seconds * recs[0].rate)) if recs else None
                kept = [(waveform(r, crop), r.digit) for r in recs]
                kept = [(w, d) for w, d in kept if len(w) >= o.frame]
                if not kept:
                    raise RnnbenchError(f"fsdd_digits: the {key} split has no utterance of at least {o.frame} samples")
                waves[key], labels[key] = [w for w, _ in kept], [d for _, d in kept]
            scaled, _, _ = standardize(waves)
            self._data = {key: _Utterances([self._frames(w) for w in ws], labels[key]) for key, ws in scaled.items()}
        return dict(self._data)

    def _frames(self, w: np.ndarray) -> torch.Tensor:
        n = len(w) // self.options.frame
        return torch.from_numpy(w[: n * self.options.frame].reshape(n, self.options.frame).astype(np.float32))

    def collate(self, items: list[tuple[torch.Tensor, int]]) -> Batch:
        items = longest_first(items, lambda item: len(item[0]))
        lengths = torch.tensor([len(f) for f, _ in items])
        B, T = len(items), int(lengths.max())
        x = torch.zeros(B, T, self.options.frame)
        for b, (f, _) in enumerate(items):
            x[b, : len(f)] = f
        mask = torch.arange(T)[None, :] < lengths[:, None]
        return {"x": x, "y": torch.tensor([d for _, d in items]), "mask": mask, "lengths": lengths}

    def readout_targets(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The output at each utterance's last frame regresses the one-hot of its digit."""
        K, B, T = batch["x"].shape[:3]
        rows = torch.arange(T, device=batch["x"].device) == (batch["lengths"] - 1)[:, :, None]
        onehot = torch.nn.functional.one_hot(batch["y"], N_DIGITS).to(batch["x"].dtype)
        return rows, onehot[:, :, None, :].expand(K, B, T, N_DIGITS)

    def _sums(self, out: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, MetricSums]:
        nll, n, hits = label_nll(out, batch["y"], batch["lengths"])
        return nll / n, {"nll": (nll.detach(), n), "acc": (hits, n)}

    def loss(self, out: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self._sums(out, batch)[0]

    def metric_sums(self, out: torch.Tensor, batch: Batch) -> MetricSums:
        return self._sums(out, batch)[1]

    def loss_and_sums(self, out: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, MetricSums]:
        return self._sums(out, batch)

    def baselines(self, split: str) -> dict[str, float]:
        if split not in self._baselines:
            from sklearn.linear_model import LogisticRegression

            data = self.datasets()

            def features(ds: _Utterances) -> np.ndarray:
                return np.stack([np.log(np.abs(np.fft.rfft(f.numpy(), axis=1)).mean(0) + 1e-6) for f in ds.frames])

            train, ev = data["train"], data[split]
            if self._linear is None and len(set(train.labels)) >= 2:  # fitted once, on train, for every split
                self._linear = LogisticRegression(C=1.0, max_iter=2000).fit(features(train), train.labels)
            counts = np.bincount(train.labels, minlength=N_DIGITS) + 1.0
            log_p = np.log(counts / counts.sum())
            y_ev = np.asarray(ev.labels)
            if self._linear is None:  # a tiny subset with one class: no classifier to fit
                self._baselines[split] = {"nll_majority": float(-log_p[y_ev].mean()),
                                          "acc_majority": float((y_ev == counts.argmax()).mean())}
                return dict(self._baselines[split])
            model = self._linear
            proba = np.clip(model.predict_proba(features(ev)), 1e-12, 1.0)
            cols = {c: j for j, c in enumerate(model.classes_)}
            picked = np.array([proba[i, cols[c]] if c in cols else 1e-12 for i, c in enumerate(y_ev)])
            self._baselines[split] = {
                "nll_majority": float(-log_p[y_ev].mean()), "acc_majority": float((y_ev == counts.argmax()).mean()),
                "nll_linear": float(-np.log(picked).mean()), "acc_linear": float((model.predict(features(ev)) == y_ev).mean()),
            }
        return dict(self._baselines[split])

    def describe(self) -> dict[str, str]:
        o = self.options
        return {"frame": str(o.frame), "crop": f"{o.max_seconds} s" if o.max_seconds else "none",
                "split": o.split if o.split == "official" else f"speaker(test={o.test_speaker},val={o.val_speaker})"}
