"""Every registered task on the stacked layout of a population of K members (issue 13).

K members' own batches stacked (padded along time to the longest member) give each member the
loss, metric sums, time steps and output gradients of its batch alone (K = 1), whatever the
batch-mates and the padding; a shared evaluation batch broadcast to K members likewise. Tasks come
from the registry, so a new task is checked without editing this file. Data-backed tasks read
RNNBENCH_DATA_DIR and skip without it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from rnnbench.errors import RnnbenchError
from rnnbench.tasks import TASKS, Task, broadcast_batch, stack_batches
from rnnbench.tasks.base import Batch, batch_steps

# Options that keep a task's data small; a task not listed here runs with its defaults.
SMALL: dict[str, dict[str, object]] = {
    "copy": {"seq_len": 7, "n_train": 12, "n_val": 4, "n_test": 4},
    "adding": {"seq_len": 9, "n_train": 12, "n_val": 4, "n_test": 4},
    "fsdd": {"max_recordings": 12, "n_components": 3},
    **{name: {"max_sequences": 12} for name in ("jsb", "nottingham", "musedata", "pianomidi")},
}


def _sequences_file() -> str:
    """A small .npz for the `sequences` task: real features, sequences of unequal lengths."""
    import tempfile

    import numpy as np

    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 12, 30)
    path = Path(tempfile.mkdtemp(prefix="rnnbench-seq-")) / "seqs.npz"
    np.savez(path, data=rng.normal(size=(int(lengths.sum()), 2)), lengths=lengths)
    return str(path)


SMALL["sequences"] = {"path": _sequences_file()}
SMALL["fsdd_digits"] = {"max_recordings": 12}
K, B = 3, 2
EXACT = {"rtol": 1e-12, "atol": 1e-12}  # float64: equal to rounding


def small_task(name: str) -> Task:
    cls = TASKS[name]
    options = cls.Options(**SMALL.get(name, {}))
    if cls.check_data.__func__ is not Task.check_data.__func__:  # the task reads data files
        if not os.environ.get("RNNBENCH_DATA_DIR"):
            pytest.skip(f"{name} needs RNNBENCH_DATA_DIR (point it at the staged data, e.g. /work/shared/data)")
        try:
            cls.check_data(options)
        except RnnbenchError as e:
            pytest.skip(f"{name}: its data is not in RNNBENCH_DATA_DIR ({e})")
    return cls(options, seed=0)


def member_batches(task: Task) -> list[Batch]:
    """K members' own batches of B train items each, of unequal lengths where items have lengths:
    items sorted by length, the middle chunk first, then the longest, then the shortest."""
    data = task.datasets()["train"]
    items = [data[i] for i in range(min(len(data), 4 * K * B))]
    items.sort(key=lambda item: task.collate([item])["x"].shape[1])
    chunks = [items[i * len(items) // K : i * len(items) // K + B] for i in range(K)]
    return [task.collate(chunks[i]) for i in (1, 2, 0)]


def as_float64(batch: Batch) -> Batch:
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_stacked_members_give_each_member_its_own_numbers(name: str) -> None:
    task = small_task(name)
    members = [as_float64(b) for b in member_batches(task)]
    steps = [int(b["x"].shape[1]) for b in members]
    if "mask" in members[0]:  # the task has lengths: the members must need padding
        assert len(set(steps)) > 1, f"want members of unequal lengths, got {steps}"
    assert task.stack_batches(members)["x"].shape[:3] == (K, B, max(steps))
    # Padded beyond the longest member too (a padded-length bucket), so every task, fixed-length
    # ones included, must select its own steps: copy's recall window, adding's last step.
    T = max(steps) + 3
    stacked = task.stack_batches(members, length=T)
    assert stacked["x"].shape[:3] == (K, B, T)
    assert stacked["steps"].dtype == torch.int64 and stacked["steps"].tolist() == steps

    g = torch.Generator().manual_seed(0)
    out = torch.randn(K, B, T, task.output_size, generator=g, dtype=torch.float64)
    for k in range(K):  # garbage where a member is padded must not reach its numbers
        out[k, :, steps[k] :] = 1e3 * torch.randn(B, T - steps[k], task.output_size, generator=g, dtype=torch.float64)
    out.requires_grad_(True)
    loss, sums = task.loss_and_sums(out, stacked)
    assert loss.shape == (K,) and loss.dtype == torch.float64
    assert task.primary_metric in sums and not any(s.requires_grad for s, _ in sums.values())
    loss.sum().backward()  # member k's loss depends on member k's outputs only
    time_steps = task.time_steps(stacked)
    assert time_steps.shape == (K,) and time_steps.dtype == torch.int64

    separate = task.metric_sums(out.detach(), stacked)
    torch.testing.assert_close(task.loss(out.detach(), stacked), loss.detach(), **EXACT)
    assert set(separate) == set(sums)
    for k, member in enumerate(members):
        alone = task.stack_batches([member])
        out_k = out.detach()[k : k + 1, :, : steps[k]].clone().requires_grad_(True)
        loss_k, sums_k = task.loss_and_sums(out_k, alone)
        torch.testing.assert_close(loss[k], loss_k[0], **EXACT)
        assert set(sums_k) == set(sums)
        for metric, (total, count) in sums.items():
            torch.testing.assert_close(total[k], sums_k[metric][0][0], **EXACT)
            torch.testing.assert_close(count[k], sums_k[metric][1][0], **EXACT)
            torch.testing.assert_close(separate[metric][0][k], total[k], **EXACT)
            torch.testing.assert_close(separate[metric][1][k], count[k], **EXACT)
        assert int(time_steps[k]) == int(task.time_steps(alone)[0]) == B * steps[k]
        loss_k.sum().backward()
        torch.testing.assert_close(out.grad[k, :, : steps[k]], out_k.grad[0], **EXACT)
        assert not out.grad[k, :, steps[k] :].any()


@pytest.mark.parametrize("name", sorted(TASKS))
def test_a_broadcast_evaluation_batch_gives_each_member_its_own_numbers(name: str) -> None:
    task = small_task(name)
    shared = as_float64(member_batches(task)[0])
    batch = task.broadcast_batch(shared, K)
    T = shared["x"].shape[1]
    assert batch["steps"].tolist() == [T] * K
    for key, v in shared.items():  # views, not copies
        assert batch[key].shape == (K, *v.shape) and batch[key].stride(0) == 0
        assert batch[key].data_ptr() == v.data_ptr()
    out = torch.randn(K, B, T, task.output_size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    loss, sums = task.loss_and_sums(out, batch)
    for k in range(K):
        loss_k, sums_k = task.loss_and_sums(out[k : k + 1], task.broadcast_batch(shared, 1))
        torch.testing.assert_close(loss[k], loss_k[0], **EXACT)
        for metric, (total, count) in sums.items():
            torch.testing.assert_close(total[k], sums_k[metric][0][0], **EXACT)
            torch.testing.assert_close(count[k], sums_k[metric][1][0], **EXACT)
    assert task.time_steps(batch).tolist() == [B * T] * K


# --- the stacking functions themselves ---------------------------------------------------------------
def test_stack_batches_pads_time_with_zeros_and_false_and_adds_steps() -> None:
    a = {"x": torch.ones(2, 3, 4), "mask": torch.ones(2, 3, dtype=torch.bool), "lengths": torch.tensor([3, 2])}
    b = {"x": 2 * torch.ones(2, 5, 4), "mask": torch.ones(2, 5, dtype=torch.bool), "lengths": torch.tensor([5, 1])}
    s = stack_batches([a, b])
    assert s["x"].shape == (2, 2, 5, 4) and s["mask"].shape == (2, 2, 5) and s["mask"].dtype == torch.bool
    assert torch.equal(s["x"][0, :, :3], a["x"]) and not s["x"][0, :, 3:].any()
    assert torch.equal(s["x"][1], b["x"])
    assert s["mask"][0, :, :3].all() and not s["mask"][0, :, 3:].any()
    assert torch.equal(s["lengths"], torch.tensor([[3, 2], [5, 1]]))  # no time dim: stacked as it is
    assert s["steps"].dtype == torch.int64 and s["steps"].tolist() == [3, 5]
    assert stack_batches([b, b])["x"].shape == (2, 2, 5, 4)  # equal lengths: no padding
    bucket = stack_batches([a, b], length=8)  # to a padded-length bucket
    assert bucket["x"].shape == (2, 2, 8, 4) and not bucket["x"][:, :, 5:].any() and not bucket["mask"][:, :, 5:].any()
    assert bucket["steps"].tolist() == [3, 5] and bucket["lengths"].shape == (2, 2)


def test_stack_batches_refuses_members_that_do_not_fit() -> None:
    a = {"x": torch.ones(2, 3, 4), "y": torch.ones(2)}
    with pytest.raises(ValueError, match="items"):
        stack_batches([a, {"x": torch.ones(1, 3, 4), "y": torch.ones(1)}])
    with pytest.raises(ValueError, match="keys"):
        stack_batches([a, {"x": torch.ones(2, 3, 4)}])
    with pytest.raises(ValueError, match="at least one"):
        stack_batches([])
    with pytest.raises(ValueError, match="shorter than the longest"):
        stack_batches([a], length=2)


def test_an_unstacked_batch_is_a_clear_error() -> None:
    batch = {"x": torch.ones(2, 3, 4)}
    with pytest.raises(ValueError, match="stack_batches or broadcast_batch"):
        batch_steps(batch)
    assert broadcast_batch(batch, 4)["steps"].tolist() == [3, 3, 3, 3]
