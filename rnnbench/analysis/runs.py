"""Read runs from any MLflow store into tidy pandas frames: one row per run, and per-epoch histories.

Everything the report shows is computed from what this module reads, through MLflow's own search
and metric-history API (`MlflowClient.search_runs`, `MlflowClient.get_metric_history`), so a
SQLite file, a tracking server or a Databricks workspace all give the same frame.

Columns of the run frame:
  * identity: `run_id`, `experiment_id`, `experiment`, `status`, `start_time` (ms; never exported);
  * tags: `cell`, `task`, `seed`, `sweep`, `point_id`, `sample`, `parent_run_id`, `config_hash`,
    `git_commit`, `torch_version`, `device`, `failure_reason`;
  * params under their MLflow names (`model.cell`, `train.lr`, ...), typed: a column whose every
    value reads as a number becomes numeric ('None'/'null' become missing);
  * final metrics (step 0: `test_*`, `final_*`, `epochs`, `best_epoch`, ...): every logged metric
    that is not a per-epoch curve (`train_*`, `val_*`, `epoch_seconds`, `epoch_core_seconds`,
    `wall_seconds`, `updates`);
  * `metric`: the task's primary metric (copy `ce`, adding `mse`, music and speech `nll`).

Runs without a `cell` and a `task` tag (e.g. a sweep's parent run) are not training runs and are
left out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from rnnbench.config import identity_from_params

TAG_COLUMNS: dict[str, str] = {
    "cell": "cell",
    "task": "task",
    "seed": "seed",
    "sweep": "sweep",
    "point_id": "point_id",
    "sample": "sample",
    "mlflow.parentRunId": "parent_run_id",
    "config_hash": "config_hash",
    "git_commit": "git_commit",
    "torch_version": "torch_version",
    "device": "device",
    "failure_reason": "failure_reason",
    "stage": "stage",
    "machine": "machine",
    "population_id": "population_id",
    "population": "population",
    "stopped_by": "stopped_by",
}
"""MLflow tag -> frame column."""

CURVE_PREFIXES = ("train_", "val_")
CURVE_KEYS = ("epoch_seconds", "epoch_core_seconds", "wall_seconds", "updates")
PRIMARY_METRIC_FALLBACK = {"copy": "ce", "adding": "mse"}  # anything else: "nll"
_MISSING = {"", "None", "none", "null", "nan", "NaN"}


def client_for(tracking_uri: str | None = None) -> Any:
    """An MlflowClient for `tracking_uri` (else $MLFLOW_TRACKING_URI, else ./mlflow.db, as training)."""
    from mlflow.tracking import MlflowClient

    from rnnbench.tracking import require_store, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    require_store(uri)  # reading: MLflow would create a missing SQLite file (and its folders)
    return MlflowClient(tracking_uri=uri)


def is_curve_key(key: str) -> bool:
    """True for a per-epoch metric (step = epoch), False for a final (step 0) metric."""
    return key.startswith(CURVE_PREFIXES) or key in CURVE_KEYS


def primary_metric(task: str) -> str:
    """The task's minimised metric: from the task registry where the task is known."""
    try:
        from rnnbench.tasks import TASKS

        if task in TASKS:
            return TASKS[task].primary_metric
    except ImportError:  # pragma: no cover - analysis works without the task modules
        pass
    return PRIMARY_METRIC_FALLBACK.get(task, "nll")


def _search(client: Any, experiment_ids: list[str], filter_string: str) -> list[Any]:
    from mlflow.entities import ViewType

    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs(
            experiment_ids, filter_string=filter_string, run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000, page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _experiment_ids(client: Any, experiments: Sequence[str] | None) -> dict[str, str]:
    """{experiment_id: name} for the named experiments (names or ids), or every active one."""
    from mlflow.entities import ViewType

    from rnnbench.errors import RnnbenchError

    if not experiments:
        found, token = [], None
        while True:
            page = client.search_experiments(view_type=ViewType.ACTIVE_ONLY, page_token=token)
            found.extend(page)
            token = page.token
            if not token:
                break
        return {e.experiment_id: e.name for e in found}
    out = {}
    for name in experiments:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            try:
                exp = client.get_experiment(name)
            except Exception:  # noqa: BLE001 - not an id either
                exp = None
        if exp is None:
            raise RnnbenchError(f"no MLflow experiment named {name!r}")
        out[exp.experiment_id] = exp.name
    return out


def _typed(values: pd.Series) -> pd.Series:
    """Params arrive as strings: numbers become numeric columns (ints stay integral), the rest str."""
    raw = values.where(~values.isin(_MISSING) & values.notna(), None)
    present = raw.dropna()
    if present.empty:
        return pd.Series(np.nan, index=values.index, dtype="float64")
    if present.isin(["True", "False", "true", "false"]).all():
        return raw.map(lambda v: None if v is None else str(v).lower() == "true").astype("boolean")
    numbers = pd.to_numeric(present, errors="coerce")
    if numbers.notna().all():
        full = pd.to_numeric(raw, errors="coerce")
        if np.all(np.mod(numbers.to_numpy(dtype=float), 1) == 0) and not present.str.contains(r"[.eE]").any():
            return full.astype("Int64")
        return full.astype("float64")
    return raw.astype("str").where(raw.notna(), None)


def runs_frame(runs: Iterable[Any], experiment_names: dict[str, str] | None = None) -> pd.DataFrame:
    """Tidy frame from MLflow `Run` objects (see the module docstring for the columns)."""
    rows = []
    for run in runs:
        tags = run.data.tags
        if "cell" not in tags or "task" not in tags:
            continue  # a parent or foreign run
        row: dict[str, Any] = {
            "run_id": run.info.run_id,
            "experiment_id": run.info.experiment_id,
            "experiment": (experiment_names or {}).get(run.info.experiment_id, ""),
            "status": run.info.status,
            "start_time": run.info.start_time,
        }
        for tag, col in TAG_COLUMNS.items():
            row[col] = tags.get(tag)
        row["identity"] = identity_from_params(run.data.params) or row["config_hash"]
        finals = {k: float(v) for k, v in run.data.metrics.items() if not is_curve_key(k)}
        for k, v in run.data.params.items():
            if k not in finals and k not in row:
                row[k] = v
        row.update(finals)
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=["run_id", "experiment_id", "experiment", "status", *TAG_COLUMNS.values(), "identity",
                                     "metric"])
    df = pd.DataFrame(rows)
    param_cols = [c for c in df.columns if "." in c]
    for c in param_cols:
        df[c] = _typed(df[c].astype("object"))
    df["seed"] = pd.to_numeric(df["seed"], errors="coerce").astype("Int64")
    df["metric"] = df["task"].map(primary_metric)
    return sort_runs(df).reset_index(drop=True)


def sort_runs(df: pd.DataFrame) -> pd.DataFrame:
    """Rows in a stable order: sweep, task, cell, learning rate, seed, run id."""
    keys = [k for k in ("sweep", "task", "cell", "train.lr", "seed", "run_id") if k in df.columns]
    return df.sort_values(keys, kind="mergesort", na_position="last")


def load_runs(
    tracking_uri: str | None = None,
    sweeps: Sequence[str] | None = None,
    experiments: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Every training run of the named sweeps (tag `sweep`), or of the experiments, as one frame.

    With neither, all runs of all active experiments. Uses `MlflowClient.search_runs` with
    `tags.sweep = '<name>'`, one search per sweep, all pages.
    """
    client = client_for(tracking_uri)
    names = _experiment_ids(client, experiments)
    ids = sorted(names)
    runs: list[Any] = []
    if sweeps:
        for sweep in sorted(set(sweeps)):
            quoted = sweep.replace("'", "\\'")
            runs.extend(_search(client, ids, f"tags.sweep = '{quoted}'"))
    else:
        runs = _search(client, ids, "")
    return runs_frame(runs, names)


def _reference_keys(keys: Iterable[str]) -> set[str]:
    """Keys that are a reference beside a metric: `<key>_<word>` where `<key>` is logged too.

    E.g. `val_ce_baseline` beside `val_ce`, `val_nll_markov` beside `val_nll`; `val_nll_per_sample`
    stays a metric (its suffix has two words).
    """
    keys = set(keys)
    out = set()
    for k in keys:
        stem, _, word = k.rpartition("_")
        if stem in keys and word and word.isalnum():
            out.add(k)
    return out


def load_histories(
    run_ids: Iterable[str],
    tracking_uri: str | None = None,
    include_references: bool = False,
) -> pd.DataFrame:
    """Per-epoch curves of the runs, long form: `run_id`, `key`, `epoch`, `value`.

    Reads every per-epoch key of each run with `MlflowClient.get_metric_history`; where an epoch was
    logged twice (a resumed run), the last write wins. References logged per epoch (`val_ce_baseline`
    ...) are constants also found among the final metrics, and are left out unless asked for.
    """
    client = client_for(tracking_uri)
    rows: list[tuple[str, str, int, float]] = []
    for run_id in sorted(set(run_ids)):
        keys = [k for k in client.get_run(run_id).data.metrics if is_curve_key(k)]
        skip = set() if include_references else _reference_keys(keys)
        for key in sorted(set(keys) - skip):
            history = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
            last = {m.step: m.value for m in history}
            rows.extend((run_id, key, int(step), float(v)) for step, v in sorted(last.items()))
    frame = pd.DataFrame(rows, columns=["run_id", "key", "epoch", "value"])
    return frame.astype({"run_id": "str", "key": "str", "epoch": "int64", "value": "float64"})


def wide_histories(histories: pd.DataFrame) -> pd.DataFrame:
    """Long histories -> one row per (run_id, epoch), one column per key."""
    if histories.empty:
        return pd.DataFrame(columns=["run_id", "epoch"])
    wide = histories.pivot_table(index=["run_id", "epoch"], columns="key", values="value", aggfunc="last")
    wide.columns.name = None
    return wide.reset_index().sort_values(["run_id", "epoch"], kind="mergesort").reset_index(drop=True)


def load_artifact_csvs(run_ids: Iterable[str], folder: str, tracking_uri: str | None = None) -> pd.DataFrame:
    """Concatenate every `<folder>/*.csv` artifact of the runs, with `run_id` and `artifact` columns."""
    import os

    client = client_for(tracking_uri)
    frames: list[pd.DataFrame] = []
    previous = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # else one progress bar per file
    try:
        for run_id in sorted(set(run_ids)):
            frames.extend(_run_csvs(client, run_id, folder))
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = previous
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["run_id", "artifact"])


def _run_csvs(client: Any, run_id: str, folder: str) -> list[pd.DataFrame]:
    import tempfile
    from pathlib import Path

    try:
        infos = client.list_artifacts(run_id, folder)
    except Exception:  # noqa: BLE001 - a run without artifacts, or an unreachable artifact store
        return []
    frames = []
    for info in sorted(infos, key=lambda i: i.path):
        if info.is_dir or not info.path.endswith(".csv"):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            part = pd.read_csv(Path(client.download_artifacts(run_id, info.path, tmp)))
        part.insert(0, "artifact", Path(info.path).stem)
        part.insert(0, "run_id", run_id)
        frames.append(part)
    return frames
