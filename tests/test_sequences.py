"""The user's own sequences (rnnbench/tasks/sequences.py) and `rnnbench compare`, on generated files."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from rnnbench.errors import RnnbenchError
from rnnbench.tasks import get_task
from rnnbench.tasks.base import stack_batches
from rnnbench.tasks.sequences import read_sequences

CLI = [sys.executable, "-m", "rnnbench.cli"]


def save(path: Path, **arrays: Any) -> Path:
    np.savez(path, **arrays)
    return path


def markov_tokens(n_seq: int, rng: np.random.Generator, vocab: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Token sequences where the next token is mostly (t + 1) mod V: a bigram beats a unigram."""
    lengths = rng.integers(5, 15, n_seq)
    seqs = []
    for n in lengths:
        s = [int(rng.integers(vocab))]
        for _ in range(n - 1):
            s.append((s[-1] + 1) % vocab if rng.random() < 0.9 else int(rng.integers(vocab)))
        seqs.append(s)
    return np.concatenate(seqs).astype(np.int64), lengths


def task_for(path: Path, **options: Any) -> Any:
    cls = get_task("sequences")
    return cls(cls.Options(path=str(path), **options), seed=0)


def test_each_kind_is_inferred_and_beats_nothing_but_its_references(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tokens, lengths = markov_tokens(40, rng)
    rolls = (rng.random((int(lengths.sum()), 6)) < 0.3).astype(np.uint8)
    real = rng.normal(size=(int(lengths.sum()), 3)) * 5 + 2
    labels = rng.integers(0, 3, len(lengths))
    kinds = {
        "categorical": save(tmp_path / "c.npz", data=tokens, lengths=lengths),
        "binary": save(tmp_path / "b.npz", data=rolls, lengths=lengths),
        "real": save(tmp_path / "r.npz", data=real, lengths=lengths),
        "label": save(tmp_path / "l.npz", data=real, lengths=lengths, labels=labels),
    }
    for kind, path in kinds.items():
        t = task_for(path)
        assert t.kind == kind and t.describe()["target_kind"] == kind
        ds = t.datasets()
        assert sum(len(ds[s]) for s in ("train", "val", "test")) == 40 and min(len(ds[s]) for s in ("val", "test")) >= 1
        b = [t.collate([ds["train"][i] for i in range(k, k + 3)]) for k in (0, 3)]
        batch = stack_batches(b)
        out = torch.zeros(2, *batch["x"].shape[1:3], t.output_size, requires_grad=True)
        loss, sums = t.loss_and_sums(out, batch)
        assert loss.shape == (2,) and torch.isfinite(loss).all()
        loss.sum().backward()
        assert out.grad is not None and torch.isfinite(out.grad).all()
        alone, _ = t.loss_and_sums(torch.zeros(1, *b[1]["x"].shape[:2], t.output_size), stack_batches([b[1]]))
        assert torch.allclose(alone[0], loss[1].detach())  # padding to a batch-mate changes nothing
        refs = t.baselines("test")
        assert refs and all(np.isfinite(v) for v in refs.values())
    refs = task_for(kinds["categorical"]).baselines("test")
    assert refs["nll_markov"] < refs["nll_marginal"]  # the bigram sees the (t + 1) mod V rule
    assert task_for(kinds["real"]).baselines("train")["nll_gaussian"] == pytest.approx(3 * 0.5 * np.log(2 * np.pi * np.e), abs=0.01)
    lab = task_for(kinds["label"])
    assert lab.output_size == 3 and set(lab.baselines("val")) == {"nll_majority", "acc_majority"}


def test_the_split_is_reproducible_and_given_splits_are_kept(tmp_path: Path) -> None:
    tokens, lengths = markov_tokens(30, np.random.default_rng(1))
    path = save(tmp_path / "t.npz", data=tokens, lengths=lengths)
    a, b, c = (read_sequences(path, s) for s in (0, 0, 1))
    assert all(np.array_equal(x, y) for x, y in zip(a["val"], b["val"]))
    assert len(a["val"]) == len(a["test"]) == 3 and len(a["train"]) == 24
    assert not all(np.array_equal(x, y) for x, y in zip(a["val"], c["val"]))
    split = np.array([0] * 20 + [1] * 5 + [2] * 5)
    given = read_sequences(save(tmp_path / "s.npz", data=tokens, lengths=lengths, split=split))
    assert [len(given[s]) for s in ("train", "val", "test")] == [20, 5, 5]


@pytest.mark.parametrize("arrays, message", [
    ({"lengths": np.array([2])}, "missing the array 'data'"),
    ({"data": np.zeros((4, 2)), "lengths": np.array([2, 3])}, "lengths sum to 5 but data has 4 steps"),
    ({"data": np.array([[0.0], [np.nan], [1.0]]), "lengths": np.array([1, 1, 1])}, "NaN or inf (first at step 1)"),
    ({"data": np.array(["a", "b", "c"]), "lengths": np.array([1, 1, 1])}, "must be numbers"),
    ({"data": np.zeros(3), "lengths": np.array([1, 1, 1]), "split": np.array([0, 0, 1])}, "the test split is empty"),
    ({"data": np.zeros(3), "lengths": np.array([1, 1, 1]), "split": np.array([0, 1, 5])}, "split values must be"),
    ({"data": np.zeros(3), "lengths": np.array([1, 1, 1]), "labels": np.array([0, 1])}, "labels must hold one integer per sequence"),
    ({"data": np.zeros(2), "lengths": np.array([1, 1])}, "at least 3 are needed"),
    ({"data": np.zeros(3), "lengths": np.array([1.0, 1.0, 1.0])}, "lengths must be a 1-D array of integers"),
])
def test_bad_files_get_one_line_naming_the_file(tmp_path: Path, arrays: dict[str, Any], message: str) -> None:
    path = save(tmp_path / "bad.npz", **arrays)
    with pytest.raises(RnnbenchError, match=re.escape(message)) as e:
        read_sequences(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_pickled_objects_and_other_files_are_refused(tmp_path: Path) -> None:
    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = np.zeros(3), np.zeros(4)
    np.savez(tmp_path / "obj.npz", data=ragged, lengths=np.array([3, 4]))
    with pytest.raises(RnnbenchError, match="holds pickled objects .*, which are not read"):
        read_sequences(tmp_path / "obj.npz")
    (tmp_path / "x.npz").write_text("not a zip")
    with pytest.raises(RnnbenchError, match="not a readable .npz"):
        read_sequences(tmp_path / "x.npz")
    with pytest.raises(RnnbenchError, match="no such file"):
        read_sequences(tmp_path / "missing.npz")


def test_compare_from_a_file_to_a_report(tmp_path: Path) -> None:
    """The README's two commands, end to end: a generated .npz -> `rnnbench compare` -> a report with
    a verdict per cell (intervals over seeds, the tests between cells, the search)."""
    tokens, lengths = markov_tokens(40, np.random.default_rng(2))
    save(tmp_path / "mine.npz", data=tokens, lengths=lengths)
    env = {**os.environ, "MPLBACKEND": "Agg"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(CLI + ["compare", "--data", "mine.npz", "--out", "cmp", "--cells", "gru,lstm", "--samples", "2",
                                 "--seeds", "2", "--max-epochs", "4", "--budget", "500"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = (tmp_path / "cmp" / "report" / "REPORT.md").read_text()
    assert "## sequences" in report and "target_kind=categorical" in report
    assert "| gru |" in report and "| lstm |" in report and "Holm-corrected p" in report
    assert "## Learning-rate search (successive halving)" in report
    assert (tmp_path / "cmp" / "compare.yaml").is_file() and not (tmp_path / "mlflow.db").exists()
    bad = subprocess.run(CLI + ["compare", "--data", "nothere.npz", "--out", "cmp2"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "nothere.npz: no such file" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "cmp2").exists()
