"""Where runs are recorded: the MLflow store, its experiments, and closing runs that died.

Traps this module exists for (../shared/docs/ecosystem-notes.md): MLflow 3.17 refuses the `./mlruns`
file store, so the default is a SQLite file; artifacts of a SQLite store would land in `<cwd>/mlruns`
unless each experiment names its artifact location; several processes creating a new store or
experiment at once race, so the driver calls `prepare_store` once before fanning out.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from urllib.parse import urlparse

from rnnbench.errors import RnnbenchError

DEFAULT_DB = "mlflow.db"


def resolve_tracking_uri(configured: str | None = None) -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI, else a SQLite file in the working directory."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = f"sqlite:///{Path.cwd() / DEFAULT_DB}"
    if "://" not in uri:  # a bare path means a SQLite file, never the refused file store
        uri = f"sqlite:///{Path(uri).resolve()}"
    return uri


def artifact_location(uri: str, experiment: str) -> str | None:
    """For a SQLite store, artifacts live beside the database file; a server decides for itself."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts" / experiment).resolve().as_uri()
    return None


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail in one line, before any work, if an HTTP tracking server does not answer."""
    scheme = urlparse(uri).scheme
    if scheme not in ("http", "https"):
        if scheme == "sqlite":
            parent = Path(uri[len("sqlite:///"):]).parent
            if not parent.is_dir():
                raise RnnbenchError(f"tracking store directory does not exist: {parent}")
        return
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            r.read()
    except Exception as e:  # noqa: BLE001 - any failure means the same thing to the user
        reason = getattr(e, "reason", e)
        raise RnnbenchError(f"tracking server {uri} is unreachable ({reason})") from None


def prepare_store(uri: str, experiment: str) -> str:
    """Create the store (migrations) and the experiment once; return the experiment id."""
    import mlflow
    from mlflow.tracking import MlflowClient

    check_reachable(uri)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(experiment, artifact_location=artifact_location(uri, experiment))
    except mlflow.exceptions.MlflowException:  # created by someone else in between
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise
        return exp.experiment_id


def git_commit() -> str:
    """The commit of the working directory's repository (or the package's), 'unknown' outside git."""
    for where in (Path.cwd(), Path(__file__).resolve().parent):
        try:
            out = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0:
            return out.stdout.strip()
    return "unknown"
