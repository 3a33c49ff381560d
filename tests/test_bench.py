"""`rnnbench bench` on a tiny shape: it times the real code for every registered cell, checks the fast
paths, writes its files and one MLflow run.

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

from rnnbench.cells import CELLS, implementation
from rnnbench.cli import app

TINY = ["--seq-len", "6", "--batch", "2", "--input", "3", "--hidden", "3,5", "--repeats", "2", "--warmup", "1", "--population", "3"]


def _usable(cell: str, device: str = "cpu") -> set[str]:
    """The implementations of `cell` this machine runs: reference and each of its loops that loads."""
    out = {"reference"}
    for impl in CELLS[cell].loops:
        try:
            out.add(implementation(cell, device, torch.float32, impl))
        except Exception:  # noqa: BLE001 - e.g. triton on the CPU
            pass
    return out


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_bench_writes_tables_and_one_mlflow_run(tmp_path: Path, store: str) -> None:
    from mlflow.tracking import MlflowClient

    det, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    out_dir = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", *TINY, "--out", str(out_dir)])
    assert result.exit_code == 0, (result.output, result.exception)
    # the bench leaves the process's global torch settings as it found them
    assert torch.are_deterministic_algorithms_enabled() == det and torch.get_num_threads() == threads
    assert torch.utils.deterministic.fill_uninitialized_memory == fill

    md = (out_dir / "bench_cpu.md").read_text()
    rows = _rows(out_dir / "bench_cpu.csv")
    assert "torch" in md and "threads" in md and "shape: seq 6, batch 2, input 3" in md
    assert {r["kind"] for r in rows} == {"fused", "loop", "step", "ragged", "ragged-padded", "trainer", "population",
                                        "sequential", "setup"}
    assert not [r for r in rows if r["check"] == "FAIL"], [(r["kind"], r["cell"], r["impl"], r["note"]) for r in rows if r["check"] == "FAIL"]
    for hidden in ("3", "5"):
        got = {(r["kind"], r["cell"], r["impl"]) for r in rows if r["hidden"] == hidden}
        assert {("fused", c, f"torch.nn.{m}") for c, m in (("tanh", "RNN"), ("lstm", "LSTM"), ("gru", "GRU"))} <= got
        for cell in CELLS:  # every registered cell, every implementation it runs here; the step in its default one
            assert {("loop", cell, impl) for impl in _usable(cell)} <= got, cell
            default = implementation(cell, "cpu", torch.float32)
            assert {(k, cell, default) for k in ("step", "ragged", "ragged-padded", "trainer", "population", "sequential")} <= got, cell
    fast = [r for r in rows if r["kind"] == "loop" and r["impl"] != "reference"]
    assert fast and all(r["check"] == "ok" and float(r["diff_f64"]) < 1e-10 for r in fast)
    pops = [r for r in rows if r["kind"] == "population"]
    assert len(pops) == 2 * len(CELLS) and all(r["check"] == "ok" and float(r["speedup"]) > 0 for r in pops)
    timed = [r for r in rows if r["kind"] not in ("setup",)]
    assert all(float(r["ms"]) > 0 for r in timed)
    assert all(int(r["repeats"]) == 2 for r in timed if r["kind"] in ("fused", "loop", "step", "trainer"))
    assert all(float(r["x_lstm"]) == 1.0 for r in rows if r["impl"] == "torch.nn.LSTM")
    assert all(float(r["over_loop"]) > 0 for r in rows if r["kind"] in ("step", "trainer"))
    assert all(float(r["over_step"]) > 0 for r in rows if r["kind"] == "trainer")
    assert "3 members in one step vs 3 populations of one" in md
    ragged = [r for r in rows if r["kind"] == "ragged"]
    assert len(ragged) == 2 * len(CELLS) and all(float(r["speedup"]) > 0 for r in ragged)
    assert "each stopping at its own vs all run to the longest" in md and "sequences of 2 to 6 steps" in md
    setup = [r for r in rows if r["kind"] == "setup"]
    assert [r["impl"] for r in setup] == ["first", "second"] and all(float(r["ms"]) > 0 for r in setup)

    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("bench").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["seq_len"] == "6" and run.data.params["hidden"] == "3,5" and run.data.params["population"] == "3"
    assert "cpu/h3/fused/lstm/torch.nn.LSTM/ms" in run.data.metrics
    assert f"cpu/h5/step/cifg/{implementation('cifg', 'cpu', torch.float32)}/over_loop" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"bench_cpu.csv", "bench_cpu.md"}
    assert "device_cpu" in run.data.tags
    # the fixed-cost probe's two training runs live in their own experiment
    assert len(client.search_runs([client.get_experiment_by_name("bench_setup").experiment_id])) == 2


def test_a_new_cell_gets_every_row_without_a_bench_edit(tmp_path: Path, store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cell registered at run time (here a renamed tanh, with its compiled loop) is benched like the others."""
    class TanhAgain(CELLS["tanh"]):  # type: ignore[misc, valid-type]
        name = "tanh_again"

    monkeypatch.setitem(CELLS, "tanh_again", TanhAgain)
    args = ["bench", *TINY[:-6], "--hidden", "4", "--repeats", "1", "--warmup", "0", "--population", "2", "--no-trainer",
            "--no-setup", "--out", str(tmp_path / "b")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    rows = [r for r in _rows(tmp_path / "b" / "bench_cpu.csv") if r["cell"] == "tanh_again"]
    assert {(r["kind"], r["impl"]) for r in rows if r["kind"] == "loop"} == {("loop", i) for i in _usable("tanh")}
    assert {r["kind"] for r in rows} == {"loop", "step", "ragged", "ragged-padded", "population", "sequential"}
    assert all(r["check"] in ("ok", "") for r in rows)


def _quick_bench(out: Path, *extra: str) -> list[dict[str, str]]:
    """`rnnbench bench` at hidden 4, one repeat, without the trainer, setup and reference rows: its CSV rows."""
    args = ["bench", *TINY[:-6], "--hidden", "4", "--repeats", "1", "--warmup", "0", "--no-trainer", "--no-setup",
            "--no-reference", *extra, "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    return _rows(out / "bench_cpu.csv")


def test_bench_without_optional_parts(tmp_path: Path, store: str) -> None:
    rows = _quick_bench(tmp_path / "b", "--population", "0", "--threads", "1")
    assert {r["kind"] for r in rows} == {"fused", "loop", "step", "ragged", "ragged-padded"}
    assert not [r for r in rows if r["impl"] == "reference" and r["kind"] == "loop"]


def test_bench_of_chosen_cells(tmp_path: Path, store: str) -> None:
    rows = _quick_bench(tmp_path / "b", "--population", "2", "--cells", "tanh,gru")
    assert {r["cell"] for r in rows if r["kind"] != "fused"} == {"tanh", "gru"}
    assert {r["kind"] for r in rows if r["cell"] == "gru"} >= {"loop", "step", "population", "sequential"}
    assert "--cells tanh,gru" in (tmp_path / "b" / "bench_cpu.md").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--hidden", "36,x"], "--hidden must be comma-separated integers"),
        (["--hidden", "0"], "--hidden must list positive sizes"),
        (["--device", "tpu"], "--device must be cpu, cuda or all"),
        (["--cells", "lstm,nope"], "--cells: unknown cell(s) nope"),
        pytest.param(["--device", "cuda"], "no CUDA device", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path: Path, args: list[str], message: str) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    out = subprocess.run([sys.executable, "-m", "rnnbench.cli", "bench", *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not list(tmp_path.iterdir())  # refused before any store or folder exists


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_on_cuda(tmp_path: Path, store: str) -> None:
    out_dir = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", "--device", "all", *TINY, "--no-setup", "--out", str(out_dir)])
    assert result.exit_code == 0, (result.output, result.exception)
    rows = _rows(out_dir / "bench_cuda.csv")
    got = {(r["kind"], r["cell"], r["impl"]) for r in rows}
    for cell in CELLS:
        assert {("loop", cell, impl) for impl in _usable(cell, "cuda")} <= got
    assert all(r["check"] == "ok" for r in rows if r["kind"] == "loop" and r["impl"] != "reference")
    assert "GiB" in (out_dir / "bench_cuda.md").read_text()
