"""The ridge readout of an echo-state network (train.readout=ridge, rnnbench/training/ridge.py):
the closed form on the states the loss reads, both forms of it, the penalty chosen on validation,
the refusals, and a real run through `rnnbench train`."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from conftest import data_dir
from typer.testing import CliRunner

from rnnbench import cells
from rnnbench.cli import app
from rnnbench.config import load_config
from rnnbench.errors import RnnbenchError
from rnnbench.tasks import TASKS, get_task
from rnnbench.tasks.base import Task
from rnnbench.training import loop, population, ridge
from rnnbench.training.population import build

H = 24


SMALL = {"adding": ["task.seq_len=7", "task.n_train=60", "task.n_val=30", "task.n_test=30"],
         "copy": ["task.seq_len=7", "task.n_train=60", "task.n_val=30", "task.n_test=30"],
         "fsdd_digits": ["task.max_recordings=30", "task.max_seconds=0.05"]}


def configs(tmp: Path, task: str = "adding", seeds: tuple[int, ...] = (0, 1)) -> list:
    return [load_config(None, [f"task.name={task}", *SMALL[task],
                               "model.cell=esn", f"model.hidden_size={H}", "train.readout=ridge", "train.batch_size=16",
                               "train.precision='64'", "train.progress_bar=false", "train.gradient_flow=false",
                               f"train.seed={s}", f"tracking.checkpoint_dir={tmp}"]) for s in seeds]


def states_and_targets(pop, k: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Member k's states at the rows its loss reads, from the reference step loop, and their targets."""
    task = pop.data.tasks[k]
    data = pop.data.dataset(k, split)
    batch = task.collate([data[i] for i in range(len(data))])
    layers, _, _ = pop.member_weights(pop.ids.index(k))
    trace = cells.run_steps("esn", layers, batch["x"].double().unsqueeze(0))
    stacked = task.stack_batches([batch])
    rows, y = task.readout_targets(stacked)
    X = trace.out[0][rows[0]]
    return torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1), y[0][rows[0]].double()


@pytest.mark.parametrize("task", sorted(name for name, cls in TASKS.items() if cls.ridge_readout is not None))
def test_the_readout_is_the_ridge_solution_at_the_penalty_validation_chose(task: str, tmp_path: Path) -> None:
    if get_task(task).check_data.__func__ is not Task.check_data.__func__ and data_dir() is None:  # a task that reads files
        pytest.skip("needs the real datasets: set RNNBENCH_DATA_DIR (see ../shared/data/SOURCES.md)")
    pop = build(configs(tmp_path, task), torch.device("cpu"), torch.float64, run_ids=["a", "b"])
    choices = loop._fit_ridge(pop, {})
    for k in (0, 1):
        X, Y = states_and_targets(pop, k, "train")
        Xv, Yv = states_and_targets(pop, k, "val")
        scores = {}
        for lam in ridge.LAMBDAS:
            W = torch.linalg.solve(X.T @ X + lam * torch.eye(X.shape[1], dtype=X.dtype), X.T @ Y)
            out = Xv @ W
            if get_task(task).ridge_readout == "identity":
                scores[(lam, 1.0)] = (float(((out[:, 0] - Yv[:, 0]) ** 2).mean()), W)
            else:  # the mean cross-entropy over the rows read (copy: every step; digits: an utterance's last)
                for s in ridge.SCALES:
                    ce = torch.nn.functional.cross_entropy(s * out, Yv.argmax(1))
                    scores[(lam, s)] = (float(ce), W * s)
        best = min(scores, key=lambda key: scores[key][0])
        assert (choices[k]["ridge_lambda"], choices[k]["readout_scale"]) == best
        W = scores[best][1]
        torch.testing.assert_close(pop.best[-2][k], W[:-1].T, rtol=1e-7, atol=1e-9)  # the member's best = fitted
        torch.testing.assert_close(pop.best[-1][k], W[-1], rtol=1e-7, atol=1e-9)
        m = pop.members[k]
        assert m.status == "stopped" and m.stopped_by == "ridge" and len(m.history) == 1
        primary = pop.task.primary_metric
        assert m.history[0][f"val_{primary}"] == pytest.approx(scores[best][0], rel=1e-9)


def test_the_dual_form_gives_the_primal_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    primal = build(configs(tmp_path), torch.device("cpu"), torch.float64, run_ids=["a", "b"])
    loop._fit_ridge(primal, {})
    monkeypatch.setattr(ridge, "DUAL_ABOVE", 2)
    dual = build(configs(tmp_path), torch.device("cpu"), torch.float64, run_ids=["a", "b"])
    loop._fit_ridge(dual, {})
    torch.testing.assert_close(dual.head_weight, primal.head_weight, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(dual.head_bias, primal.head_bias, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("task", ["adding", "copy"])
def test_a_batch_scored_in_pieces_gives_the_numbers_of_the_whole(task: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Evaluation batches too large for memory go in pieces of rows (Population.pieces), or, where
    the task reads only the last step (adding), whole with only that step's states kept
    (Population.last_step_states): the same readout and the same test, final_val and final_train
    scores, to rounding (float64)."""
    def fit_and_score() -> tuple:
        pop = build(configs(tmp_path, task), torch.device("cpu"), torch.float64, run_ids=["a", "b"])
        loop._fit_ridge(pop, {})
        scores = loop._score(pop, list(pop.ids), 0.0, {"recurrent": 0, "total": 0}, H)
        return pop, [m.history[0] for m in pop.members], scores

    whole, whole_records, whole_scores = fit_and_score()
    T = whole.data.dataset(0, "train")[0][0].shape[0]
    rows = 3  # batches of 16: pieces of 3, 3, 3, 3, 3 and 1
    monkeypatch.setattr(population, "EVAL_STATE_ELEMENTS", rows * T * H)
    batch = whole.on_device(whole.task.broadcast_batch(next(iter(whole.data.eval["val"][None if not whole.task.seeded_data else 0])), 2))
    assert [p["x"].shape[1] for p in whole.pieces(batch)] == ([16] if task == "adding" else [3, 3, 3, 3, 3, 1])
    assert whole.reads_last_step_only(batch) == (task == "adding")
    split, split_records, split_scores = fit_and_score()
    torch.testing.assert_close(split.head_weight, whole.head_weight, rtol=1e-6, atol=1e-8)  # lambda 1e-8 amplifies rounding
    torch.testing.assert_close(split.head_bias, whole.head_bias, rtol=1e-6, atol=1e-8)
    for a, b in zip(split_records, whole_records):
        assert {k: v for k, v in a.items() if "seconds" not in k} == pytest.approx(
            {k: v for k, v in b.items() if "seconds" not in k}, rel=1e-7)
    for i in whole_scores:
        keys = [k for k in whole_scores[i] if k.startswith(("test_", "final_"))]
        assert keys and {k: split_scores[i][k] for k in keys} == pytest.approx({k: whole_scores[i][k] for k in keys}, rel=1e-7)


@pytest.mark.parametrize("overrides,match", [
    (["model.cell=lstm", "model.hidden_size=8"], "lstm trains its recurrent weights"),
    (["task.name=jsb", "model.cell=esn", "model.hidden_size=8"], "task jsb has no least-squares readout"),
])
def test_a_ridge_readout_where_none_fits_is_refused_in_one_line(overrides: list[str], match: str) -> None:
    with pytest.raises(RnnbenchError, match=match) as e:
        load_config(None, ["train.readout=ridge", *overrides])
    assert "\n" not in str(e.value)


def test_rnnbench_train_records_a_ridge_run(tmp_path: Path, store: str) -> None:
    spec = tmp_path / "esn.yaml"
    spec.write_text("model: {cell: esn}\ntask: {name: adding}\ntrain: {readout: ridge}\n")
    result = CliRunner().invoke(app, [
        "train", str(spec), "task.name=adding", "task.seq_len=6", "task.n_train=50", "task.n_val=20", "task.n_test=20",
        "model.cell=esn", "model.budget=41", "model.budget_convention=total", "train.readout=ridge",
        "train.progress_bar=false", f"tracking.checkpoint_dir={tmp_path / 'ck'}", f"tracking.tracking_uri={store}"])
    assert result.exit_code == 0, result.output
    [run] = mlflow.MlflowClient(store).search_runs(mlflow.MlflowClient(store).search_experiments()[0].experiment_id)
    assert run.info.status == "FINISHED"
    m, p = run.data.metrics, run.data.params
    assert m["ridge_lambda"] in ridge.LAMBDAS and m["readout_scale"] == 1.0 and m["test_mse"] < m["test_mse_baseline"]
    assert p["train.readout"] == "ridge" and p["n_params_total"] == "41" and m["hidden_size"] == 40
    assert m["epochs"] == 1 and any(k.startswith("gradflow_trained_") for k in m)  # the probe runs on it too


def test_the_cost_estimate_counts_one_pass_for_a_ridge_readout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The sweep's estimate: a ridge run costs one pass (fit) and the final scoring, not max_epochs epochs."""
    from rnnbench.sweep import cost

    monkeypatch.setattr(cost, "_measure", lambda config: (2.0, 1.0, 10, "label"))
    [ridge_run] = configs(tmp_path, seeds=(0,))
    by_optimizer = ridge_run.model_copy(deep=True)
    by_optimizer.train.readout, by_optimizer.train.max_epochs = "optimizer", 5
    assert cost.estimate([ridge_run]).seconds == 2.0 * 1 + 1.0
    assert cost.estimate([by_optimizer]).seconds == 2.0 * 5 + 1.0
