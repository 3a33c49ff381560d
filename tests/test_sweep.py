"""Sweeps: spec validation, expansion, stable point ids, and the CLI end to end against a real SQLite
store: idempotent re-runs, failures that don't stop the sweep, SIGKILL mid-way and restart,
concurrent worker processes, and Ray."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cli_processes import start_and_wait
from rnnbench.errors import RnnbenchError
from rnnbench.sweep.spec import expand, spec_from_dict

CLI = [sys.executable, "-m", "rnnbench.cli", "sweep"]
TINY_BASE = {
    "model": {"hidden_size": 8},
    "task": {"name": "copy", "seq_len": 5, "n_train": 64, "n_val": 16, "n_test": 16},
    "train": {"max_epochs": 2, "batch_size": 16, "early_stopping_patience": None},
}


def tiny(**extra: Any) -> dict[str, Any]:
    return {"name": "t", "base": TINY_BASE, **extra}


def write_spec(tmp_path: Path, spec: dict[str, Any], name: str = "sweep.yaml") -> Path:
    import yaml

    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run_cli(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + args, cwd=cwd, env=dict(os.environ), capture_output=True, text=True, timeout=timeout)


def active_children(uri: str, sweep: str) -> list[Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(sweep)
    runs = client.search_runs([exp.experiment_id], f"tags.sweep = '{sweep}'", max_results=1000)
    return [r for r in runs if "point_id" in r.data.tags]


def assert_one_finished_per_point(uri: str, sweep: str, n_points: int) -> list[Any]:
    runs = active_children(uri, sweep)
    ids = [r.data.tags["point_id"] for r in runs]
    assert len(set(ids)) == n_points, f"{len(set(ids))} points recorded, expected {n_points}"
    assert len(ids) == n_points, f"duplicated points: {sorted(ids)}"
    assert all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]
    return runs


# --- spec validation -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, message",
    [
        (tiny(grids={"train.seed": [0]}), "unknown key 'grids'"),
        (tiny(random={"samples": 2, "params": {"train.lr": {"loguniform": [1e-4, 1e-2]}}, "sed": 1}), "unknown key 'random.sed'"),
        (tiny(random={"samples": 2, "params": {"train.lr": {"logunif": [1e-4, 1e-2]}}}), "unknown key 'random.params.train.lr.logunif'"),
        (tiny(random={"samples": 2, "params": {"train.lr": {"loguniform": [0, 1e-2]}}}), "loguniform needs low > 0"),
        (tiny(random={"samples": 2, "params": {"train.lr": {"loguniform": [1e-2, 1e-4]}}}), "low < high"),
        (tiny(random={"samples": 2, "params": {"train.lr": {"uniform": [0, 1], "choice": [1]}}}), "exactly one of"),
        (tiny(random={"samples": 0, "params": {"train.lr": {"uniform": [0, 1]}}}), "random.samples"),
        (tiny(grid={"train.seed": []}), "has no values"),
        (tiny(grid={"tracking.experiment": ["a"]}), "tracking settings are shared"),
        (tiny(grid={"seed": [0]}), "is not a config path"),
        (tiny(grid={"train.lr": [1e-3]}, random={"samples": 1, "params": {"train.lr": {"uniform": [0, 1]}}}), "both in grid and in random"),
        (tiny(solved={"metric": "ce"}), "exactly one of fraction_of_baseline, threshold"),
        ({"name": "has space", "base": TINY_BASE}, "name"),
        ({"base": TINY_BASE}, "missing key 'name'"),
    ],
)
def test_spec_errors_are_one_line(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(RnnbenchError) as e:
        spec_from_dict(spec)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "spec, overrides, message",
    [
        (tiny(grid={"train.lrr": [1]}), [], "grid point lrr=1: unknown config key 'train.lrr'"),
        (tiny(grid={"model.cell": ["lstmm"]}), [], "unknown cell 'lstmm'"),
        (tiny(), ["train.batch_size=0"], "base: config train.batch_size"),
        (tiny(grid={"train.seed": [0, 1]}), ["train.seed=3"], "swept by the spec"),
    ],
)
def test_points_are_validated_before_anything_runs(spec: dict[str, Any], overrides: list[str], message: str) -> None:
    with pytest.raises(RnnbenchError, match="") as e:
        expand(spec_from_dict(spec), overrides)
    assert message in str(e.value)


def test_shipped_specs_are_valid() -> None:
    from rnnbench.cells import CELLS
    from rnnbench.sweep.spec import load_spec

    root = Path(__file__).resolve().parents[1] / "experiments"
    smoke = expand(load_spec(root / "smoke.yaml"))  # `model.cell: all`: every registered cell
    assert sorted(p.config.model.cell for p in smoke) == sorted(CELLS)
    sizes = {"smoke": len(CELLS), "chung2014_music": 600, "chung2014_speech": 150, "copy": 125, "adding": 150}
    for name, n in sizes.items():
        spec = load_spec(root / f"{name}.yaml")
        assert spec.name == name
        assert len(expand(spec)) == n, name
    assert load_spec(root / "copy.yaml").solved.is_solved({"test_ce": 0.01, "test_ce_baseline": 0.2}) is True
    assert load_spec(root / "adding.yaml").solved.is_solved({"test_mse": 0.05, "test_mse_baseline": 1 / 6}) is False
    music = expand(load_spec(root / "chung2014_music.yaml"))
    p = music[0].config
    assert (p.train.optimizer, p.train.momentum, p.train.rmsprop_alpha, p.train.weight_noise, p.train.grad_clip) == (
        "rmsprop", 0.9, 0.95, 0.075, 1.0
    )
    assert p.model.budget == "music" and p.train.early_stopping_patience is not None


# --- expansion -------------------------------------------------------------------------------------
def test_grid_times_random_and_the_same_samples_for_every_grid_point() -> None:
    import math

    spec = spec_from_dict(tiny(
        grid={"model.cell": ["tanh", "gru"], "train.seed": [0, 1, 2]},
        random={"samples": 4, "seed": 7, "params": {"train.lr": {"loguniform": [math.exp(-12), math.exp(-6)]}}},
    ))
    points = expand(spec)
    assert len(points) == 2 * 3 * 4
    assert [p.assignments["model.cell"] for p in points[:12]] == ["tanh"] * 12  # first grid key outermost
    assert [p.sample for p in points[:8]] == [0, 1, 2, 3, 0, 1, 2, 3]  # samples innermost
    by_sample: dict[int, set[float]] = {}
    for p in points:
        by_sample.setdefault(p.sample, set()).add(p.config.train.lr)
        assert math.exp(-12) <= p.config.train.lr <= math.exp(-6)
        assert p.config.train.progress_bar is False  # one progress bar: the sweep's
        assert p.config.tracking.experiment == "t"  # named after the sweep unless base sets one
    assert all(len(v) == 1 for v in by_sample.values())  # one lr per sample index, whatever the cell/seed
    assert len({next(iter(v)) for v in by_sample.values()}) == 4
    again = expand(spec)
    assert [p.config.train.lr for p in again] == [p.config.train.lr for p in points]
    other_seed = spec_from_dict({**spec.model_dump(), "random": {**spec.random.model_dump(), "seed": 8}})
    assert [p.config.train.lr for p in expand(other_seed)] != [p.config.train.lr for p in points]


def test_choice_randint_uniform_and_section_grids() -> None:
    spec = spec_from_dict(tiny(
        grid={"task": [{"name": "copy", "seq_len": 5}, {"name": "adding", "seq_len": 6}]},
        random={"samples": 20, "seed": 0, "params": {
            "train.batch_size": {"randint": [2, 4]},
            "model.cell": {"choice": ["tanh", "gru"]},
            "train.momentum": {"uniform": [0.0, 0.5]},
        }},
    ))
    points = expand(spec)
    assert {p.config.task.name for p in points} == {"copy", "adding"}
    assert {p.config.task.n_train for p in points if p.config.task.name == "adding"} == {64}  # merged into base task
    assert {p.config.train.batch_size for p in points} <= {2, 3, 4}
    assert {p.config.model.cell for p in points} <= {"tanh", "gru"}
    assert all(0.0 <= p.config.train.momentum <= 0.5 for p in points)
    assert len({p.point_id for p in points}) == len(points)  # repeated draws are kept once


def test_point_ids_are_stable_and_ignore_tracking(tmp_path: Path) -> None:
    spec = spec_from_dict(tiny(grid={"model.cell": ["tanh", "lstm"], "train.seed": [0, 1]}))
    ids = [p.point_id for p in expand(spec)]
    assert len(set(ids)) == 4
    moved = [p.point_id for p in expand(spec, ["tracking.tracking_uri=sqlite:///elsewhere.db", "tracking.checkpoint_dir=/x"])]
    assert moved == ids
    assert [p.point_id for p in expand(spec, ["train.max_epochs=3"])] != ids  # what changes numbers changes ids
    renamed = spec_from_dict({**spec.model_dump(), "name": "other"})
    assert not set(p.point_id for p in expand(renamed)) & set(ids)
    # ... and are the same in a fresh interpreter (no hash randomisation, no dict-order effects)
    path = write_spec(tmp_path, spec.model_dump())
    code = "import sys; from rnnbench.sweep import expand, load_spec; print(' '.join(p.point_id for p in expand(load_spec(sys.argv[1]))))"
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "123"})
    assert out.stdout.split() == ids, out.stderr


def _run(status: str, run_id: str, params: bool = True) -> Any:
    return SimpleNamespace(info=SimpleNamespace(status=status, run_id=run_id), data=SimpleNamespace(params={"a": "1"} if params else {}))


def test_decide_keeps_one_run_per_point(tmp_path: Path) -> None:
    from rnnbench.sweep.runs import decide

    import torch

    (tmp_path / "r2").mkdir()
    torch.save({"epoch": 0}, tmp_path / "r2" / "member.pt")
    assert decide([], tmp_path).action == "new"
    d = decide([_run("FAILED", "r0"), _run("FINISHED", "r1"), _run("FINISHED", "r3")], tmp_path)
    assert (d.action, d.run_id, [r.info.run_id for r, _ in d.retire]) == ("done", "r1", ["r0", "r3"])
    d = decide([_run("FAILED", "r0"), _run("RUNNING", "r2")], tmp_path)  # killed with a checkpoint: resume it
    assert (d.action, d.run_id, [r.info.run_id for r, _ in d.retire]) == ("resume", "r2", ["r0"])
    d = decide([_run("KILLED", "r2")], tmp_path)  # Ctrl-C'd: resume too
    assert (d.action, d.run_id) == ("resume", "r2")
    d = decide([_run("RUNNING", "r4")], tmp_path)  # killed before its first checkpoint: start over
    assert (d.action, [r.info.run_id for r, _ in d.retire]) == ("retry", ["r4"])
    d = decide([_run("RUNNING", "r2", params=False)], tmp_path)  # killed before its params were logged
    assert d.action == "retry"
    (tmp_path / "r5").mkdir()
    data = (tmp_path / "r2" / "member.pt").read_bytes()
    (tmp_path / "r5" / "member.pt").write_bytes(data[: len(data) // 2])  # truncated: start afresh, say why
    d = decide([_run("KILLED", "r2"), _run("RUNNING", "r5")], tmp_path)
    assert (d.action, d.run_id, [r.info.run_id for r, _ in d.retire]) == ("resume", "r2", ["r5"])
    assert str(tmp_path / "r5" / "member.pt") in d.retire[0][1]


# --- end to end ------------------------------------------------------------------------------------
def test_cli_end_to_end_then_rerun_runs_nothing(tmp_path: Path, store: str) -> None:
    spec = write_spec(tmp_path, tiny(
        name="e2e",
        grid={"model.cell": ["tanh", "lstm"]},
        random={"samples": 2, "seed": 0, "params": {"train.lr": {"loguniform": [1e-3, 1e-2]}}},
    ))
    from rnnbench.sweep import load_spec, run_sweep

    said: list[str] = []
    dry = run_sweep(load_spec(spec), ["train.max_epochs=1"], dry_run=True, echo=said.append)
    assert "4 new" in said[0] and sum(line.startswith("  new ") for line in said) == 4
    assert not dry.outcomes and not (tmp_path / "mlflow.db").exists()

    out = run_cli([str(spec), "train.max_epochs=1"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "4 FINISHED (4 this time, 0 before), 0 FAILED" in out.stdout
    assert "Traceback" not in out.stderr

    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    runs = assert_one_finished_per_point(store, "e2e", 4)
    exp = client.get_experiment_by_name("e2e")
    (parent,) = client.search_runs([exp.experiment_id], "tags.sweep_role = 'parent'")
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep"] == "e2e" and parent.data.tags["spec_hash"]
    for r in runs:
        t = r.data.tags
        assert t["mlflow.parentRunId"] == parent.info.run_id
        assert {t["cell"], t["task"], t["seed"], t["sample"]} <= {"tanh", "lstm", "copy", "0", "1"}
        assert r.data.params["train.max_epochs"] == "1" and r.data.params["train.progress_bar"] == "False"
    lrs = {(r.data.tags["sample"], r.data.params["train.lr"]) for r in runs}
    assert len(lrs) == 2  # sample k has the same lr for both cells

    again = run_cli([str(spec), "train.max_epochs=1"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 already FINISHED" in again.stderr and "(0 this time, 4 before)" in again.stdout
    after = assert_one_finished_per_point(store, "e2e", 4)
    assert {r.info.run_id for r in after} == {r.info.run_id for r in runs}
    (parent2,) = client.search_runs([exp.experiment_id], "tags.sweep_role = 'parent'")
    assert parent2.info.run_id == parent.info.run_id  # the parent run is reused

    said.clear()
    run_sweep(load_spec(spec), ["train.max_epochs=2"], dry_run=True, echo=said.append)
    assert "4 new" in said[0] and "4 earlier points" in said[1]
    # one chunk (--only) of the same spec: the other chunk's points are not "earlier points not in this spec"
    from rnnbench.sweep.spec import restrict

    said.clear()
    whole = load_spec(spec)
    run_sweep(restrict(whole, ["model.cell=lstm"]), ["train.max_epochs=1"], dry_run=True, echo=said.append, chunk_of=whole)
    assert "2 already FINISHED" in said[0] and not any("earlier points" in line for line in said)


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.yaml"], "spec file not found"),
        (["bad.yaml"], "unknown key 'grdi'"),
        (["good.yaml", "--executor", "slurm"], "unknown executor 'slurm'; valid executors: local, ray"),
        (["good.yaml", "--workers", "0"], "--workers must be at least 1"),
        (["good.yaml", "train.lrr=1"], "unknown config key 'train.lrr'"),
    ],
)
def test_cli_bad_input_one_line(tmp_path: Path, store: str, args: list[str], message: str) -> None:
    write_spec(tmp_path, tiny(grdi={}), "bad.yaml")
    write_spec(tmp_path, tiny(), "good.yaml")
    out = run_cli(args, tmp_path)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="its train.device=cuda points must fail")
def test_failed_points_do_not_stop_the_sweep(tmp_path: Path, store: str) -> None:
    # Adding with SGD at lr 1e30 and no clipping diverges within a few updates (train() ends the run
    # FAILED); train.device=cuda on a host without CUDA fails before train() creates its run (the
    # sweep records it). (An impossible budget no longer gets this far: the config refuses it.)
    base = {**TINY_BASE, "task": {**TINY_BASE["task"], "name": "adding"}, "model": {"cell": "tanh", "hidden_size": 8}}
    spec = write_spec(tmp_path, {
        "name": "failing",
        "base": {**base, "train": {**TINY_BASE["train"], "optimizer": "sgd", "grad_clip": None}},
        "grid": {"train.lr": [0.01, 1e30], "train.device": ["cpu", "cuda"]},
    })
    out = run_cli([str(spec)], tmp_path)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "1 FINISHED (1 this time, 0 before), 3 FAILED" in out.stdout
    assert "training loss became" in out.stdout and "train.device=cuda but no CUDA device" in out.stdout
    assert "Traceback" not in out.stderr

    runs = active_children(store, "failing")
    assert len(runs) == 4 and len({r.data.tags["point_id"] for r in runs}) == 4
    failed = [r for r in runs if r.info.status == "FAILED"]
    assert len(failed) == 3 and all(r.data.tags.get("failure_reason") for r in failed)
    assert all(r.data.tags.get("cell") == "tanh" and r.data.tags.get("mlflow.parentRunId") for r in failed)

    # A re-run retries the failed points only; the old attempts are retired, never counted twice.
    again = run_cli([str(spec)], tmp_path)
    assert again.returncode == 1 and "1 already FINISHED, 0 to resume, 3 to retry" in again.stderr
    runs2 = active_children(store, "failing")
    assert len(runs2) == 4 and len({r.data.tags["point_id"] for r in runs2}) == 4
    assert {r.info.run_id for r in runs2 if r.info.status == "FINISHED"} == {r.info.run_id for r in runs if r.info.status == "FINISHED"}
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    old = client.get_run(failed[0].info.run_id)
    assert old.info.lifecycle_stage == "deleted" and old.data.tags["superseded"] == "true"
    everything = client.search_runs([client.get_experiment_by_name("failing").experiment_id], run_view_type=ViewType.ALL)
    aggregates = [r for r in everything if r.data.tags.get("sweep_role") == "aggregate"]  # the sweep's seed summaries
    assert len(everything) - len(aggregates) == 1 + 4 + 3  # parent, active children, retired attempts


def test_failure_inside_train_is_recorded_in_process(tmp_path: Path, store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception escaping train() for one point: recorded FAILED with its reason; the others run."""
    import rnnbench.train as train_module
    from rnnbench.sweep import run_sweep

    real = train_module.train

    def flaky(config: Any, **kw: Any) -> Any:
        if config.model.cell == "gru":
            raise ValueError("boom from a monkeypatch")
        return real(config, **kw)

    monkeypatch.setattr(train_module, "train", flaky)
    spec = spec_from_dict(tiny(name="flaky", grid={"model.cell": ["tanh", "gru"]}))
    summary = run_sweep(spec, ["train.max_epochs=1"], progress=False, echo=lambda _: None)
    assert not summary.ok and len(summary.finished) == 1
    (bad,) = summary.failed
    assert bad.reason == "ValueError: boom from a monkeypatch" and bad.run_id
    assert any("boom from a monkeypatch" in line for line in summary.lines())
    from mlflow.tracking import MlflowClient

    run = MlflowClient(store).get_run(bad.run_id)
    assert run.info.status == "FAILED" and run.data.tags["failure_reason"] == bad.reason
    assert run.data.params["model.cell"] == "gru"


def test_a_second_driver_of_the_same_sweep_is_refused(tmp_path: Path, store: str) -> None:
    import fcntl

    from rnnbench.sweep import run_sweep

    spec = spec_from_dict(tiny(name="locked"))
    with open(tmp_path / ".rnnbench-sweep-locked.lock", "w") as held:  # as a running driver holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RnnbenchError, match="sweep 'locked' is already running against this store"):
            run_sweep(spec, progress=False, echo=lambda _: None)
        run_sweep(spec, dry_run=True, echo=lambda _: None)  # reading is fine
    assert not (tmp_path / "mlflow.db").exists()  # refused before the store was touched


SLOW_POINTS = {
    "name": "killed",
    "base": {**TINY_BASE, "task": {**TINY_BASE["task"], "n_train": 1500}, "train": {**TINY_BASE["train"], "max_epochs": 4}},
    "grid": {"model.cell": ["tanh", "gru"], "train.seed": [0, 1]},
}


def _store_state(db: Path, ckpt_root: Path) -> tuple[list[str], list[str]]:
    """(statuses of child runs, ids of RUNNING child runs that have a checkpoint), read with sqlite3."""
    rows: list = []
    for attempt in range(4):  # a loaded machine can hold the write lock (or a killed writer's journal) for seconds
        try:
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
            rows = con.execute(
                "SELECT r.status, r.run_uuid FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                "WHERE t.key = 'point_id' AND r.lifecycle_stage = 'active'"
            ).fetchall()
            con.close()
            break
        except sqlite3.Error:
            if attempt == 3:
                return [], []
            time.sleep(2)
    return [s for s, _ in rows], [u for s, u in rows if s == "RUNNING" and (ckpt_root / u / "member.pt").is_file()]


def _kill_sweep_when(tmp_path: Path, args: list[str], reached: Any) -> None:
    """Start `rnnbench sweep *args` in its own process group, wait (at most 240 s) until `reached()`, then
    SIGKILL the driver and its workers, the whole group."""
    proc = start_and_wait(["sweep", *args], tmp_path, reached)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_sigkill_mid_sweep_then_restart(tmp_path: Path, store: str) -> None:
    spec = write_spec(tmp_path, SLOW_POINTS)
    db, ckpts = tmp_path / "mlflow.db", tmp_path / "rnnbench_runs"

    def mid_way() -> bool:
        statuses, running_with_ckpt = _store_state(db, ckpts)
        return statuses.count("FINISHED") >= 1 and bool(running_with_ckpt)

    _kill_sweep_when(tmp_path, [str(spec), "--workers", "2", "--no-progress"], mid_way)
    statuses, interrupted = _store_state(db, ckpts)
    assert "RUNNING" in statuses and statuses.count("FINISHED") < 4

    out = run_cli([str(spec), "--workers", "2", "--no-progress"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = assert_one_finished_per_point(store, "killed", 4)
    ids = {r.info.run_id for r in runs}
    assert set(interrupted) <= ids  # killed runs with a checkpoint were resumed, not restarted
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    for run_id in interrupted:
        steps = [m.step for m in client.get_metric_history(run_id, "val_ce")]
        assert steps == sorted(set(steps)) and steps[-1] == 3  # every epoch once, up to the last


def test_sigkill_mid_population_sweep_then_restart(tmp_path: Path, store: str) -> None:
    """A population killed mid-way (--batch-models on) continues from its members' checkpoints on the
    next invocation, even with --batch-models off (each member then alone): same runs, every epoch
    recorded once."""
    from rnnbench.sweep.runs import MEMBER_CHECKPOINT as CHECKPOINT_NAME
    from rnnbench.training.checkpoint import FILE

    assert CHECKPOINT_NAME == FILE
    spec = write_spec(tmp_path, {**SLOW_POINTS, "name": "killed_group", "grid": {"train.seed": [0, 1], "train.lr": [0.001, 0.003]}})
    db, ckpts = tmp_path / "mlflow.db", tmp_path / "rnnbench_runs"

    def group_checkpoints() -> list[str]:
        return [p.parent.name for p in ckpts.glob(f"*/{CHECKPOINT_NAME}")] if ckpts.is_dir() else []

    # mid-way: every member has finished an epoch (and written its checkpoint)
    _kill_sweep_when(tmp_path, [str(spec), "--batch-models", "on", "--no-progress"], lambda: len(group_checkpoints()) == 4)
    interrupted = group_checkpoints()
    statuses, _ = _store_state(db, ckpts)
    assert statuses.count("RUNNING") == 4, statuses

    out = run_cli([str(spec), "--batch-models", "off", "--no-progress"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "4 to resume" in out.stderr and "points together" not in out.stderr
    runs = assert_one_finished_per_point(store, "killed_group", 4)
    assert {r.info.run_id for r in runs} == set(interrupted)  # continued, not restarted
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    for run_id in interrupted:
        steps = [m.step for m in client.get_metric_history(run_id, "val_ce")]
        assert steps == sorted(set(steps)) and steps[-1] == 3  # every epoch once, up to the last


def test_parallel_workers_lose_and_double_nothing(tmp_path: Path, store: str) -> None:
    from mlflow.tracking import MlflowClient

    from rnnbench.sweep import run_sweep

    spec = spec_from_dict(tiny(name="parallel", grid={"model.cell": ["tanh", "lstm", "gru"], "train.seed": [0, 1]}))
    summary = run_sweep(spec, [], workers=2, progress=False, echo=lambda _: None)
    assert summary.ok and len(summary.finished) == 6
    runs = assert_one_finished_per_point(store, "parallel", 6)
    client = MlflowClient(store)
    for r in runs:
        assert r.data.params["model.cell"] == r.data.tags["cell"]
        assert [m.step for m in client.get_metric_history(r.info.run_id, "val_ce")] == [0, 1]
        assert "test_ce" in r.data.metrics
    assert {r.info.experiment_id for r in runs} == {client.get_experiment_by_name("parallel").experiment_id}
    # the same point gives the same numbers in a worker process as in this one
    from rnnbench.config import Config
    from rnnbench.train import train

    first = next(p for p in expand(spec) if p.config.model.cell == "tanh" and p.config.train.seed == 0)
    local = train(Config.from_dict({**first.config.to_dict(), "tracking": {"experiment": "check"}}))
    (remote,) = [r for r in runs if r.data.tags["point_id"] == first.point_id]
    assert local.metrics["test_ce"] == pytest.approx(remote.data.metrics["test_ce"], rel=1e-5)


def _gpu_seen_after(pause: float) -> str | None:
    time.sleep(pause)  # long enough that the other task starts on the other worker
    return os.environ.get("CUDA_VISIBLE_DEVICES")


@pytest.mark.parametrize("gpus, seen", [(["5", "7"], ["5", "7"]), (["0"], None)])
def test_process_pool_spreads_workers_over_gpus(monkeypatch: pytest.MonkeyPatch, gpus: list[str], seen: Any) -> None:
    """Worker k of a pool on a host with several GPUs sees only GPU k mod n (its cuda:0); with one GPU (or
    none) the workers' environment is left alone."""
    from rnnbench.sweep import executors

    monkeypatch.setattr(executors, "visible_gpus", lambda: gpus)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    ex = executors.ProcessPoolExecutor(2)
    try:
        futures = [ex._pool.submit(_gpu_seen_after, 3.0) for _ in range(2)]
        got = sorted(f.result(timeout=300) or "-" for f in futures)
    finally:
        ex.close()
    assert got == (seen if seen else ["-", "-"])
    assert ("over GPUs 5,7" in ex.description) == (len(gpus) > 1)
    pool = executors.pinned_pool(2)  # the pool that runs populations side by side pins the same way
    try:
        futures = [pool.submit(_gpu_seen_after, 3.0) for _ in range(2)]
        assert sorted(f.result(timeout=300) or "-" for f in futures) == (seen if seen else ["-", "-"])
    finally:
        pool.shutdown()


@pytest.mark.ray
def test_ray_executor_local_instance(tmp_path: Path, store: str) -> None:
    pytest.importorskip("ray")
    from rnnbench.sweep import run_sweep

    spec = spec_from_dict(tiny(name="onray", grid={"model.cell": ["tanh", "gru"]}))
    summary = run_sweep(spec, [], executor="ray", workers=2, progress=False, echo=lambda _: None)
    assert summary.ok, summary.lines()
    runs = assert_one_finished_per_point(store, "onray", 2)
    assert all(r.data.tags["mlflow.parentRunId"] == summary.parent_run_id for r in runs)
    again = run_sweep(spec, [], executor="ray", workers=2, progress=False, echo=lambda _: None)
    assert again.ok and again.already_done == 2 and not again.outcomes
    import ray

    assert not ray.is_initialized()  # the instance it started is shut down


@pytest.mark.ray
def test_ray_tasks_ask_for_a_gpu_share_where_the_cluster_has_gpus(tmp_path: Path, store: str) -> None:
    """A task asking for no GPU sees none under Ray, so on a cluster with GPUs (here 2, declared) each task
    asks for GPUs / tasks at a time; the sweep still schedules and finishes every point."""
    pytest.importorskip("ray")
    import ray

    from rnnbench.sweep import run_sweep
    from rnnbench.sweep.ray_executor import RayExecutor

    ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert RayExecutor(4).gpu_share == 0.5 and RayExecutor(1).gpu_share == 1.0
        assert "0.5 GPU each" in RayExecutor(4).description
        spec = spec_from_dict(tiny(name="raygpu", grid={"train.seed": [0, 1, 2]}))
        summary = run_sweep(spec, [], executor="ray", workers=4, progress=False, echo=lambda _: None)
        assert summary.ok, summary.lines()
        assert_one_finished_per_point(store, "raygpu", 3)
    finally:
        ray.shutdown()


def test_batch_models_trains_groups_together_one_run_per_point(tmp_path: Path) -> None:
    """--batch-models on: points differing only in seed and lr train as one population (rnnbench.training),
    each still its own FINISHED child run; a re-run finds them all done."""
    import os
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    spec = tmp_path / "bm.yaml"
    spec.write_text(
        "name: bm\nbase:\n  model: {hidden_size: 8}\n"
        "  task: {name: copy, seq_len: 5, n_train: 64, n_val: 32, n_test: 32}\n"
        "  train: {max_epochs: 2, batch_size: 16, early_stopping_patience: null}\n"
        "grid:\n  model.cell: [lstm, gru_reset_before]\n  train.seed: [0, 1]\n  train.lr: [0.001, 0.003]\n"
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    cmd = [sys.executable, "-m", "rnnbench.cli", "sweep", str(spec), "--batch-models", "on", "--no-progress"]
    first = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "training 4 points together" in first.stderr
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("bm")
    runs = client.search_runs([exp.experiment_id], "tags.sweep_role = 'point'")
    assert len(runs) == 8 and {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.data.tags["point_id"] for r in runs}) == 8
    assert {r.data.tags["population"] for r in runs} == {"4"}
    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and "8 FINISHED (0 this time, 8 before)" in second.stdout


def test_batch_models_runs_groups_side_by_side_with_workers(tmp_path: Path) -> None:
    """--batch-models on --workers 2: the two groups train in two worker processes at once; every
    point is its own FINISHED run, with the numbers the in-process group gives."""
    import os
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    spec = tmp_path / "bw.yaml"
    spec.write_text(
        "name: bw\nbase:\n  model: {hidden_size: 8}\n"
        "  task: {name: copy, seq_len: 5, n_train: 64, n_val: 32, n_test: 32}\n"
        "  train: {max_epochs: 2, batch_size: 16, early_stopping_patience: null}\n"
        "grid:\n  model.cell: [tanh, gru_reset_before]\n  train.seed: [0, 1]\n"
    )
    finals = {}
    for workers in ("2", "1"):
        uri = f"sqlite:///{tmp_path / f'mlflow{workers}.db'}"
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        cmd = [sys.executable, "-m", "rnnbench.cli", "sweep", str(spec), "--batch-models", "on", "--no-progress", "--workers", workers]
        out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert ("2 groups at a time" in out.stderr) == (workers == "2"), out.stderr[-2000:]
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("bw").experiment_id], "tags.sweep_role = 'point'")
        assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
        finals[workers] = {r.data.tags["point_id"]: r.data.metrics["test_ce"] for r in runs}
    assert finals["2"] == finals["1"]


def test_committed_results_point_ids_are_still_the_specs_points() -> None:
    """Re-running the sweeps behind results/ after an upgrade finds every recorded point FINISHED:
    every point id in results/runs.csv is one the specs expand to today (a study run in chunks has
    recorded part of its points so far)."""
    import pandas as pd

    from rnnbench.sweep.spec import load_spec

    root = Path(__file__).resolve().parents[1]
    runs = pd.read_csv(root / "results" / "runs.csv", dtype=str)
    from rnnbench.sweep.spec import final_points, grid_key

    for sweep, recorded in runs.groupby("sweep"):
        spec = load_spec(root / "experiments" / f"{sweep}.yaml")
        points = expand(spec)
        ids = {p.point_id for p in points}
        if spec.halving is None:
            assert set(recorded["point_id"]) <= ids, sweep
            continue
        # a halving sweep, perhaps in part (chunks): its runs are search points or the final points of
        # some choice of sample
        keys = {grid_key(spec, p) for p in points}
        for sample in range(spec.random.samples):
            ids |= {p.point_id for p in final_points(spec, {k: sample for k in keys})}
        assert set(recorded["point_id"]) <= ids, sweep
