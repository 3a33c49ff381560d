"""Train a population of K >= 1 configs with Lightning and record each member in its own MLflow run.

`rnnbench train` is a population of one; a sweep trains its points that differ only in per-member
keys (`MEMBER_KEYS`) as populations of K. The flow of one population:

  build    configs -> one task class, one hidden size -> runs (created, or reopened to resume) ->
           Population (stacked weights from each member's own seed) -> member checkpoints restored
  fit      Lightning's loop, manual optimization (Population.training_step); at each epoch's end the
           callbacks below decide per member, checkpoint, record, and drop the members that are done
  score    the members that finished, with their best-validation weights: test, final_val, final_train
  record   final metrics, FINISHED; a diverged member FAILED with its reason as soon as it is found
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from rnnbench import checkpoints
from rnnbench.config import Config
from rnnbench.errors import RnnbenchError
from rnnbench.training import checkpoint
from rnnbench.training.population import EvalBatches, Member, Population, TrainBatches, build
from rnnbench.training.recorder import RunRecorder, standard_tags

# Keys in which the members of one population may differ (each is a (K,) tensor or a per-member rule);
# every other key (cell, task, size, batch size, optimizer kind, precision, ...) is the population's.
MEMBER_KEYS = ("train.seed", "train.lr", "train.momentum", "train.weight_decay", "train.grad_clip",
               "train.weight_noise", "train.early_stopping_patience", "train.stop_below_baseline", "train.max_epochs", "train.rmsprop_alpha",
               "train.rmsprop_floor")


def population_key(config: Config) -> tuple[tuple[str, str], ...]:
    """Configs with equal keys can train as one population: equal in everything but MEMBER_KEYS and
    the settings that never change a number (config.NOT_IDENTITY: progress bar, threads, tracking)."""
    from rnnbench.config import NOT_IDENTITY

    free = set(MEMBER_KEYS) | set(NOT_IDENTITY)
    return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in config.flat().items()
                        if k not in free and not k.startswith("tracking.")))


@dataclass
class RunResult:
    run_id: str
    status: str  # FINISHED | FAILED
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str | None = None


class PopulationInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a population; its unfinished runs (`run_ids`) are KILLED, resumable."""

    def __init__(self, run_ids: list[str]) -> None:
        super().__init__(f"stopped; runs {', '.join(run_ids)} KILLED")
        self.run_ids = run_ids


# A rule that may stop members at an epoch's end, e.g. successive halving over learning rates
# (rnnbench/sweep/halving.py): called with the epoch the members in training just completed and
# every member (their status, stopped_by, best_score, history); returns the indices (into that
# list) of members in training to stop ("pruned").
Pruner = Callable[[int, list[Member]], list[int]]


# --- the epoch's end, in the order of the callbacks' list -------------------------------------------
class EpochTimer(Callback):
    """Epoch and training-batch seconds; wall-clock since fit began (plus a resumed run's earlier time)."""

    def __init__(self) -> None:
        self.fit_t0 = self.epoch_t0 = self.batch_t0 = 0.0
        self.train_seconds = 0.0

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.fit_t0 = time.perf_counter()

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.epoch_t0 = time.perf_counter()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.batch_t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Population, outputs: Any, batch: Any, batch_idx: int) -> None:
        seconds = time.perf_counter() - self.batch_t0
        for i in pl_module.ids:
            pl_module.members[i].train_seconds += seconds


class MemberStopping(Callback):
    """Per member, at each epoch's end: its record of the epoch; divergence (FAILED); early stopping
    as Lightning's EarlyStopping (mode min, `patience` epochs without a strict improvement, a
    non-finite score stops), best-validation weights kept; train.stop_below_baseline (a score that
    far below the task's baseline: solved with a margin, nothing left to learn that counts);
    max_epochs; then the pruner, if any."""

    def __init__(self, timer: EpochTimer, pruner: Pruner | None = None) -> None:
        self.timer, self.pruner = timer, pruner

    def on_train_epoch_end(self, trainer: Any, pl_module: Population) -> None:
        pop = pl_module
        train, val = pop.split_values("train"), pop.split_values("val")
        now = time.perf_counter()
        bad = pop.bad_step.tolist()
        bad_loss = pop.bad_loss.tolist()
        steps, time_steps = pop.steps.tolist(), pop.train_steps.tolist()
        improved = []
        monitor = f"val_{pop.task.primary_metric}"
        # The epoch's cost split over the members that computed it (the report's costs add these up:
        # a run resumed in another population is charged for each epoch where it ran).
        share = torch.get_num_threads() / len(pop.ids)
        for row, i in enumerate(pop.ids):
            m = pop.members[i]
            m.time_steps = time_steps[row]
            if bad[row] >= 0:
                m.status, m.reason = "failed", f"training loss became {bad_loss[row]} at epoch {m.epoch}, step {bad[row]}"
                improved.append(False)
                continue
            record = {**train[row], **val[row], "epoch_seconds": now - self.timer.epoch_t0,
                      "epoch_core_seconds": share * (now - self.timer.epoch_t0),
                      "wall_seconds": m.wall_offset + now - self.timer.fit_t0, "updates": float(steps[row])}
            del m.history[m.epoch:]  # an epoch re-run after a resume replaces its earlier record
            m.history.append(record)
            score = record.get(monitor, math.nan)
            better = math.isfinite(score) and score < m.best_score
            improved.append(better)
            if better:
                m.best_score, m.best_epoch, m.wait = score, m.epoch, 0
            else:
                m.wait += 1
            m.epoch += 1
            below = m.config.train.stop_below_baseline
            if not math.isfinite(score):
                m.status, m.stopped_by = "stopped", "non_finite_val"
            elif below is not None and score < below * record[f"{monitor}_baseline"]:
                m.status, m.stopped_by = "stopped", "below_baseline"
            elif m.patience is not None and m.wait >= m.patience:
                m.status, m.stopped_by = "stopped", "early_stopping"
            elif m.epoch >= m.config.train.max_epochs:
                m.status, m.stopped_by = "stopped", "max_epochs"
        pop.keep_best(improved)
        training = [i for i in pop.ids if pop.members[i].status == "training"]
        if self.pruner is not None and training:
            for i in self.pruner(pop.members[training[0]].epoch, pop.members):
                if i in training:
                    pop.members[i].status, pop.members[i].stopped_by = "stopped", "pruned"


class MemberCheckpoint(Callback):
    """Each member's file, after the epoch's decisions and before the epoch reaches MLflow."""

    def on_train_epoch_end(self, trainer: Any, pl_module: Population) -> None:
        for row, i in enumerate(pl_module.ids):
            if pl_module.members[i].status != "failed":  # nothing resumes a FAILED run
                checkpoint.save(pl_module, row)


class EpochRecords(Callback):
    """The epoch to each member's MLflow run; a diverged member FAILED; then the members that are done
    leave the compute, and the fit ends when none is left."""

    def __init__(self, recorders: dict[int, RunRecorder]) -> None:
        self.recorders = recorders

    def on_train_epoch_end(self, trainer: Any, pl_module: Population) -> None:
        pop = pl_module
        for i in pop.ids:
            m, rec = pop.members[i], self.recorders.get(i)  # no recorder: a population trained without MLflow
            if rec is not None:
                rec.log_epochs(m.history)
            if m.status == "failed":
                folder = checkpoint.member_path(m.config.tracking.checkpoint_dir, m.run_id).parent
                if rec is not None:
                    rec.fail(m.reason or "diverged", folder)
                else:
                    checkpoints.remove_folder(folder)
        rows = [r for r, i in enumerate(pop.ids) if pop.members[i].status == "training"]
        if len(rows) < len(pop.ids):
            pop.keep(rows)
        if not rows:
            trainer.should_stop = True

    def on_train_end(self, trainer: Any, pl_module: Population) -> None:
        time_steps = pl_module.train_steps.tolist()
        for row, i in enumerate(pl_module.ids):  # max_steps ended the fit inside an epoch
            pl_module.members[i].time_steps = time_steps[row]
            if pl_module.members[i].status == "training":
                pl_module.members[i].status, pl_module.members[i].stopped_by = "stopped", "max_steps"


def quiet_lightning() -> None:
    """Lightning's per-start adverts and summaries drown the progress bar."""
    import logging
    import warnings

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in (".*does not have many workers.*", ".*LeafSpec.*", ".*TreeSpec.*", ".*configure_optimizers.*",
                    ".*exists and is not empty.*"):
        warnings.filterwarnings("ignore", pattern)


# --- one population, start to end -------------------------------------------------------------------
def train_population(
    configs: list[Config],
    *,
    run_ids: list[str | None] | None = None,
    experiment_id: str | None = None,
    tags: list[dict[str, str]] | None = None,
    pruner: Pruner | None = None,
    impl: str = "auto",
) -> list[RunResult]:
    """Train `configs` (equal `population_key`) as one population; one MLflow run per member.

    run_ids[k] continues member k's run from its checkpoint (or starts it afresh in that run); tags[k]
    are added to its run. Returns one RunResult per config, in order. A diverged member ends FAILED
    while the others go on; an error of the whole population fails every unfinished run (a
    RnnbenchError is re-raised after that); Ctrl-C or SIGTERM closes the unfinished runs KILLED
    (resumable) and re-raises KeyboardInterrupt.
    """
    from rnnbench.budget import param_counts
    from rnnbench.cells import implementation
    from rnnbench.cpu_memory import keep_freed_memory
    from rnnbench.training.threads import flush_subnormals, use_threads

    if not configs:
        return []
    K = len(configs)
    run_ids = list(run_ids) if run_ids is not None else [None] * K
    tags = list(tags) if tags is not None else [{} for _ in range(K)]
    _check_members(configs, run_ids, tags)
    quiet_lightning()
    keep_freed_memory()
    flush_subnormals()
    t_setup = time.perf_counter()
    t = configs[0].train
    device, dtype = _device_and_dtype(configs[0])
    configs, task, hidden = _resolved(configs)
    threads = use_threads(configs[0], task.input_size, hidden) if K == 1 else torch.get_num_threads()

    recorders: dict[int, RunRecorder] = {}
    members: list[Member] = []
    try:
        m = configs[0].model
        counts = param_counts(m.cell, task.input_size, hidden, task.output_size, m.num_layers, m.bidirectional)
        recurrence = implementation(configs[0].model.cell, device, dtype, impl)
        fresh = []  # members whose run is new (or had not got as far as its params): probed at init
        population = uuid.uuid4().hex[:12]  # the runs trained together (one wall clock: the report's costs)
        for k, c in enumerate(configs):
            extra = {"gradient_flow": "not probed: bidirectional"} if c.model.bidirectional and t.gradient_flow else {}
            recorders[k], new = _open_run(c, run_ids[k], experiment_id, {"population_id": population, **extra, **tags[k]},
                                          device, K, counts, threads, recurrence)
            if new:
                fresh.append(k)
        pop = build(configs, device, dtype, impl, [recorders[k].run_id for k in range(K)])
        members = pop.members
        _resume(pop, recorders, run_ids)
        # The probe follows one recurrence from the loss back in time; a bidirectional model has two
        # running opposite ways, so it is not probed (the run's tag says so).
        probes = _probe_batches(pop) if t.gradient_flow and not configs[0].model.bidirectional else None
        if probes is not None:
            _probe(pop, recorders, probes, "init", only=fresh)
        _check_stop_rule(pop)
        setup_seconds = time.perf_counter() - t_setup
        choices: dict[int, dict[str, float]] = {}
        if t.readout == "ridge":
            choices = _fit_ridge(pop, recorders)
        else:
            _fit(pop, recorders, pruner)
        done = [i for i, m in enumerate(members) if m.status == "stopped"]
        final = _score(pop, done, setup_seconds, counts, hidden)
        for i, chosen in choices.items():
            final[i].update(chosen)
        if probes is not None and done:
            _probe(pop, recorders, probes, "trained", only=done)
    except (KeyboardInterrupt, SystemExit):
        for k, r in recorders.items():
            if k >= len(members) or members[k].status != "failed":
                r.kill()
        raise PopulationInterrupted([r.run_id for r in recorders.values()]) from None
    except Exception as e:  # noqa: BLE001 - recorded in every unfinished run, as one line
        results = _fail_unfinished(e, configs, recorders, members)
        if isinstance(e, RnnbenchError) or len(recorders) < K:
            raise
        return results
    return _finish(members, recorders, final)


def _check_members(configs: list[Config], run_ids: list[str | None], tags: list[dict[str, str]]) -> None:
    K = len(configs)
    if len(run_ids) != K or len(tags) != K:
        raise RnnbenchError(f"train_population: {K} configs but {len(run_ids)} run ids and {len(tags)} tag sets")
    key = population_key(configs[0])
    for c in configs[1:]:
        if population_key(c) != key:
            differ = sorted(set(population_key(c)) ^ set(key))
            raise RnnbenchError(f"train_population: configs differ in {differ[0][0]!r}, which members must share")


def _check_stop_rule(pop: Population) -> None:
    """train.stop_below_baseline needs the task's val_<metric>_baseline (copy, adding): one line if absent."""
    if any(c.train.stop_below_baseline is not None for c in pop.configs):
        key = f"{pop.task.primary_metric}_baseline"
        if key not in pop.task.baselines("val"):
            raise RnnbenchError(f"train.stop_below_baseline: task {pop.task.name} has no {key} to stop below; set it to null")


def _device_and_dtype(config: Config) -> tuple[torch.device, torch.dtype]:
    t = config.train
    if t.device == "cuda" and not torch.cuda.is_available():
        raise RnnbenchError("train.device=cuda but no CUDA device is available")
    use_cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    return device, torch.float64 if t.precision == "64" else torch.float32


def _resolved(configs: list[Config]) -> tuple[list[Config], Any, int]:
    """The configs with their hidden size resolved (what gets recorded), a task instance, that size."""
    from rnnbench.budget import hidden_size_of
    from rnnbench.tasks import get_task

    task = get_task(configs[0].task.name)(configs[0].task, seed=configs[0].train.seed)
    hidden = hidden_size_of(configs[0], task.input_size, task.output_size)
    resolved = [c.model_copy(deep=True) for c in configs]
    for c in resolved:
        c.model.hidden_size = hidden
    return resolved, task, hidden


def _fail_unfinished(error: Exception, configs: list[Config], recorders: dict[int, RunRecorder],
                     members: list[Member]) -> list[RunResult]:
    """Every run not already FAILED is closed FAILED with the population's error, in one line."""
    reason = str(error) if isinstance(error, RnnbenchError) else f"{type(error).__name__}: {error}".strip()
    results = []
    for k, r in recorders.items():
        m = members[k] if k < len(members) else None
        if m is not None and m.status == "failed":
            results.append(RunResult(r.run_id, "FAILED", reason=m.reason))
        else:
            folder = checkpoint.member_path(configs[k].tracking.checkpoint_dir, r.run_id).parent
            results.append(RunResult(r.run_id, "FAILED", reason=r.fail(reason, folder)))
    return results


def _finish(members: list[Member], recorders: dict[int, RunRecorder], final: dict[int, dict[str, float]]) -> list[RunResult]:
    results = []
    for k, m in enumerate(members):
        if m.status == "failed":  # recorded when it diverged
            results.append(RunResult(m.run_id, "FAILED", reason=m.reason))
            continue
        recorders[k].log_final(final[k])
        recorders[k].finish(m.stopped_by)
        results.append(RunResult(m.run_id, "FINISHED", final[k]))
    return results


def _open_run(config: Config, run_id: str | None, experiment_id: str | None, tags: dict[str, str],
              device: torch.device, K: int, counts: dict[str, int], threads: int, recurrence: str) -> tuple[RunRecorder, bool]:
    """A new run with its params, or the run to resume (its params are already there); True if the
    params were logged now (a new run)."""
    import yaml

    from rnnbench.tasks import get_task
    from rnnbench.tracking import prepare_store, resolve_tracking_uri

    uri = resolve_tracking_uri(config.tracking.tracking_uri)
    if run_id is not None:
        rec = RunRecorder.reopen(uri, run_id)
    else:
        exp = experiment_id or prepare_store(uri, config.tracking.experiment)
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        rec = RunRecorder.create(uri, exp, tags=standard_tags(config, device_name, {**tags, "population": str(K)}),
                                 run_name=config.tracking.run_name)
    if not rec.has_params():
        task = get_task(config.task.name)(config.task, seed=config.train.seed)
        params = {**config.flat(), **{f"task.{k}": v for k, v in task.describe().items()},
                  "n_params_recurrent": counts["recurrent"], "n_params_total": counts["total"], "threads_used": threads,
                  **({"n_params_frozen": counts["frozen"]} if "frozen" in counts else {})}
        rec.log_setup(params, {"recurrence": recurrence}, yaml.safe_dump(config.to_dict(), sort_keys=False))
        return rec, True
    return rec, False


def _resume(pop: Population, recorders: dict[int, RunRecorder], run_ids: list[str | None]) -> None:
    """Members with a checkpoint continue from it; one whose file is bad fails in one line."""
    for row, i in enumerate(list(pop.ids)):
        if run_ids[i] is None:
            continue
        m = pop.members[i]
        path = checkpoint.member_path(m.config.tracking.checkpoint_dir, m.run_id)
        if not path.is_file():
            continue
        try:
            checkpoint.restore(pop, row, checkpoint.load(path))
        except checkpoints.CheckpointError as e:
            raise RnnbenchError(f"cannot resume run {m.run_id}: {e}") from None
        if m.status == "stopped" and m.stopped_by in ("max_epochs", "max_steps") and m.epoch < m.config.train.max_epochs:
            m.status, m.stopped_by = "training", ""  # continued with a longer budget than it had
        recorders[i].log_epochs(m.history)  # epochs checkpointed by the interrupted process, not yet logged
        m.wall_offset = m.history[-1]["wall_seconds"] if m.history else m.wall_offset
    rows = [r for r, i in enumerate(pop.ids) if pop.members[i].status == "training"]
    if len(rows) < len(pop.ids):
        pop.keep(rows)


def make_trainer(pop: Population, callbacks: list[Any], max_epochs: int, max_steps: int) -> Any:
    """The Lightning Trainer a population trains and is scored in (`rnnbench bench` times its step in it)."""
    import lightning as L

    t = pop.configs[0].train
    use_cuda = pop.device.type == "cuda"
    quiet_lightning()
    trainer = L.Trainer(
        accelerator="gpu" if use_cuda else "cpu", devices=1, max_epochs=max_epochs, max_steps=max_steps,
        limit_train_batches=t.limit_train_batches, limit_val_batches=t.limit_eval_batches,
        precision="64-true" if t.precision == "64" else "32-true", deterministic=not use_cuda,
        callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=t.progress_bar,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    # Lightning's deterministic mode also fills every new tensor with NaN (a debugging aid costing
    # about a tenth of a small CPU step); the algorithms stay deterministic without it.
    torch.utils.deterministic.fill_uninitialized_memory = False
    return trainer


def _fit(pop: Population, recorders: dict[int, RunRecorder], pruner: Pruner | None) -> None:
    if not pop.ids:
        return
    t = pop.configs[0].train
    max_epochs = max(pop.configs[i].train.max_epochs - pop.members[i].epoch for i in pop.ids)
    done_steps = int(pop.steps.max())
    max_steps = -1 if t.max_steps < 0 else max(t.max_steps - done_steps, 0)
    if max_epochs <= 0 or max_steps == 0:
        for i in pop.ids:
            pop.members[i].status = "stopped"
        return
    timer = EpochTimer()
    callbacks = [timer, MemberStopping(timer, pruner), MemberCheckpoint(), EpochRecords(recorders)]
    trainer = make_trainer(pop, callbacks, max_epochs, max_steps)
    trainer.fit(pop, TrainBatches(pop), EvalBatches(pop, "val"))


def _fit_ridge(pop: Population, recorders: dict[int, RunRecorder]) -> dict[int, dict[str, float]]:
    """The readout by ridge regression (rnnbench/training/ridge.py): one record per member, no epochs."""
    from rnnbench.training import ridge

    if not pop.ids:
        return {}
    records, choices, seconds, time_steps = ridge.fit(pop)
    ridge.finish_members(pop, records, seconds, time_steps)
    for i in pop.ids:
        if i in recorders:
            recorders[i].log_epochs(pop.members[i].history)
    return choices


def _score(pop: Population, done: list[int], setup_seconds: float, counts: dict[str, int], hidden: int) -> dict[int, dict[str, float]]:
    """Test, final_val and final_train of the finished members with their best-validation weights."""
    final: dict[int, dict[str, float]] = {i: {} for i in done}
    if not done:
        return final
    pop.use_best(done)
    trainer = make_trainer(pop, [], 1, -1)
    for split in ("test", "final_val", "final_train"):
        pop.scoring = split
        trainer.validate(pop, EvalBatches(pop, split), verbose=False)
        for i, values in zip(pop.ids, pop.split_values(split)):
            final[i].update(values)
    pop.scoring = None
    setup_share = setup_seconds * torch.get_num_threads() / len(pop.members)
    for i in done:
        m = pop.members[i]
        seconds = [h["epoch_seconds"] for h in m.history]
        best = m.best_epoch
        final[i].update(
            epochs=float(len(m.history)), best_epoch=float(best),
            best_val=float(m.best_score) if math.isfinite(m.best_score) else math.nan,
            seconds_per_epoch=sum(seconds) / len(seconds) if seconds else math.nan,
            core_seconds=sum(h.get("epoch_core_seconds", math.nan) for h in m.history) + setup_share,
            seconds_to_best=m.history[best]["wall_seconds"] if 0 <= best < len(m.history) else math.nan,
            time_steps_per_second=m.time_steps / max(m.train_seconds, 1e-9), setup_seconds=setup_seconds,
            n_params_recurrent=float(counts["recurrent"]), n_params_total=float(counts["total"]), hidden_size=float(hidden),
        )
    return final


# --- the gradient-flow probe, at initialisation and with the best-validation weights ----------------
def _probe_batches(pop: Population) -> dict[int, Any]:
    """Each member's fixed probe batch from its test split (one per distinct dataset)."""
    from rnnbench.analysis.gradient_flow import probe_batch

    by_key: dict[Any, Any] = {}
    for i, key in enumerate(pop.data.data_key):
        if key not in by_key:
            by_key[key] = probe_batch(pop.data.tasks[i], pop.data.dataset(i, "test"))
    return {i: by_key[key] for i, key in enumerate(pop.data.data_key)}


def _probe(pop: Population, recorders: dict[int, RunRecorder], batches: dict[int, Any], tag: str, only: list[int]) -> None:
    from rnnbench.analysis.gradient_flow import probe

    dtype = pop.head_weight.dtype
    for i in only:
        if i not in pop.ids or i not in recorders:
            continue
        layers, hw, hb = pop.member_weights(pop.ids.index(i))
        batch = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batches[i].items()}
        task = pop.data.tasks[i]

        def head(h: torch.Tensor, hw: torch.Tensor = hw, hb: torch.Tensor = hb) -> torch.Tensor:
            return torch.einsum("kbth,koh->kbto", h, hw) + hb[:, None, None, :]

        def loss(y: torch.Tensor, b: dict[str, Any], task: Any = task) -> torch.Tensor:
            return task.loss(y, task.broadcast_batch(b, 1))[0]

        with torch.enable_grad():
            metrics, artifacts = probe(pop.cell.name, layers, head, loss, batch, tag)
        recorders[i].log_probe(metrics, artifacts)
