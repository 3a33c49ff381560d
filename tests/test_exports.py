"""Committed exports (rnnbench/analysis/exports.py): the report rebuilt from them is the store's, byte
for byte; exporting is deterministic; chunks from separate stores merge; a sweep on a fresh store
counts the exported points as done."""

from __future__ import annotations

import filecmp
import gzip
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

CLI = [sys.executable, "-m", "rnnbench.cli"]
SPEC: dict[str, Any] = {
    "name": "ex",
    "base": {"model": {"hidden_size": 8}, "task": {"name": "copy", "seq_len": 5, "n_train": 64, "n_val": 16, "n_test": 16},
             "train": {"max_epochs": 2, "batch_size": 16, "early_stopping_patience": None}},
    "grid": {"model.cell": ["tanh", "gru"], "train.seed": [0, 1]},
}


def cli(args: list[str], cwd: Path, uri: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    done = subprocess.run(CLI + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def same_tree(a: Path, b: Path) -> list[str]:
    """Paths that differ (or exist on one side only) between two folders, recursively."""
    cmp = filecmp.dircmp(a, b)
    out = [*cmp.left_only, *cmp.right_only, *cmp.diff_files]
    for name in cmp.common_dirs:
        out += [f"{name}/{p}" for p in same_tree(a / name, b / name)]
    return out


def test_the_report_from_exports_is_the_report_from_the_store(tmp_path: Path) -> None:
    spec = tmp_path / "ex.yaml"
    chunk = {**SPEC, "grid": {**SPEC["grid"], "model.cell": ["tanh"]}}
    spec.write_text(yaml.safe_dump(SPEC, sort_keys=False))
    (tmp_path / "chunk.yaml").write_text(yaml.safe_dump(chunk, sort_keys=False))
    one, two = f"sqlite:///{tmp_path / 'one.db'}", f"sqlite:///{tmp_path / 'two.db'}"
    # chunk 1 (tanh) on store one, exported; then the whole sweep on a fresh store two, told about
    # the exports: it trains only gru (the exported points are done), and its export merges
    cli(["sweep", "chunk.yaml", "--no-progress", "tracking.checkpoint_dir=ck1"], tmp_path, one)
    cli(["export", "--sweep", "ex", "--out", "runs"], tmp_path, one)
    first = {p.name: p.read_bytes() for p in (tmp_path / "runs").iterdir()}
    cli(["export", "--sweep", "ex", "--out", "runs"], tmp_path, one)  # again: the same bytes
    assert {p.name: p.read_bytes() for p in (tmp_path / "runs").iterdir()} == first
    # a dry run before store two exists already counts the exported points, and creates nothing
    done = cli(["sweep", "ex.yaml", "--dry-run", "--exported", "runs", "tracking.checkpoint_dir=ck2"], tmp_path, two)
    assert "2 already FINISHED" in done.stderr and "2 new" in done.stderr and not (tmp_path / "two.db").exists()
    done = cli(["sweep", "ex.yaml", "--no-progress", "--exported", "runs", "tracking.checkpoint_dir=ck2"], tmp_path, two)
    assert "2 already FINISHED" in done.stderr and "2 new" in done.stderr
    cli(["export", "--sweep", "ex", "--out", "runs"], tmp_path, two)
    import pandas as pd

    runs = pd.read_csv(tmp_path / "runs" / "ex.runs.csv.gz", dtype=str)
    assert sorted(runs["tags.cell"]) == ["gru", "gru", "tanh", "tanh"] and set(runs["status"]) == {"FINISHED"}
    curves = pd.read_csv(tmp_path / "runs" / "ex.curves.csv.gz")
    assert set(curves["run_id"]) == set(runs["run_id"]) and {"train_ce", "val_ce"} <= set(curves["key"])
    probes = pd.read_csv(tmp_path / "runs" / "ex.probes.csv.gz")
    assert set(probes["run_id"]) == set(runs["run_id"])  # the gradient-flow probes travel too

    # store two holds only gru: a report of the merged exports = a report of one store with all four
    cli(["sweep", "ex.yaml", "--no-progress", "tracking.checkpoint_dir=ck1"], tmp_path, one)
    cli(["report", "--sweep", "ex", "--out", "from_store", "--specs", "."], tmp_path, one)
    cli(["export", "--sweep", "ex", "--out", "runs_one"], tmp_path, one)
    cli(["report", "--from", "runs_one", "--out", "from_exports", "--specs", "."], tmp_path, two)
    assert not same_tree(tmp_path / "from_store", tmp_path / "from_exports")
    assert (tmp_path / "from_store" / "REPORT.md").read_text().count("| tanh |") >= 1


def test_report_from_a_folder_without_exports_is_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'none.db'}"}
    done = subprocess.run(CLI + ["report", "--from", "nowhere", "--out", "r"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "no exports there" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "r").exists() and not (tmp_path / "none.db").exists()


@pytest.mark.parametrize("content, says", [
    (b"not gzip at all", "unreadable (BadGzipFile"),
    (gzip.compress(b"\xff\xfe\x00"), "unreadable (UnicodeDecodeError"),
    (gzip.compress(b"a,b\n1,2\n"), "missing column(s): run_id"),
    (gzip.compress(b"run_id,experiment_id,experiment,status,start_time,metrics.x\nr1,1,e,FINISHED,12,abc\n"),
     "line 2: could not convert string to float: 'abc'"),
])
def test_a_damaged_or_foreign_export_is_one_line(tmp_path: Path, content: bytes, says: str) -> None:
    """A file in the exports folder that is not gzip, not text, not an export, or holds a value that
    is not a number: one line naming the file, exit 2, nothing written."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "x.runs.csv.gz").write_bytes(content)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'none.db'}"}
    done = subprocess.run(CLI + ["report", "--from", "runs", "--out", "r"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "export runs/x.runs.csv.gz" in done.stderr and says in done.stderr, done.stderr
    assert not (tmp_path / "r").exists() and not (tmp_path / "none.db").exists()


def test_the_committed_results_rebuild_from_the_committed_exports(tmp_path: Path) -> None:
    """`rnnbench report --from results/runs` on a fresh clone gives the committed results/: the report,
    its CSV exports and tables byte for byte; the same figures (their pixels depend on the plotting
    library's version, so only their names are compared here)."""
    root = Path(__file__).resolve().parents[1]
    results = root / "results"
    if not any((results / "runs").glob("*.runs.csv.gz")):
        import pytest

        pytest.skip("no committed exports under results/runs")
    env = {**os.environ, "MPLBACKEND": "Agg"}
    (tmp_path / "r").mkdir()
    if (results / "DISCUSSION.md").is_file():  # hand-written; the report links it when it is there
        (tmp_path / "r" / "DISCUSSION.md").write_bytes((results / "DISCUSSION.md").read_bytes())
    done = subprocess.run(CLI + ["report", "--from", str(results / "runs"), "--out", str(tmp_path / "r"),
                                 "--specs", str(root / "experiments")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "r"
    texts = ["REPORT.md", "runs.csv", "histories.csv.gz", *(f"tables/{p.name}" for p in (results / "tables").iterdir())]
    for name in texts:
        assert (out / name).read_bytes() == (results / name).read_bytes(), name
    assert sorted(p.name for p in (out / "figures").iterdir()) == sorted(p.name for p in (results / "figures").iterdir())


def test_seed_aggregates_in_the_store_equal_the_report(tmp_path: Path, monkeypatch: Any) -> None:
    """After a sweep, one aggregate run per cell holds mean, CI bounds and n of the final metrics:
    the report's numbers (summary.csv, printed to 6 significant digits)."""
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from rnnbench.analysis.report import build_report
    from rnnbench.sweep.runner import run_sweep
    from rnnbench.sweep.spec import spec_from_dict

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'agg.db'}"
    spec = spec_from_dict({**SPEC, "name": "agg", "grid": {**SPEC["grid"], "train.seed": [0, 1, 2]}})
    lines: list[str] = []
    run_sweep(spec, [f"tracking.tracking_uri={uri}", f"tracking.checkpoint_dir={tmp_path / 'ck'}"], progress=False,
              echo=lines.append)
    assert any("seed aggregates: 2 runs" in line for line in lines)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("agg").experiment_id
    agg = {r.data.params["cell"]: r for r in client.search_runs([exp], "tags.sweep_role = 'aggregate'")}
    assert set(agg) == {"tanh", "gru"} and all("cell" not in r.data.tags for r in agg.values())
    summary = pd.read_csv(build_report(tmp_path / "rep", sweeps=["agg"], tracking_uri=uri, figures=False).parent
                          / "tables" / "summary.csv")
    for row in summary.itertuples():
        m = agg[row.cell].data.metrics
        assert m["test_ce_n"] == row.n_seeds == 3
        for ours, theirs in ((m["test_ce_mean"], row.test_mean), (m["test_ce_ci_low"], row.test_ci_low),
                             (m["test_ce_ci_high"], row.test_ci_high), (m["final_val_ce_mean"], row.val_mean)):
            assert f"{ours:.6g}" == f"{theirs:.6g}"
    from rnnbench.analysis.aggregates import publish_aggregates

    assert sorted(publish_aggregates("agg", uri)) == sorted(r.info.run_id for r in agg.values())  # updated, none added
    assert len(client.search_runs([exp], "tags.sweep_role = 'aggregate'")) == 2
