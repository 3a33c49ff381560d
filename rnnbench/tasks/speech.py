"""Raw speech: next-frame waveform modelling on the Free Spoken Digit Dataset, framed like Chung 2014.

Chung et al. 2014 (§4.1) modelled private Ubisoft waveforms: at each step the RNN reads 20
consecutive samples and predicts the next 10 with a mixture of 20 diagonal Gaussians. This task
does the same on FSDD (8 kHz, 16-bit, 3,000 spoken digits, 6 speakers): for a waveform s,

    x_t = s[10 t : 10 t + 20],    y_t = s[10 t + 20 : 10 t + 30],    t = 0 .. (len(s) - 20) // 10 - 1,

so steps advance by `frame_out` samples, the first `frame_in` samples are only input, and a tail
shorter than one output frame is dropped.

Scale: int16 samples are divided by 32768, then z-scored with the mean and standard deviation of
all samples of the TRAIN split (after cropping); val and test use the same two numbers.

Output layout, per step (K = n_components, F = frame_out): K mixture logits, then K*F means, then
K*F log standard deviations (component-major: [k, f] at k*F + f). Log std is clamped to
[LOG_STD_MIN, LOG_STD_MAX] on the z-scored scale.

Metric `nll`: the mixture's negative log-DENSITY of one output frame (10 samples) in nats, on the
z-scored scale, averaged over every predicted frame of the split (BL 2012 convention: flatten all
steps; padding counts for nothing). Being a density it can be negative, and it depends on the
scale: changing the normalisation shifts it by F * log(scale ratio). `nll_per_sample` = nll / F.
Chung's Table 2 speech numbers are on an unknown (private) scale and cannot be compared directly.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch.utils.data import Dataset

from rnnbench.errors import RnnbenchError
from rnnbench.tasks import register_task
from rnnbench.tasks.base import Batch, MetricSums, Task, TaskOptions, longest_first, member_sums

if TYPE_CHECKING:
    from rnnbench.datasets import Recording

# On the z-scored scale. FSDD's train std is 0.061 (of full scale), so one int16 step is 5e-4 there:
# the floor exp(-7) = 9e-4 keeps a density on quantised data from growing without bound.
LOG_STD_MIN, LOG_STD_MAX = -7.0, 3.0
INT16_SCALE = 32768.0
FSDD_SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
LOG_2PI = math.log(2 * math.pi)


class SpeechOptions(TaskOptions):
    name: str = "fsdd"
    frame_in: int = Field(20, ge=1, description="samples read per step (Chung: 20)")
    frame_out: int = Field(10, ge=1, description="samples predicted per step; also the hop (Chung: 10)")
    n_components: int = Field(20, ge=1, description="Gaussian mixture components (Chung: 20)")
    max_samples: int | None = Field(None, ge=1, description="crop each utterance to its first N samples")
    max_seconds: float | None = Field(None, gt=0, description="crop each utterance to its first S seconds")
    max_recordings: int | None = Field(None, ge=1, description="keep the first N recordings of each split")
    split: Literal["official", "speaker"] = Field(
        "official", description="official: index 0-4 test, 5-9 val, 10-49 train; speaker: hold out speakers"
    )
    test_speaker: str = Field("theo", description="held-out test speaker when split='speaker'")
    val_speaker: str = Field("lucas", description="held-out validation speaker when split='speaker'")

    @model_validator(mode="after")
    def _check(self) -> SpeechOptions:
        if self.max_samples is not None and self.max_seconds is not None:
            raise ValueError("give max_samples or max_seconds, not both")
        if self.max_samples is not None and self.max_samples < self.frame_in + self.frame_out:
            raise ValueError(f"max_samples must be at least frame_in + frame_out = {self.frame_in + self.frame_out}")
        for key in ("test_speaker", "val_speaker"):
            if getattr(self, key) not in FSDD_SPEAKERS:
                raise ValueError(f"{key} must be one of {', '.join(FSDD_SPEAKERS)}")
        if self.split == "speaker" and self.test_speaker == self.val_speaker:
            raise ValueError("test_speaker and val_speaker must differ")
        return self


# --- the metric ------------------------------------------------------------------------------------
def mog_step_nll(params: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, n_components: int) -> torch.Tensor:
    """Negative log-density (nats) of each output frame under a diagonal Gaussian mixture; 0 where padded.

    params: (..., T, K * (1 + 2F)) as [logits | means | log stds] (see module docstring);
    y: (..., T, F); mask: (..., T) bool. Log stds are clamped to [LOG_STD_MIN, LOG_STD_MAX].
    """
    K, F = n_components, y.shape[-1]
    if params.shape[-1] != K * (1 + 2 * F):
        want = K * (1 + 2 * F)
        raise ValueError(f"expected {want} outputs for {K} components of {F} samples, got {params.shape[-1]}")
    lead = params.shape[:-1]
    logits = params[..., :K]
    mu = params[..., K : K + K * F].reshape(*lead, K, F)
    log_std = params[..., K + K * F :].reshape(*lead, K, F).clamp(LOG_STD_MIN, LOG_STD_MAX)
    z = (y.to(params.dtype).unsqueeze(-2) - mu) * torch.exp(-log_std)
    log_comp = -0.5 * (z * z + LOG_2PI).sum(-1) - log_std.sum(-1)  # (..., T, K)
    log_p = torch.logsumexp(torch.log_softmax(logits, dim=-1) + log_comp, dim=-1)
    return torch.where(mask, -log_p, torch.zeros((), dtype=log_p.dtype, device=log_p.device))


def gaussian_params(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """A single Gaussian per step in mog_step_nll's layout (K = 1): mean, std (..., F) -> (..., 1 + 2F)."""
    mean, std = torch.broadcast_tensors(mean, std)
    return torch.cat([torch.zeros(*mean.shape[:-1], 1, dtype=mean.dtype), mean, torch.log(std)], dim=-1)


def fit_linear_predictor(frames: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares y ≈ [x, 1] @ W over (x, y) frame pairs, and the residual std of each output sample.

    Returns W (frame_in + 1, frame_out) and std (frame_out,), float64. The normal equations are
    accumulated pair by pair, so no design matrix of the whole split is built.
    """
    fi, fo = frames[0][0].shape[1], frames[0][1].shape[1]
    xtx = torch.zeros(fi + 1, fi + 1, dtype=torch.float64)
    xty = torch.zeros(fi + 1, fo, dtype=torch.float64)
    for x, y in frames:
        x1 = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
        xtx += x1.T @ x1
        xty += x1.T @ y.double()
    w = torch.linalg.solve(xtx, xty)
    sse, n = torch.zeros(fo, dtype=torch.float64), 0
    for x, y in frames:
        pred = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], dim=1) @ w
        sse += ((y.double() - pred) ** 2).sum(0)
        n += len(y)
    return w, (sse / n).sqrt()


def loudness(x: torch.Tensor) -> torch.Tensor:
    """Local loudness of each step: the RMS of the samples read, plus the density floor exp(LOG_STD_MIN)."""
    return x.double().pow(2).mean(1).sqrt() + math.exp(LOG_STD_MIN)


def loudness_scale(frames: list[tuple[torch.Tensor, torch.Tensor]], w: torch.Tensor) -> torch.Tensor:
    """c (frame_out,): the maximum-likelihood scale of residual std = c * loudness(x) for the linear
    predictor w over (x, y) pairs: c_f^2 = mean over steps of r_f^2 / loudness^2."""
    total, n = torch.zeros(w.shape[1], dtype=torch.float64), 0
    for x, y in frames:
        x1 = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
        r = y.double() - x1 @ w
        total += (r / loudness(x)[:, None]).pow(2).sum(0)
        n += len(y)
    return (total / max(n, 1)).sqrt()


# --- data -----------------------------------------------------------------------------------------
def frame_waveform(s: torch.Tensor, frame_in: int, frame_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of shapes (n, frame_in), (n, frame_out) with x_t = s[t*fo : t*fo + fi], y_t = next fo samples."""
    n = max((len(s) - frame_in) // frame_out, 0)
    x = s[: frame_in + frame_out * (n - 1)].unfold(0, frame_in, frame_out) if n else s.new_zeros(0, frame_in)
    y = s[frame_in : frame_in + frame_out * n].reshape(n, frame_out)
    return x, y


class WaveformDataset(Dataset):
    """Normalised waveforms; an item is (x, y) framed on the fly (no copies of overlapping frames)."""

    def __init__(self, waves: list[torch.Tensor], ids: list[str], frame_in: int, frame_out: int) -> None:
        self.waves, self.ids, self.frame_in, self.frame_out = waves, ids, frame_in, frame_out

    def __len__(self) -> int:
        return len(self.waves)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return frame_waveform(self.waves[i], self.frame_in, self.frame_out)


def waveform(rec: Recording, crop: int | None = None) -> np.ndarray:
    """A recording's first `crop` samples (all when None) as float64 on the /32768 scale."""
    return rec.samples[:crop].astype(np.float64) / INT16_SCALE


def standardize(waves: dict[str, list[np.ndarray]]) -> tuple[dict[str, list[np.ndarray]], float, float]:
    """Every split's waveforms z-scored with the train split's mean and std (fsdd and fsdd_digits
    alike), and those two statistics."""
    train = np.concatenate(waves["train"])
    mean, std = float(train.mean()), float(train.std())
    return {key: [(w - mean) / std for w in ws] for key, ws in waves.items()}, mean, std


def split_recordings(
    recordings: list[Recording], split: str, test_speaker: str = "theo", val_speaker: str = "lucas"
) -> dict[str, list[Recording]]:
    """{'train','val','test'} -> recordings, sorted by (speaker, digit, index).

    official (FSDD README): index 0-4 test; of the README's train (5-49), index 5-9 is val.
    speaker: every recording of test_speaker is test, of val_speaker val, the rest train.
    """
    out: dict[str, list[Recording]] = {"train": [], "val": [], "test": []}
    for r in sorted(recordings, key=lambda r: (r.speaker, r.digit, r.index)):
        if split == "official":
            key = "test" if r.index < 5 else "val" if r.index < 10 else "train"
        else:
            key = "test" if r.speaker == test_speaker else "val" if r.speaker == val_speaker else "train"
        out[key].append(r)
    return out


@register_task
class SpeechTask(Task):
    """FSDD raw-waveform modelling: read 20 samples, predict the next 10 with a 20-component MoG.

    A member's batch (`collate`): x (B, T, frame_in), y (B, T, frame_out) on the z-scored scale,
    mask (B, T) bool, lengths (B,). Losses and sums take the stacked layout (leading K, see Task). Attributes `norm_mean`, `norm_std` hold the train statistics (on the /32768 scale).
    """

    name = "fsdd"
    Options = SpeechOptions
    primary_metric = "nll"

    def __init__(self, options: SpeechOptions, seed: int) -> None:
        super().__init__(options, seed)
        self.options: SpeechOptions = options
        self.input_size = options.frame_in
        self.output_size = options.n_components * (1 + 2 * options.frame_out)
        self._waves: dict[str, WaveformDataset] | None = None
        self._baselines: dict[str, dict[str, float]] = {}
        self._fits: tuple[torch.Tensor, ...] | None = None
        self.norm_mean = self.norm_std = float("nan")

    @classmethod
    def check_data(cls, options: TaskOptions) -> None:
        """The recordings are present and match the manifest (fetch: verified, or downloaded)."""
        from rnnbench.datasets import fetch

        fetch("fsdd")

    def crop_length(self, rate: int) -> int | None:
        o = self.options
        return o.max_samples if o.max_seconds is None else int(round(o.max_seconds * rate))

    def datasets(self) -> dict[str, Dataset]:
        """Read FSDD once (cached), split, crop, normalise with train statistics.

        max_recordings keeps the first N of each split in (speaker, digit, index) order.
        """
        if self._waves is None:
            from rnnbench.datasets import load_fsdd

            o = self.options
            splits = split_recordings(load_fsdd(), o.split, o.test_speaker, o.val_speaker)
            raw: dict[str, list[np.ndarray]] = {}
            ids: dict[str, list[str]] = {}
            for key, recs in splits.items():
                recs = recs[: o.max_recordings]
                crop = self.crop_length(recs[0].rate) if recs else None
                if crop is not None and crop < o.frame_in + o.frame_out:
                    step = o.frame_in + o.frame_out
                    raise RnnbenchError(f"fsdd: a crop of {crop} samples is shorter than one step ({step})")
                raw[key] = [waveform(r, self.crop_length(r.rate)) for r in recs]
                ids[key] = [f"{r.digit}_{r.speaker}_{r.index}" for r in recs]
            if not raw["train"]:
                raise RnnbenchError("fsdd: the train split is empty")
            scaled, self.norm_mean, self.norm_std = standardize(raw)
            self._waves = {
                key: WaveformDataset([torch.from_numpy(w.astype(np.float32)) for w in waves], ids[key], o.frame_in,
                                     o.frame_out)
                for key, waves in scaled.items()
            }
        return dict(self._waves)

    def collate(self, items: list[tuple[torch.Tensor, torch.Tensor]]) -> Batch:
        items = longest_first(items, lambda item: len(item[0]))
        lengths = torch.tensor([len(x) for x, _ in items])
        B, T = len(items), int(lengths.max())
        x = torch.zeros(B, T, self.options.frame_in)
        y = torch.zeros(B, T, self.options.frame_out)
        for b, (xb, yb) in enumerate(items):
            x[b, : len(xb)], y[b, : len(yb)] = xb, yb
        mask = torch.arange(T)[None, :] < lengths[:, None]
        return {"x": x, "y": y, "mask": mask, "lengths": lengths}

    def step_nll(self, out: torch.Tensor, batch: Batch) -> torch.Tensor:
        """(K, B, T) negative log-density per output frame, 0 at padding."""
        return mog_step_nll(out, batch["y"], batch["mask"], self.options.n_components)

    def member_nll(self, out: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(K,) NLL summed over each member's valid frames and (K,) the number of those frames."""
        return self.step_nll(out, batch).sum((1, 2)), batch["mask"].sum((1, 2))

    def loss(self, out: torch.Tensor, batch: Batch) -> torch.Tensor:
        """(K,) mean NLL per valid output frame of each member's batch."""
        nll, frames = self.member_nll(out, batch)
        return nll / frames

    def metric_sums(self, out: torch.Tensor, batch: Batch) -> MetricSums:
        nll, frames = self.member_nll(out, batch)
        f = frames.to(nll.dtype)
        return {"nll": (nll, f), "nll_per_sample": (nll, f * self.options.frame_out)}

    def loss_and_sums(self, out: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, MetricSums]:
        """`loss` and `metric_sums` from one mixture-NLL computation (the same numbers as calling both)."""
        nll, frames = self.member_nll(out, batch)
        f, d = frames.to(nll.dtype), nll.detach()
        return nll / frames, {"nll": (d, f), "nll_per_sample": (d, f * self.options.frame_out)}

    def packed_rows(self, batch: Batch) -> torch.Tensor:
        return batch["mask"]

    def packed_loss_and_sums(self, out: torch.Tensor, batch: Batch, counts: torch.Tensor) -> tuple[torch.Tensor, MetricSums]:
        """`loss_and_sums` over the valid frames only (out: their mixture parameters, packed)."""
        nll_rows = mog_step_nll(out, batch["y"][batch["mask"]], torch.ones(out.shape[0], dtype=torch.bool, device=out.device),
                                self.options.n_components)
        nll = member_sums(nll_rows, counts)
        f = counts.to(out.device, nll.dtype)
        d = nll.detach()
        return nll / f, {"nll": (d, f), "nll_per_sample": (d, f * self.options.frame_out)}

    def baselines(self, split: str) -> dict[str, float]:
        """References fitted on train, scored on `split` with the metric's own code (mog_step_nll, K = 1).

        nll_gaussian: one Gaussian for every sample (i.i.d., no memory); on the z-scored scale it is
        N(0, 1) up to rounding. A recurrent model that does not beat it has learned nothing.
        nll_linear: linear prediction of the 10 samples from the 20 read (least squares) with a
        Gaussian residual per output position: the classical LPC-style reference.
        nll_loudness: the same linear prediction, its residual std following the local loudness:
        std_t,f = c_f (rms(x_t) + e), rms over the 20 samples read, e = exp(LOG_STD_MIN), c_f fitted
        on train by maximum likelihood (c_f^2 = mean of r_t,f^2 / (rms_t + e)^2). Speech is loud and
        quiet in turn (and silent between words), so a fixed residual variance is far too wide in the
        pauses and too narrow in the vowels; a model has to beat this to show it learned more than
        the envelope.
        """
        if split not in self._baselines:
            data, fo = self.datasets(), self.options.frame_out
            if self._fits is None:  # fitted once per instance, on train
                train = torch.cat(data["train"].waves).double()
                pairs = [data["train"][i] for i in range(len(data["train"]))]
                linear = fit_linear_predictor(pairs)
                self._fits = (train.mean(), train.std(correction=0), *linear, loudness_scale(pairs, linear[0]))
            mean, std, w, res_std, scale = self._fits
            sums, frames = {"gaussian": 0.0, "linear": 0.0, "loudness": 0.0}, 0
            for i in range(len(data[split])):  # one recording at a time: memory stays small
                x, y = (t.double() for t in data[split][i])
                every = torch.ones(len(y), dtype=torch.bool)
                x1 = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
                params = {
                    "gaussian": gaussian_params(mean.expand(len(y), fo), std.expand(len(y), fo)),
                    "linear": gaussian_params(x1 @ w, res_std),
                    "loudness": gaussian_params(x1 @ w, scale * loudness(x)[:, None]),
                }
                for key, p in params.items():
                    sums[key] += float(mog_step_nll(p, y, every, 1).sum())
                frames += len(y)
            out = {}
            for key, total in sums.items():
                value = total / frames if frames else float("nan")
                out[f"nll_{key}"], out[f"nll_per_sample_{key}"] = value, value / fo
            self._baselines[split] = out
        return dict(self._baselines[split])

    def describe(self) -> dict[str, str]:
        o = self.options
        crop = f"{o.max_samples} samples" if o.max_samples else f"{o.max_seconds} s" if o.max_seconds else "none"
        return {
            "frame_in": str(o.frame_in),
            "frame_out": str(o.frame_out),
            "n_components": str(o.n_components),
            "split": o.split if o.split == "official" else f"speaker(test={o.test_speaker},val={o.val_speaker})",
            "crop": crop,
            "normalisation": "int16/32768, then z-score with train-split mean/std",
            "nll_units": f"nats per output frame of {o.frame_out} z-scored samples (a density)",
        }
