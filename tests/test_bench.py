"""`rnnbench bench` on a tiny shape: it runs, checks the fast paths, writes its files and one MLflow run.

No timing assertions: the speed targets live in the bench's own output (results/bench), never here.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rnnbench.cli import app

TINY = ["--seq-len", "4", "--batch", "2", "--input", "3", "--hidden", "3,5", "--repeats", "2", "--warmup", "1", "--many", "3"]


def test_bench_writes_tables_and_one_mlflow_run(tmp_path: Path, store: str) -> None:
    from mlflow.tracking import MlflowClient

    from rnnbench.cells import _fast

    det, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    out_dir = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", *TINY, "--out", str(out_dir)])
    assert result.exit_code == 0, (result.output, result.exception)
    # the bench leaves the process's global torch settings as it found them
    assert torch.are_deterministic_algorithms_enabled() == det and torch.get_num_threads() == threads

    md = (out_dir / "bench_cpu.md").read_text()
    with (out_dir / "bench_cpu.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert "torch" in md and "threads" in md and "shape: seq 4, batch 2, input 3" in md
    kinds = {r["kind"] for r in rows}
    assert kinds == {"bare", "cell", "bare-step", "harness", "lightning", "setup", "many"}
    many = [r for r in rows if r["kind"] == "many"]  # K=3 batched and sequential, each cell, first hidden size
    assert {(r["cell"], r["impl"]) for r in many} == {
        (c, s + u) for c in ("tanh", "lstm", "gru", "lstm_peephole", "gru_reset_before") for s in ("batched", "sequential") for u in ("", "-unequal")}
    assert all(float(r["speedup"]) > 0 for r in many if r["impl"] == "batched") and "models trained together" in md
    rows = [r for r in rows if r["kind"] != "many"]
    for hidden in ("3", "5"):
        got = {(r["kind"], r["cell"], r["impl"]) for r in rows if r["hidden"] == hidden}
        assert {("bare", c, "torch") for c in ("tanh", "lstm", "gru")} <= got
        assert {("cell", c, "reference") for c in ("lstm_peephole", "gru_reset_before")} <= got
        assert {("cell", c, "python") for c in ("lstm_peephole", "gru_reset_before")} <= got
        assert {("harness", c) for c in ("tanh", "lstm", "gru", "lstm_peephole", "gru_reset_before")} <= {k[:2] for k in got}
        assert {("bare-step", c) for c in ("tanh", "lstm", "gru", "lstm_peephole", "gru_reset_before")} <= {k[:2] for k in got}
        assert {("lightning", c) for c in ("tanh", "lstm", "gru", "lstm_peephole", "gru_reset_before")} <= {k[:2] for k in got}
        if _fast.extension_info()["state"]:
            assert {("cell", c, "cpp") for c in ("lstm_peephole", "gru_reset_before", "tanh", "lstm", "gru")} <= got
    skipped = [r for r in rows if r["note"].startswith("compiled loop unavailable")]
    assert bool(skipped) != bool(_fast.extension_info()["state"])  # cpp rows say why they were not timed
    assert all(r["impl"] == "cpp" and r["ms"] == "nan" for r in skipped)
    rows = [r for r in rows if r not in skipped]
    fast_rows = [r for r in rows if r["kind"] == "cell" and r["impl"] != "reference"]
    assert fast_rows and all(r["check"] == "ok" for r in fast_rows), [(r["cell"], r["impl"], r["check"], r["note"]) for r in fast_rows]
    assert all(float(r["diff_f64"]) < 1e-10 for r in fast_rows)
    timed = [r for r in rows if r["kind"] != "setup"]
    assert all(float(r["ms"]) > 0 and int(r["repeats"]) == 2 for r in timed)
    lstm = [r for r in rows if (r["kind"], r["cell"]) == ("bare", "lstm")]
    assert all(float(r["x_fused_lstm"]) == 1.0 for r in lstm)
    assert all(float(r["harness_over_bare"]) > 0 and float(r["harness_over_step"]) > 0 for r in rows if r["kind"] == "harness")
    assert "a bare PyTorch training step of the same model" in md  # the floor beside each harness target
    assert md.count("x the throughput of the bare fused torch.nn kernel") == 6  # tanh, lstm, gru at 2 sizes
    setup = [r for r in rows if r["kind"] == "setup"]
    assert [r["impl"] for r in setup] == ["first", "second"] and all(float(r["ms"]) > 0 for r in setup)

    client = MlflowClient(store)
    exp = client.get_experiment_by_name("bench")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["seq_len"] == "4" and run.data.params["hidden"] == "3,5"
    assert "cpu/h3/bare/lstm/torch/ms" in run.data.metrics
    assert "cpu/h5/harness/lstm_peephole" in " ".join(run.data.metrics)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"bench_cpu.csv", "bench_cpu.md"}
    assert "device_cpu" in run.data.tags
    # the fixed-cost probe's two training runs live in their own experiment
    probe = client.get_experiment_by_name("bench_setup")
    assert len(client.search_runs([probe.experiment_id])) == 2


def test_bench_without_optional_parts(tmp_path: Path, store: str) -> None:
    out_dir = tmp_path / "b"
    args = ["bench", *TINY[:-4], "--repeats", "1", "--warmup", "0", "--hidden", "4", "--no-lightning", "--no-setup",
            "--no-reference", "--many", "0", "--threads", "1", "--out", str(out_dir)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    with (out_dir / "bench_cpu.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {r["kind"] for r in rows} == {"bare", "cell", "bare-step", "harness"}
    assert not [r for r in rows if r["impl"] == "reference"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--hidden", "36,x"], "--hidden must be comma-separated integers"),
        (["--device", "tpu"], "--device must be cpu, cuda or all"),
        pytest.param(["--device", "cuda"], "no CUDA device", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path: Path, args: list[str], message: str) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    out = subprocess.run([sys.executable, "-m", "rnnbench.cli", "bench", *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_on_cuda(tmp_path: Path, store: str) -> None:
    out_dir = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", "--device", "all", *TINY, "--no-setup", "--out", str(out_dir)])
    assert result.exit_code == 0, (result.output, result.exception)
    with (out_dir / "bench_cuda.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    got = {(r["kind"], r["cell"], r["impl"]) for r in rows}
    assert {("cell", "lstm_peephole", "graphed"), ("cell", "gru_reset_before", "graphed")} <= got
    assert all(r["check"] == "ok" for r in rows if r["kind"] == "cell" and r["impl"] != "reference")
    assert "GiB" in (out_dir / "bench_cuda.md").read_text()
