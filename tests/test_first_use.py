"""What a new user meets first (issue 12, items 10 and 16-18): errors that come before anything is
created, readable run names and sweep descriptions in MLflow, the thread count, what a sweep will cost,
and default outputs that leave the committed results/ alone. Real files, real SQLite stores, real CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml


def data_dir() -> Path | None:
    d = os.environ.get("RNNBENCH_DATA_DIR")
    return Path(d) if d and Path(d).is_dir() else None


requires_data = pytest.mark.skipif(
    data_dir() is None, reason="real datasets absent: set RNNBENCH_DATA_DIR to a copy of ../shared/data (.ci/run does)"
)
CLI = [sys.executable, "-m", "rnnbench.cli"]
TINY_COPY = {"name": "copy", "seq_len": 4, "n_train": 32, "n_val": 16, "n_test": 16}
TINY_TRAIN = {"max_epochs": 1, "batch_size": 16, "gradient_flow": False, "progress_bar": False, "early_stopping_patience": None}
JSB_TINY = {"model": {"hidden_size": 4}, "task": {"name": "jsb", "max_sequences": 4}, "train": TINY_TRAIN}


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + args, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=300)


def runs_in(db: Path) -> list[Any]:
    """Every run of every experiment in the SQLite store `db` (none when the file does not exist)."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    if not db.exists():
        return []
    client = MlflowClient(f"sqlite:///{db}")
    ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return client.search_runs(ids, run_view_type=ViewType.ALL) if ids else []


def one_error_line(out: subprocess.CompletedProcess, *parts: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rnnbench: error: "), out.stderr[-2000:]
    for part in parts:
        assert part in lines[0], lines[0]


def broken_data(tmp_path: Path, kind: str) -> Path:
    """A data folder that is missing, empty, or a copy of the real one with JSB's .mat truncated."""
    root = tmp_path / f"data-{kind}"
    if kind == "empty":
        root.mkdir()
    elif kind == "truncated":
        mat = Path("polyphonic/mat/JSB_Chorales.mat")
        (root / mat.parent).mkdir(parents=True)
        data = (data_dir() / mat).read_bytes()  # type: ignore[operator]
        (root / mat).write_bytes(data[: len(data) // 2])
    return root


DATA_PROBLEMS = [("missing", "is not a directory"), ("empty", "is missing from the offline mirror"),
                 ("truncated", "wrong SHA-256")]


# --- item 10: validate before anything is created ------------------------------------------------
@requires_data
@pytest.mark.parametrize("kind, message", DATA_PROBLEMS)
def test_train_with_bad_data_fails_in_one_line_and_leaves_no_run(tmp_path: Path, store: str, kind: str, message: str) -> None:
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(JSB_TINY))
    out = run_cli(["train", "s.yaml"], tmp_path, env={"RNNBENCH_DATA_DIR": str(broken_data(tmp_path, kind))})
    one_error_line(out, message)
    assert runs_in(tmp_path / "mlflow.db") == []
    assert not (tmp_path / "rnnbench_runs").exists()


@requires_data
@pytest.mark.parametrize("kind, message", DATA_PROBLEMS[1:])
def test_sweep_checks_every_point_before_its_parent_exists(tmp_path: Path, store: str, kind: str, message: str) -> None:
    # The copy points are fine; the jsb point's data is not: nothing at all may be created.
    spec = {"name": "mixed", "base": {"model": {"hidden_size": 4}, "train": TINY_TRAIN},
            "grid": {"task": [TINY_COPY, {"name": "jsb", "max_sequences": 4}]}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    out = run_cli(["sweep", "s.yaml"], tmp_path, env={"RNNBENCH_DATA_DIR": str(broken_data(tmp_path, kind))})
    one_error_line(out, "jsb", message)
    assert runs_in(tmp_path / "mlflow.db") == []


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_unwritable_checkpoint_folder_is_refused_before_the_run(tmp_path: Path, store: str, command: str) -> None:
    # Tests run as root in CI, where chmod stops nothing: a folder under a regular file cannot be made by anyone.
    (tmp_path / "a_file").write_text("not a folder")
    where = "tracking.checkpoint_dir=a_file/checkpoints"
    if command == "train":
        spec = {"model": {"hidden_size": 4}, "task": TINY_COPY, "train": TINY_TRAIN}
    else:
        spec = {"name": "ck", "base": {"model": {"hidden_size": 4}, "task": TINY_COPY, "train": TINY_TRAIN},
                "grid": {"model.cell": ["tanh", "gru"]}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    out = run_cli([command, "s.yaml", where], tmp_path)
    one_error_line(out, "tracking.checkpoint_dir", "a_file is not a folder")
    assert runs_in(tmp_path / "mlflow.db") == []


def test_writable_check_leaves_nothing_behind(tmp_path: Path) -> None:
    from rnnbench.train import check_writable_dir

    check_writable_dir(tmp_path / "not" / "yet", "tracking.checkpoint_dir")
    check_writable_dir(tmp_path, "tracking.checkpoint_dir")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("budget, message", [
    ("-5", "greater than or equal to 1"),
    ("0", "greater than or equal to 1"),
    ("3", "below the smallest lstm model"),  # no hidden size gives an LSTM of 3 parameters
])
def test_impossible_budgets_are_refused_by_config_validation(budget: str, message: str) -> None:
    from rnnbench.config import load_config
    from rnnbench.errors import RnnbenchError

    with pytest.raises(RnnbenchError, match="model.budget") as e:
        load_config(None, ["model.cell=lstm", f"model.budget={budget}"])
    assert message in str(e.value) and "\n" not in str(e.value)


# --- item 16: readable names, the sweep's description, a no-op re-run that touches nothing --------
def test_train_run_is_named_and_logs_the_numbers_that_matter(tmp_path: Path, store: str) -> None:
    from mlflow.tracking import MlflowClient

    spec = {"model": {"cell": "gru", "hidden_size": 4}, "task": TINY_COPY, "train": {**TINY_TRAIN, "seed": 3, "lr": 0.002},
            "tracking": {"experiment": "named"}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    out = run_cli(["train", "s.yaml"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("named").experiment_id])
    assert run.info.run_name == "cell=gru task=copy seed=3 lr=0.002"
    m = run.data.metrics
    for key in ("test_ce", "best_epoch", "seconds_per_epoch", "n_params_recurrent", "n_params_total"):
        assert key in m, key
    assert m["n_params_total"] > m["n_params_recurrent"] > 0
    assert run.data.params["train.threads"] == "auto" and int(run.data.params["threads_used"]) >= 1


TINY_SWEEP = {"name": "described", "description": "two cells on a tiny copy task",
              "base": {"model": {"hidden_size": 4}, "task": TINY_COPY, "train": TINY_TRAIN},
              "grid": {"model.cell": ["tanh", "gru"]}}


def test_sweep_description_reaches_mlflow_and_a_finished_rerun_leaves_the_parent_alone(
    tmp_path: Path, store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    from rnnbench.sweep import cost, run_sweep, spec_from_dict

    monkeypatch.setattr(cost, "ESTIMATE_FROM_RUN_EPOCHS", 0)  # estimate this tiny sweep too

    spec = spec_from_dict(TINY_SWEEP)
    said: list[str] = []
    first = run_sweep(spec, progress=False, echo=said.append)
    assert first.ok and any(line.startswith("estimate: 2 runs to do") for line in said), said
    client = MlflowClient(store)
    parent = client.get_run(first.parent_run_id)
    assert parent.data.tags["mlflow.note.content"] == "two cells on a tiny copy task"
    assert parent.info.status == "FINISHED"

    said.clear()
    again = run_sweep(spec, progress=False, echo=said.append)
    assert again.ok and again.parent_run_id == first.parent_run_id and not again.outcomes
    after = client.get_run(first.parent_run_id)
    assert (after.info.status, after.info.end_time) == (parent.info.status, parent.info.end_time)
    assert not any("estimate" in line for line in said)


# --- item 17: threads ---------------------------------------------------------------------------
def test_auto_threads_one_for_small_models_and_within_the_cap() -> None:
    from rnnbench.training.threads import auto_threads

    assert auto_threads("lstm_peephole", 96, 36, cap=2) == 1  # Chung's music size
    assert auto_threads("tanh", 96, 100, cap=8) == 1
    assert auto_threads("lstm", 88, 512, cap=1) == 1  # a sweep worker's share is never exceeded
    assert 1 <= auto_threads("lstm", 88, 512, cap=os.cpu_count() or 1) <= (os.cpu_count() or 1)


def test_train_uses_the_threads_asked_for_and_restores_the_process_setting(tmp_path: Path, store: str) -> None:
    import torch
    from mlflow.tracking import MlflowClient

    from rnnbench.config import Config
    from rnnbench.train import train

    before = torch.get_num_threads()
    config = Config.from_dict({"model": {"hidden_size": 4}, "task": TINY_COPY, "train": {**TINY_TRAIN, "threads": 3}})
    result = train(config)
    assert result.status == "FINISHED" and torch.get_num_threads() == before
    assert MlflowClient(store).get_run(result.run_id).data.params["threads_used"] == "3"


# --- item 18: the cost of a sweep, and outputs that leave results/ alone ---------------------------
def test_dry_run_prints_the_runs_and_an_upper_bound_of_their_cost(tmp_path: Path, store: str) -> None:
    from rnnbench.sweep import run_sweep, spec_from_dict

    said: list[str] = []
    run_sweep(spec_from_dict(TINY_SWEEP), dry_run=True, workers=2, echo=said.append)
    (line,) = [s for s in said if " runs to do: " in s]
    assert line.startswith("2 runs to do: at most ") and "with --workers 2" in line and "early stopping" in line
    assert sum("s per epoch" in s for s in said) == 2  # one measured figure per distinct model
    assert not (tmp_path / "mlflow.db").exists()


def test_a_large_sweep_warns_and_goes_on(tmp_path: Path, store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from rnnbench.sweep import cost, run_sweep, spec_from_dict

    monkeypatch.setattr(cost, "WARN_CORE_HOURS", 0.0)
    monkeypatch.setattr(cost, "ESTIMATE_FROM_RUN_EPOCHS", 0)
    said: list[str] = []
    summary = run_sweep(spec_from_dict(TINY_SWEEP), progress=False, echo=said.append)
    assert summary.ok and any(s.startswith("warning: a large sweep: 2 runs to do") for s in said), said


def test_a_small_sweep_is_not_held_up_by_its_estimate(tmp_path: Path, store: str) -> None:
    from rnnbench.sweep import cost, run_sweep, spec_from_dict
    from rnnbench.sweep.spec import expand

    spec = spec_from_dict(TINY_SWEEP)
    assert not cost.worth_estimating([p.config for p in expand(spec)])
    said: list[str] = []
    assert run_sweep(spec, progress=False, echo=said.append).ok
    assert not any("runs to do" in s for s in said), said


def test_bench_and_report_defaults_write_outside_results(tmp_path: Path, store: str) -> None:
    from typer.testing import CliRunner

    from rnnbench.cli import app
    from rnnbench.sweep import run_sweep, spec_from_dict

    assert run_sweep(spec_from_dict(TINY_SWEEP), progress=False, echo=lambda line: None).ok
    runner = CliRunner()
    bench = runner.invoke(app, ["bench", "--seq-len", "4", "--batch", "2", "--input", "2", "--hidden", "3", "--repeats", "1",
                                "--warmup", "0", "--population", "0", "--no-trainer", "--no-setup", "--no-reference"])
    assert bench.exit_code == 0, (bench.output, bench.exception)
    (tmp_path / "specs").mkdir()
    report = runner.invoke(app, ["report", "--sweep", "described", "--no-figures", "--specs", "specs"])
    assert report.exit_code == 0, (report.output, report.exception)
    assert (tmp_path / "rnnbench_bench" / "bench_cpu.md").is_file()
    assert (tmp_path / "rnnbench_report" / "REPORT.md").is_file()
    assert not (tmp_path / "results").exists()


def test_no_tracked_file_is_one_gitignore_ignores() -> None:
    # The two sweep lock files were committed before .gitignore listed them; git kept tracking them.
    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "--cached", "--ignored", "--exclude-standard"], cwd=root,
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == []


@requires_data
def test_the_estimate_scales_each_epoch_by_its_batches_padded_lengths(monkeypatch: pytest.MonkeyPatch) -> None:
    """On music the batches run from tens to thousands of steps: the timed steps give a cost per padded
    step, and an epoch costs that times the sum of its batches' lengths (not the first batches' cost
    times a count of batches, 10x low on MuseData). A clock that advances 1 ms per padded step of each
    training step makes the expected figures exact."""
    import torch

    from rnnbench.config import load_config
    from rnnbench.sweep import cost
    from rnnbench.training.population import Population, build

    config = load_config(None, ["task.name=jsb", "model.hidden_size=8", "train.batch_size=8", "train.threads=1"])
    clock = [0.0]
    real_step = Population.train_step

    def step(self: Population, batch: dict) -> object:
        out = real_step(self, batch)
        clock[0] += 1e-3 * batch["x"].shape[2]
        return out

    monkeypatch.setattr(Population, "train_step", step)
    monkeypatch.setattr(cost.time, "perf_counter", lambda: clock[0])
    per_epoch, final, batches, _ = cost._measure(config)
    data = build([config], torch.device("cpu"), torch.float32).data
    lengths = {split: [b["x"].shape[1] for b in loader] for split, loader in
               [("train", data.train[0])] + [(s, data.eval[s][data.data_key[0]]) for s in ("val", "test", "final_train")]}
    assert batches == len(lengths["train"]) and len(set(lengths["train"])) > 10  # unequal lengths
    assert per_epoch == pytest.approx(1e-3 * (sum(lengths["train"]) + cost.EVAL_SHARE * sum(lengths["val"])))
    assert final == pytest.approx(1e-3 * cost.EVAL_SHARE * (sum(lengths["test"]) + sum(lengths["val"]) + sum(lengths["final_train"])))
