"""Train one configuration and record it in MLflow: the loop every entry point (train, sweep) shares.

A run ends FINISHED, FAILED (with a `failure_reason` tag) or KILLED; a run killed from outside stays
RUNNING in MLflow with its last checkpoint on disk, and `train(config, run_id=...)` resumes it.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from rnnbench.config import Config
from rnnbench.cpu_memory import keep_freed_memory
from rnnbench.errors import RnnbenchError
from rnnbench.tracking import git_commit, prepare_store, resolve_tracking_uri


@dataclass
class RunResult:
    run_id: str
    status: str  # FINISHED | FAILED
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str | None = None


def resolve_hidden_size(config: Config, input_size: int, output_size: int) -> int:
    """hidden_size as given, or the size whose parameter count is nearest model.budget."""
    from rnnbench.budget import PRESETS, hidden_size_for_budget

    m = config.model
    if m.budget is None:
        assert m.hidden_size is not None
        return m.hidden_size
    budget = PRESETS[m.budget] if isinstance(m.budget, str) else m.budget
    return hidden_size_for_budget(
        m.cell, input_size, budget, convention=m.budget_convention, output_size=output_size, num_layers=m.num_layers
    )


def _quiet_lightning() -> None:
    # Lightning's per-start adverts and summaries drown the progress bar.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*TreeSpec.*")


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
    """Train `config`; record params, per-epoch metrics, best-checkpoint test metrics into MLflow."""
    check_before_run(config)  # before the heavy imports and before any store or run exists
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient
    from torch.utils.data import DataLoader

    from rnnbench.analysis.gradient_flow import probe_batch
    from rnnbench import checkpoints
    from rnnbench.model import DivergedError, EpochRecorder, RandomState, SafeCheckpointIO, SequenceModel
    from rnnbench.tasks import get_task

    _quiet_lightning()
    keep_freed_memory()
    t_setup = time.perf_counter()
    uri = resolve_tracking_uri(config.tracking.tracking_uri)
    experiment_id = experiment_id or prepare_store(uri, config.tracking.experiment)
    client = MlflowClient(tracking_uri=uri)

    t = config.train
    task = get_task(config.task.name)(config.task, seed=t.seed)
    hidden = resolve_hidden_size(config, task.input_size, task.output_size)
    config = config.model_copy(deep=True)
    config.model.hidden_size = hidden  # the resolved config is what gets recorded
    threads = use_threads(config, task.input_size, hidden)

    use_cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
    if t.device == "cuda" and not torch.cuda.is_available():
        raise RnnbenchError("train.device=cuda but no CUDA device is available")
    device_name = torch.cuda.get_device_name(0) if use_cuda else "cpu"

    resuming = run_id is not None
    if run_id is None:
        run_tags = {
            "git_commit": git_commit(),
            "torch_version": torch.__version__,
            "device": device_name,
            "cell": config.model.cell,
            "task": config.task.name,
            "seed": str(t.seed),
            "config_hash": config.config_hash(),
            **(tags or {}),
        }
        run = client.create_run(experiment_id, tags=run_tags, run_name=config.tracking.run_name or run_name(config))
        run_id = run.info.run_id
    else:
        client.update_run(run_id, status="RUNNING")
    ckpt_dir = Path(config.tracking.checkpoint_dir) / run_id

    try:
        L.seed_everything(t.seed, workers=True, verbose=False)
        model = SequenceModel(config, task, hidden)
        if not resuming:
            params = {**config.flat(), **{f"task.{k}": v for k, v in task.describe().items()}}
            params.update(n_params_recurrent=model.counts["recurrent"], n_params_total=model.counts["total"],
                          threads_used=threads)
            dtype = torch.float64 if t.precision == "64" else torch.float32
            recurrence = model.rnn.recurrence("cuda" if use_cuda else "cpu", dtype)
            client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()],
                             tags=[RunTag("recurrence", recurrence)])
            client.log_text(run_id, yaml.safe_dump(config.to_dict(), sort_keys=False), "config.yaml")

        data = task.datasets()
        gen = torch.Generator().manual_seed(t.seed)
        kw: dict[str, Any] = dict(batch_size=t.batch_size, collate_fn=task.collate)
        train_loader = DataLoader(data["train"], shuffle=True, generator=gen, drop_last=False, **kw)
        eval_loaders = {
            "val": DataLoader(data["val"], **kw),
            "test": DataLoader(data["test"], **kw),
            "final_train": DataLoader(data["train"], **kw),
        }

        monitor = f"val_{task.primary_metric}"
        callbacks: list[Any] = [
            ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=monitor, mode="min"),
            EpochRecorder(client, run_id, monitor),
            RandomState(gen),
        ]
        if t.early_stopping_patience is not None:
            callbacks.append(EarlyStopping(monitor=monitor, mode="min", patience=t.early_stopping_patience))
        # last.ckpt after every epoch, the resume point: Lightning 2.6's save_last=True writes it only in
        # epochs that improved `monitor` (when best.ckpt is written), so a resume would redo the epochs
        # since. Lightning runs checkpoint callbacks last and in this order: this one's file holds the
        # epoch's EarlyStopping and best-checkpoint state.
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1,
                                         enable_version_counter=False))
        trainer = L.Trainer(
            accelerator="gpu" if use_cuda else "cpu",
            devices=1,
            max_epochs=t.max_epochs,
            max_steps=t.max_steps,
            limit_train_batches=t.limit_train_batches,
            limit_val_batches=t.limit_eval_batches,
            gradient_clip_val=t.grad_clip,
            gradient_clip_algorithm="norm",
            precision="64-true" if t.precision == "64" else "32-true",
            deterministic=not use_cuda,
            callbacks=callbacks,
            logger=False,
            enable_progress_bar=t.progress_bar,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=str(ckpt_dir),
            plugins=[SafeCheckpointIO()],  # atomic writes; reads that cannot run code
        )
        # Lightning's deterministic mode also fills every new tensor with NaN
        # (torch.utils.deterministic.fill_uninitialized_memory): a debugging aid that cost ~1 ms of a
        # 10 ms CPU step here (about 70 allocations a step; `rnnbench bench`). The algorithms stay
        # deterministic without it, and no op of ours reads memory it did not write.
        torch.utils.deterministic.fill_uninitialized_memory = False
        last = ckpt_dir / "last.ckpt"
        # The same test inputs for the probe at initialisation and after training.
        probe = probe_batch(task, data["test"]) if t.gradient_flow else None
        if probe is not None and not resuming:
            _gradient_flow(client, run_id, model, task, probe, "init")
        setup_seconds = time.perf_counter() - t_setup
        if resuming and last.exists():
            problem = checkpoints.folder_problem(ckpt_dir)
            if problem:
                raise RnnbenchError(f"cannot resume run {run_id}: {problem}")
            callbacks[1].restore(client, run_id)  # checkpoints older than EpochRecorder's state: epochs from MLflow
        trainer.fit(model, train_loader, eval_loaders["val"], ckpt_path=str(last) if resuming and last.exists() else None,
                    weights_only=True)

        # Test (and re-score train and val) with the best-validation checkpoint, as Chung et al.
        best = callbacks[0].best_model_path or None
        final: dict[str, float] = {}
        for split in ("test", "final_val", "final_train"):
            model.eval_prefix = split
            loader = eval_loaders["val" if split == "final_val" else split]
            for results in trainer.validate(model, loader, ckpt_path=best, verbose=False, weights_only=True):
                final.update({k: float(v) for k, v in results.items()})
        if probe is not None:  # the model now holds the best-validation weights
            _gradient_flow(client, run_id, model, task, probe, "trained")
        timer = callbacks[1]
        final.update(
            epochs=float(timer.epochs),
            best_epoch=float(timer.best_epoch(monitor)),
            best_val=float(callbacks[0].best_model_score) if callbacks[0].best_model_score is not None else float("nan"),
            seconds_per_epoch=timer.seconds_per_epoch(),
            seconds_to_best=timer.seconds_to(timer.best_epoch(monitor)),
            time_steps_per_second=model.train_time_steps / max(timer.train_seconds, 1e-9),
            setup_seconds=setup_seconds,
            n_params_recurrent=float(model.counts["recurrent"]),
            n_params_total=float(model.counts["total"]),
            hidden_size=float(hidden),
        )
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in final.items()])
        client.set_terminated(run_id, "FINISHED")
        return RunResult(run_id, "FINISHED", final)
    except DivergedError as e:
        return _fail(client, run_id, str(e), RunTag, ckpt_dir)
    except (KeyboardInterrupt, SystemExit):
        # Lightning turns Ctrl-C inside fit() into SystemExit(1): either way the run was stopped.
        # `rnnbench train` has no resume option; train(config, run_id=...) continues from last.ckpt.
        from rnnbench.interrupts import Interrupted

        client.set_terminated(run_id, "KILLED")
        kept = (Path(config.tracking.checkpoint_dir) / run_id).resolve()
        raise Interrupted(
            f"run {run_id} marked KILLED; its checkpoints (if an epoch ended) are kept in {kept}",
            "to resume it, run", ("--resume", run_id),
        ) from None
    except RnnbenchError as e:
        _fail(client, run_id, str(e), RunTag, ckpt_dir)
        raise
    except Exception as e:  # noqa: BLE001 - recorded, then reported to the caller
        return _fail(client, run_id, f"{type(e).__name__}: {e}".strip(), RunTag, ckpt_dir)


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
    from rnnbench.tasks import get_task

    task = get_task(config.task.name)(config.task, seed=config.train.seed)
    resolved = config.model_copy(deep=True)  # the hash train() tagged: with the hidden size resolved
    resolved.model.hidden_size = resolve_hidden_size(config, task.input_size, task.output_size)
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


# One model's step products are tiny at Chung's sizes, and the compiled CPU loops split a forward
# pass over threads only where gates x H x H >= 16384 (rnnbench/cells/csrc/fast_rnn.cpp, "threads").
# Measured on this project's 2-core machine while it was busy (load ~2), seconds per JSB epoch,
# 1 vs 2 torch threads: lstm_peephole H=37 0.41 vs 2.84 and 0.37 vs 1.00; gru_reset_before H=46
# 0.33 vs 1.83 and 0.39 vs 0.89; tanh H=101 0.40 vs 0.33 and 0.41 vs 2.79 (two threads fight the
# other processes for the cores and wait on each other). Bigger models gain from a free core and
# lose when there is none: lstm H=256 1.41 vs 0.88 and 1.15 vs 1.04, gru_reset_before H=256 1.12 vs
# 0.91 and 1.11 vs 2.62, lstm_peephole H=512 5.5 vs 7.1. Results do not depend on the thread count.
PARALLEL_PRODUCT = 16384  # gates x H x H from which a second thread can pay


def auto_threads(cell: str, input_size: int, hidden_size: int, cap: int) -> int:
    """train.threads=auto: 1 for a model below PARALLEL_PRODUCT; else the cores the 1-minute load
    average leaves free, at least 1 and at most `cap` (torch's setting: a sweep worker's share)."""
    from rnnbench.budget import count_params

    gates_times_hidden = count_params(cell, 2, hidden_size) - count_params(cell, 1, hidden_size)  # one input column
    if gates_times_hidden * hidden_size < PARALLEL_PRODUCT:
        return 1
    free = (os.cpu_count() or 1) - os.getloadavg()[0]
    return max(1, min(cap, round(free)))


def use_threads(config: Config, input_size: int, hidden_size: int) -> int:
    """Set torch's CPU threads for this run (train.threads, or auto_threads) and return the number."""
    import torch

    wanted = config.train.threads
    threads = auto_threads(config.model.cell, input_size, hidden_size, torch.get_num_threads()) if wanted == "auto" else wanted
    torch.set_num_threads(threads)
    return threads


def _gradient_flow(client: Any, run_id: str, model: Any, task: Any, batch: dict[str, Any], tag: str) -> None:
    import torch

    from rnnbench.analysis.gradient_flow import log_gradient_flow

    dtype = next(model.parameters()).dtype
    batch = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
    # Training mode on purpose: cuDNN's RNN backward refuses eval mode, and the models have no
    # dropout or batch statistics, so the mode changes nothing else.
    was_training = model.training
    model.train()
    with torch.enable_grad():
        log_gradient_flow(client, run_id, model.rnn, model.head, task, batch, tag)
    model.train(was_training)


def _fail(client: Any, run_id: str, reason: str, RunTag: Any, ckpt_dir: Path | None = None) -> RunResult:
    from rnnbench.checkpoints import remove_folder

    if ckpt_dir is not None:  # nothing resumes a FAILED run (a sweep starts its point afresh)
        remove_folder(ckpt_dir)
    reason = " ".join(reason.split())[:500]
    client.log_batch(run_id, tags=[RunTag("failure_reason", reason)])
    client.set_terminated(run_id, "FAILED")
    return RunResult(run_id, "FAILED", reason=reason)
