"""Successive halving (rnnbench/sweep/halving.py) and the two-stage halving sweep, on a real store."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from conftest import requires_data
from rnnbench.errors import RnnbenchError
from rnnbench.sweep.halving import SuccessiveHalving, choose
from rnnbench.sweep.spec import expand, final_points, grid_key, restrict, spec_from_dict


@dataclass
class M:
    best_score: float
    status: str = "training"
    stopped_by: str = ""


def test_a_rung_keeps_the_best_third_of_the_field_rounded_up() -> None:
    rule = SuccessiveHalving((2, 6), 3)
    members = [M(s) for s in (5.0, 1.0, 4.0, 3.0, 2.0, math.nan, 7.0)]
    assert rule(1, members) == []  # not a rung
    assert sorted(rule(2, members)) == [0, 2, 5, 6]  # 7 in the field: 3 places (1.0, 2.0, 3.0)
    # the field: neither pruned nor failed; a member that stopped on its own keeps its place
    members = [M(1.0, "stopped", "early_stopping"), M(2.0), M(3.0), M(0.5, "stopped", "pruned"), M(0.1, "failed")]
    assert rule(6, members) == [1, 2]  # a field of 3 has 1 place, taken by the best: the early-stopped member
    assert SuccessiveHalving((1,), 3)(1, [M(2.0)]) == []  # always at least one place


def _run(status: str, best_val: float, stopped_by: str = "") -> Any:
    return SimpleNamespace(info=SimpleNamespace(status=status), data=SimpleNamespace(
        tags={"stopped_by": stopped_by} if stopped_by else {}, metrics={"best_val": best_val}))


def test_choose_takes_the_best_complete_unpruned_run() -> None:
    runs = [(0, _run("FINISHED", 0.5, "pruned")), (1, _run("FINISHED", 2.0, "early_stopping")),
            (2, _run("FAILED", 0.1)), (3, _run("FINISHED", 1.5, "max_epochs")), (4, _run("FINISHED", 1.5, "early_stopping"))]
    assert choose(runs) == 3  # 0 pruned, 2 failed; 3 and 4 tie: the lower sample
    assert choose([(0, _run("FINISHED", 1.0, "pruned"))]) is None


SPEC: dict[str, Any] = {
    "name": "hv",
    "base": {"model": {"hidden_size": 8}, "task": {"name": "jsb", "max_sequences": 8},
             "train": {"optimizer": "rmsprop", "rmsprop_floor": 0.01, "batch_size": 4, "max_epochs": 4,
                       "early_stopping_patience": 3, "gradient_flow": False}},
    "grid": {"model.cell": ["tanh", "gru"]},
    "random": {"samples": 4, "seed": 2014, "params": {"train.lr": {"loguniform": [1e-4, 3e-2]}}},
    "halving": {"rungs": [1, 2], "reduction": 3, "search_seed": 0, "seeds": [0, 1]},
}


@pytest.mark.parametrize("change, message", [
    ({"random": None}, "halving needs random"),
    ({"grid": {"train.seed": [0, 1]}}, "not grid train.seed"),
    ({"halving": {"rungs": [3, 2], "seeds": [0]}}, "rungs must be increasing"),
])
def test_halving_spec_errors(change: dict[str, Any], message: str) -> None:
    raw = {k: v for k, v in {**SPEC, **change}.items() if v is not None}
    with pytest.raises(RnnbenchError, match=message):
        spec_from_dict(raw)


def test_stages_and_chunks() -> None:
    spec = spec_from_dict(SPEC)
    search = expand(spec)
    assert len(search) == 8 and {p.stage for p in search} == {"search"}
    assert {p.config.train.seed for p in search} == {0}
    key = grid_key(spec, search[0])
    final = final_points(spec, {key: 2})
    assert [(p.sample, p.config.train.seed) for p in final] == [(2, 0), (2, 1)]
    assert final[0].point_id == search[2].point_id  # the search seed's final run is its search run
    assert final[0].config.train.lr == search[2].config.train.lr
    chunk = restrict(spec, ["model.cell=gru"])
    assert [p.point_id for p in expand(chunk)] == [p.point_id for p in search[4:]]  # a chunk keeps the ids
    with pytest.raises(RnnbenchError, match="takes tanh, gru"):
        restrict(spec, ["model.cell=lstm"])
    with pytest.raises(RnnbenchError, match="one of the grid's keys"):
        restrict(spec, ["train.lr=0.1"])


@requires_data
def test_a_halving_sweep_searches_then_trains_seeds_at_the_chosen_rate(tmp_path: Path, store: str) -> None:
    from rnnbench.sweep.runner import run_sweep

    spec = spec_from_dict({**SPEC, "grid": {"model.cell": ["gru"]}})
    summary = run_sweep(spec, [f"tracking.checkpoint_dir={tmp_path / 'ck'}"], workers=1, progress=False, echo=lambda s: None)
    assert summary.ok and summary.total == 4 + 2
    runs = MlflowClient(store).search_runs([MlflowClient(store).get_experiment_by_name("hv").experiment_id],
                                            "tags.sweep = 'hv'")
    runs = [r for r in runs if "cell" in r.data.tags]  # not the parent runs
    search = [r for r in runs if r.data.tags["stage"] == "search"]
    final = [r for r in runs if r.data.tags["stage"] == "final"]
    assert len(search) == 4 and len(final) == 1 and all(r.info.status == "FINISHED" for r in runs)
    # rung 1: 4 in the field, 2 places; rung 2: 2 in the field, 1 place
    pruned = sorted(int(r.data.metrics["epochs"]) for r in search if r.data.tags.get("stopped_by") == "pruned")
    assert pruned[:2] == [1, 1] and len(pruned) in (2, 3)
    pick = choose([(int(r.data.tags["sample"]), r) for r in search])
    chosen = next(r for r in search if int(r.data.tags["sample"]) == pick)
    assert final[0].data.params["train.lr"] == chosen.data.params["train.lr"] and final[0].data.params["train.seed"] == "1"
    assert float(chosen.data.params["train.rmsprop_floor"]) == 0.01
    again = run_sweep(spec, [f"tracking.checkpoint_dir={tmp_path / 'ck'}"], workers=1, progress=False, echo=lambda s: None)
    assert again.ok and not again.outcomes  # everything done: nothing runs
    from rnnbench.analysis.report import build_report

    text = build_report(tmp_path / "report", sweeps=["hv"], tracking_uri=store, spec_dir=tmp_path, figures=False).read_text()
    assert "## Learning-rate search (successive halving)" in text and ") chosen |" in text
    import pandas as pd

    summary = pd.read_csv(tmp_path / "report" / "tables" / "summary.csv")
    row = summary[summary["cell"] == "gru"].iloc[0]
    # one candidate compared: the chosen rate, with its two seeds (the search's other samples are not candidates)
    assert (row["n_candidates"], row["n_seeds"], row["train.lr"]) == (1, 2, float(chosen.data.params["train.lr"]))
    search_table = pd.read_csv(tmp_path / "report" / "tables" / "search.csv")
    assert len(search_table) == 4 and search_table["chosen"].sum() == 1


def test_costs_count_a_population_once_and_flag_runs_cut_while_improving() -> None:
    import pandas as pd

    from rnnbench.analysis.costs import cost_table, cut_while_improving

    runs = pd.DataFrame({
        "run_id": ["a", "b", "c", "d"], "status": "FINISHED", "sweep": "s", "setting": "jsb", "cell": "gru",
        "variant": "", "candidate": ["lr=1", "lr=1", "lr=2", "lr=1"], "stage": ["final", "final", "search", None],
        "population_id": ["p", "p", "q", None], "population": ["2", "2", "1", "1"], "machine": "cpu x",
        "epochs": [10.0, 20.0, 5.0, 100.0], "seconds_per_epoch": [1.0, 1.0, 2.0, 1.0], "setup_seconds": [3.0, 3.0, 1.0, 0.0],
        "threads_used": ["1", "1", "2", "1"], "best_epoch": [2.0, 19.0, 1.0, 97.0], "train.max_epochs": [50, 50, 50, 100],
        "stopped_by": ["early_stopping", "max_epochs", "pruned", None], "seed": [0, 1, 0, 0],
    })
    costs = cost_table(runs).set_index("stage")
    assert costs.loc["final", "populations"] == 1 and costs.loc["final", "serial_hours"] * 3600 == 23.0  # max, once
    assert costs.loc["search", "core_hours"] * 3600 == 22.0  # (5 x 2 + 1) x 2 threads
    assert sorted(cut_while_improving(runs)["run_id"]) == ["b", "d"]  # d: no tag, at its max_epochs, best at the end


def test_costs_add_up_each_runs_recorded_share_wherever_it_ran() -> None:
    """Runs with `core_seconds` (per-epoch shares) cost their sum, however many populations they ran
    in; an older run without it in the same part falls back to its population's longest member."""
    import pandas as pd

    from rnnbench.analysis.costs import cost_table

    runs = pd.DataFrame({
        "run_id": ["a", "b", "c"], "status": "FINISHED", "sweep": "s", "setting": "jsb", "cell": "gru", "variant": "",
        "candidate": "lr=1", "stage": "final", "population_id": ["p", "p", "q"], "population": ["2", "2", "1"],
        "machine": "cpu x", "epochs": [10.0, 20.0, 4.0], "seconds_per_epoch": [1.0, 1.0, 1.0],
        "setup_seconds": [3.0, 3.0, 1.0], "threads_used": ["2", "2", "1"],
        # b resumed alone after p ended: its later epochs are charged in full, not hidden behind a's
        "core_seconds": [12.0, 31.0, None],
    })
    row = cost_table(runs).set_index("stage").loc["final"]
    assert row["populations"] == 2 and row["runs"] == 3
    assert row["core_hours"] * 3600 == pytest.approx(12.0 + 31.0 + 5.0)
    assert row["serial_hours"] * 3600 == pytest.approx((12.0 + 31.0) / 2 + 5.0)


def test_the_expected_best_of_n_samples_is_the_unbiased_estimator() -> None:
    """E[min of n drawn without replacement] over every subset, by brute force, equals the estimator."""
    import itertools

    import numpy as np
    import pandas as pd

    from rnnbench.analysis.tuning_budget import expected_best, tuning_budget_table

    values = np.array([3.0, 1.0, 4.0, 1.5, 9.0])
    ordered = np.sort(values)
    for n in range(1, 6):
        brute = np.mean([min(c) for c in itertools.combinations(values, n)])
        assert expected_best(ordered, n) @ ordered == pytest.approx(brute)
    runs = pd.DataFrame({"run_id": list("abcde"), "status": "FINISHED", "task": "t", "setting": "t", "variant": "",
                         "cell": "gru", "metric": "nll", "candidate": [f"lr={v}" for v in range(5)],
                         "final_val_nll": values, "test_nll": values + 1})
    table = tuning_budget_table(runs, runs.iloc[0:0])
    assert list(table["n_samples"]) == [1, 2, 3, 4, 5] and table["expected_val"].iloc[0] == pytest.approx(values.mean())
    assert table["expected_val"].iloc[-1] == 1.0 and table["expected_test"].iloc[-1] == 2.0  # the best, and its test

    from rnnbench.analysis.tuning_budget import leaders

    assert leaders(table) == []  # one cell: no "same cell / different cell" verdict to draw
    other = runs.assign(cell="lstm", run_id=list("fghij"), final_val_nll=values[::-1] + 0.5, test_nll=values[::-1] + 1.5)
    two = tuning_budget_table(pd.concat([runs, other], ignore_index=True), runs.iloc[0:0])
    said = leaders(two)
    assert len(said) == 1 and said[0].endswith("gru's (1.0000): the same cell.")


def test_fanova_ranks_the_hyperparameter_the_score_depends_on() -> None:
    import numpy as np
    import pandas as pd

    from rnnbench.analysis.importance import importance_table

    rng = np.random.default_rng(0)
    lr, mom = 10 ** rng.uniform(-4, -2, 24), rng.uniform(0, 0.9, 24)
    runs = pd.DataFrame({"run_id": [f"r{i}" for i in range(24)], "status": "FINISHED", "task": "t", "setting": "t",
                         "variant": "", "cell": "gru", "metric": "nll", "train.lr": lr, "train.momentum": mom,
                         "candidate": [f"lr={a:.6g}, momentum={b:.6g}" for a, b in zip(lr, mom)],
                         "final_val_nll": (np.log10(lr) + 3) ** 2 + 0.01 * mom, "test_nll": 0.0})
    table = importance_table(runs, runs.iloc[0:0], ("train.lr", "train.momentum")).set_index("param")
    assert table.loc["train.lr", "importance"] > 0.8 > table.loc["train.momentum", "importance"]
    assert table["importance"].sum() == pytest.approx(1.0) and set(table["n_trials"]) == {24}


@requires_data
def test_batch_models_off_trains_each_seed_alone_and_the_search_as_one_population(tmp_path: Path, store: str) -> None:
    """--batch-models off: the seeds stage's points train alone (each recorded FINISHED when it stops,
    not when its slowest batch-mate does); the search stays one population, which halving ranks."""
    from rnnbench.sweep.runner import run_sweep

    spec = spec_from_dict({**SPEC, "grid": {"model.cell": ["tanh"]},
                           "halving": {**SPEC["halving"], "seeds": [0, 1, 2]}})
    lines: list[str] = []
    summary = run_sweep(spec, [f"tracking.checkpoint_dir={tmp_path / 'ck'}"], workers=1, progress=False,
                        batch_models="off", echo=lines.append)
    assert summary.ok and summary.total == 4 + 3
    assert any("--batch-models off applies to the seeds stage" in line for line in lines)
    client = MlflowClient(store)
    runs = [r for r in client.search_runs([client.get_experiment_by_name("hv").experiment_id], "tags.sweep = 'hv'")
            if "cell" in r.data.tags]
    search = [r.data.tags["population"] for r in runs if r.data.tags["stage"] == "search"]
    final = sorted((r.data.params["train.seed"], r.data.tags["population"]) for r in runs if r.data.tags["stage"] == "final")
    assert search == ["4"] * 4  # the 4 samples at seed 0 trained together
    assert final == [("1", "1"), ("2", "1")]  # seeds 1 and 2 each alone (seed 0's final run is its search run)
