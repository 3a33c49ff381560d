"""Committed exports of a sweep's runs: what `rnnbench report --from` rebuilds the report from.

Per sweep, three gzipped CSV files in one folder (default results/runs/):

  <sweep>.runs.csv.gz     one row per training run: run_id, experiment_id, experiment, status,
                          start_time, then tags.<k>, params.<k> (as MLflow holds them: strings) and
                          metrics.<k> (the final, non-curve metrics), in MLflow's own column naming
  <sweep>.curves.csv.gz   the per-epoch curves of its FINISHED runs: run_id, key, epoch, value
  <sweep>.probes.csv.gz   its gradient-flow probe CSVs (artifacts gradient_flow/*.csv): run_id, artifact, ...

Only runs that ended (FINISHED, FAILED) are exported; RUNNING and KILLED ones resume from their
store and are exported when they end. Read back, the runs are handed to the same `runs_frame` as
runs read from a store, so the report built from exports is the one built from the store (of ended
runs), byte for byte (tests/test_exports.py). Exporting again merges: rows of runs already in the
files are replaced by the store's, other rows are kept, so a study run in chunks on several
machines (each with its own store) accumulates in one set of files. Floats are written with
Python's repr and read back exactly; the gzip header carries no time, so the same runs give the same bytes.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd

from rnnbench.analysis.runs import client_for, is_curve_key, load_artifact_csvs, load_histories
from rnnbench.errors import RnnbenchError

FOLDER = Path("results") / "runs"
KINDS = ("runs", "curves", "probes")
INFO = ["run_id", "experiment_id", "experiment", "status", "start_time"]
ENDED = ("FINISHED", "FAILED")


def path_of(folder: str | Path, sweep: str, kind: str) -> Path:
    return Path(folder) / f"{sweep}.{kind}.csv.gz"


def sweeps_in(folder: str | Path) -> list[str]:
    """The sweeps with a runs export in `folder`, sorted."""
    return sorted(p.name[: -len(".runs.csv.gz")] for p in Path(folder).glob("*.runs.csv.gz"))


# --- writing ----------------------------------------------------------------------------------------
def export_sweeps(sweeps: Sequence[str], tracking_uri: str | None = None, folder: str | Path = FOLDER) -> list[Path]:
    """Export (merge into) the files of each sweep from the store; returns the files written."""
    client = client_for(tracking_uri)
    written: list[Path] = []
    for sweep in sorted(set(sweeps)):
        every = _store_runs(client, sweep)
        if not every:
            raise RnnbenchError(f"no training runs of sweep {sweep!r} in the store")
        # RUNNING and KILLED runs are not results yet: they resume from this store's checkpoints, and
        # are exported once they end
        runs = [r for r in every if r.info.status in ENDED]
        if not runs:
            continue
        fresh = pd.DataFrame([_row(r, client) for r in runs])
        finished = sorted(r.info.run_id for r in runs if r.info.status == "FINISHED")
        frames = {
            "runs": fresh,
            "curves": load_histories(finished, tracking_uri),
            "probes": load_artifact_csvs(finished, "gradient_flow", tracking_uri),
        }
        replaced = set(fresh["run_id"])
        for kind, frame in frames.items():
            path = path_of(folder, sweep, kind)
            if path.is_file():  # keep the rows of runs this store does not have (other chunks)
                old = _read(path)
                frame = pd.concat([old[~old["run_id"].isin(replaced)], frame.astype(str) if kind == "runs" else frame],
                                  ignore_index=True)
            written.append(_write(_ordered(frame, kind), path))
    return written


def _store_runs(client: Any, sweep: str) -> list[Any]:
    quoted = sweep.replace("'", "\\'")
    ids = [e.experiment_id for e in client.search_experiments()]
    runs, token = [], None
    while True:
        page = client.search_runs(ids, f"tags.sweep = '{quoted}'", max_results=1000, page_token=token)
        runs.extend(r for r in page if "cell" in r.data.tags and "task" in r.data.tags)
        token = page.token
        if not token:
            return runs


def _row(run: Any, client: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                           "experiment": client.get_experiment(run.info.experiment_id).name, "status": run.info.status,
                           "start_time": run.info.start_time}
    row.update({f"tags.{k}": v for k, v in run.data.tags.items() if not k.startswith("mlflow.") or k == "mlflow.parentRunId"})
    row.update({f"params.{k}": v for k, v in run.data.params.items()})
    row.update({f"metrics.{k}": repr(float(v)) for k, v in run.data.metrics.items() if not is_curve_key(k)})
    return {k: ("" if v is None else str(v)) for k, v in row.items()}


def _ordered(frame: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Columns and rows in a fixed order, whatever order the chunks came in."""
    if kind == "runs":
        rest = sorted(c for c in frame.columns if c not in INFO)
        return frame[[*INFO, *rest]].fillna("").sort_values("run_id", kind="mergesort").reset_index(drop=True)
    if frame.empty:
        return frame
    # curves by run, key, epoch (as load_histories gives them); probes by run and file, each file's
    # rows and columns in their own order (as load_artifact_csvs gives them)
    keys = ["run_id", "key", "epoch"] if kind == "curves" else ["run_id", "artifact"]
    return frame.sort_values(keys, kind="mergesort").reset_index(drop=True)


def _write(frame: pd.DataFrame, path: Path) -> Path:
    text = frame.to_csv(index=False, lineterminator="\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0) as gz:  # no time in the header
        gz.write(text.encode())
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)  # never half-written
    return path


COLUMNS = {"runs": INFO, "curves": ["run_id", "key", "epoch", "value"], "probes": ["run_id", "artifact"]}


def _read(path: Path) -> pd.DataFrame:
    """One export file, or one line naming the file and what is wrong with it (not gzip, not CSV,
    a column missing): a damaged or foreign file in the folder is refused, never half-read."""
    kind = path.name.rsplit(".", 3)[-3]
    try:
        text = gzip.decompress(path.read_bytes()).decode()
        if kind != "runs" and not text.strip():
            return pd.DataFrame(columns=COLUMNS[kind])
        frame = (pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False) if kind == "runs"
                 else pd.read_csv(io.StringIO(text), float_precision="round_trip"))
    except (OSError, EOFError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise RnnbenchError(f"export {path}: unreadable ({type(e).__name__}: {e})") from None
    missing = [c for c in COLUMNS[kind] if c not in frame.columns]
    if missing:
        raise RnnbenchError(f"export {path}: not an rnnbench {kind} export (missing column(s): {', '.join(missing)})")
    return frame


# --- reading ----------------------------------------------------------------------------------------
def exported_runs(folder: str | Path, sweeps: Sequence[str] | None = None) -> list[Any]:
    """The exported runs as objects shaped like MLflow's Run (info, data.tags/params/metrics)."""
    names = sorted(set(sweeps)) if sweeps else sweeps_in(folder)
    out = []
    for sweep in names:
        path = path_of(folder, sweep, "runs")
        if not path.is_file():
            raise RnnbenchError(f"no export of sweep {sweep!r} in {folder} (expected {path.name})")
        for line, row in enumerate(_read(path).to_dict("records"), start=2):
            try:
                info = SimpleNamespace(run_id=row["run_id"], experiment_id=row["experiment_id"], status=row["status"],
                                       start_time=int(row["start_time"]) if row["start_time"] else None,
                                       experiment_name=row["experiment"])
                part = {kind: {k.split(".", 1)[1]: v for k, v in row.items() if k.startswith(kind + ".") and v != ""}
                        for kind in ("tags", "params", "metrics")}
                metrics = {k: float(v) for k, v in part["metrics"].items()}
            except ValueError as e:  # a start time or metric that is not a number
                raise RnnbenchError(f"export {path}, line {line}: {e}") from None
            data = SimpleNamespace(tags=part["tags"], params=part["params"], metrics=metrics)
            out.append(SimpleNamespace(info=info, data=data))
    return out


def exported_table(folder: str | Path, kind: str, run_ids: Sequence[str], sweeps: Sequence[str] | None = None) -> pd.DataFrame:
    """The curves or probes of these runs from the exports (empty frame when there are none)."""
    wanted = set(run_ids)
    frames = []
    for sweep in sorted(set(sweeps)) if sweeps else sweeps_in(folder):
        path = path_of(folder, sweep, kind)
        if path.is_file():
            frame = _read(path)
            frames.append(frame[frame["run_id"].isin(wanted)])
    if not frames:
        return pd.DataFrame(columns=["run_id", "key", "epoch", "value"] if kind == "curves" else ["run_id", "artifact"])
    frame = pd.concat(frames, ignore_index=True)
    if kind == "curves":
        try:
            frame = frame.astype({"run_id": "str", "key": "str", "epoch": "int64", "value": "float64"})
        except (ValueError, TypeError) as e:  # an epoch or value that is not a number
            raise RnnbenchError(f"curves export in {folder}: {e}") from None
        return frame.sort_values(["run_id", "key", "epoch"], kind="mergesort").reset_index(drop=True)
    return frame
