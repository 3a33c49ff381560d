"""Train one configuration and record it in MLflow: a population of one (rnnbench/training).

A run ends FINISHED, FAILED (with a `failure_reason` tag) or KILLED; a run killed from outside stays
RUNNING in MLflow with its last checkpoint on disk, and `train(config, run_id=...)` resumes it.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from rnnbench.config import Config
from rnnbench.errors import RnnbenchError
from rnnbench.tracking import resolve_tracking_uri
from rnnbench.training.loop import RunResult

__all__ = ["RunResult", "check_before_run", "check_writable_dir", "resumable_run", "run_name", "train"]

_F = TypeVar("_F", bound=Callable[..., Any])


def _restores_torch_threads(fn: _F) -> _F:
    """train() sets torch's thread count for its model; leave the process's setting as it was found, so
    the next run in the same process (an in-process sweep) starts from the same cap."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        before = torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return wrapper  # type: ignore[return-value]


@_restores_torch_threads
def train(
    config: Config,
    *,
    run_id: str | None = None,
    experiment_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> RunResult:
    """Train `config` (a population of one); record params, per-epoch metrics and the best-validation
    model's test metrics in MLflow. Ctrl-C or SIGTERM: the run is KILLED and `Interrupted` says how
    to resume it."""
    check_before_run(config)  # before the heavy imports and before any store or run exists
    from rnnbench.interrupts import Interrupted
    from rnnbench.training.loop import PopulationInterrupted, train_population

    if config.tracking.run_name is None:
        config = config.model_copy(deep=True)
        config.tracking.run_name = run_name(config)
    try:
        [result] = train_population([config], run_ids=[run_id], experiment_id=experiment_id, tags=[tags or {}])
    except PopulationInterrupted as e:
        [stopped] = e.run_ids
        kept = (Path(config.tracking.checkpoint_dir) / stopped).resolve()
        raise Interrupted(f"run {stopped} marked KILLED; its checkpoint (if an epoch ended) is kept in {kept}",
                          "to resume it, run", ("--resume", stopped)) from None
    return result


def resumable_run(config: Config, run_id: str) -> str:
    """The experiment id of `run_id` if `train(config, run_id=...)` can continue it: the run is in the
    store, stopped (RUNNING after a kill, or KILLED), and was started with this config; else one line."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from rnnbench.tracking import require_store

    uri = resolve_tracking_uri(config.tracking.tracking_uri)
    require_store(uri)
    try:
        run = MlflowClient(tracking_uri=uri).get_run(run_id)
    except MlflowException:
        raise RnnbenchError(f"--resume: no run {run_id!r} in {uri}") from None
    status = run.info.status
    if status == "FINISHED":
        raise RnnbenchError(f"--resume: run {run_id} is already FINISHED; nothing to resume")
    if status not in ("RUNNING", "KILLED"):
        reason = run.data.tags.get("failure_reason", "no reason recorded")
        raise RnnbenchError(f"--resume: run {run_id} is {status} ({reason}); train anew without --resume")
    from rnnbench.budget import hidden_size_of
    from rnnbench.tasks import get_task

    task = get_task(config.task.name)(config.task, seed=config.train.seed)
    resolved = config.model_copy(deep=True)  # the hash train() tagged: with the hidden size resolved
    resolved.model.hidden_size = hidden_size_of(config, task.input_size, task.output_size)
    logged = run.data.tags.get("config_hash")
    if logged is not None and logged != resolved.config_hash():
        raise RnnbenchError(f"--resume: run {run_id} was started with another config (hash {logged}, this one "
                            f"{resolved.config_hash()}): give the spec and overrides it was started with")
    return run.info.experiment_id


def check_before_run(config: Config) -> None:
    """What can fail cheaply fails here, in one line, before a store, an experiment or a run exists:
    the task's data (present and hash-checked: a missing, empty or altered data folder) and the
    checkpoint folder (creatable and writable). The budget is checked with the config itself."""
    from rnnbench.tasks import get_task

    get_task(config.task.name).check_data(config.task)
    check_writable_dir(Path(config.tracking.checkpoint_dir), "tracking.checkpoint_dir")


def check_writable_dir(path: Path, what: str) -> None:
    """RnnbenchError unless `path` is (or can be made) a folder this process can write in. Leaves
    nothing behind: the probe is a temporary folder made in `path`, or in its nearest existing
    ancestor when `path` does not exist yet. A real write, not os.access: root passes every mode bit."""
    probe_in = path
    while not probe_in.exists() and probe_in != probe_in.parent:
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise RnnbenchError(f"{what} {path} cannot be created: {probe_in} is not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".rnnbench-write-test-", dir=probe_in))
    except OSError as e:
        raise RnnbenchError(f"{what} {path} is not writable ({e.strerror or e})") from None


def run_name(config: Config) -> str:
    """A readable MLflow run name for a plain `rnnbench train` run, in the sweep's label form
    ('cell=gru task=jsb seed=3 lr=0.0007'), instead of MLflow's random two words."""
    from rnnbench.sweep.spec import point_label

    return point_label({"model.cell": config.model.cell, "task.name": config.task.name,
                        "train.seed": config.train.seed, "train.lr": config.train.lr})
