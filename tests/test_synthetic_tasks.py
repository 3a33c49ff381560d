"""Copy and adding generators: shapes, seeding, and the published baselines measured empirically."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rnnbench.config import Config
from rnnbench.tasks import get_task
from rnnbench.tasks.adding import ADDING_BASELINE, make_adding
from rnnbench.tasks.copy import BLANK, DELIM, copy_baseline, make_copy


def task(name: str, seed: int = 0, **options: object):
    cfg = Config.from_dict({"model": {"hidden_size": 4}, "task": {"name": name, **options}})
    return get_task(name)(cfg.task, seed=seed)


def test_copy_layout() -> None:
    x, y = make_copy(5, 30, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 50)
    assert (x[:, :10] < 8).all() and (x[:, 10:29] == BLANK).all() and (x[:, 39] == DELIM).all()
    assert (x[:, 40:] == BLANK).all() and (x == DELIM).sum() == 5
    assert (y[:, :40] == BLANK).all() and torch.equal(y[:, 40:], x[:, :10])


@pytest.mark.parametrize("T, expected", [(100, 0.1733), (200, 0.0945), (500, 0.0400), (1000, 0.0204)])
def test_copy_baseline_formula(T: int, expected: float) -> None:
    assert copy_baseline(T) == pytest.approx(expected, abs=1e-4)


def test_copy_memoryless_baseline_empirical() -> None:
    """Blank everywhere but uniform over the 8 symbols on the recall steps scores 10 ln 8 / (T + 20)."""
    T = 50
    x, y = make_copy(20_000, T, torch.Generator().manual_seed(1))
    logits = torch.full((*y.shape, 10), -1e9)
    logits[:, :-10, BLANK] = 0.0
    logits[:, -10:, :8] = 0.0
    ce = F.cross_entropy(logits.reshape(-1, 10), y.reshape(-1)).item()
    assert ce == pytest.approx(copy_baseline(T), rel=1e-6)
    # and symbols really are uniform over 0..7
    counts = torch.bincount(y[:, -10:].reshape(-1), minlength=10).float()
    assert counts[8:].sum() == 0
    assert torch.allclose(counts[:8] / counts.sum(), torch.full((8,), 1 / 8), atol=0.005)


def test_adding_layout_and_baseline() -> None:
    x, target = make_adding(100_000, 40, torch.Generator().manual_seed(2))
    assert x.shape == (100_000, 40, 2) and target.shape == (100_000,)
    markers = x[..., 1]
    assert (markers.sum(1) == 2).all()
    assert (markers[:, :20].sum(1) == 1).all() and (markers[:, 20:].sum(1) == 1).all()
    assert torch.allclose((x[..., 0] * markers).sum(1), target)
    assert ((x[..., 0] >= 0) & (x[..., 0] < 1)).all()
    mse_predict_one = ((target - 1) ** 2).mean().item()
    assert mse_predict_one == pytest.approx(ADDING_BASELINE, abs=0.003)
    assert ADDING_BASELINE == pytest.approx(0.167, abs=5e-4)


@pytest.mark.parametrize("name", ["copy", "adding"])
def test_same_seed_same_data_other_seed_other_data(name: str) -> None:
    a = task(name, seed=3, seq_len=20, n_train=50, n_val=10, n_test=10).datasets()
    b = task(name, seed=3, seq_len=20, n_train=50, n_val=10, n_test=10).datasets()
    c = task(name, seed=4, seq_len=20, n_train=50, n_val=10, n_test=10).datasets()
    for split in ("train", "val", "test"):
        assert all(torch.equal(u, v) for u, v in zip(a[split].tensors, b[split].tensors))
    assert not torch.equal(a["train"].tensors[0], c["train"].tensors[0])
    assert not torch.equal(a["train"].tensors[0][:10], a["test"].tensors[0])  # splits are distinct draws


def test_copy_metric_sums_and_collate() -> None:
    t = task("copy", seq_len=5, n_train=8, n_val=4, n_test=4)
    ds = t.datasets()["train"]
    batch = t.collate([ds[i] for i in range(8)])
    assert batch["x"].shape == (8, 25, 10) and batch["x"].sum(-1).eq(1).all()
    perfect = F.one_hot(batch["y"], 10).float()[None] * 50  # a population of one: (1, B, T, 10)
    sums = t.metric_sums(perfect, t.broadcast_batch(batch, 1))
    assert sums["recall_acc"][0] / sums["recall_acc"][1] == 1.0
    assert (sums["ce"][0] / sums["ce"][1]).item() < 1e-6
    assert math.isclose(t.baselines("val")["ce_baseline"], copy_baseline(5))


def members_of_unequal_length(name: str, seq_lens: tuple[int, ...], B: int = 3) -> list[tuple[object, dict]]:
    """(task, its own float64 batch) per member; the seq_lens differ, so stacking pads."""
    out = []
    for seed, seq_len in enumerate(seq_lens):
        t = task(name, seed=seed, seq_len=seq_len, n_train=B, n_val=1, n_test=1)
        ds = t.datasets()["train"]
        batch = t.collate([ds[i] for i in range(B)])
        out.append((t, {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}))
    return out


def padded_outputs(batches: list[dict], size: int) -> tuple[torch.Tensor, list[int]]:
    """Random (K, B, T_max, size) float64 outputs, garbage beyond each member's own length."""
    steps = [b["x"].shape[1] for b in batches]
    g = torch.Generator().manual_seed(0)
    out = torch.randn(len(batches), batches[0]["x"].shape[0], max(steps), size, generator=g, dtype=torch.float64)
    for k, n in enumerate(steps):
        out[k, :, n:] = 1e3
    return out, steps


def test_copy_stacked_members_of_unequal_length_give_the_per_batch_cross_entropy() -> None:
    """Each member's numbers are the original per-batch formulas on its own batch: mean CE over all
    T + 20 steps, recall accuracy on its own last 10 steps, whatever the longer members pad."""
    members = members_of_unequal_length("copy", (5, 12, 8))
    t = members[0][0]
    stacked = t.stack_batches([b for _, b in members])
    out, steps = padded_outputs([b for _, b in members], 10)
    loss, sums = t.loss_and_sums(out, stacked)
    for k, (_, b) in enumerate(members):
        own = out[k, :, : steps[k]]
        ce = F.cross_entropy(own.reshape(-1, 10), b["y"].reshape(-1))
        torch.testing.assert_close(loss[k], ce, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sums["ce"][0][k] / sums["ce"][1][k], ce, rtol=1e-12, atol=1e-12)
        assert sums["ce"][1][k] == b["y"].numel()
        hits = (own[:, -10:].argmax(-1) == b["y"][:, -10:]).sum()
        assert sums["recall_acc"][0][k] == hits and sums["recall_acc"][1][k] == b["y"].shape[0] * 10
    assert t.time_steps(stacked).tolist() == [3 * n for n in steps]


def test_adding_stacked_members_of_unequal_length_read_their_own_last_step() -> None:
    members = members_of_unequal_length("adding", (6, 11, 9))
    t = members[0][0]
    stacked = t.stack_batches([b for _, b in members])
    out, steps = padded_outputs([b for _, b in members], 1)
    loss, sums = t.loss_and_sums(out, stacked)
    for k, (_, b) in enumerate(members):
        mse = F.mse_loss(out[k, :, steps[k] - 1, 0], b["y"])
        torch.testing.assert_close(loss[k], mse, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sums["mse"][0][k], mse * 3, rtol=1e-12, atol=1e-12)
        assert sums["mse"][1][k] == 3
