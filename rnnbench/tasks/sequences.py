"""Your own sequences: `task: {name: sequences, path: my.npz}`.

The file is a NumPy .npz (`numpy.savez`; nothing pickled: object arrays are refused) with

  data     (N, F) or (N,): every step of every sequence, the sequences one after another
  lengths  (S,) integers >= 1 summing to N: the sequences' lengths, in order
  split    optional (S,) integers 0 / 1 / 2: train / val / test; without it a reproducible split by
           `split_seed` (80 / 10 / 10 per cent of the sequences, at least one each)
  labels   optional (S,) integers >= 0: one class per sequence

and `target` says what is predicted (auto: inferred from the file, and recorded as the param
`task.target_kind`):

  binary       0/1 features (e.g. piano rolls): the next step, one Bernoulli per feature;
               metric nll = nats per step summed over features (as the music tasks)
  real         real features: the next step, a diagonal Gaussian (mean, log std per feature), on the
               scale where each feature has the train split's mean 0 and std 1; nll per step
  categorical  one integer token per step (F = 1, values 0..V-1, V = max + 1 over all splits):
               the next token, a softmax; nll = cross-entropy per step, in nats
  label        one class per sequence (`labels`): the model reads the whole sequence and its last
               step's output is a softmax over the classes; nll per sequence, and `acc`

auto picks label when there are labels, else binary when every value is 0 or 1, else categorical
for integers in one column, else real. Next-step targets read x_t = s_{t-1} (zeros before the first
step) and predict y_t = s_t, so every step is predicted from its past only.

References, fitted on train and scored on the split with the metric's own code: binary per-feature
`marginal` and first-order `markov` (as the music tasks); real `gaussian` (per feature, no memory)
and `linear` (least squares s_t from [s_{t-1}, 1], Gaussian residual); categorical `marginal`
(unigram) and `markov` (bigram), both add-one smoothed; label `majority` (the train split's class
frequencies).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch.utils.data import Dataset

from rnnbench.errors import RnnbenchError
from rnnbench.tasks import register_task
from rnnbench.tasks.base import Batch, MetricSums, Task, TaskOptions, longest_first
from rnnbench.tasks.polyphonic import bernoulli_step_nll

Kind = Literal["binary", "real", "categorical", "label"]
LOG_STD_MIN, LOG_STD_MAX = -7.0, 5.0  # the Gaussian's log std, on the standardised scale
SPLITS = ("train", "val", "test")


class SequencesOptions(TaskOptions):
    name: str = "sequences"
    path: str = Field(..., description="the .npz file (see rnnbench/tasks/sequences.py for its arrays)")
    target: Literal["auto", "binary", "real", "categorical", "label"] = "auto"
    split_seed: int = Field(0, ge=0, description="shuffles the sequences into train/val/test when the file has no `split`")


def _fail(path: str | Path, problem: str) -> RnnbenchError:
    return RnnbenchError(f"{path}: {problem}")


def read_sequences(path: str | Path, split_seed: int = 0) -> dict[str, object]:
    """The file's sequences by split, checked: {'train'|'val'|'test': [(T, F) arrays], 'labels': {...} or
    None, 'integer': bool}. Any problem is one RnnbenchError naming the file and what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise _fail(path, "no such file")
    import zipfile

    if not zipfile.is_zipfile(p):
        raise _fail(path, "not a readable .npz (an .npz is a zip of .npy arrays, as numpy.savez writes)")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError:
        raise _fail(path, "holds pickled objects (e.g. a ragged object array), which are not read: save plain "
                          "arrays (data, lengths) with numpy.savez") from None
    except Exception as e:  # noqa: BLE001 - not a zip, truncated, ...
        raise _fail(path, f"not a readable .npz ({type(e).__name__}: {e})") from None
    for key in ("data", "lengths"):
        if key not in arrays:
            raise _fail(path, f"missing the array {key!r} (it has {', '.join(sorted(arrays)) or 'none'})")
    data, lengths = arrays["data"], arrays["lengths"]
    if data.ndim == 1:
        data = data[:, None]
    if data.ndim != 2 or data.shape[0] == 0 or data.shape[1] == 0:
        raise _fail(path, f"data must be (N, F) with N, F >= 1, got shape {arrays['data'].shape}")
    if not (np.issubdtype(data.dtype, np.number) or data.dtype == bool):
        raise _fail(path, f"data must be numbers, got dtype {data.dtype}")
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        bad = int(np.argwhere(~np.isfinite(data))[0][0])
        raise _fail(path, f"data holds NaN or inf (first at step {bad})")
    if lengths.ndim != 1 or not np.issubdtype(lengths.dtype, np.integer) or len(lengths) == 0 or (lengths < 1).any():
        raise _fail(path, "lengths must be a 1-D array of integers >= 1")
    if int(lengths.sum()) != len(data):
        raise _fail(path, f"lengths sum to {int(lengths.sum())} but data has {len(data)} steps")
    S = len(lengths)
    for key in ("split", "labels"):
        if key in arrays and (arrays[key].shape != (S,) or not np.issubdtype(arrays[key].dtype, np.integer)):
            raise _fail(path, f"{key} must hold one integer per sequence ({S}), got shape {arrays[key].shape} "
                              f"dtype {arrays[key].dtype}")
    if "split" in arrays:
        split = arrays["split"]
        if not np.isin(split, (0, 1, 2)).all():
            raise _fail(path, "split values must be 0 (train), 1 (val) or 2 (test)")
    else:
        if S < 3:
            raise _fail(path, f"{S} sequence(s): at least 3 are needed to split them into train, val and test")
        order = np.random.default_rng(split_seed).permutation(S)
        n_val = n_test = max(1, round(0.1 * S))
        split = np.zeros(S, dtype=np.int64)
        split[order[:n_val]], split[order[n_val : n_val + n_test]] = 1, 2
    labels = arrays.get("labels")
    if labels is not None and (labels < 0).any():
        raise _fail(path, "labels must be >= 0")
    seqs = np.split(data, np.cumsum(lengths)[:-1])
    out: dict[str, object] = {"integer": bool(np.issubdtype(data.dtype, np.integer) or data.dtype == bool),
                              "labels": None if labels is None else {}}
    for code, name in enumerate(SPLITS):
        idx = np.flatnonzero(split == code)
        if len(idx) == 0:
            raise _fail(path, f"the {name} split is empty")
        out[name] = [seqs[i] for i in idx]
        if labels is not None:
            out["labels"][name] = labels[idx]  # type: ignore[index]
    return out


def infer_kind(target: str, seqs: dict[str, object]) -> Kind:
    if target != "auto":
        return target  # type: ignore[return-value]
    if seqs["labels"] is not None:
        return "label"
    values = np.concatenate([np.unique(s) for split in SPLITS for s in seqs[split]])  # type: ignore[union-attr]
    if np.isin(values, (0, 1)).all():
        return "binary"
    if seqs["integer"] and seqs["train"][0].shape[1] == 1 and (values >= 0).all():  # type: ignore[index]
        return "categorical"
    return "real"


def label_nll(out: torch.Tensor, y: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Many-to-one: the cross-entropy of each sequence's label at its own last step. out (K, B, T, C),
    y (K, B) classes, lengths (K, B) -> (K,) summed CE, (K,) number of sequences, (K,) correct labels."""
    last = (lengths - 1).clamp(min=0)
    logits = torch.gather(out, 2, last[..., None, None].expand(*last.shape, 1, out.shape[-1])).squeeze(2)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none").view(y.shape)
    hits = (logits.argmax(-1) == y).sum(1).to(out.dtype)
    return ce.sum(1), torch.full_like(ce.sum(1), float(y.shape[1])), hits


class _Items(Dataset):
    def __init__(self, seqs: list[torch.Tensor], labels: np.ndarray | None) -> None:
        self.seqs, self.labels = seqs, labels

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.seqs[i], -1 if self.labels is None else int(self.labels[i])


@register_task
class SequencesTask(Task):
    """The user's sequences (module docstring). Batch: x (B, T, D), y (B, T, ...) or (B,) for labels,
    mask (B, T) bool, lengths (B,)."""

    name = "sequences"
    Options = SequencesOptions
    primary_metric = "nll"

    def __init__(self, options: SequencesOptions, seed: int) -> None:
        super().__init__(options, seed)
        self.options: SequencesOptions = options
        raw = read_sequences(options.path, options.split_seed)
        self.kind: Kind = infer_kind(options.target, raw)
        self._raw = raw
        first = raw["train"][0]  # type: ignore[index]
        self.features = first.shape[1]
        if self.kind == "categorical":
            if self.features != 1:
                raise _fail(options.path, f"categorical targets need one token per step (F = 1), got F = {self.features}")
            self.vocab = 1 + int(max(s.max() for split in SPLITS for s in raw[split]))  # type: ignore[union-attr]
            self.input_size = self.output_size = self.vocab
        elif self.kind == "label":
            if raw["labels"] is None:
                raise _fail(options.path, "target label needs the array 'labels'")
            self.classes = 1 + int(max(v.max() for v in raw["labels"].values()))  # type: ignore[union-attr]
            self.input_size, self.output_size = self.features, self.classes
            self.bidirectional_outputs = "last_step"  # one label per sequence: the model may read all of it
        else:
            self.input_size = self.features
            self.output_size = self.features if self.kind == "binary" else 2 * self.features
        train = np.concatenate(raw["train"]).astype(np.float64)  # type: ignore[arg-type]
        scale = self.kind in ("real", "label") and not (self.kind == "label" and np.isin(train, (0, 1)).all())
        self.mean = train.mean(0) if scale else np.zeros(self.features)
        self.std = np.where(train.std(0) > 0, train.std(0), 1.0) if scale else np.ones(self.features)
        self._baselines: dict[str, dict[str, float]] = {}

    @classmethod
    def check_data(cls, options: TaskOptions) -> None:
        read_sequences(options.path, getattr(options, "split_seed", 0))  # type: ignore[attr-defined]

    def describe(self) -> dict[str, str]:
        """Recorded as task.* params: what was inferred, and the file's SHA-256 (a run's data, not just its path)."""
        import hashlib

        return {"target_kind": self.kind, "features": str(self.features),
                "sequences": "/".join(str(len(self._raw[s])) for s in SPLITS),  # type: ignore[arg-type]
                "sha256": hashlib.sha256(Path(self.options.path).read_bytes()).hexdigest()}

    # --- data -------------------------------------------------------------------------------------
    def _values(self, s: np.ndarray) -> torch.Tensor:
        if self.kind == "categorical":
            return torch.from_numpy(s[:, 0].astype(np.int64))
        return torch.from_numpy(((s.astype(np.float64) - self.mean) / self.std).astype(np.float32))

    def datasets(self) -> dict[str, Dataset]:
        labels = self._raw["labels"]
        return {s: _Items([self._values(q) for q in self._raw[s]], None if labels is None else labels[s])  # type: ignore[index, union-attr]
                for s in SPLITS}

    def collate(self, items: list[tuple[torch.Tensor, int]]) -> Batch:
        items = longest_first(items, lambda item: len(item[0]))
        lengths = torch.tensor([len(s) for s, _ in items])
        B, T = len(items), int(lengths.max())
        mask = torch.arange(T)[None, :] < lengths[:, None]
        if self.kind == "label":
            x = torch.zeros(B, T, self.features)
            for b, (s, _) in enumerate(items):
                x[b, : len(s)] = s
            return {"x": x, "y": torch.tensor([lab for _, lab in items]), "mask": mask, "lengths": lengths}
        if self.kind == "categorical":
            y = torch.zeros(B, T, dtype=torch.long)
            x = torch.zeros(B, T, self.vocab)
            for b, (s, _) in enumerate(items):
                y[b, : len(s)] = s
                x[b, 1 : len(s)] = F.one_hot(s[:-1], self.vocab).float()
            return {"x": x, "y": y, "mask": mask, "lengths": lengths}
        x, y = torch.zeros(B, T, self.features), torch.zeros(B, T, self.features)
        for b, (s, _) in enumerate(items):
            y[b, : len(s)] = s
            x[b, 1 : len(s)] = s[:-1]
        return {"x": x, "y": y, "mask": mask, "lengths": lengths}

    # --- the metric -----------------------------------------------------------------------------------
    def member_nll(self, out: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(K,) NLL summed over each member's predictions, (K,) their count, and (K,) correct labels (label only)."""
        mask, y = batch["mask"], batch["y"]
        zero = torch.zeros((), dtype=out.dtype, device=out.device)
        if self.kind == "binary":
            step = bernoulli_step_nll(out, y, mask)
        elif self.kind == "real":
            Fd = self.features
            mu, log_std = out[..., :Fd], out[..., Fd:].clamp(LOG_STD_MIN, LOG_STD_MAX)
            z = (y.to(out.dtype) - mu) * torch.exp(-log_std)
            step = torch.where(mask, (0.5 * z * z + log_std + 0.5 * math.log(2 * math.pi)).sum(-1), zero)
        elif self.kind == "categorical":
            K, B, T, V = out.shape
            ce = F.cross_entropy(out.reshape(-1, V), y.reshape(-1), reduction="none").view(K, B, T)
            step = torch.where(mask, ce, zero)
        else:  # label: the output at each sequence's own last step
            return label_nll(out, y, batch["lengths"])
        return step.sum((1, 2)), mask.sum((1, 2)).to(out.dtype), None

    def loss(self, out: torch.Tensor, batch: Batch) -> torch.Tensor:
        nll, n, _ = self.member_nll(out, batch)
        return nll / n

    def metric_sums(self, out: torch.Tensor, batch: Batch) -> MetricSums:
        nll, n, hits = self.member_nll(out, batch)
        sums: MetricSums = {"nll": (nll, n)}
        if hits is not None:
            sums["acc"] = (hits, n)
        return sums

    def loss_and_sums(self, out: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, MetricSums]:
        nll, n, hits = self.member_nll(out, batch)
        sums: MetricSums = {"nll": (nll.detach(), n)}
        if hits is not None:
            sums["acc"] = (hits, n)
        return nll / n, sums

    # --- references --------------------------------------------------------------------------------
    def baselines(self, split: str) -> dict[str, float]:
        if split not in self._baselines:
            train = [self._values(s).numpy() for s in self._raw["train"]]  # type: ignore[union-attr]
            evals = [self._values(s).numpy() for s in self._raw[split]]  # type: ignore[index, union-attr]
            self._baselines[split] = getattr(self, f"_refs_{self.kind}")(train, evals, split)
        return dict(self._baselines[split])

    def _refs_binary(self, train: list[np.ndarray], evals: list[np.ndarray], split: str) -> dict[str, float]:
        from rnnbench.tasks.polyphonic import marginal_bernoulli_nll, markov_nll

        return {"nll_marginal": marginal_bernoulli_nll(train, evals, "zero"), "nll_markov": markov_nll(train, evals, "zero")}

    def _refs_real(self, train: list[np.ndarray], evals: list[np.ndarray], split: str) -> dict[str, float]:
        def nll(pred: np.ndarray, y: np.ndarray, std: np.ndarray) -> float:
            z = (y - pred) / std
            return float((0.5 * z * z + np.log(std) + 0.5 * math.log(2 * math.pi)).sum(1).mean())

        def pairs(seqs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
            prev = np.concatenate([np.vstack([np.zeros((1, s.shape[1])), s[:-1]]) for s in seqs]).astype(np.float64)
            return np.hstack([prev, np.ones((len(prev), 1))]), np.concatenate(seqs).astype(np.float64)

        xt, yt = pairs(train)
        w, *_ = np.linalg.lstsq(xt, yt, rcond=None)
        res_std = np.maximum((yt - xt @ w).std(0), math.exp(LOG_STD_MIN))
        xe, ye = pairs(evals)
        g_mean, g_std = yt.mean(0), np.maximum(yt.std(0), math.exp(LOG_STD_MIN))
        return {"nll_gaussian": nll(np.broadcast_to(g_mean, ye.shape), ye, g_std), "nll_linear": nll(xe @ w, ye, res_std)}

    def _refs_categorical(self, train: list[np.ndarray], evals: list[np.ndarray], split: str) -> dict[str, float]:
        V = self.vocab
        uni = np.ones(V)
        bi = np.ones((V + 1, V))  # row V: the first token of a sequence (no previous one)
        for s in train:
            np.add.at(uni, s, 1)
            np.add.at(bi, (np.concatenate([[V], s[:-1]]), s), 1)
        log_uni = np.log(uni / uni.sum())
        log_bi = np.log(bi / bi.sum(1, keepdims=True))
        n = sum(len(s) for s in evals)
        return {"nll_marginal": float(-sum(log_uni[s].sum() for s in evals) / n),
                "nll_markov": float(-sum(log_bi[np.concatenate([[V], s[:-1]]), s].sum() for s in evals) / n)}

    def _refs_label(self, train: list[np.ndarray], evals: list[np.ndarray], split: str) -> dict[str, float]:
        labels = self._raw["labels"]  # type: ignore[index]
        counts = np.bincount(labels["train"], minlength=self.classes) + 1.0  # type: ignore[index]
        log_p = np.log(counts / counts.sum())
        ev = labels[split]  # type: ignore[index]
        return {"nll_majority": float(-log_p[ev].mean()), "acc_majority": float((ev == counts.argmax()).mean())}
