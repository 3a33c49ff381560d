"""The one place that writes a training run to MLflow: `RunRecorder`.

A run's life in the store: created with the standard tags (or reopened, RUNNING again, after a kill),
its params, tags and config.yaml once, one metric batch per epoch (step = epoch), its final metrics
and gradient-flow probes at step 0, then FINISHED, FAILED with a `failure_reason` tag, or KILLED.
The trainer hands plain Python values (dicts of floats, strings); nothing here knows about Lightning
or tensors. MLflow is imported inside the methods, so importing this module stays cheap.

Exactly-once epochs: an epoch counts as held by MLflow when the store has its `epoch_seconds`
metric at that step (the marker every epoch record carries; final metrics never use that name).
`log_epochs` may be given the whole history again and again (a resumed run does), and writes only
the epochs the store lacks. Each epoch is one `log_batch`, so a kill mid-way leaves whole epochs.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

    from rnnbench.config import Config

EPOCH_MARKER = "epoch_seconds"
"""The metric whose presence at step e says that epoch e is recorded (every epoch record has it)."""
REASON_MAX_CHARS = 500
"""A failure reason is kept to one line of at most this many characters (the sweep's summary too)."""
"""log_probe's text name for the gradient-norm curve, stored as gradient_flow/<tag>.csv; any other
name N is stored as gradient_flow/<tag>_N.csv (the gate statistics: "gates")."""


RESUMED_TAG = "resumed_git_commits"  # the code a run was resumed on, where it is not its git_commit


def one_line_reason(reason: str) -> str:
    """`reason` as recorded: whitespace runs (newlines too) collapsed to one space, at most
    REASON_MAX_CHARS characters, and never empty (a FAILED run always says something)."""
    return " ".join(reason.split())[:REASON_MAX_CHARS] or "no reason given"


def config_tags(config: Config) -> dict[str, str]:
    """The tags that identify what a run trains: cell, task, seed and config_hash. Give the resolved
    config (hidden size filled in from a budget): its hash is the one a resume compares against."""
    return {
        "cell": config.model.cell,
        "task": config.task.name,
        "seed": str(config.train.seed),
        "config_hash": config.config_hash(),
    }


def standard_tags(config: Config, device: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Every training run's tags: git_commit, torch_version, device (a GPU's name or "cpu"), the
    `config_tags`, then `extra` (sweep, point_id, batched, ...; they win over the standard ones)."""
    import torch

    from rnnbench.tracking import git_commit

    return {
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "device": device,
        "machine": machine(),
        **config_tags(config),
        **(extra or {}),
    }


def machine() -> str:
    """The CPU model and the cores this process may use, e.g. 'Intel(R) Xeon(R) Processor, 2 cores': what
    a run's seconds were measured on (the report's cost per part)."""
    import os
    from pathlib import Path

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    except OSError:
        import platform

        model = platform.processor() or platform.machine()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return f"{model or 'unknown CPU'}, {cores} cores"


def tracking_client(tracking: str | MlflowClient) -> MlflowClient:
    """A client for a tracking URI; a client is returned as it is."""
    if isinstance(tracking, str):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=tracking)
    return tracking


def _now_ms() -> int:
    return int(time.time() * 1000)


class RunRecorder:
    """Writes one MLflow run. Make one with `create` (a new run) or `reopen` (continue a stopped run);
    `RunRecorder(client, run_id)` wraps an existing run without touching its status."""

    def __init__(self, client: MlflowClient, run_id: str, logged_epochs: Iterable[int] | None = None) -> None:
        """`logged_epochs`: the epochs the store already holds; None: read them from the store when
        first needed."""
        self.client = client
        self.run_id = run_id
        self._logged: set[int] | None = set(logged_epochs) if logged_epochs is not None else None

    # --- opening -------------------------------------------------------------------------------------
    @classmethod
    def create(cls, tracking: str | MlflowClient, experiment_id: str, *, tags: Mapping[str, str],
               run_name: str | None = None) -> RunRecorder:
        """A new RUNNING run in `experiment_id` with `tags` (see `standard_tags`); `tracking` is a
        tracking URI or a client. run_name None: MLflow picks one."""
        client = tracking_client(tracking)
        run = client.create_run(experiment_id, tags=dict(tags), run_name=run_name)
        return cls(client, run.info.run_id, logged_epochs=())

    @classmethod
    def reopen(cls, tracking: str | MlflowClient, run_id: str) -> RunRecorder:
        """Continue a stopped run (RUNNING after a kill, or KILLED): status RUNNING again; learns
        which epochs the store already holds, so `log_epochs` never writes one twice. Resumed on other
        code than the run's `git_commit`, it says so: tag `resumed_git_commits`, "<commit>@<first
        epoch it trained>" for each such resume, comma-separated."""
        from rnnbench.tracking import git_commit

        client = tracking_client(tracking)
        client.update_run(run_id, status="RUNNING")
        recorder = cls(client, run_id)
        epochs = recorder.logged_epochs()
        tags = client.get_run(run_id).data.tags
        commit, started = git_commit(), tags.get("git_commit")
        if started is not None and commit != started:
            before = [t for t in tags.get(RESUMED_TAG, "").split(",") if t]
            entry = f"{commit}@{max(epochs) + 1 if epochs else 0}"
            if not before or before[-1].split("@")[0] != commit:
                client.set_tag(run_id, RESUMED_TAG, ",".join([*before, entry]))
        return recorder

    # --- reading what the run holds -----------------------------------------------------------------
    def has_params(self) -> bool:
        """True once the run's params are logged (MLflow refuses to change a param: log them once)."""
        return bool(self.client.get_run(self.run_id).data.params)

    def logged_epochs(self) -> set[int]:
        """The epochs (steps of EPOCH_MARKER) the store holds for this run."""
        return set(self._known_epochs())

    def _known_epochs(self) -> set[int]:
        if self._logged is None:
            self._logged = {m.step for m in self.client.get_metric_history(self.run_id, EPOCH_MARKER)}
        return self._logged

    def epoch_history(self, keys: Iterable[str]) -> list[dict[str, float]]:
        """The recorded per-epoch values of `keys`, one dict per recorded epoch in epoch order (a key
        an epoch lacks is absent from its dict): for a resume whose checkpoint lacks the record."""
        by_epoch: dict[int, dict[str, float]] = {}
        for key in dict.fromkeys(keys):
            for m in self.client.get_metric_history(self.run_id, key):
                by_epoch.setdefault(m.step, {})[key] = m.value
        return [by_epoch[e] for e in sorted(by_epoch)]

    # --- writing --------------------------------------------------------------------------------------
    def log_setup(self, params: Mapping[str, Any], tags: Mapping[str, str], config_yaml: str) -> None:
        """The run's params (values as str), extra tags (e.g. the recurrence implementation) and the
        resolved config as the artifact config.yaml. Once per run: see `has_params`."""
        from mlflow.entities import Param, RunTag

        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()],
                              tags=[RunTag(k, str(v)) for k, v in tags.items()])
        self.client.log_text(self.run_id, config_yaml, "config.yaml")

    def log_epochs(self, history: list[dict[str, float]]) -> list[int]:
        """Write, step = epoch (the list index), every epoch of `history` the store lacks; return the
        epochs written. Give the whole history each time: epochs already recorded are skipped. Each
        record must hold EPOCH_MARKER (how a reopened run knows its epoch is recorded)."""
        from mlflow.entities import Metric

        logged = self._known_epochs()
        missing = [e for e in range(len(history)) if e not in logged]
        for epoch in missing:
            if EPOCH_MARKER not in history[epoch]:
                raise ValueError(f"epoch {epoch}'s record has no {EPOCH_MARKER!r}: it could be written twice after a resume")
        now = _now_ms()
        for epoch in missing:
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, epoch) for k, v in history[epoch].items()])
            logged.add(epoch)  # only after the write: a failed write is retried by the next call
        return missing

    def log_final(self, metrics: Mapping[str, float]) -> None:
        """The run's final numbers (test and re-scored splits, timings, counts) at step 0."""
        from mlflow.entities import Metric

        now = _now_ms()
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])

    def log_probe(self, metrics: Mapping[str, float], artifacts: Mapping[str, str]) -> None:
        """A gradient-flow probe as rnnbench.analysis.gradient_flow.probe returns it: its metrics
        (gradflow_<tag>_*) at step 0, and each CSV text at its artifact path (gradient_flow/<tag>.csv, ...)."""
        from mlflow.entities import Metric

        now = _now_ms()
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in sorted(metrics.items())])
        for path, text in artifacts.items():
            self.client.log_text(self.run_id, text, path)

    # --- ending ---------------------------------------------------------------------------------------
    def finish(self, stopped_by: str = "") -> None:
        """Status FINISHED, with the tag stopped_by (early_stopping, max_epochs, max_steps, pruned, ...) when given."""
        from mlflow.entities import RunTag

        if stopped_by:
            self.client.log_batch(self.run_id, tags=[RunTag("stopped_by", stopped_by)])
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self, reason: str, checkpoint_folder: str | Path | None = None) -> str:
        """Status FAILED with the tag failure_reason (one line, see `one_line_reason`); the run's
        checkpoint folder is removed first (nothing resumes a FAILED run: a sweep starts its point
        afresh). Returns the reason as recorded."""
        from mlflow.entities import RunTag

        from rnnbench.checkpoints import remove_folder

        if checkpoint_folder is not None:
            remove_folder(Path(checkpoint_folder))
        reason = one_line_reason(reason)
        self.client.log_batch(self.run_id, tags=[RunTag("failure_reason", reason)])
        self.client.set_terminated(self.run_id, "FAILED")
        return reason

    def kill(self) -> None:
        """Status KILLED: stopped from outside, its checkpoint kept; `reopen` continues it."""
        self.client.set_terminated(self.run_id, "KILLED")

    # --- for the sweep: attempts without a recorder of their own ------------------------------------
    @classmethod
    def record_early_failure(cls, tracking: str | MlflowClient, experiment_id: str, reason: str, *,
                             tags: Mapping[str, str], run_name: str | None = None,
                             config: Config | None = None) -> RunRecorder:
        """A FAILED run for an error raised before any run existed (a bad task option, an unreadable
        dataset), so the attempt leaves a trace: `tags` plus failure_reason, and with `config` its
        `config_tags` and its flat params. Returns the recorder of that (closed) run."""
        from mlflow.entities import Param

        run_tags = {**tags, "failure_reason": one_line_reason(reason)}
        if config is not None:
            run_tags.update(config_tags(config))
        recorder = cls.create(tracking, experiment_id, tags=run_tags, run_name=run_name)
        if config is not None:
            recorder.client.log_batch(recorder.run_id, params=[Param(k, str(v)) for k, v in config.flat().items()])
        recorder.fail(reason)
        return recorder

    @staticmethod
    def kill_running(tracking: str | MlflowClient, runs: Iterable[Run]) -> list[str]:
        """Close as KILLED those of `runs` (MLflow Run entities, e.g. a point's attempts) that are
        RUNNING: this attempt's runs, stopped from outside. Returns their ids."""
        client = tracking_client(tracking)
        closed = []
        for run in runs:
            if run.info.status == "RUNNING":
                RunRecorder(client, run.info.run_id).kill()
                closed.append(run.info.run_id)
        return closed
