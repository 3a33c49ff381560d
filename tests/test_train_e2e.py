"""`rnnbench train` end to end: a subprocess per task against a real SQLite store, read back via MLflow."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "rnnbench.cli"]
TINY = ["model.hidden_size=8", "train.max_epochs=2", "train.batch_size=16", "train.progress_bar=false"]


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(CLI + args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300)


def write_spec(tmp_path: Path, text: str) -> Path:
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    return spec


@pytest.mark.parametrize(
    "task, cell, metric, baseline",
    [
        ("copy", "lstm", "ce", "ce_baseline"),
        ("adding", "gru_reset_before", "mse", "mse_baseline"),
    ],
)
def test_train_records_everything(tmp_path: Path, store: str, task: str, cell: str, metric: str, baseline: str) -> None:
    from mlflow.tracking import MlflowClient

    spec = write_spec(tmp_path, f"model: {{cell: {cell}}}\ntask: {{name: {task}, seq_len: 6, n_train: 64, n_val: 32, n_test: 32}}\n")
    out = run_cli(["train", str(spec), *TINY, "tracking.experiment=e2e"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "FINISHED" in out.stdout

    client = MlflowClient(store)
    exp = client.get_experiment_by_name("e2e")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    p, m, tags = run.data.params, run.data.metrics, run.data.tags
    assert p["model.cell"] == cell and p["task.name"] == task and p["model.hidden_size"] == "8"
    assert int(p["n_params_recurrent"]) > 0 and int(p["n_params_total"]) > int(p["n_params_recurrent"])
    for key in (f"test_{metric}", f"test_{baseline}", f"final_train_{metric}", "seconds_per_epoch", "best_epoch"):
        assert key in m and math.isfinite(m[key]), key
    if task == "copy":
        assert 0.0 <= m["test_recall_acc"] <= 1.0
    history = client.get_metric_history(run.info.run_id, f"val_{metric}")
    assert [h.step for h in history] == [0, 1]  # one value per epoch
    assert len(client.get_metric_history(run.info.run_id, f"val_{baseline}")) == 2
    assert len(client.get_metric_history(run.info.run_id, f"train_{metric}")) == 2
    updates = sorted((h.step, h.value) for h in client.get_metric_history(run.info.run_id, "updates"))
    assert updates == [(0, 4.0), (1, 8.0)]  # optimizer steps so far: 64 sequences in batches of 16
    assert {"git_commit", "torch_version", "device"} <= set(tags)
    assert tags["device"] == "cpu" and tags["cell"] == cell
    from rnnbench.cells import implementation  # which time loop ran: implementations agree only to float rounding

    assert tags["recurrence"] == implementation(cell, "cpu", __import__("torch").float32) and tags["population"] == "1"
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "config.yaml" in artifacts
    # artifacts stay beside the store, not in the working directory's ./mlruns
    assert not (tmp_path / "mlruns").exists()


def test_same_seed_same_numbers(tmp_path: Path, store: str) -> None:
    from rnnbench.config import load_config
    from rnnbench.train import train

    over = ["task.seq_len=5", "task.n_train=32", "task.n_val=16", "task.n_test=16", "model.cell=gru", *TINY]
    a = train(load_config(None, over))
    b = train(load_config(None, over))
    c = train(load_config(None, over + ["train.seed=1"]))
    assert a.status == b.status == "FINISHED"
    assert a.metrics["test_ce"] == b.metrics["test_ce"] and a.metrics["final_train_ce"] == b.metrics["final_train_ce"]
    assert c.metrics["test_ce"] != a.metrics["test_ce"]


def test_training_flushes_subnormal_floats(tmp_path: Path, store: str) -> None:
    """A run's process treats subnormals as zero (they made long tanh/GRU steps 5-8x slower)."""
    import torch

    from rnnbench.config import load_config
    from rnnbench.train import train

    torch.set_flush_denormal(False)  # (an earlier test's run may have set it)
    subnormal = torch.tensor([1e-39], dtype=torch.float32)
    assert (subnormal * 1.0).item() != 0.0
    try:
        over = ["task.seq_len=5", "task.n_train=32", "task.n_val=16", "task.n_test=16", "model.cell=tanh", *TINY]
        assert train(load_config(None, over)).status == "FINISHED"
        assert (subnormal * 1.0).item() == 0.0
    finally:
        torch.set_flush_denormal(False)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="needs CUDA")])])
def test_divergence_ends_run_failed_not_crash(tmp_path: Path, store: str, device: str) -> None:
    """On CUDA the finiteness check is deferred by one update (no stream drain per step): same outcome."""
    from mlflow.tracking import MlflowClient

    spec = write_spec(tmp_path, "model: {cell: tanh}\ntask: {name: adding, seq_len: 5, n_train: 64, n_val: 16, n_test: 16}\n")
    # SGD with an absurd step and no clipping overflows to inf within a few updates.
    out = run_cli(["train", str(spec), *TINY, "train.optimizer=sgd", "train.lr=1e30", "train.grad_clip=null",
                   f"train.device={device}"], tmp_path)
    assert out.returncode == 1
    assert "FAILED" in out.stderr and "Traceback" not in out.stderr
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("rnnbench").experiment_id])
    assert run.info.status == "FAILED"
    assert "training loss became" in run.data.tags["failure_reason"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "missing.yaml"], "spec file not found: missing.yaml"),
        (["train", "task.name=copy"], "a key=value override where the spec goes"),
        (["train", "spec.yaml", "model.cell=lstmm"], "unknown cell 'lstmm'"),
        (["train", "spec.yaml", "task.name=nope"], "unknown task 'nope'"),
        (["train", "spec.yaml", "train.lrr=1"], "unknown config key 'train.lrr'"),
        (["train", "spec.yaml", "train.max_epochs=zero"], "config train.max_epochs"),
        (["train", "spec.yaml", "train.batch_size=0"], "config train.batch_size"),
        (["train", "spec.yaml", "tracking.tracking_uri=http://127.0.0.1:9"], "tracking server http://127.0.0.1:9 is unreachable"),
        (["ui", "--port", "99999"], "--port must be between 1 and 65535, got 99999"),
    ],
)
def test_cli_bad_input_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    write_spec(tmp_path, "model: {cell: lstm, hidden_size: 4}\ntask: {name: copy}\n")
    out = run_cli(args, tmp_path, env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"})
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_ui_on_a_taken_port_says_so_in_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = run_cli(["ui", "--port", str(port)], tmp_path, env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"})
    assert out.returncode == 2 and f"cannot serve on 127.0.0.1:{port}" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_ui_serves_the_store_on_localhost_and_opens_the_runs_table(tmp_path: Path) -> None:
    """`rnnbench ui` starts MLflow's UI for the same store, bound to 127.0.0.1, and prints the address
    of the runs table of the experiment with the latest run: MLflow 3.17's UI opens an experiment on
    its GenAI traces page unless the URL asks for the machine-learning view (`workflowType`)."""
    import json
    import re
    import socket
    import time
    import urllib.request

    from mlflow.tracking import MlflowClient

    from rnnbench.tracking import prepare_store

    uri = f"sqlite:///{tmp_path / 'ui.db'}"
    prepare_store(uri, "older")
    experiment_id = prepare_store(uri, "mine")
    client = MlflowClient(uri)
    client.set_terminated(client.create_run(experiment_id).info.run_id, "FINISHED")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.Popen(CLI + ["ui", "--port", str(port)], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        first = proc.stdout.readline() if proc.stdout else ""
        page = f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
        assert first.rstrip().endswith(f"open {page}"), first
        deadline, status = time.time() + 120, None
        while time.time() < deadline and status is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    status = r.status
            except OSError:
                assert proc.poll() is None, "the UI server ended"
                time.sleep(1)
        assert status == 200
        api = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get?experiment_id={experiment_id}"
        with urllib.request.urlopen(api, timeout=5) as r:
            tags = {t["key"]: t["value"] for t in json.load(r)["experiment"].get("tags", [])}
        assert tags["mlflow.experimentKind"] == "custom_model_development"  # older 3.x UIs read this tag
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            index = r.read().decode()
        (bundle,) = re.findall(r'src="/?([^"]*static/js/main\.[0-9a-f]+\.js)"', index)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/{bundle}", timeout=30) as r:
            js = r.read().decode()
        # the served UI knows the page and the query parameter the printed address relies on
        assert '"/experiments/:experimentId/runs"' in js and 'get("workflowType")' in js and '"machine_learning"' in js
    finally:
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cell", ["tanh", "lstm", "gru", "lstm_peephole", "gru_reset_before"])
def test_train_on_cuda_with_gradient_flow(tmp_path: Path, store: str, cell: str) -> None:
    """Every cell trains on CUDA to FINISHED, gradient-flow probes included (cuDNN's backward needs training mode)."""
    from mlflow.tracking import MlflowClient

    spec = write_spec(tmp_path, f"model: {{cell: {cell}}}\ntask: {{name: copy, seq_len: 5, n_train: 64, n_val: 32, n_test: 32}}\n")
    out = run_cli(["train", str(spec), *TINY, "train.device=cuda", "train.gradient_flow=true"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("rnnbench").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["device"] != "cpu"
    assert {"gradflow_init_steps", "gradflow_trained_steps", "test_ce"} <= set(run.data.metrics)


def test_resumed_run_continues_with_the_same_numbers(tmp_path: Path, store: str) -> None:
    """2 epochs, then the same run resumed to 4, ends with the weights of 4 epochs in one go: the
    member checkpoint carries the shuffling generator and the optimizer state; weight noise comes
    from a counter keyed on (seed, step), so it continues by itself."""
    import torch

    from rnnbench.config import Config
    from rnnbench.train import train

    def config(epochs: int, name: str) -> Config:
        return Config.from_dict({
            "model": {"cell": "gru_reset_before", "hidden_size": 8},
            "task": {"name": "copy", "seq_len": 5, "n_train": 64, "n_val": 32, "n_test": 32},
            "train": {"max_epochs": epochs, "batch_size": 16, "weight_noise": 0.05, "early_stopping_patience": None,
                      "progress_bar": False, "gradient_flow": False},
            "tracking": {"experiment": name, "checkpoint_dir": str(tmp_path / "ckpt")},
        })

    whole = train(config(4, "whole"))
    first = train(config(2, "split"))
    resumed = train(config(4, "split"), run_id=first.run_id)
    assert (whole.status, first.status, resumed.status) == ("FINISHED",) * 3
    a = torch.load(tmp_path / "ckpt" / whole.run_id / "member.pt", weights_only=True)
    b = torch.load(tmp_path / "ckpt" / first.run_id / "member.pt", weights_only=True)
    assert a["member"]["epoch"] == b["member"]["epoch"] == 4
    for wa, wb in zip(a["weights"] + a["best"], b["weights"] + b["best"], strict=True):
        assert torch.equal(wa, wb)
    assert resumed.metrics["test_ce"] == whole.metrics["test_ce"]
