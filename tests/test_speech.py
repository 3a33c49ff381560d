"""FSDD raw-waveform task: framing, splits, normalisation, the mixture NLL and its batching.

Data-backed tests read RNNBENCH_DATA_DIR (e.g. /work/shared/data) and skip without it. FSDD is
small (21 MB, under a second to read), so the whole set is read once per module.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import distributions as D

from rnnbench.tasks import get_task
from rnnbench.tasks.speech import (
    LOG_STD_MAX,
    LOG_STD_MIN,
    SpeechTask,
    frame_waveform,
    gaussian_params,
    mog_step_nll,
)


def _data_dir() -> Path:
    value = os.environ.get("RNNBENCH_DATA_DIR")
    if not value:
        pytest.skip("RNNBENCH_DATA_DIR is not set (point it at the staged data, e.g. /work/shared/data)")
    if not (Path(value) / "speech" / "fsdd" / "recordings").is_dir():
        pytest.skip(f"RNNBENCH_DATA_DIR={value} has no speech/fsdd/recordings folder")
    return Path(value)


def make(**options) -> SpeechTask:
    return SpeechTask(SpeechTask.Options(**options), seed=0)


@pytest.fixture(scope="module")
def official() -> SpeechTask:
    _data_dir()
    task = make()
    task.datasets()
    return task


# --- no data needed -------------------------------------------------------------------------------
def test_registered_sizes_and_options() -> None:
    assert get_task("fsdd") is SpeechTask and SpeechTask.primary_metric == "nll"
    task = make()
    assert task.input_size == 20 and task.output_size == 20 * (1 + 2 * 10) == 420
    assert make(frame_in=8, frame_out=4, n_components=3).output_size == 3 * 9
    for bad in (
        {"max_samples": 100, "max_seconds": 0.1},
        {"max_samples": 25},  # shorter than one step
        {"split": "speaker", "test_speaker": "theo", "val_speaker": "theo"},
        {"test_speaker": "alice"},
        {"unknown": 1},
    ):
        with pytest.raises(ValidationError):
            SpeechTask.Options(**bad)


def test_framing_follows_chung() -> None:
    s = torch.arange(75.0)
    x, y = frame_waveform(s, 20, 10)
    assert x.shape == (5, 20) and y.shape == (5, 10)  # (75 - 20) // 10 steps; the last 5 samples are dropped
    for t in range(5):
        torch.testing.assert_close(x[t], s[10 * t : 10 * t + 20])
        torch.testing.assert_close(y[t], s[10 * t + 20 : 10 * t + 30])
    assert frame_waveform(torch.arange(29.0), 20, 10)[0].shape == (0, 20)
    assert frame_waveform(torch.arange(30.0), 20, 10)[1].shape == (1, 10)


def test_mog_nll_equals_torch_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    B, T, K, F = 2, 3, 4, 5
    logits = torch.randn(B, T, K, generator=g, dtype=torch.float64)
    mu = torch.randn(B, T, K, F, generator=g, dtype=torch.float64)
    log_std = 0.5 * torch.randn(B, T, K, F, generator=g, dtype=torch.float64)
    y = torch.randn(B, T, F, generator=g, dtype=torch.float64)
    params = torch.cat([logits, mu.flatten(-2), log_std.flatten(-2)], dim=-1)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    mixture = D.MixtureSameFamily(D.Categorical(logits=logits), D.Independent(D.Normal(mu, log_std.exp()), 1))
    expected = -mixture.log_prob(y) * mask
    torch.testing.assert_close(mog_step_nll(params, y, mask, K), expected)

    # Padding content cannot reach the result; extreme scales stay finite (clamped log std).
    params2, y2 = params.clone(), y.clone()
    params2[1, 1:] = float("nan")
    y2[1, 1:] = 1e30
    torch.testing.assert_close(mog_step_nll(params2, y2, mask, K), expected)
    params3 = params.clone()
    params3[..., K + K * F :] = 1e4
    assert torch.isfinite(mog_step_nll(params3, y, mask, K)).all()
    params3[..., K + K * F :] = -1e4
    assert torch.isfinite(mog_step_nll(params3, y, mask, K)).all()
    assert LOG_STD_MIN < 0 < LOG_STD_MAX
    with pytest.raises(ValueError):
        mog_step_nll(params[..., :-1], y, mask, K)


def test_single_gaussian_params_give_the_normal_density() -> None:
    y = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    params = gaussian_params(torch.zeros(1, 3, dtype=torch.float64), torch.full((3,), 2.0, dtype=torch.float64))
    expected = -D.Normal(0.0, 2.0).log_prob(y).sum(-1)
    torch.testing.assert_close(mog_step_nll(params, y, torch.ones(1, dtype=torch.bool), 1), expected)


# --- FSDD ---------------------------------------------------------------------------------------------
def test_official_split_sizes_and_ids(official: SpeechTask) -> None:
    data = official.datasets()
    assert {k: len(v) for k, v in data.items()} == {"train": 2400, "val": 300, "test": 300}
    index = {k: {int(i.rsplit("_", 1)[1]) for i in v.ids} for k, v in data.items()}
    assert index["test"] == set(range(5)) and index["val"] == set(range(5, 10)) and index["train"] == set(range(10, 50))
    assert len(set(data["test"].ids)) == 300
    assert not set(data["test"].ids) & set(data["train"].ids)


def test_normalisation_uses_train_statistics_only(official: SpeechTask) -> None:
    from rnnbench.datasets import load_fsdd

    recs = load_fsdd()
    train = np.concatenate([r.samples for r in recs if r.index >= 10]).astype(np.float64) / 32768
    everything = np.concatenate([r.samples for r in recs]).astype(np.float64) / 32768
    assert official.norm_mean == pytest.approx(train.mean(), rel=1e-9)
    assert official.norm_std == pytest.approx(train.std(), rel=1e-9)
    assert official.norm_std != pytest.approx(everything.std(), rel=1e-6)
    data = official.datasets()
    z = torch.cat(data["train"].waves).double()
    assert z.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert z.std(correction=0).item() == pytest.approx(1.0, abs=1e-5)
    # val/test use the same two numbers: a recording maps back to its int16 samples.
    rec = next(r for r in recs if r.index == 0 and r.digit == 0 and r.speaker == "george")
    i = data["test"].ids.index("0_george_0")
    back = data["test"].waves[i].double() * official.norm_std + official.norm_mean
    np.testing.assert_allclose(back.numpy() * 32768, rec.samples, atol=1e-2)


def test_speaker_split() -> None:
    _data_dir()
    data = make(split="speaker", test_speaker="theo", val_speaker="lucas", max_samples=40).datasets()
    assert {k: len(v) for k, v in data.items()} == {"train": 2000, "val": 500, "test": 500}
    assert {i.split("_")[1] for i in data["test"].ids} == {"theo"}
    assert {i.split("_")[1] for i in data["val"].ids} == {"lucas"}
    assert not {i.split("_")[1] for i in data["train"].ids} & {"theo", "lucas"}


def test_crop_recordings_and_batch_shapes() -> None:
    _data_dir()
    task = make(max_samples=500, max_recordings=3)
    data = task.datasets()
    assert {k: len(v) for k, v in data.items()} == {"train": 3, "val": 3, "test": 3}
    assert all(len(w) == 500 for w in data["train"].waves)  # every FSDD file is longer than 500 samples
    batch = task.collate([data["train"][i] for i in range(3)])
    assert batch["x"].shape == (3, 48, 20) and batch["y"].shape == (3, 48, 10)  # (500 - 20) // 10 steps
    assert batch["mask"].all() and batch["lengths"].tolist() == [48, 48, 48]
    assert make(max_seconds=0.0625, max_recordings=1).datasets()["train"].waves[0].shape == (500,)


def test_batched_nll_equals_per_sequence_and_ignores_padding() -> None:
    _data_dir()
    torch.manual_seed(0)
    task = make(max_recordings=5, n_components=3)
    data = task.datasets()["val"]
    items = [data[i] for i in range(5)]
    assert len({len(x) for x, _ in items}) > 1, "want recordings of different lengths"
    rnn = torch.nn.GRU(20, 8, batch_first=True)
    head = torch.nn.Linear(8, task.output_size)

    def model(batch: dict[str, torch.Tensor]) -> torch.Tensor:  # a population of one: (1, B, T, O)
        return head(rnn(batch["x"][0])[0])[None]

    batch = task.broadcast_batch(task.collate(items), 1)
    assert int(batch["mask"].sum()) == sum(len(x) for x, _ in items)
    out = model(batch)
    sums = task.metric_sums(out, batch)
    total, count = sums["nll"]
    singles = [task.metric_sums(model(b), b)["nll"] for b in (task.broadcast_batch(task.collate([i]), 1) for i in items)]
    torch.testing.assert_close(total, sum(s for s, _ in singles), rtol=1e-5, atol=1e-3)
    assert int(count) == sum(int(n) for _, n in singles)
    s, n = sums["nll_per_sample"]
    assert (s / n).item() == pytest.approx((total / count).item() / 10)
    torch.testing.assert_close(task.loss(out, batch), total / count)
    loss1, sums1 = task.loss_and_sums(out, batch)  # the training step's one-pass form: the same numbers
    assert torch.equal(loss1, task.loss(out, batch))
    assert all(torch.equal(sums1[k][i], sums[k][i]) for k in sums for i in (0, 1)) and set(sums1) == set(sums)

    pad = ~batch["mask"]
    noisy = {k: v.clone() for k, v in batch.items()}
    noisy["x"][pad] = 100 * torch.randn(int(pad.sum()), 20)
    noisy["y"][pad] = 100 * torch.randn(int(pad.sum()), 10)
    torch.testing.assert_close(task.metric_sums(model(noisy), noisy)["nll"][0], total)


def test_baselines_finite_and_ordered(official: SpeechTask) -> None:
    for split in ("train", "val", "test"):
        b = official.baselines(split)
        assert all(math.isfinite(v) for v in b.values())
        assert b["nll_per_sample_gaussian"] == pytest.approx(b["nll_gaussian"] / 10)
        assert b["nll_linear"] < b["nll_gaussian"]
    # On train the fitted Gaussian is N(0, 1) of the z-scored samples, so per sample it is close to
    # the entropy 0.5 ln(2 pi e) = 1.419 (not exact: the first 20 samples and tails are not predicted).
    entropy = 0.5 * math.log(2 * math.pi * math.e)
    assert official.baselines("train")["nll_per_sample_gaussian"] == pytest.approx(entropy, abs=0.05)
    assert official.baselines("test") == official.baselines("test")


def test_the_loudness_reference_follows_the_envelope() -> None:
    """Noise whose level swells and fades (0.01 to 1, slowly): the loudness-scaled residual fits it
    (c recovered), and it scores far better than one fixed residual variance."""
    import math

    import torch

    from rnnbench.tasks.speech import fit_linear_predictor, frame_waveform, gaussian_params, loudness, loudness_scale, mog_step_nll

    g = torch.Generator().manual_seed(0)
    level = 0.01 + torch.sin(torch.arange(8000, dtype=torch.float64) * math.pi / 2000).abs()
    wave = (torch.randn(len(level), generator=g, dtype=torch.float64) * level)
    pairs = [frame_waveform(wave, 20, 10)]
    w, std = fit_linear_predictor(pairs)
    c = loudness_scale(pairs, w)
    assert torch.allclose(c, torch.ones_like(c), atol=0.15)  # white noise: residual std = its own level
    x, y = pairs[0]
    x1 = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    every = torch.ones(len(y), dtype=torch.bool)
    fixed = float(mog_step_nll(gaussian_params(x1 @ w, std), y, every, 1).mean())
    scaled = float(mog_step_nll(gaussian_params(x1 @ w, c * loudness(x)[:, None]), y, every, 1).mean())
    assert scaled < fixed - 1.5  # nats per frame of 10 samples (about 2.3 for this envelope)


def test_spoken_digits_are_a_many_to_one_task_with_its_references() -> None:
    """fsdd_digits: framed utterances, one label each; the majority and linear references beside them."""
    _data_dir()
    import torch

    from rnnbench.tasks import get_task
    from rnnbench.tasks.base import stack_batches

    cls = get_task("fsdd_digits")
    task = cls(cls.Options(max_recordings=120, max_seconds=0.3), seed=0)
    data = task.datasets()
    labels = np.array(data["train"].labels)
    assert np.bincount(labels, minlength=10).min() >= 10  # the subset covers every digit
    x, y = data["train"][0]
    assert x.shape[1] == 80 and x.shape[0] <= 30 and 0 <= y < 10
    batch = stack_batches([task.collate([data["train"][i] for i in range(4)])])
    out = torch.zeros(1, *batch["x"].shape[1:3], 10)
    loss, sums = task.loss_and_sums(out, batch)
    assert float(loss[0]) == pytest.approx(np.log(10)) and float(sums["acc"][1][0]) == 4  # uniform logits: ln 10
    refs = task.baselines("test")
    assert refs["nll_majority"] == pytest.approx(np.log(10), abs=0.05)
    assert refs["acc_linear"] > refs["acc_majority"] + 0.2 and refs["nll_linear"] < refs["nll_majority"]
