"""The population trainer (rnnbench/training): a member does not depend on its population.

For every registered cell, K in {1, 3, 8}, on real music data (sequences of unequal lengths, so
batch-mates pad each other) in float64: every member of a population of K gives the numbers the same
config gives trained alone (per-epoch records, final scores, final weights), including a member that
stops early and one that diverges. No MLflow here (the loop runs with no recorder); the runs and
their records are tested in test_train_e2e.py and test_sweep.py.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import requires_data
from rnnbench.cells import CELLS
from rnnbench.config import Config, load_config
from rnnbench.errors import RnnbenchError
from rnnbench.training import loop
from rnnbench.training.population import build

TIMING = {"epoch_seconds", "epoch_core_seconds", "wall_seconds"}
TINY = ["task.name=jsb", "task.max_sequences=12", "model.hidden_size=4", "train.batch_size=3",
        "train.precision='64'", "train.progress_bar=false", "train.gradient_flow=false",
        "train.limit_train_batches=3", "train.limit_eval_batches=2", "train.early_stopping_patience=null",
        "train.max_epochs=3"]


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def member_configs(cell: str, tmp: Path, members: list[list[str]]) -> list[Config]:
    return [load_config(None, TINY + [f"model.cell={cell}", f"tracking.checkpoint_dir={tmp}"] + over) for over in members]


def fit(configs: list[Config]) -> Any:
    """Train a population with the real loop and callbacks, no MLflow; return it after scoring."""
    pop = build(configs, torch.device("cpu"), torch.float64, run_ids=[f"m{k}-{c.train.seed}-{c.train.lr}" for k, c in enumerate(configs)])
    loop._fit(pop, {}, None)
    done = [i for i, m in enumerate(pop.members) if m.status == "stopped"]
    final = loop._score(pop, done, 0.0, {"recurrent": 0, "total": 0}, 4)
    return pop, final


def numbers(pop: Any, final: dict[int, dict[str, float]], k: int) -> dict[str, Any]:
    m = pop.members[k]
    history = [{key: v for key, v in h.items() if key not in TIMING} for h in m.history]
    scores = {key: v for key, v in final.get(k, {}).items() if key.startswith(("test_", "final_"))}
    return {"status": m.status, "history": history, "scores": scores, "best_epoch": m.best_epoch}


def assert_close(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["status"] == b["status"] and a["best_epoch"] == b["best_epoch"]
    assert len(a["history"]) == len(b["history"])
    for ha, hb in zip(a["history"], b["history"]):
        assert ha.keys() == hb.keys()
        for key in ha:
            assert ha[key] == pytest.approx(hb[key], rel=1e-9, abs=1e-12, nan_ok=True), key
    assert a["scores"].keys() == b["scores"].keys()
    for key in a["scores"]:
        assert a["scores"][key] == pytest.approx(b["scores"][key], rel=1e-9, abs=1e-12, nan_ok=True), key


# Eight members that differ in seed and per-member hyperparameters: one stops early (patience 1),
# one has fewer epochs, one diverges (Adam steps of 1e308 overflow the weights to inf within two
# updates; inf times a zero input is NaN).
EIGHT = [
    ["train.seed=0", "train.lr=0.01"],
    ["train.seed=1", "train.lr=0.003"],
    ["train.seed=2", "train.lr=0.03", "train.early_stopping_patience=1"],
    ["train.seed=3", "train.lr=0.001", "train.max_epochs=2"],
    ["train.seed=4", "train.lr=0.02", "train.grad_clip=0.5"],
    ["train.seed=5", "train.lr=1e308", "train.grad_clip=null"],
    ["train.seed=6", "train.lr=0.005", "train.weight_noise=0.01"],
    ["train.seed=7", "train.lr=0.002"],
]


@requires_data
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_members_do_not_depend_on_their_population(cell: str, tmp_path: Path) -> None:
    members = EIGHT
    if CELLS[cell].count_params(1, 1) == 0:  # a cell that trains no recurrent weights refuses weight noise
        members = [m if "train.weight_noise=0.01" not in m else ["train.seed=6", "train.lr=0.005", "train.grad_clip=2.0"]
                   for m in EIGHT]
    eight = member_configs(cell, tmp_path, members)
    pop8, final8 = fit(eight)
    statuses = [m.status for m in pop8.members]
    assert statuses[5] == "failed" and "training loss became" in (pop8.members[5].reason or "")
    assert all(s == "stopped" for k, s in enumerate(statuses) if k != 5)
    assert pop8.members[3].epoch == 2 and pop8.members[0].epoch == 3  # per-member max_epochs
    three_idx = [2, 5, 6]
    pop3, final3 = fit([eight[k] for k in three_idx])
    for j, k in enumerate(three_idx):
        assert_close(numbers(pop3, final3, j), numbers(pop8, final8, k))
    for k in (0, 2, 5, 6):  # alone: plain, early-stopped, diverged, with weight noise (where the cell takes it)
        pop1, final1 = fit([eight[k]])
        assert_close(numbers(pop1, final1, 0), numbers(pop8, final8, k))


@requires_data
def test_a_member_stopped_early_keeps_its_best_weights(tmp_path: Path) -> None:
    configs = member_configs("gru_reset_before", tmp_path, [["train.seed=0", "train.lr=0.05", "train.early_stopping_patience=1"]])
    pop, final = fit(configs)
    m = pop.members[0]
    scores = [h["val_nll"] for h in m.history]
    assert m.best_epoch == min(range(len(scores)), key=scores.__getitem__)
    assert final[0]["final_val_nll"] == pytest.approx(scores[m.best_epoch], rel=1e-9)


@requires_data
def test_a_pruner_stops_members_at_a_rung(tmp_path: Path) -> None:
    configs = member_configs("tanh", tmp_path, [[f"train.seed={s}", f"train.lr={lr}"] for s, lr in ((0, 0.01), (1, 1e-5), (2, 0.003))])
    pop = build(configs, torch.device("cpu"), torch.float64, run_ids=["a", "b", "c"])
    calls: list[tuple[int, dict[int, float]]] = []

    def keep_best_two_at_epoch_1(epoch: int, members: list[Any]) -> list[int]:
        scores = {i: m.history[-1]["val_nll"] for i, m in enumerate(members) if m.status == "training"}
        calls.append((epoch, scores))
        return sorted(scores, key=scores.__getitem__)[2:] if epoch == 1 else []

    loop._fit(pop, {}, keep_best_two_at_epoch_1)
    pruned = [m for m in pop.members if m.stopped_by == "pruned"]
    assert len(pruned) == 1 and pruned[0].epoch == 1
    assert [e for e, _ in calls] == [1, 2] and len(calls[1][1]) == 2  # epoch 3 ends every member (max_epochs)
    assert all(math.isfinite(v) for _, s in calls for v in s.values())


@requires_data
def test_each_epoch_is_charged_to_the_members_that_computed_it(tmp_path: Path) -> None:
    """The report's costs add up `core_seconds`: each epoch's seconds x threads split over the members
    in it (a member gone after epoch 1 leaves the later epochs to the others), plus a setup share."""
    configs = member_configs("gru", tmp_path, [["train.seed=0"], ["train.seed=1", "train.max_epochs=1"], ["train.seed=2"]])
    pop = build(configs, torch.device("cpu"), torch.float64, run_ids=["a", "b", "c"])
    loop._fit(pop, {}, None)
    final = loop._score(pop, [0, 1, 2], 6.0, {"recurrent": 0, "total": 0}, 4)
    a, b, c = (m.history for m in pop.members)
    assert (len(a), len(b), len(c)) == (3, 1, 3)
    assert a[0]["epoch_core_seconds"] == pytest.approx(a[0]["epoch_seconds"] / 3)  # one thread, three members
    assert b[0]["epoch_core_seconds"] == a[0]["epoch_core_seconds"]
    for e in (1, 2):
        assert a[e]["epoch_core_seconds"] == c[e]["epoch_core_seconds"] == pytest.approx(a[e]["epoch_seconds"] / 2)
    for k, history in enumerate((a, b, c)):  # setup: 6 s over three members
        assert final[k]["core_seconds"] == pytest.approx(sum(h["epoch_core_seconds"] for h in history) + 2.0)


def _graphed_fit(configs: list[Config], device: str, capture: Any) -> Any:
    from rnnbench.training.graphs import StepGraphs

    pop = build(configs, torch.device(device), torch.float64 if device == "cpu" else torch.float32,
                run_ids=[f"g{k}" for k in range(len(configs))])
    pop.graphs = StepGraphs(pop, capture=capture)
    loop._fit(pop, {}, None)
    return pop


@requires_data
@pytest.mark.parametrize("cell", ["lstm_peephole", "gru"])
def test_the_graphed_step_gives_the_plain_steps_numbers(cell: str, tmp_path: Path) -> None:
    """The CUDA-graph bookkeeping (padded-length buckets, static inputs, captured steps replayed,
    graphs dropped when a member leaves), run on the CPU with eager replays: the numbers of the
    plain step, for members that stop early, run out of epochs and diverge."""
    from rnnbench.training.graphs import eager_capture

    configs = member_configs(cell, tmp_path, [EIGHT[k] for k in (0, 2, 3, 5, 6)])
    plain, _ = fit(configs)
    graphed = _graphed_fit(configs, "cpu", eager_capture)
    assert graphed.graphs.captures > 0  # steps were captured and replayed
    for k in range(len(configs)):
        assert_close(numbers(graphed, {}, k), numbers(plain, {}, k))


@pytest.mark.gpu
@requires_data
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_cuda_graphs_give_the_eager_numbers(cell: str, tmp_path: Path) -> None:
    """On a GPU: the real CUDA graphs against the same bookkeeping replayed eagerly (float32 tolerance)."""
    from rnnbench.training.graphs import cuda_capture, eager_capture

    over = ["train.device=cuda", "train.precision='32'"]
    configs = member_configs(cell, tmp_path, [EIGHT[k] + over for k in (0, 2, 6)])
    a, b = _graphed_fit(configs, "cuda", cuda_capture), _graphed_fit(configs, "cuda", eager_capture)
    assert a.graphs.captures > 0
    for k in range(len(configs)):
        ha, hb = numbers(a, {}, k), numbers(b, {}, k)
        assert len(ha["history"]) == len(hb["history"])
        for ra, rb in zip(ha["history"], hb["history"]):
            for key in ra:
                assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-5), key


def test_a_member_stops_once_its_score_is_far_enough_below_the_baseline(tmp_path: Path) -> None:
    """train.stop_below_baseline: the member that reaches val_mse < f x val_mse_baseline stops at that epoch
    (its best weights those of it), the member without the rule trains on, in the same population."""
    base = ["task.name=adding", "task.seq_len=5", "task.n_train=200", "task.n_val=100", "task.n_test=50", "model.cell=lstm",
            "model.hidden_size=8", "train.batch_size=10", "train.precision='64'", "train.progress_bar=false",
            "train.gradient_flow=false", "train.early_stopping_patience=null", "train.max_epochs=12", "train.lr=0.01",
            f"tracking.checkpoint_dir={tmp_path}"]
    configs = [load_config(None, base + over) for over in (["train.stop_below_baseline=0.5"], [])]
    pop, _ = fit(configs)
    ruled, free = pop.members
    baseline = ruled.history[0]["val_mse_baseline"]
    below = [h["val_mse"] < 0.5 * baseline for h in free.history]  # the same member without the rule
    assert any(below), "the member without the rule never got that far below: make the test's run longer"
    first = below.index(True)
    assert ruled.stopped_by == "below_baseline" and len(ruled.history) == first + 1 < len(free.history)
    assert free.stopped_by == "max_epochs" and len(free.history) == 12
    assert ruled.history == free.history[: first + 1]  # a member does not depend on its population


@requires_data
def test_a_stop_rule_for_a_task_without_that_baseline_fails_in_one_line(tmp_path: Path, store: str) -> None:
    from rnnbench.train import train

    with pytest.raises(RnnbenchError, match="task jsb has no nll_baseline to stop below") as e:
        train(load_config(None, TINY + ["train.stop_below_baseline=0.1", f"tracking.checkpoint_dir={tmp_path}"]))
    assert "\n" not in str(e.value)


PACKED = [pytest.param(c, "jsb", id=f"{c}-jsb") for c in sorted(CELLS)] + [
    pytest.param(c, "fsdd", id=f"{c}-fsdd") for c in ("lstm", "gru_reset_before")]


@requires_data
@pytest.mark.parametrize(("cell", "task"), PACKED)
def test_packed_rows_give_the_padded_numbers(cell: str, task: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A music (or speech) population's projection over each member's own steps and its output layer
    and loss over the valid steps only (rows_linear) give the padded computation's loss, sums and
    gradients."""
    from rnnbench import cells
    from rnnbench.cells import loops
    from rnnbench.training.population import TrainBatches

    if not cells.rows_linear_available("cpu", torch.float64):
        pytest.skip("the compiled CPU ops did not load")
    from rnnbench.training import population

    monkeypatch.setattr(population, "PACK_BELOW", 1.01)  # pack whatever the padding
    base = TINY if task == "jsb" else [o for o in TINY if not o.startswith("task.")] + [
        "task.name=fsdd", "task.max_recordings=12", "task.n_components=3"]
    configs = [load_config(None, base + [f"model.cell={cell}", f"tracking.checkpoint_dir={tmp_path}", f"train.seed={k}"])
               for k in range(3)]
    pop = build(configs, torch.device("cpu"), torch.float64)
    batch = pop.on_device(next(iter(TrainBatches(pop))))
    assert len(set(batch["steps"].tolist())) > 1  # members of unequal lengths: some rows are padding
    weights = pop.trained_weights()

    def scores(packed: bool) -> tuple[Any, ...]:
        monkeypatch.setattr(loops, "rows_linear_available", lambda d, t: packed)
        monkeypatch.setattr(cells, "rows_linear_available", lambda d, t: packed)
        got = pop._packed_scores(batch)
        if packed:
            assert got is not None
            loss, sums = got
        else:
            assert got is None
            loss, sums = pop.task.loss_and_sums(pop(batch["x"], batch["steps"], batch["lengths"]), batch)
        return loss, sums["nll"], torch.autograd.grad(loss.sum(), weights, allow_unused=True)

    (la, sa, ga), (lb, sb, gb) = scores(True), scores(False)
    monkeypatch.setattr(cells, "rows_linear_available", lambda d, t: True)
    monkeypatch.setattr(population, "PACK_BELOW", 0.0)  # a batch with (almost) no padding is not gathered
    assert pop._packed_scores(batch) is None
    torch.testing.assert_close(la, lb, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sa[0], sb[0], rtol=1e-12, atol=1e-10)
    assert torch.equal(sa[1], sb[1])
    for a, b in zip(ga, gb):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
