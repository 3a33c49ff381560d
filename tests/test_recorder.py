"""RunRecorder, the one MLflow writer of a training run, against a real SQLite store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from rnnbench.config import Config
from rnnbench.training.recorder import EPOCH_MARKER, RESUMED_TAG, RunRecorder, config_tags, standard_tags

CONFIG = Config.from_dict({
    "model": {"cell": "gru", "hidden_size": 8},
    "task": {"name": "copy", "seq_len": 5, "n_train": 64, "n_val": 16, "n_test": 16},
    "train": {"max_epochs": 4, "batch_size": 16, "seed": 3},
})


def history(n: int) -> list[dict[str, float]]:
    """n epochs' records as a trainer keeps them: distinct values per epoch and key."""
    return [{"train_ce": 2.0 - 0.1 * e, "val_ce": 2.5 - 0.1 * e, EPOCH_MARKER: 0.5 + e, "wall_seconds": 1.0 + e}
            for e in range(n)]


def experiment(store: str, name: str = "rec") -> str:
    from rnnbench.tracking import prepare_store

    return prepare_store(store, name)


def client(store: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store)


def steps_of(store: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client(store).get_metric_history(run_id, key))


def artifact_text(store: str, run_id: str, path: str, into: Path) -> str:
    return Path(client(store).download_artifacts(run_id, path, str(into))).read_text()


def test_create_then_setup_records_tags_params_and_config(store: str, tmp_path: Path) -> None:
    exp = experiment(store)
    tags = standard_tags(CONFIG, "cpu", {"sweep": "s", "point_id": "p1"})
    rec = RunRecorder.create(store, exp, tags=tags, run_name="cell=gru seed=3")
    assert not rec.has_params()
    yaml_text = "model:\n  cell: gru\n"
    rec.log_setup({**CONFIG.flat(), "n_params_total": 123}, {"recurrence": "reference"}, yaml_text)
    assert rec.has_params()

    run = client(store).get_run(rec.run_id)
    assert run.info.status == "RUNNING" and run.info.run_name == "cell=gru seed=3"
    for key in ("git_commit", "torch_version", "device", "cell", "task", "seed", "config_hash"):
        assert run.data.tags[key], key
    assert run.data.tags["cell"] == "gru" and run.data.tags["seed"] == "3" and run.data.tags["device"] == "cpu"
    assert run.data.tags["config_hash"] == CONFIG.config_hash()
    assert run.data.tags["sweep"] == "s" and run.data.tags["recurrence"] == "reference"
    assert run.data.params["model.cell"] == "gru" and run.data.params["n_params_total"] == "123"
    assert artifact_text(store, rec.run_id, "config.yaml", tmp_path / "dl") == yaml_text

    rec.log_final({"test_ce": 1.25, "epochs": 4})
    rec.finish()
    run = client(store).get_run(rec.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["test_ce"] == 1.25
    assert steps_of(store, rec.run_id, "epochs") == [(0, 4.0)]


def test_log_epochs_writes_each_epoch_once_as_the_history_grows(store: str) -> None:
    rec = RunRecorder.create(store, experiment(store), tags=config_tags(CONFIG))
    assert rec.log_epochs(history(1)) == [0]
    assert rec.log_epochs(history(1)) == []
    assert rec.log_epochs(history(3)) == [1, 2]
    again = RunRecorder(client(store), rec.run_id)  # a second recorder learns the epochs from the store
    assert again.logged_epochs() == {0, 1, 2} and again.log_epochs(history(3)) == []
    expected = history(3)
    for key in expected[0]:
        assert steps_of(store, rec.run_id, key) == [(e, expected[e][key]) for e in range(3)], key


def test_a_record_without_the_epoch_marker_is_refused(store: str) -> None:
    rec = RunRecorder.create(store, experiment(store), tags={})
    with pytest.raises(ValueError, match=EPOCH_MARKER):
        rec.log_epochs([{"train_ce": 1.0}])
    assert client(store).get_run(rec.run_id).data.metrics == {}


WRITER = textwrap.dedent("""
    import sys, time
    from rnnbench.training.recorder import RunRecorder
    store, exp = sys.argv[1], sys.argv[2]
    history = [{"train_ce": 2.0 - 0.1 * e, "epoch_seconds": 0.5 + e} for e in range(4)]
    rec = RunRecorder.create(store, exp, tags={"cell": "gru"})
    rec.log_epochs(history[:1])
    rec.log_epochs(history[:2])
    print(rec.run_id, flush=True)
    time.sleep(60)  # killed here, mid-training as far as the store knows
""")


def test_a_run_killed_with_sigkill_reopens_and_logs_each_epoch_once(store: str, tmp_path: Path) -> None:
    exp = experiment(store)
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    proc = subprocess.Popen([sys.executable, str(script), store, exp], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        assert proc.stdout is not None
        run_id = proc.stdout.readline().strip()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert run_id, "the writer printed no run id"
    assert client(store).get_run(run_id).info.status == "RUNNING"  # SIGKILL leaves it so

    rec = RunRecorder.reopen(store, run_id)
    assert rec.logged_epochs() == {0, 1}
    full = [{"train_ce": 2.0 - 0.1 * e, EPOCH_MARKER: 0.5 + e} for e in range(4)]
    assert rec.log_epochs(full) == [2, 3]  # the resumed run hands over its whole history
    assert rec.log_epochs(full) == []
    for key in full[0]:
        assert steps_of(store, run_id, key) == [(e, full[e][key]) for e in range(4)], key


def test_kill_then_reopen_is_running_again(store: str) -> None:
    rec = RunRecorder.create(store, experiment(store), tags={})
    rec.log_epochs(history(2))
    rec.kill()
    assert client(store).get_run(rec.run_id).info.status == "KILLED"
    back = RunRecorder.reopen(client(store), rec.run_id)
    assert client(store).get_run(rec.run_id).info.status == "RUNNING"
    assert back.logged_epochs() == {0, 1}
    assert [h[EPOCH_MARKER] for h in back.epoch_history([EPOCH_MARKER, "val_ce"])] == [0.5, 1.5]
    assert back.epoch_history(["val_ce"]) == [{"val_ce": h["val_ce"]} for h in history(2)]


def test_a_run_resumed_on_other_code_says_which_and_from_which_epoch(store: str) -> None:
    from rnnbench.tracking import git_commit

    here = git_commit()
    rec = RunRecorder.create(store, experiment(store), tags={"git_commit": "0" * 40})
    rec.log_epochs(history(3))
    rec.kill()
    RunRecorder.reopen(store, rec.run_id)
    assert client(store).get_run(rec.run_id).data.tags[RESUMED_TAG] == f"{here}@3"
    RunRecorder.reopen(store, rec.run_id)  # again on the same code: nothing added
    assert client(store).get_run(rec.run_id).data.tags[RESUMED_TAG] == f"{here}@3"
    same = RunRecorder.create(store, experiment(store), tags={"git_commit": here})
    same.kill()
    RunRecorder.reopen(store, same.run_id)
    assert RESUMED_TAG not in client(store).get_run(same.run_id).data.tags


def test_fail_records_one_line_reason_and_removes_the_checkpoint_folder(store: str, tmp_path: Path) -> None:
    rec = RunRecorder.create(store, experiment(store), tags={})
    folder = tmp_path / "checkpoints" / rec.run_id
    folder.mkdir(parents=True)
    (folder / "last.ckpt").write_bytes(b"weights")
    reason = rec.fail("training loss became nan\n  at epoch 3," + " x" * 400, folder)
    assert reason.startswith("training loss became nan at epoch 3, x x") and len(reason) == 500
    run = client(store).get_run(rec.run_id)
    assert run.info.status == "FAILED" and run.data.tags["failure_reason"] == reason
    assert not folder.exists()


def test_fail_without_a_reason_still_says_something(store: str) -> None:
    rec = RunRecorder.create(store, experiment(store), tags={})
    assert rec.fail("  ") == "no reason given"
    assert client(store).get_run(rec.run_id).data.tags["failure_reason"] == "no reason given"


def test_probe_metrics_and_artifacts_keep_their_names(store: str, tmp_path: Path) -> None:
    rec = RunRecorder.create(store, experiment(store), tags={})
    curve = "t,distance,grad_norm,relative\n1,1,0.5,0.5\n2,0,1,1\n"
    gates = "layer,gate,frac_saturated\n0,i,0.25\n"
    written = {"gradflow_init_sat_i": 0.25, "gradflow_init_steps": 2.0, "gradflow_init_vanish_distance": 1.0}
    rec.log_probe(written, {"gradient_flow/init.csv": curve, "gradient_flow/init_gates.csv": gates})
    rec.log_probe({"gradflow_trained_steps": 2}, {"gradient_flow/trained.csv": curve})  # no gates: no gates file
    metrics = client(store).get_run(rec.run_id).data.metrics
    assert {k: v for k, v in metrics.items() if k.startswith("gradflow_")} == {**written, "gradflow_trained_steps": 2.0}
    assert steps_of(store, rec.run_id, "gradflow_init_steps") == [(0, 2.0)]
    files = sorted(f.path for f in client(store).list_artifacts(rec.run_id, "gradient_flow"))
    assert files == ["gradient_flow/init.csv", "gradient_flow/init_gates.csv", "gradient_flow/trained.csv"]
    assert artifact_text(store, rec.run_id, "gradient_flow/init.csv", tmp_path / "a") == curve
    assert artifact_text(store, rec.run_id, "gradient_flow/init_gates.csv", tmp_path / "b") == gates


def test_early_failure_is_a_failed_run_with_the_config_tags_and_params(store: str) -> None:
    exp = experiment(store)
    rec = RunRecorder.record_early_failure(store, exp, "train.device=cuda but\nno CUDA device",
                                           tags={"sweep": "s", "point_id": "p"}, run_name="p", config=CONFIG)
    run = client(store).get_run(rec.run_id)
    assert run.info.status == "FAILED" and run.info.run_name == "p"
    assert run.data.tags["failure_reason"] == "train.device=cuda but no CUDA device"
    assert {k: run.data.tags[k] for k in config_tags(CONFIG)} == config_tags(CONFIG)
    assert run.data.tags["point_id"] == "p" and run.data.params == {k: str(v) for k, v in CONFIG.flat().items()}

    bare = RunRecorder.record_early_failure(store, exp, "no config", tags={"sweep": "s"})
    run = client(store).get_run(bare.run_id)
    assert run.info.status == "FAILED" and run.data.params == {} and "cell" not in run.data.tags


def test_kill_running_closes_only_the_running_runs(store: str) -> None:
    exp = experiment(store)
    running = RunRecorder.create(store, exp, tags={"point_id": "p"})
    done = RunRecorder.create(store, exp, tags={"point_id": "p"})
    done.finish()
    c = client(store)
    runs = c.search_runs([exp], "tags.point_id = 'p'")
    assert RunRecorder.kill_running(c, runs) == [running.run_id]
    assert c.get_run(running.run_id).info.status == "KILLED" and c.get_run(done.run_id).info.status == "FINISHED"
