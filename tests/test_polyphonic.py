"""Polyphonic music tasks: batching, masks, step counts, layouts, the metric and the baselines.

Data-backed tests read RNNBENCH_DATA_DIR (e.g. /work/shared/data) and skip without it. The fast
set reads only JSB; the other three corpora are read whole under `slow`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from rnnbench.tasks import TASKS, get_task
from rnnbench.tasks.polyphonic import (
    PolyphonicTask,
    bernoulli_step_nll,
    marginal_bernoulli_nll,
    markov_nll,
    to_layout,
)

CHUNG_SIZES = {"jsb": 96, "nottingham": 93, "musedata": 105, "pianomidi": 108}
# SOURCES.md §1e: test-split sequences and steps of each corpus.
TEST_SPLIT = {"jsb": (77, 4725), "nottingham": (170, 44463), "musedata": (124, 64339), "pianomidi": (25, 19036)}


def _data_dir() -> Path:
    value = os.environ.get("RNNBENCH_DATA_DIR")
    if not value:
        pytest.skip("RNNBENCH_DATA_DIR is not set (point it at the staged data, e.g. /work/shared/data)")
    if not (Path(value) / "polyphonic" / "mat").is_dir():
        pytest.skip(f"RNNBENCH_DATA_DIR={value} has no polyphonic/mat folder")
    return Path(value)


needs_data = pytest.fixture(_data_dir, name="data_dir")


def make(name: str, **options) -> PolyphonicTask:
    cls = get_task(name)
    return cls(cls.Options(**options), seed=0)


def whole_split(task: PolyphonicTask, split: str) -> dict[str, torch.Tensor]:
    data = task.datasets()[split]
    return task.collate([data[i] for i in range(len(data))])


def one_member(task: PolyphonicTask, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A member's collated batch in the stacked layout the losses take (a population of one)."""
    return task.broadcast_batch(batch, 1)


# --- no data needed -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CHUNG_SIZES))
def test_registered_with_sizes_and_options(name: str) -> None:
    cls = TASKS[name]
    assert issubclass(cls, PolyphonicTask) and cls.primary_metric == "nll"
    assert cls.Options().name == name
    assert make(name).input_size == make(name).output_size == 88
    assert make(name, layout="chung").input_size == make(name, layout="chung").output_size == CHUNG_SIZES[name]
    with pytest.raises(ValidationError):
        cls.Options(seq_len=3)  # unknown keys are errors
    with pytest.raises(ValidationError):
        cls.Options(layout="key96")


def test_describe_states_layout_and_first_frame() -> None:
    d = make("jsb", layout="chung", first_frame="skip").describe()
    assert d == {"layout": "chung", "first_frame": "skip", "input_size": "96"}


def test_step_nll_matches_the_bernoulli_formula_and_ignores_padding() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    y = (torch.rand(2, 5, 7, generator=g) < 0.3).double()
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    p = torch.sigmoid(logits)
    by_hand = -(y * p.log() + (1 - y) * (1 - p).log()).sum(-1) * mask
    got = bernoulli_step_nll(logits, y, mask)
    torch.testing.assert_close(got, by_hand)
    logits[1, 2:] = float("nan")  # anything at padded steps stays out
    y[1, 2:] = 7.0
    torch.testing.assert_close(bernoulli_step_nll(logits, y, mask), by_hand)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_fused_bernoulli_nll_equals_torchs_values_and_gradients(dtype: torch.dtype) -> None:
    """The compiled op behind cells.bernoulli_nll against binary_cross_entropy_with_logits summed
    over the keys, computed in float64: logits from -60 to 60 (0 and ±1e-8 included), both targets."""
    from rnnbench.cells import bernoulli_nll, compiled

    if not compiled.load_extension():
        pytest.skip("the compiled CPU ops did not build here")
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1000, 88, generator=g, dtype=torch.float64) * 8
    z[0, :7] = torch.tensor([0.0, 1e-8, -1e-8, 40.0, -40.0, 60.0, -60.0], dtype=torch.float64)
    y = (torch.rand(1000, 88, generator=g) < 0.2).double()
    w = torch.randn(1000, generator=g, dtype=torch.float64)
    zd = z.clone().requires_grad_()
    exact = torch.nn.functional.binary_cross_entropy_with_logits(zd, y, reduction="none").sum(-1)
    (exact_grad,) = torch.autograd.grad(exact, zd, w)
    zc = z.to(dtype).requires_grad_()
    got = compiled.BernoulliNLL.apply(zc, y.to(dtype))  # the op (bernoulli_nll picks it by size and threads)
    assert got.shape == (1000,) and got.dtype == dtype
    (grad,) = torch.autograd.grad(got, zc, w.to(dtype))
    # the dispatch keeps the leading dims whichever it runs
    assert bernoulli_nll(zc.detach().view(10, 100, 88), y.to(dtype).view(10, 100, 88)).shape == (10, 100)
    tol = {"rtol": 1e-13, "atol": 1e-13} if dtype == torch.float64 else {"rtol": 1e-6, "atol": 1e-5}
    torch.testing.assert_close(got.view(-1).double(), exact.detach(), **tol)
    torch.testing.assert_close(grad.double(), exact_grad, **(tol if dtype == torch.float64 else {"rtol": 0, "atol": 1e-6}))
    # rows split between the threads (a population's logits) give the same numbers, bit for bit
    zp = z.to(dtype).requires_grad_()
    split = compiled.BernoulliNLL.apply(zp, y.to(dtype), None, True)
    assert torch.equal(split, got) and torch.equal(torch.autograd.grad(split, zp, w.to(dtype))[0], grad)


@pytest.mark.parametrize("shared", [False, True])
def test_the_loss_reads_the_valid_steps_targets_where_they_lie(shared: bool) -> None:
    """packed_targets and bernoulli_nll's target_rows (both dispatch paths) give y[mask]'s NLL and
    gradients: a stacked batch's targets and a broadcast one's (member stride 0), float64."""
    from rnnbench.cells import bernoulli_nll, compiled, loops
    from rnnbench.tasks.polyphonic import packed_targets

    g = torch.Generator().manual_seed(2)
    K, B, T, D = 3, 4, 9, 88
    y = (torch.rand(1 if shared else K, B, T, D, generator=g) < 0.2).double()
    mask = torch.rand(1 if shared else K, B, T, generator=g) < 0.6
    if shared:
        y, mask = y.expand(K, B, T, D), mask.expand(K, B, T)
    targets, rows = packed_targets(y, mask)
    assert torch.equal(targets.index_select(0, rows), y[mask])
    z = torch.randn(int(mask.sum()), D, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(len(z), generator=g, dtype=torch.float64)
    exact = torch.nn.functional.binary_cross_entropy_with_logits(z, y[mask], reduction="none").sum(-1)
    (exact_grad,) = torch.autograd.grad(exact, z, w)
    paths = [("torch", float("inf"))] + ([("op", 0)] if compiled.load_extension() else [])
    for name, threshold in paths:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(loops, "FUSED_LOSS_ELEMENTS", threshold)
            mp.setattr(torch, "get_num_threads", lambda: 2)  # the dispatch by size only
            got = bernoulli_nll(z, targets, target_rows=rows)
        (grad,) = torch.autograd.grad(got, z, w)
        torch.testing.assert_close(got, exact, rtol=1e-13, atol=1e-13, msg=name)
        torch.testing.assert_close(grad, exact_grad, rtol=1e-13, atol=1e-13, msg=name)
    if compiled.load_extension():
        with pytest.raises(RuntimeError, match="y_rows out of range"):
            compiled.BernoulliNLL.apply(z.detach(), targets, rows + len(targets))


def test_to_layout_chung_puts_midi_p_in_column_p_minus_1() -> None:
    roll = np.zeros((3, 88), dtype=np.uint8)
    roll[0, 0] = roll[1, 75] = 1  # MIDI 21 and MIDI 96
    chung = to_layout(roll, "chung", 96)
    assert chung.shape == (3, 96)
    assert chung[0, 20] == chung[1, 95] == 1 and chung.sum() == 2
    roll[2, 76] = 1  # MIDI 97 does not fit a 96-wide chung roll
    with pytest.raises(Exception, match="drop notes"):
        to_layout(roll, "chung", 96)


def test_baselines_by_hand_on_a_tiny_roll() -> None:
    # One key: train frames 1,1,0,1 -> marginal P(on) = (3 + 1) / (4 + 2) = 2/3;
    # transitions 1->1, 1->0, 0->1: P(on | on) = (1 + 1) / (2 + 2), P(on | off) = (1 + 1) / (1 + 2).
    train = [np.array([[1], [1], [0], [1]], dtype=np.uint8)]
    test = [np.array([[0], [1]], dtype=np.uint8)]
    m = 2 / 3
    assert marginal_bernoulli_nll(train, test, "zero") == pytest.approx(-(math.log(1 - m) + math.log(m)) / 2)
    assert marginal_bernoulli_nll(train, test, "skip") == pytest.approx(-math.log(m))
    p_on_after_off = 2 / 3
    assert markov_nll(train, test, "zero") == pytest.approx(-(math.log(1 - m) + math.log(p_on_after_off)) / 2)
    assert markov_nll(train, test, "skip") == pytest.approx(-math.log(p_on_after_off))


# --- JSB (small: the fast set) ----------------------------------------------------------------------
def test_jsb_first_frame_conventions_count_steps(data_dir: Path) -> None:
    n_seq, n_steps = TEST_SPLIT["jsb"]
    for first_frame, expected in (("zero", n_steps), ("skip", n_steps - n_seq)):
        task = make("jsb", first_frame=first_frame)
        batch = whole_split(task, "test")
        assert batch["x"].shape[0] == n_seq
        assert int(batch["mask"].sum()) == int(batch["lengths"].sum()) == expected
        out = torch.zeros(1, *batch["y"].shape)
        _, count = task.metric_sums(out, one_member(task, batch))["nll"]
        assert count.tolist() == [expected]
        # With all logits 0 every key costs ln 2, whatever the roll.
        assert task.loss(out, one_member(task, batch)).item() == pytest.approx(88 * math.log(2))
        assert task.time_steps(one_member(task, batch)).tolist() == [n_seq * batch["x"].shape[1]]


def test_jsb_batch_shapes_and_shift(data_dir: Path) -> None:
    for first_frame in ("zero", "skip"):
        task = make("jsb", first_frame=first_frame, max_sequences=4)
        data = task.datasets()
        assert {k: len(v) for k, v in data.items()} == {"train": 4, "val": 4, "test": 4}
        rolls = [data["train"][i] for i in range(4)]
        batch = task.collate(rolls)
        B, T, D = batch["x"].shape
        assert batch["y"].shape == (B, T, D) and batch["mask"].shape == (B, T) and batch["mask"].dtype == torch.bool
        assert D == 88 and B == 4 and T == max(len(r) for r in rolls) - (first_frame == "skip")
        # the batch holds the items longest first (the recurrent loops drop each at its own end)
        assert batch["lengths"].tolist() == sorted(batch["lengths"].tolist(), reverse=True)
        for b, r in enumerate(sorted(rolls, key=len, reverse=True)):
            r = r.float()
            n = int(batch["lengths"][b])
            if first_frame == "zero":
                assert n == len(r)
                assert not batch["x"][b, 0].any()
                torch.testing.assert_close(batch["x"][b, 1:n], r[:-1])
                torch.testing.assert_close(batch["y"][b, :n], r)
            else:
                assert n == len(r) - 1
                torch.testing.assert_close(batch["x"][b, :n], r[:-1])
                torch.testing.assert_close(batch["y"][b, :n], r[1:])
            assert not batch["x"][b, n:].any() and not batch["y"][b, n:].any()


def test_jsb_chung_layout_shifts_columns(data_dir: Path) -> None:
    key88, chung = make("jsb", max_sequences=5), make("jsb", layout="chung", max_sequences=5)
    for a, b in zip(key88.rolls()["test"], chung.rolls()["test"]):
        assert b.shape == (len(a), 96)
        np.testing.assert_array_equal(b[:, 20:], a[:, :76])  # MIDI 21..96
        assert not b[:, :20].any() and not a[:, 76:].any()
    batch = whole_split(chung, "test")
    assert batch["x"].shape[-1] == 96


@pytest.mark.parametrize("first_frame", ["zero", "skip"])
def test_jsb_batched_nll_equals_per_sequence_and_ignores_padding(data_dir: Path, first_frame: str) -> None:
    torch.manual_seed(0)
    task = make("jsb", first_frame=first_frame, max_sequences=6)
    data = task.datasets()["val"]
    items = [data[i] for i in range(6)]
    assert len({len(r) for r in items}) > 1, "want sequences of different lengths"
    rnn = torch.nn.GRU(88, 16, batch_first=True)
    head = torch.nn.Linear(16, task.output_size)

    def model(batch: dict[str, torch.Tensor]) -> torch.Tensor:  # a population of one: (1, B, T, D)
        return head(rnn(batch["x"][0])[0])[None]

    batch = one_member(task, task.collate(items))
    out = model(batch)
    total, count = task.metric_sums(out, batch)["nll"]
    sums = [task.metric_sums(model(b), b)["nll"] for b in (one_member(task, task.collate([r])) for r in items)]
    torch.testing.assert_close(total, sum(s for s, _ in sums))
    assert int(count) == sum(int(n) for _, n in sums)
    loss = task.loss(out, batch)
    torch.testing.assert_close(loss, total / count)
    # the training step's one-pass form gives exactly the same loss and sums
    loss1, sums1 = task.loss_and_sums(out, batch)
    assert torch.equal(loss1, loss) and torch.equal(sums1["nll"][0], total) and torch.equal(sums1["nll"][1], count)
    assert not sums1["nll"][0].requires_grad

    # Garbage in the padding changes neither the metric nor the gradient of the loss.
    grads = torch.autograd.grad(loss, list(rnn.parameters()) + list(head.parameters()))
    pad = ~batch["mask"]
    noisy = {k: v.clone() for k, v in batch.items()}
    noisy["x"][pad] = 5.0 * torch.randn(int(pad.sum()), 88)
    noisy["y"][pad] = torch.rand(int(pad.sum()), 88)
    out2 = model(noisy)
    torch.testing.assert_close(task.metric_sums(out2, noisy)["nll"][0], total)
    grads2 = torch.autograd.grad(task.loss(out2, noisy), list(rnn.parameters()) + list(head.parameters()))
    for g1, g2 in zip(grads, grads2):
        torch.testing.assert_close(g1, g2)


def test_jsb_baselines_finite_markov_beats_marginal_and_cached(data_dir: Path) -> None:
    task = make("jsb")
    for split in ("train", "val", "test"):
        b = task.baselines(split)
        assert set(b) == {"nll_marginal", "nll_markov"}
        assert all(math.isfinite(v) and v > 0 for v in b.values())
        assert b["nll_markov"] < b["nll_marginal"]
    # Computed once per instance: the cache answers, and a caller's edit does not reach it.
    first = task.baselines("test")
    first["nll_markov"] = -1.0
    assert task.baselines("test")["nll_markov"] > 0 and task._baselines["test"] is not first
    # The public functions on the task's own rolls give the same numbers.
    r = task.rolls()
    assert task.baselines("test")["nll_markov"] == pytest.approx(markov_nll(r["train"], r["test"], "zero"))
    # The marginal sits well above the published RNN result (8.71) and well below 88 ln 2.
    assert 9.0 < task.baselines("test")["nll_marginal"] < 88 * math.log(2)


def test_jsb_pickle_source_equals_mat(data_dir: Path) -> None:
    if not (data_dir / "polyphonic" / "JSB_Chorales.pickle").is_file():
        pytest.skip("the JSB pickle is not staged")
    mat, pkl = make("jsb", max_sequences=10), make("jsb", max_sequences=10, source="pickle")
    for split in ("train", "val", "test"):
        for a, b in zip(mat.rolls()[split], pkl.rolls()[split], strict=True):
            np.testing.assert_array_equal(a, b)


# --- the other corpora, read whole --------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["nottingham", "musedata", "pianomidi", "jsb"])
def test_corpus_chung_size_is_its_highest_pitch_and_counts(data_dir: Path, name: str) -> None:
    task = make(name, layout="chung")
    rolls = task.rolls()
    top = max(int(np.flatnonzero(np.concatenate(r).any(0)).max()) for r in rolls.values())
    assert top + 1 == CHUNG_SIZES[name]  # column j is MIDI 1 + j; the corpus's highest note is the last column
    n_seq, n_steps = TEST_SPLIT[name]
    assert len(rolls["test"]) == n_seq and sum(len(r) for r in rolls["test"]) == n_steps
    skip = make(name, first_frame="skip", max_sequences=None)
    assert sum(len(r) - 1 for r in skip.rolls()["test"]) == n_steps - n_seq
    b = task.baselines("test")
    assert all(math.isfinite(v) for v in b.values()) and b["nll_markov"] < b["nll_marginal"]
