"""Shared fixtures: a real SQLite MLflow store per test, and the shared data directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Lightning and MLflow read these at import; keep tests quiet and local.
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite tracking URI in tmp_path; the test runs with tmp_path as working directory."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def data_dir() -> Path | None:
    d = os.environ.get("RNNBENCH_DATA_DIR")
    return Path(d) if d and Path(d).is_dir() else None


requires_data = pytest.mark.skipif(
    data_dir() is None, reason="real datasets absent: set RNNBENCH_DATA_DIR to a copy of ../shared/data (.ci/run does)"
)
