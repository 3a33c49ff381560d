"""Analysis against a real MLflow store: tiny copy/adding runs trained by rnnbench.train.train.

One SQLite store per module (about 30 runs of a fraction of a second each), then: the frame has
one row per run, the statistics equal scipy's and a hand calculation, and two reports of the same
store are byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from rnnbench.analysis import tables as T
from rnnbench.analysis.report import build_report
from rnnbench.analysis.runs import load_histories, load_runs, wide_histories

CELLS = ("tanh", "lstm", "gru")
LRS = (1e-2, 3e-3)
PLAN = {"copy": ({"seq_len": 10}, (0, 1, 2)), "adding": ({"seq_len": 20}, (0, 1))}
SWEEP = "tiny"


def _config(uri: str, root: Path, task: str, options: dict, cell: str, lr: float, seed: int):
    from rnnbench.config import Config

    return Config.from_dict({
        "model": {"cell": cell, "hidden_size": 8},
        "task": {"name": task, "n_train": 128, "n_val": 64, "n_test": 64, **options},
        "train": {"seed": seed, "lr": lr, "batch_size": 32, "max_epochs": 2, "progress_bar": False, "device": "cpu"},
        "tracking": {"tracking_uri": uri, "experiment": "analysis-test", "checkpoint_dir": str(root / "ckpt")},
    })


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Trained runs of sweep 'tiny' (copy: 3 cells x 2 lr x 3 seeds; adding: x 2 seeds) and one foreign run."""
    from rnnbench.train import train

    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    run_ids: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        for task, (options, seeds) in PLAN.items():
            for cell in CELLS:
                for lr in LRS:
                    for seed in seeds:
                        result = train(_config(uri, root, task, options, cell, lr, seed), tags={"sweep": SWEEP})
                        assert result.status == "FINISHED", result.reason
                        run_ids.append(result.run_id)
        other = train(_config(uri, root, "copy", {"seq_len": 10}, "tanh", 1e-2, 0), tags={"sweep": "other"})
    return {"uri": uri, "root": root, "run_ids": run_ids, "other": other.run_id}


@pytest.fixture(scope="module")
def runs(tiny_store: dict) -> pd.DataFrame:
    return load_runs(tiny_store["uri"], sweeps=[SWEEP])


def test_one_row_per_run_typed(tiny_store: dict, runs: pd.DataFrame) -> None:
    assert len(runs) == len(tiny_store["run_ids"]) == runs["run_id"].nunique()
    assert set(runs["run_id"]) == set(tiny_store["run_ids"])  # the 'other' sweep is left out
    assert (runs["status"] == "FINISHED").all() and (runs["sweep"] == SWEEP).all()
    assert runs["train.lr"].dtype == np.float64 and str(runs["train.seed"].dtype) == "Int64"
    assert runs["test_ce"].dtype == np.float64 and runs["model.cell"].tolist() == runs["cell"].tolist()
    assert set(runs["metric"]) == {"ce", "mse"}
    assert not any(c.startswith(("val_", "train_")) for c in runs.columns)  # curves stay out of the frame
    everything = load_runs(tiny_store["uri"])
    assert len(everything) == len(runs) + 1 and tiny_store["other"] in set(everything["run_id"])
    # 'other' repeats the config and seed of a 'tiny' run: one is kept (the newer), not two seeds
    kept, dropped = T.drop_repeats(everything)
    assert len(dropped) == 1 and tiny_store["other"] in set(kept["run_id"])
    assert dropped["config_hash"].iloc[0] == kept.set_index("run_id").loc[tiny_store["other"], "config_hash"]


def test_histories_one_row_per_epoch(tiny_store: dict, runs: pd.DataFrame) -> None:
    some = runs["run_id"].iloc[:3].tolist()
    hist = load_histories(some, tiny_store["uri"])
    wide = wide_histories(hist)
    for rid in some:
        row = runs.set_index("run_id").loc[rid]
        mine = wide[wide["run_id"] == rid]
        assert len(mine) == int(row["epochs"]) and mine["epoch"].tolist() == list(range(int(row["epochs"])))
        key = f"val_{row['metric']}"
        assert mine[key].min() == pytest.approx(row["best_val"], rel=1e-6)
        assert mine["wall_seconds"].is_monotonic_increasing
    assert not hist["key"].str.endswith("_baseline").any()  # per-epoch constants left out by default


def test_chosen_lr_is_lowest_mean_validation(runs: pd.DataFrame) -> None:
    chosen = T.candidates_table(runs)
    for (task, cell), part in runs.groupby(["task", "cell"]):
        metric = part["metric"].iloc[0]
        means = part.groupby("train.lr")[f"final_val_{metric}"].mean()
        row = chosen[(chosen["task"] == task) & (chosen["cell"] == cell) & chosen["chosen"]]
        assert len(row) == 1 and row["train.lr"].iloc[0] == means.idxmin()


def test_ci_is_the_t_interval(runs: pd.DataFrame) -> None:
    summary = T.summary_table(runs)
    chosen = T.chosen_runs(runs)
    assert len(summary) == len(PLAN) * len(CELLS)
    for _, s in summary.iterrows():
        x = chosen[(chosen["setting"] == s["setting"]) & (chosen["cell"] == s["cell"])][f"test_{s['metric']}"].to_numpy()
        n = len(x)
        assert n == s["n_seeds"] == len(PLAN[s["task"]][1])
        half = stats.t.ppf(0.975, n - 1) * x.std(ddof=1) / math.sqrt(n)  # by hand
        assert s["test_mean"] == pytest.approx(x.mean(), rel=1e-12)
        assert s["test_ci_half"] == pytest.approx(half, rel=1e-12)
        lo, hi = stats.t.interval(0.95, n - 1, loc=x.mean(), scale=stats.sem(x))  # and scipy's own
        assert (s["test_ci_low"], s["test_ci_high"]) == pytest.approx((lo, hi), rel=1e-12)
        if s["task"] == "copy":
            assert s["ref_baseline"] == pytest.approx(10 * math.log(8) / 30)
            assert s["solved"] == int((x < 0.1 * s["ref_baseline"]).sum())


def _holm_by_hand(p: list[float]) -> list[float]:
    """Holm 1979: sort ascending, p_(i) * (m - i + 1), running maximum, capped at 1."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def test_pairwise_matches_scipy_and_holm(runs: pd.DataFrame) -> None:
    pairs = T.pairwise_table(runs)
    chosen = T.chosen_runs(runs)
    assert len(pairs) == len(PLAN) * 3
    for setting, family in pairs.groupby("setting"):
        for _, r in family.iterrows():
            pick = chosen[chosen["setting"] == setting]
            a = pick[pick["cell"] == r["cell_a"]][f"test_{r['metric']}"].to_numpy()
            b = pick[pick["cell"] == r["cell_b"]][f"test_{r['metric']}"].to_numpy()
            welch = stats.ttest_ind(a, b, equal_var=False)
            mwu = stats.mannwhitneyu(a, b, alternative="two-sided")
            assert (r["welch_t"], r["welch_p"]) == pytest.approx((welch.statistic, welch.pvalue), rel=1e-12)
            assert (r["mwu_u"], r["mwu_p"]) == pytest.approx((mwu.statistic, mwu.pvalue), rel=1e-12)
            assert r["rank_biserial"] == pytest.approx(2 * mwu.statistic / (len(a) * len(b)) - 1)
            sp = math.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
            d = (a.mean() - b.mean()) / sp
            assert r["cohens_d"] == pytest.approx(d) and r["hedges_g"] == pytest.approx(d * (1 - 3 / (4 * (len(a) + len(b)) - 9)))
        assert family["welch_p_holm"].tolist() == pytest.approx(_holm_by_hand(family["welch_p"].tolist()))
        assert family["mwu_p_holm"].tolist() == pytest.approx(_holm_by_hand(family["mwu_p"].tolist()))


@pytest.mark.filterwarnings("ignore:Mean of empty slice:RuntimeWarning")
def test_the_curves_bootstrap_band_is_seaborns_to_the_bit() -> None:
    """The learning curves' band (figures.SeabornBootstrap) gives seaborn's own errorbar=("ci", 95),
    n_boot, seed numbers exactly, over samples of every size the curves meet, NaN among them."""
    from seaborn._statistics import EstimateAggregator

    from rnnbench.analysis.figures import N_BOOT, SEED, SeabornBootstrap

    rng = np.random.default_rng(3)
    theirs = EstimateAggregator("mean", ("ci", 95), n_boot=N_BOOT, seed=SEED)
    ours = EstimateAggregator("mean", SeabornBootstrap(95))
    for trial in range(300):
        v = rng.normal(size=int(rng.integers(1, 12))) * 10 ** rng.uniform(-4, 2)
        if trial % 7 == 0:
            v[0] = np.nan
        frame = pd.DataFrame({"y": v})
        assert np.array_equal(theirs(frame, "y").to_numpy(), ours(frame, "y").to_numpy(), equal_nan=True), v


def test_holm_by_hand_with_a_known_family() -> None:
    p = [0.01, 0.04, 0.03, 0.005, float("nan")]
    # sorted 0.005, 0.01, 0.03, 0.04 (m = 4): x4 = 0.02, x3 = 0.03, x2 = 0.06, x1 = 0.04 -> running max 0.06
    expected = [0.03, 0.06, 0.06, 0.02]
    got = T.holm(p)
    assert got[:4].tolist() == pytest.approx(expected) and math.isnan(got[4])
    assert _holm_by_hand(p[:4]) == pytest.approx(expected)


def test_variants_table_compares_each_registered_variant_with_the_vanilla(monkeypatch: pytest.MonkeyPatch) -> None:
    from rnnbench.cells import CELLS

    # The variants come from the registry (each cell's variant_of), not from a list in the analysis.
    assert set(T.variants_of(T.VANILLA)) == {"lstm_nig", "lstm_nfg", "lstm_nog", "lstm_niaf", "lstm_noaf", "lstm",
                                             "cifg", "lstm_fgr"}
    assert all(CELLS[c].variant_of == T.VANILLA for c in T.variants_of(T.VANILLA)) and T.VANILLA in CELLS
    rng = np.random.default_rng(0)
    means = {"lstm_peephole": 8.3, "lstm_nig": 8.4, "lstm_nfg": 9.5, "cifg": 8.31, "gru": 8.0}  # gru: no variant
    chosen = pd.DataFrame([{"task": "jsb", "setting": "jsb", "variant": "", "cell": cell, "metric": "nll",
                            "status": "FINISHED", "test_nll": m + 0.1 * rng.standard_normal()}
                           for cell, m in means.items() for _ in range(5)])
    monkeypatch.setattr(T, "chosen_runs", lambda runs, tuned=("train.lr",): chosen)
    table = T.variants_table(chosen)
    assert table["cell"].tolist() == [c for c in T.variants_of(T.VANILLA) if c in means]  # registry order, no gru
    base = chosen[chosen["cell"] == T.VANILLA]["test_nll"].to_numpy()
    for _, r in table.iterrows():
        x = chosen[chosen["cell"] == r["cell"]]["test_nll"].to_numpy()
        assert r["diff"] == pytest.approx(x.mean() - base.mean(), rel=1e-12) and (r["n"], r["n_vanilla"]) == (5, 5)
        assert r["welch_p"] == pytest.approx(stats.ttest_ind(x, base, equal_var=False).pvalue, rel=1e-12)
        assert r["mwu_p"] == pytest.approx(stats.mannwhitneyu(x, base, alternative="two-sided").pvalue, rel=1e-12)
    assert table["welch_p_holm"].tolist() == pytest.approx(_holm_by_hand(table["welch_p"].tolist()))
    assert table["mwu_p_holm"].tolist() == pytest.approx(_holm_by_hand(table["mwu_p"].tolist()))
    nfg = table.set_index("cell").loc["lstm_nfg"]
    assert nfg["welch_p_holm"] < 0.01  # 1.2 nats worse in 5 seeds of sd 0.1: found


def test_architecture_table_contrasts_each_architecture_with_one_unidirectional_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    means = {("gru", 1, False): 0.9, ("gru", 1, True): 0.5, ("gru", 2, False): 0.88, ("gru", 2, True): 0.45,
             ("lstm", 1, False): 0.7, ("lstm", 1, True): 0.69}
    rows = []
    for (cell, layers, bi), m in means.items():
        for seed in range(5):
            rows.append({"task": "fsdd_digits", "setting": "fsdd_digits", "cell": cell, "metric": "nll", "status": "FINISHED",
                         "variant": f"bidirectional={str(bi).lower()}, num_layers={layers}", "seed": seed,
                         "model.num_layers": layers, "model.bidirectional": None if not bi and cell == "lstm" else bi,
                         "test_nll": m + 0.05 * rng.standard_normal(), "test_acc": 1 - m / 2 + 0.01 * rng.standard_normal()})
    chosen = pd.DataFrame(rows)  # lstm's unidirectional runs logged no model.bidirectional (older runs): false
    monkeypatch.setattr(T, "chosen_runs", lambda runs, tuned=("train.lr",): chosen)
    table = T.architecture_table(chosen)
    assert list(zip(table["cell"], table["num_layers"], table["bidirectional"])) == list(means)
    contrasts = table[table["welch_p"].notna()]
    assert len(contrasts) == 4 and table.loc[table["welch_p"].isna(), "num_layers"].tolist() == [1, 1]
    for _, r in table.iterrows():
        g = chosen[(chosen["cell"] == r["cell"]) & (chosen["variant"] == r["variant"])]
        base = chosen[(chosen["cell"] == r["cell"]) & (chosen["variant"] == "bidirectional=false, num_layers=1")]
        x, xb = g["test_nll"].to_numpy(), base["test_nll"].to_numpy()
        assert r["n"] == 5 and r["mean"] == pytest.approx(x.mean(), rel=1e-12)
        assert r["ci_half"] == pytest.approx(stats.t.ppf(0.975, 4) * x.std(ddof=1) / math.sqrt(5), rel=1e-9)
        assert r["acc_mean"] == pytest.approx(g["test_acc"].mean(), rel=1e-12)
        if r["num_layers"] == 1 and not r["bidirectional"]:
            continue
        assert r["diff"] == pytest.approx(x.mean() - xb.mean(), rel=1e-12)
        assert r["welch_p"] == pytest.approx(stats.ttest_ind(x, xb, equal_var=False).pvalue, rel=1e-12)
        assert r["mwu_p"] == pytest.approx(stats.mannwhitneyu(x, xb, alternative="two-sided").pvalue, rel=1e-12)
    assert contrasts["welch_p_holm"].tolist() == pytest.approx(_holm_by_hand(contrasts["welch_p"].tolist()))
    found = contrasts[contrasts["welch_p_holm"] < 0.05]
    assert sorted(zip(found["cell"], found["num_layers"], found["bidirectional"])) == [("gru", 1, True), ("gru", 2, True)]
    # a setting that does not vary the architecture has no rows
    one = chosen[chosen["variant"] == "bidirectional=false, num_layers=1"].assign(variant="")
    monkeypatch.setattr(T, "chosen_runs", lambda runs, tuned=("train.lr",): one)
    assert T.architecture_table(chosen).empty


def test_report_compares_stacked_and_bidirectional_models_on_spoken_digits(tmp_path: Path, store: str) -> None:
    """A real sweep of the many-to-one task (FSDD, a few recordings, 1 epoch): its report has the
    accuracy beside the cross-entropy and the architectures table, section and figure."""
    import os

    if not os.environ.get("RNNBENCH_DATA_DIR"):
        pytest.skip("fsdd_digits needs RNNBENCH_DATA_DIR (point it at the staged data, e.g. /work/shared/data)")
    (tmp_path / "digits.yaml").write_text(
        "name: digits_tiny\nbase:\n  model: {budget: 1500, budget_convention: recurrent}\n"
        "  task: {name: fsdd_digits, max_recordings: 20, max_seconds: 0.1}\n"
        "  train: {lr: 0.003, batch_size: 10, max_epochs: 1, gradient_flow: false, device: cpu}\n"
        "grid:\n  model.num_layers: [1, 2]\n  model.bidirectional: [false, true]\n  train.seed: [0, 1]\n"
        "  model.cell: [gru]\n")
    _cli(["sweep", "digits.yaml", "--batch-models", "on"], tmp_path)
    report = build_report(tmp_path / "r", tracking_uri=store, spec_dir=tmp_path / "none").read_text()
    table = pd.read_csv(tmp_path / "r" / "tables" / "architectures.csv")
    assert sorted(zip(table["num_layers"], table["bidirectional"])) == [(1, False), (1, True), (2, False), (2, True)]
    assert (table["n"] == 2).all() and table["acc_mean"].between(0, 1).all() and table["welch_p"].notna().sum() == 3
    assert "## Stacked and bidirectional models" in report and "| test acc ± 95% CI |" in report
    assert (tmp_path / "r" / "figures" / "architectures_fsdd-digits.png").is_file()


def test_selection_avoids_failing_candidates() -> None:
    rows = []
    for lr, vals, statuses in ((0.1, [0.5, np.nan], ["FINISHED", "FAILED"]), (0.01, [0.9, 0.8], ["FINISHED"] * 2)):
        for seed, (v, st) in enumerate(zip(vals, statuses)):
            rows.append({"run_id": f"{lr}-{seed}", "task": "copy", "cell": "lstm", "metric": "ce", "status": st,
                         "train.lr": lr, "train.seed": seed, "seed": seed, "final_val_ce": v, "test_ce": v})
    cand = T.candidates_table(pd.DataFrame(rows))
    assert cand.loc[cand["chosen"], "train.lr"].tolist() == [0.01]
    assert cand.set_index("train.lr").loc[0.1, "n_failed"] == 1


def test_markdown_table_and_formats() -> None:
    frame = pd.DataFrame({"a": ["x|y", "z"], "b": [1.23456, float("nan")], "c": [True, pd.NA]})
    text = T.markdown_table(frame, {"b": ".2f"})
    assert text == "| a | b | c |\n|---|---|---|\n| x\\|y | 1.23 | yes |\n| z |  |  |\n"
    assert T.pm(1.0, float("nan")) == "1.0000" and T.pm(1.0, 0.25, ".2f") == "1.00 ± 0.25"


def test_solved_rules_from_spec(tmp_path: Path) -> None:
    (tmp_path / "long.yaml").write_text(
        "name: long\nbase: {task: {name: copy}}\nsolved: {metric: test_ce, threshold: 0.01}\n"
    )
    (tmp_path / "both.yaml").write_text("solved: {adding: {fraction_of_baseline: 0.05}}\n")
    rules = T.solved_rules_from_specs(tmp_path, ["long", "both"])
    assert rules["copy"] == T.SolvedRule("ce", None, 0.01)
    assert rules["adding"] == T.SolvedRule("mse", 0.05, None)
    assert T.solved_rules_from_specs(tmp_path, ["elsewhere"]) == T.DEFAULT_SOLVED


def test_chung_table_maps_cells() -> None:
    summary = pd.DataFrame([{
        "task": "jsb", "setting": "jsb", "variant": "", "cell": cell, "n_seeds": 3, "train_mean": 8.0,
        "test_mean": 8.6, "test_ci_low": 8.5, "test_ci_high": 8.7, "test_ci_half": 0.1,
    } for cell in ("gru_reset_before", "lstm", "tanh")])
    chung = T.chung_table(summary).set_index("cell")
    assert chung.loc["gru_reset_before", "chung_test"] == 8.54 and chung.loc["gru_reset_before", "chung_inside_ci"]
    assert chung.loc["lstm", "chung_cell"] == "LSTM" and "no peepholes" in chung.loc["lstm", "form"]
    assert chung.loc["tanh", "test_diff"] == pytest.approx(8.6 - 9.10) and not chung.loc["tanh", "chung_inside_ci"]


def test_report_twice_is_byte_identical(tiny_store: dict, tmp_path: Path) -> None:
    a = build_report(tmp_path / "a", sweeps=[SWEEP], tracking_uri=tiny_store["uri"], spec_dir=tmp_path / "none")
    b = build_report(tmp_path / "b", sweeps=[SWEEP], tracking_uri=tiny_store["uri"], spec_dir=tmp_path / "none")
    files_a = sorted(p.relative_to(a.parent) for p in a.parent.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b.parent) for p in b.parent.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert (a.parent / rel).read_bytes() == (b.parent / rel).read_bytes(), rel
    names = {str(p) for p in files_a}
    assert {"REPORT.md", "runs.csv", "histories.csv.gz", "tables/summary.md", "tables/pairwise.csv",
            "figures/test_metric.png", "figures/test_metric.svg", "figures/curves_copy.png"} <= names
    exported = pd.read_csv(a.parent / "runs.csv")
    assert len(exported) == len(tiny_store["run_ids"]) and "start_time" not in exported
    report = a.read_text()
    assert "## copy" in report and "## adding" in report and "**Findings.**" in report
    # the same report again into the same folder rewrites it to the same bytes
    before = a.read_bytes()
    build_report(tmp_path / "a", sweeps=[SWEEP], tracking_uri=tiny_store["uri"], spec_dir=tmp_path / "none")
    assert a.read_bytes() == before


def test_cli_report_command(tiny_store: dict, tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from rnnbench.analysis.cli import command

    app = typer.Typer()
    app.command()(command)
    res = CliRunner().invoke(app, ["--sweep", SWEEP, "--out", str(tmp_path / "r"), "--tracking-uri", tiny_store["uri"],
                                   "--no-figures", "--specs", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r" / "REPORT.md").is_file() and not (tmp_path / "r" / "figures").exists()


# --- a run's identity: one config and seed is one run, however it was launched --------------------
def _cli(args: list[str], cwd: Path) -> None:
    import os
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "rnnbench.cli", *args], cwd=cwd, env=dict(os.environ),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


TINY_RUN = ("model: {cell: tanh, hidden_size: 8}\n"
            "task: {name: copy, seq_len: 5, n_train: 64, n_val: 16, n_test: 16}\n"
            "train: {max_epochs: 2, batch_size: 16, early_stopping_patience: null, device: cpu}\n")


def test_a_sweep_point_and_a_train_run_of_one_config_count_once(tmp_path: Path, store: str) -> None:
    """`rnnbench sweep` (progress bar forced off) and `rnnbench train train.progress_bar=true` of the same
    config and seed are one run in the report; also when the train run's config_hash tag is the old one
    (a run recorded before progress_bar left the hash: the identity is rebuilt from its params)."""
    import yaml
    from mlflow.tracking import MlflowClient

    (tmp_path / "run.yaml").write_text(TINY_RUN)
    spec = {"name": "ident", "base": yaml.safe_load(TINY_RUN), "grid": {"train.seed": [0]}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    _cli(["sweep", "sweep.yaml"], tmp_path)
    _cli(["train", "run.yaml", "train.progress_bar=true"], tmp_path)
    runs = load_runs(store)
    assert len(runs) == 2 and sorted(runs["train.progress_bar"].astype(str)) == ["False", "True"]
    assert runs["identity"].nunique() == 1 and runs["config_hash"].nunique() == 1

    def seeds_in_report(out: Path) -> int:
        build_report(out, tracking_uri=store, spec_dir=tmp_path / "none", figures=False)
        summary = pd.read_csv(out / "tables" / "summary.csv")
        assert len(summary) == 1
        assert pd.read_csv(out / "runs.csv")["repeat"].sum() == 1
        return int(summary["n_seeds"].iloc[0])

    assert seeds_in_report(tmp_path / "r1") == 1
    # the train run as the old code tagged it: a hash that included progress_bar=True
    by_hand = runs[runs["sweep"].isna()].iloc[0]
    old = hashlib.sha256(json.dumps({k: v for k, v in yaml.safe_load(
        MlflowClient(store).download_artifacts(by_hand["run_id"], "config.yaml", str(tmp_path))
        and (tmp_path / "config.yaml").read_text()).items() if k != "tracking"}, sort_keys=True).encode()).hexdigest()[:16]
    assert old != by_hand["config_hash"]
    MlflowClient(store).set_tag(by_hand["run_id"], "config_hash", old)
    assert load_runs(store)["config_hash"].nunique() == 2
    assert seeds_in_report(tmp_path / "r2") == 1


# --- missing values and runs that learned nothing -------------------------------------------------
def test_missing_values_never_print_as_na_and_unlearned_runs_are_flagged(tmp_path: Path, store: str) -> None:
    """Real runs where a varied param is missing in some (model.budget: null beside 300), and runs with
    train.lr=1e3 that finish with a loss far above the memoryless baseline (adding: enough updates that
    lr=1e-2 learns)."""
    import re

    from rnnbench.config import Config
    from rnnbench.train import train

    def run(seq_len: int, lr: float, seed: int, budget: int | None) -> str:
        result = train(Config.from_dict({
            "model": {"cell": "tanh", "hidden_size": 8, "budget": budget},
            "task": {"name": "adding", "seq_len": seq_len, "n_train": 512, "n_val": 64, "n_test": 64},
            "train": {"seed": seed, "lr": lr, "batch_size": 16, "max_epochs": 3, "progress_bar": False,
                      "device": "cpu", "early_stopping_patience": None, "gradient_flow": False},
            "tracking": {"tracking_uri": store, "checkpoint_dir": str(tmp_path / "ckpt")},
        }))
        assert result.status == "FINISHED", result.reason
        return result.run_id

    for seed in (0, 1):
        run(5, 1e-2, seed, None)
    run(5, 1e-2, 0, 300)
    diverged = [run(5, 1e3, 0, None), run(6, 1e3, 0, None)]  # the second is its setting's only candidate

    report = build_report(tmp_path / "r", tracking_uri=store, spec_dir=tmp_path / "none")
    out = report.parent
    for path in out.rglob("*"):
        assert not re.search(r"(^|[-_])(na|nan)([-_.]|$)", path.name), path.name
        if path.suffix in (".md", ".csv"):
            text = path.read_text()
            assert "<NA>" not in text and "=nan" not in text and "=," not in text and "=]" not in text, path
    text = report.read_text()
    assert "## adding (seq_len=5) [budget=none]" in text and "## adding (seq_len=5) [budget=300]" in text
    assert (out / "figures" / "curves_adding-seq-len-5_budget-none.png").is_file()

    runs = pd.read_csv(out / "runs.csv")
    flagged = runs[runs["not_learned"].notna()]
    assert sorted(flagged["run_id"]) == sorted(diverged)
    assert flagged["not_learned"].str.contains("is not below the baseline reference").all()
    summary = pd.read_csv(out / "tables" / "summary.csv").set_index(["setting", "variant"])
    assert summary.loc[("adding (seq_len=6)", "budget=none"), "n_not_learned"].item() == 1
    assert summary.loc[("adding (seq_len=5)", "budget=none"), "n_not_learned"].item() == 0  # lr=1e3 not chosen there
    candidates = pd.read_csv(out / "tables" / "candidates.csv")
    assert candidates.loc[candidates["train.lr"] == 1000, "n_not_learned"].tolist() == [1, 1]
    section = text.split("## adding (seq_len=6) [budget=none]")[1].split("\n## ")[0]
    assert f"| 1/1 {T.NOT_LEARNED_MARK} |" in section and "Seeds that learned nothing" in section
    assert "## Runs that learned nothing" in text and all(rid in text for rid in diverged)


def test_learning_verdict_rule() -> None:
    ok = {"final_val_ce": 0.1, "final_val_ce_baseline": 0.69, "test_ce": 0.1, "test_ce_baseline": 0.69}
    assert T.learning_verdict(ok, "ce") is None
    bad = {**ok, "final_val_ce": 4492.0}
    assert T.learning_verdict(bad, "ce") == "best-checkpoint validation ce 4492 is not below the baseline reference 0.69"
    music = {"final_val_nll": 10.8, "final_val_nll_marginal": 11.0, "final_val_nll_markov": 10.5}
    assert T.learning_verdict(music, "nll") is None  # worse than Markov but better than ignoring the past
    assert "marginal" in T.learning_verdict({**music, "final_val_nll": 11.2}, "nll")
    assert T.learning_verdict({"test_ce": 5.0, "test_ce_baseline": 0.7}, "ce").startswith("test ce 5")
    assert T.learning_verdict({"final_val_ce": 5.0}, "ce") is None  # no reference: nothing to say


# --- figures a reader can read ---------------------------------------------------------------------
@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list:
    """The figures the figure functions draw, kept open instead of saved."""
    from rnnbench.analysis import figures as F

    figs: list = []
    monkeypatch.setattr(F, "save", lambda fig, out_dir, name: figs.append(fig) or [Path(name + ".png")])
    return figs


def test_intervals_respect_the_metric_range_and_cells_have_a_legend(drawn: list) -> None:
    from rnnbench.analysis import figures as F

    mse = [0.002, 0.07, 0.17]  # adding T=200, gru: the t-interval reaches -0.13
    assert T.t_interval(mse)[1] < 0
    lo, hi = F.bootstrap_interval(mse)
    assert min(mse) <= lo < hi <= max(mse) and F.bootstrap_interval(mse) == (lo, hi)
    cells = ["gru", "gru_reset_before", "lstm_peephole"]
    chosen = pd.DataFrame([{"setting": "adding", "variant": "", "cell": c, "seed": s, "status": "FINISHED",
                            "metric": "mse", "test_mse": v} for c in cells for s, v in enumerate(mse)])
    summary = pd.DataFrame([{"setting": "adding", "variant": "", "cell": c, "metric": "mse", "test_mean": np.mean(mse),
                             "test_ci_half": 0.2, "ref_baseline": 1 / 6} for c in cells])
    F.test_metric_figure(summary, chosen, Path("unused"))
    (fig,) = drawn
    ax = fig.axes[0]
    assert [t.get_text().replace("\n", "") for t in ax.get_xticklabels()] == cells
    assert all(t.get_rotation() == 0 for t in ax.get_xticklabels())  # wrapped at '_', not overlapping
    assert [t.get_text() for t in fig.legends[0].get_texts()] == cells
    from matplotlib.collections import LineCollection

    bars = [seg for c in ax.collections if isinstance(c, LineCollection) for seg in c.get_segments()]
    assert len(bars) == len(cells) and min(seg[:, 1].min() for seg in bars) >= min(mse)  # never below zero


def test_success_figure_lines_stay_visible_with_integer_ticks(drawn: list) -> None:
    from rnnbench.analysis import figures as F

    success = pd.DataFrame([{"task": "copy", "variant": "", "cell": c, "seq_len": 100, "n_seeds": 3, "solved": 0,
                             "solved_fraction": 0.0} for c in ("gru", "lstm", "tanh")])
    F.success_figure(success, Path("unused"))
    ax = drawn[0].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["100"] and list(ax.get_xticks()) == [100]
    lines = ax.get_lines()
    assert len({tuple(line.get_ydata()) for line in lines}) == 3  # equal values, drawn apart
    assert len({line.get_marker() for line in lines}) == 3 and len({line.get_linestyle() for line in lines}) == 3
    assert max(abs(line.get_ydata()[0]) for line in lines) <= F.SUCCESS_OFFSET


def test_every_curves_panel_is_labelled(drawn: list) -> None:
    from rnnbench.analysis import figures as F

    chosen = pd.DataFrame([{"run_id": f"r{s}", "setting": "copy", "variant": "", "cell": "gru", "seed": s,
                            "status": "FINISHED", "metric": "ce"} for s in (0, 1)])
    histories = pd.DataFrame([{"run_id": f"r{s}", "key": k, "epoch": e, "value": v}
                              for s in (0, 1) for e in range(3)
                              for k, v in (("val_ce", 1.0 / (e + 1) + s), ("wall_seconds", e + 1.0), ("updates", 10 * e))])
    F.learning_curves(chosen, histories, Path("unused"))
    for ax in drawn[0].axes:
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel() == "validation ce"
        assert any(t.get_text() for t in ax.get_yticklabels())


def test_curves_that_go_below_zero_keep_a_linear_axis(drawn: list) -> None:
    """A density's NLL (speech) falls from +5 to -6.5 nats: on a log axis (its positive values span more
    than a decade) every point below zero would vanish off the bottom."""
    from rnnbench.analysis import figures as F

    chosen = pd.DataFrame([{"run_id": f"r{s}", "setting": "fsdd", "variant": "", "cell": "gru", "seed": s,
                            "status": "FINISHED", "metric": "nll"} for s in (0, 1)])
    histories = pd.DataFrame([{"run_id": f"r{s}", "key": k, "epoch": e, "value": v}
                              for s in (0, 1) for e in range(4)
                              for k, v in (("val_nll", (5.0, 0.3, -2.0, -6.5)[e] + s / 2), ("wall_seconds", e + 1.0), ("updates", 10 * e))])
    F.learning_curves(chosen, histories, Path("unused"))
    for ax in drawn[0].axes:
        assert ax.get_yscale() == "linear"
        low, high = ax.get_ylim()
        assert low <= -6.5 and high >= 5.5  # every point inside the panel


def test_success_never_pools_runs_of_different_protocols() -> None:
    """Copy on 2,000 and on 20,000 training sequences at the same T are two protocols: two rows."""
    from rnnbench.analysis.report import success_frame

    rows = [{"run_id": f"{n}-{s}", "task": "copy", "variant": "", "cell": "lstm", "status": "FINISHED",
             "task.seq_len": 10, "task.n_train": n, "task.n_val": 500, "test_ce": ce, "test_ce_baseline": 0.7}
            for n, ce in ((2000, 0.2), (20000, 0.01)) for s in range(3)]
    success = success_frame(pd.DataFrame(rows), {"copy": T.SolvedRule("ce")})
    assert success[["protocol", "n_seeds", "solved"]].values.tolist() == [["n_train=2000", 3, 0], ["n_train=20000", 3, 3]]
    one = success_frame(pd.DataFrame([r for r in rows if r["task.n_train"] == 20000]), {"copy": T.SolvedRule("ce")})
    assert one["protocol"].tolist() == [""] and one["n_seeds"].tolist() == [3]


def test_chung_ranking_is_compared_only_when_each_of_chungs_cells_ran() -> None:
    """A corpus with only some of Chung's cells (a study chunk in progress) gets the numbers beside
    Chung's, but no verdict on which cell is best."""
    from rnnbench.analysis.report import findings

    def summary(cells: dict[str, float]) -> pd.DataFrame:
        return pd.DataFrame([{"task": "musedata", "setting": "musedata", "variant": "", "cell": c, "metric": "nll",
                              "n_seeds": 5, "n_failed": 0, "test_mean": m, "test_ci_half": 0.05, "test_ci_low": m - 0.05,
                              "test_ci_high": m + 0.05, "train_mean": m - 0.2, "candidate": "lr=0.001", "n_candidates": 1,
                              "seconds_per_epoch": 1.0, "time_steps_per_second": 1e5} for c, m in cells.items()])

    empty = pd.DataFrame(columns=["task", "setting", "variant", "cell_a", "cell_b", "welch_p_holm", "mwu_p_holm"])
    one = summary({"tanh": 7.5})
    text = findings(one, empty, T.chung_table(one), pd.DataFrame(), ("train.lr",))
    assert "not compared here: only tanh of its GRU, LSTM, tanh have run" in text and "which" not in text.split("Ours vs")[0]
    three = summary({"tanh": 7.5, "gru_reset_before": 7.2, "lstm_peephole": 7.3})
    text = findings(three, empty, T.chung_table(three), pd.DataFrame(), ("train.lr",))
    assert "here best gru_reset_before, which agrees with the paper" in text  # Chung's MuseData: GRU best
