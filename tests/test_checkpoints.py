"""Checkpoints against real kills and real bad files (issue 12, items 4-6), through the public entry
points: `rnnbench sweep` / `rnnbench train` subprocesses killed with a real SIGKILL at a chosen write,
then resumed by the same command, `train(config, run_id=...)` and `train_population(..., run_ids=...)`.

* a checkpoint (member.pt, one per member of a population) replaced by a pickle that runs code never
  runs it, with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 set too (it turns torch.load's default unsafe);
* an empty or truncated checkpoint makes the sweep start the point afresh (the old attempt retired
  with a reason naming the file, its folder removed) and `train` fail in one line naming the file;
* a kill between an epoch's checkpoint and its MLflow write, or just after that write, never
  leaves an epoch logged twice or missing, and the numbers are those of an uninterrupted run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from rnnbench.errors import RnnbenchError

TIMING = {"seconds_per_epoch", "seconds_to_best", "time_steps_per_second", "setup_seconds", "core_seconds", "epoch_seconds",
          "epoch_core_seconds", "wall_seconds"}
BASE = {
    "model": {"cell": "gru", "hidden_size": 8},
    "task": {"name": "copy", "seq_len": 5, "n_train": 64, "n_val": 16, "n_test": 16},
    "train": {"max_epochs": 2, "batch_size": 16, "early_stopping_patience": None, "weight_noise": 0.05,
              "progress_bar": False, "gradient_flow": False},
}

# Run the rnnbench command line in this process after installing a kill switch: SIGKILL right after
# the Nth file moved into place under a given name (a checkpoint write: os.replace, or os.rename
# under shutil.move), half-way through the Nth copy onto that name, or right after the MLflow write
# of a given epoch's metrics.
LAUNCHER = r"""
import os, signal, sys
from pathlib import Path

after_file = os.environ.get("KILL_AFTER_FILE")  # "<file name>:<n>"
after_epoch = os.environ.get("KILL_AFTER_EPOCH_LOGGED")  # "<epoch>"
during_copy = os.environ.get("KILL_DURING_COPY")  # "<file name>:<n>"
if after_file:
    name, n = after_file.rsplit(":", 1)
    seen = [0]
    def killing(move):
        def wrapper(src, dst, *a, **k):
            out = move(src, dst, *a, **k)
            if Path(dst).name == name:
                seen[0] += 1
                if seen[0] == int(n):
                    os.kill(os.getpid(), signal.SIGKILL)
            return out
        return wrapper
    os.replace, os.rename = killing(os.replace), killing(os.rename)
if during_copy:  # a kill half-way through copying a file of that name (a move across file systems)
    import shutil
    name, n = during_copy.rsplit(":", 1)
    copies = [0]
    copyfile = shutil.copyfile
    def copy_half_then_die(src, dst, *a, **k):
        if Path(dst).name == name:
            copies[0] += 1
            if copies[0] == int(n):
                data = Path(src).read_bytes()
                Path(dst).write_bytes(data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
        return copyfile(src, dst, *a, **k)
    shutil.copyfile = copy_half_then_die
if after_epoch:
    from mlflow.tracking import MlflowClient
    log_batch = MlflowClient.log_batch
    def log_then_die(self, run_id, metrics=(), *a, **k):
        out = log_batch(self, run_id, metrics, *a, **k)
        if any(m.key == "epoch_seconds" and m.step == int(after_epoch) for m in metrics or ()):
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    MlflowClient.log_batch = log_then_die
from rnnbench.cli import main
sys.argv = ["rnnbench", *sys.argv[1:]]
main()
"""


def rnnbench(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """`rnnbench *args` in a subprocess (with the kill switches of LAUNCHER set from `env`)."""
    full = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}", **env}
    return subprocess.run([sys.executable, "-c", LAUNCHER, *args], cwd=cwd, env=full, capture_output=True, text=True,
                          timeout=300)


def killed(out: subprocess.CompletedProcess) -> None:
    assert out.returncode == -signal.SIGKILL, f"not killed (exit {out.returncode}): {out.stderr[-2000:]}"


def write_spec(folder: Path, name: str, seeds: list[int], **train: Any) -> Path:
    spec = {"name": name, "base": {**BASE, "train": {**BASE["train"], **train}}, "grid": {"train.seed": seeds}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def client_of(folder: Path) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")


def runs_of(folder: Path, experiment: str, deleted: bool = False) -> list[Any]:
    """The experiment's training runs (a sweep's child runs: not its parent, not its seed aggregates), active or deleted."""
    from mlflow.entities import ViewType

    client = client_of(folder)
    exp = client.get_experiment_by_name(experiment)
    view = ViewType.DELETED_ONLY if deleted else ViewType.ACTIVE_ONLY
    runs = client.search_runs([exp.experiment_id], run_view_type=view, max_results=100)
    return [r for r in runs if r.data.tags.get("sweep_role") not in ("parent", "aggregate")]


def poison(path: Path, marker: Path) -> None:
    """Replace a checkpoint by a torch.save'd pickle whose loading would create `marker`."""
    import torch

    class RunsCode:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": RunsCode()}, path)


def damage(path: Path, how: str, marker: Path) -> None:
    if how == "code":
        poison(path, marker)
    elif how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(b"")


# --- states left by real kills, made once per module and copied into each test's folder ------------
@pytest.fixture(scope="module")
def killed_sweeps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with two sweeps killed with SIGKILL: 'one' (one point) after its last epoch's member.pt,
    before its test metrics; 'group' (four points trained as one population) after every member
    wrote its epoch-0 member.pt."""
    folder = tmp_path_factory.mktemp("killed")
    killed(rnnbench(["sweep", str(write_spec(folder, "one", [0])), "--batch-models", "off", "--no-progress"], folder,
                    KILL_AFTER_FILE="member.pt:2"))
    killed(rnnbench(["sweep", str(write_spec(folder, "group", [0, 1, 2, 3])), "--batch-models", "on", "--no-progress"],
                    folder, KILL_AFTER_FILE="member.pt:4"))
    return folder


def copy_of(state: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "copy"
    shutil.copytree(state, folder)
    return folder


def running_runs(folder: Path, experiment: str) -> list[Any]:
    runs = sorted(runs_of(folder, experiment), key=lambda r: int(r.data.tags.get("seed", 0)))
    assert [r.info.status for r in runs] == ["RUNNING"] * len(runs) and runs, [r.info.status for r in runs]
    return runs


def rerun_and_check(folder: Path, sweep: str, batch_models: str, damaged: dict[str, Path], marker: Path) -> None:
    """Re-run the sweep: no code ran, every point FINISHED, each damaged run retired with its file
    named and its checkpoint folder removed, every other run resumed."""
    before = {r.info.run_id for r in running_runs(folder, sweep)}
    out = rnnbench(["sweep", str(folder / f"{sweep}.yaml"), "--batch-models", batch_models, "--no-progress"], folder,
                   TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")  # makes torch.load's default unsafe
    assert not marker.exists(), "a checkpoint file ran code"
    assert out.returncode == 0, out.stderr[-3000:]
    after = runs_of(folder, sweep)
    assert len(after) == len(before) and all(r.info.status == "FINISHED" for r in after)
    assert {r.info.run_id for r in after} & set(damaged) == set()  # started afresh ...
    assert before - set(damaged) <= {r.info.run_id for r in after}  # ... the sound ones resumed
    retired = {r.info.run_id: r.data.tags["superseded_reason"] for r in runs_of(folder, sweep, deleted=True)}
    for run_id, path in damaged.items():
        assert str(path) in retired[run_id] and "\n" not in retired[run_id], retired[run_id]
        assert not path.parent.exists()  # ... and the old attempt's checkpoint folder removed


@pytest.mark.parametrize("batch_models", ["on", "off"])
def test_sweep_restarts_the_models_of_a_group_whose_checkpoint_is_bad(
    killed_sweeps: Path, tmp_path: Path, batch_models: str
) -> None:
    """member.pt holding code, truncated, empty: those points start afresh, the sound one resumes
    (alone with --batch-models off: a member's file resumes in any population)."""
    folder = copy_of(killed_sweeps, tmp_path)
    marker = tmp_path / "code-ran"
    runs = running_runs(folder, "group")
    damaged = {}
    for run, how in zip(runs, ("code", "truncated", "empty")):
        damaged[run.info.run_id] = path = folder / "rnnbench_runs" / run.info.run_id / "member.pt"
        damage(path, how, marker)
    rerun_and_check(folder, "group", batch_models, damaged, marker)


@pytest.mark.parametrize("file, how", [("member.pt", "code"), ("member.pt", "truncated"), ("member.pt", "empty")])
def test_sweep_restarts_a_point_whose_checkpoint_is_bad(killed_sweeps: Path, tmp_path: Path, file: str, how: str) -> None:
    folder = copy_of(killed_sweeps, tmp_path)
    marker = tmp_path / "code-ran"
    (run,) = running_runs(folder, "one")
    path = folder / "rnnbench_runs" / run.info.run_id / file
    damage(path, how, marker)
    rerun_and_check(folder, "one", "off", {run.info.run_id: path}, marker)


@pytest.fixture(scope="module")
def killed_train(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `rnnbench train` run killed after its last epoch's member.pt."""
    folder = tmp_path_factory.mktemp("killed_train")
    (folder / "spec.yaml").write_text(yaml.safe_dump(BASE, sort_keys=False))
    killed(rnnbench(["train", "spec.yaml"], folder, KILL_AFTER_FILE="member.pt:2"))
    return folder


def test_a_kill_while_a_checkpoint_is_written_leaves_a_whole_one(tmp_path: Path) -> None:
    """With the temp folder on another file system (a node's tmpfs, a shared checkpoint folder), a
    writer that stages each checkpoint there and copies it over leaves a truncated file when killed
    during the copy. Checkpoints are written in their own folder and renamed."""
    import tempfile

    import torch

    def loads(path: Path) -> bool:
        try:
            torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001 - any failure to load is what this test looks for
            return False
        return True

    staging = Path(tempfile.mkdtemp(dir="/dev/shm")) if Path("/dev/shm").is_dir() else None
    if staging is None or os.stat(staging).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs a temp folder on another file system than the checkpoints (/dev/shm)")
    try:
        (tmp_path / "spec.yaml").write_text(yaml.safe_dump(BASE, sort_keys=False))
        out = rnnbench(["train", "spec.yaml"], tmp_path, TMPDIR=str(staging), KILL_DURING_COPY="member.pt:2")
        files = list((tmp_path / "rnnbench_runs").glob("*/member.pt"))
        assert files, out.stderr[-2000:]
        assert [loads(f) for f in files] == [True] * len(files)  # whole, whatever happened
        assert not [p for p in staging.iterdir() if p.is_file()]  # and no half-copied file left in the temp folder
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@pytest.mark.parametrize("file, how", [("member.pt", "code"), ("member.pt", "truncated"), ("member.pt", "empty")])
def test_train_resume_refuses_a_bad_checkpoint_in_one_line(
    killed_train: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, file: str, how: str
) -> None:
    from rnnbench.config import load_config
    from rnnbench.train import train

    folder = copy_of(killed_train, tmp_path)
    marker = tmp_path / "code-ran"
    (run,) = running_runs(folder, "rnnbench")
    path = folder / "rnnbench_runs" / run.info.run_id / file
    damage(path, how, marker)
    monkeypatch.chdir(folder)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(RnnbenchError) as e:
        train(load_config(folder / "spec.yaml", []), run_id=run.info.run_id)
    assert not marker.exists(), "a checkpoint file ran code"
    assert str(path) in str(e.value) and "\n" not in str(e.value), str(e.value)
    failed = client_of(folder).get_run(run.info.run_id)
    assert failed.info.status == "FAILED" and str(path) in failed.data.tags["failure_reason"]
    assert not path.parent.exists()  # a FAILED run's checkpoints are removed: nothing resumes it


def test_population_resume_never_runs_code_from_its_checkpoint(
    killed_sweeps: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rnnbench.config import Config
    from rnnbench.training.loop import train_population

    folder = copy_of(killed_sweeps, tmp_path)
    marker = tmp_path / "code-ran"
    runs = running_runs(folder, "group")
    path = folder / "rnnbench_runs" / runs[1].info.run_id / "member.pt"
    poison(path, marker)
    monkeypatch.chdir(folder)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    configs = [Config.from_dict({**BASE, "train": {**BASE["train"], "seed": s},
                                 "tracking": {"tracking_uri": uri, "experiment": "group"}}) for s in (0, 1, 2, 3)]
    with pytest.raises(RnnbenchError) as e:
        train_population(configs, run_ids=[r.info.run_id for r in runs])
    assert not marker.exists(), "a checkpoint file ran code"
    assert str(path) in str(e.value) and "\n" not in str(e.value), str(e.value)


# --- a kill on either side of an epoch's MLflow write ------------------------------------------------
def per_epoch(client: Any, run_id: str, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
    return {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in keys}


@pytest.mark.parametrize("batch_models, file", [("off", "member.pt"), ("on", "member.pt")])
def test_kills_around_an_epochs_metrics_log_every_epoch_once(
    tmp_path: Path, store: str, batch_models: str, file: str
) -> None:
    """Killed right after epoch 1's metric write, then (resumed) right after epoch 2's checkpoint
    write, then resumed to the end: each epoch is in MLflow once, with an uninterrupted run's numbers."""
    from rnnbench.sweep.runner import run_sweep
    from rnnbench.sweep.spec import load_spec

    epochs = 4
    seeds = [0, 1] if batch_models == "on" else [0]
    args = ["--batch-models", batch_models, "--no-progress"]
    cut = write_spec(tmp_path, "cut", seeds, max_epochs=epochs)
    whole = write_spec(tmp_path, "whole", seeds, max_epochs=epochs)

    killed(rnnbench(["sweep", str(cut), *args], tmp_path, KILL_AFTER_EPOCH_LOGGED="1"))
    # the resumed process's first checkpoint write is epoch 2's (the population's first member)
    killed(rnnbench(["sweep", str(cut), *args], tmp_path, KILL_AFTER_FILE=f"{file}:1"))
    out = rnnbench(["sweep", str(cut), *args], tmp_path)
    assert out.returncode == 0 and "to resume" in out.stderr, out.stderr[-3000:]
    summary = run_sweep(load_spec(whole), batch_models=batch_models, progress=False, echo=lambda _: None)
    assert summary.ok

    client = client_of(tmp_path)
    resumed = {r.data.tags["seed"]: r for r in runs_of(tmp_path, "cut")}
    reference = {r.data.tags["seed"]: r for r in runs_of(tmp_path, "whole")}
    assert sorted(resumed) == sorted(reference) == [str(s) for s in seeds]
    for seed, ref in reference.items():
        run = resumed[seed]
        assert run.info.status == ref.info.status == "FINISHED"
        keys = [k for k in ref.data.metrics if len(client.get_metric_history(ref.info.run_id, k)) > 1]
        assert "val_ce" in keys and "train_ce" in keys
        got, want = per_epoch(client, run.info.run_id, keys), per_epoch(client, ref.info.run_id, keys)
        for key in keys:
            assert [s for s, _ in got[key]] == list(range(epochs)), (key, got[key])  # each epoch once
            if key not in TIMING:
                assert [v for _, v in got[key]] == [v for _, v in want[key]], key
        for key, value in ref.data.metrics.items():
            if key not in TIMING:
                assert run.data.metrics[key] == value, key
