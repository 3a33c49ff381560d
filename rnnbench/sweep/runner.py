"""Run a sweep: expand the spec, prepare the store once, skip what is done, fan out, summarise.

Order of events (each step is safe to interrupt; re-running the same command carries on):
  1. expand the spec into points and validate every config (before anything is written);
  2. create the store and the experiment once, here in the driver (workers only add runs);
  3. find or create the sweep's parent run; read the child runs already there, by point id;
  4. per point: FINISHED -> skip; RUNNING/KILLED with a checkpoint -> resume that run; otherwise
     retire stale attempts and start a new child run;
  5. hand the jobs to the executor, at most `capacity` in flight, with a progress bar;
  6. close the parent run (FINISHED only if every point is) and return a summary.
Steps 2-6 hold a lock for a SQLite store: one driver per sweep at a time.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from rnnbench.config import Config
from rnnbench.errors import RnnbenchError
from rnnbench.interrupts import Interrupted
from rnnbench.sweep.jobs import Job, Outcome
from rnnbench.sweep.runs import POINT_ROLE, Decision, checkpoint_of, child_runs, decide, find_parent, parent_run, retire
from rnnbench.sweep.spec import Point, SweepSpec, expand


@dataclass
class PlannedPoint:
    point: Point
    decision: Decision


@dataclass
class SweepSummary:
    name: str
    tracking_uri: str
    experiment: str
    experiment_id: str
    parent_run_id: str | None
    total: int
    already_done: int
    outcomes: list[Outcome] = field(default_factory=list)
    foreign_points: int = 0  # child runs of this sweep name whose point is not in this spec

    @property
    def finished(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "FINISHED"]

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != "FINISHED"]

    @property
    def ok(self) -> bool:
        return self.already_done + len(self.finished) == self.total

    def lines(self) -> list[str]:
        """The end-of-sweep report: counts, then every failed point with its reason."""
        not_run = self.total - self.already_done - len(self.outcomes)
        head = (
            f"sweep {self.name}: {self.total} points: {self.already_done + len(self.finished)} FINISHED "
            f"({len(self.finished)} this time, {self.already_done} before), {len(self.failed)} FAILED"
            + (f", {not_run} not run" if not_run else "")
        )
        out = [head]
        if self.failed:
            out.append("failed points (re-run the same command to retry them):")
            for o in sorted(self.failed, key=lambda o: o.index):
                out.append(f"  [{o.point_id}] {o.label}: {o.reason} (run {o.run_id or '-'})")
        out.append(f"store {self.tracking_uri}, experiment {self.experiment!r} (id {self.experiment_id}), parent run {self.parent_run_id}")
        return out


DRIVER_ONLY = ("exported", "sweep_point_ids")  # keys of `shared` the driver reads and no run records


def _job(point: Point, decision: Decision, experiment_id: str, tags: dict[str, str], shared: dict[str, Any],
         halving: tuple[tuple[int, ...], int] | None = None) -> Job:
    config = point.config.to_dict()
    tracking = {k: v for k, v in shared.items() if k not in DRIVER_ONLY}
    config["tracking"] = {**config["tracking"], **tracking, "run_name": point.label}
    point_tags = {**tags, "point_id": point.point_id}
    if point.sample is not None:
        point_tags["sample"] = str(point.sample)
    if point.stage is not None:
        point_tags["stage"] = point.stage
    resume = decision.run_id if decision.action == "resume" else None
    return Job(point.index, point.point_id, point.label, config, experiment_id, point_tags, resume, halving)


def plan(spec: SweepSpec, overrides: list[str] | None = None) -> tuple[list[Point], dict[str, Any]]:
    """The sweep's points and the tracking settings they share, resolved here in the driver."""
    from rnnbench.tracking import resolve_tracking_uri

    points = expand(spec, overrides)
    tracking = points[0].config.tracking
    shared = {
        "tracking_uri": resolve_tracking_uri(tracking.tracking_uri),
        "experiment": tracking.experiment,
        "checkpoint_dir": str(Path(tracking.checkpoint_dir).resolve()),
    }
    return points, shared


def run_sweep(
    spec: SweepSpec,
    overrides: list[str] | None = None,
    *,
    executor: str = "local",
    workers: int | None = None,
    progress: bool = True,
    dry_run: bool = False,
    batch_models: str = "auto",
    echo: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
    exported: str | Path | None = None,
    chunk_of: SweepSpec | None = None,
) -> SweepSummary:
    """Run every point of `spec` not yet FINISHED in the store (or in the exports in `exported`, the
    folder `rnnbench export` writes); see the module docstring. `chunk_of`: the whole spec when `spec`
    is one chunk of it (--only): its other chunks' points are not "earlier points not in this spec"."""
    from rnnbench.sweep.executors import EXECUTORS

    if executor not in EXECUTORS:
        raise RnnbenchError(f"unknown executor {executor!r}; valid executors: {', '.join(EXECUTORS)}")
    if batch_models not in BATCH_MODES:
        raise RnnbenchError(f"unknown --batch-models {batch_models!r}; valid: {', '.join(BATCH_MODES)}")
    if workers is not None and workers < 1:
        raise RnnbenchError(f"--workers must be at least 1 (got {workers})")
    points, shared = plan(spec, overrides)
    if exported is not None:
        if not Path(exported).is_dir():
            raise RnnbenchError(f"--exported {exported}: not a folder")
        shared["exported"] = str(exported)
    if chunk_of is not None and chunk_of.halving is None:
        shared["sweep_point_ids"] = frozenset(p.point_id for p in expand(chunk_of, overrides))
    check_points(points)
    with nullcontext() if dry_run else _one_driver(shared["tracking_uri"], spec.name):
        if spec.halving is None:
            summary = _plan_and_run(spec, overrides, points, shared, executor, workers, progress, dry_run, echo,
                                    _batching_on(batch_models, executor))
        else:
            summary = _search_then_seeds(spec, overrides, points, shared, executor, workers, progress, dry_run, echo,
                                         seeds_batched=batch_models != "off")
        if not dry_run and summary.outcomes:
            _publish_aggregates(spec.name, shared["tracking_uri"], echo)
        return summary


def _publish_aggregates(sweep: str, uri: str, echo: Callable[[str], None]) -> None:
    """The seed aggregates of the sweep in the store (rnnbench/analysis/aggregates.py); a failure is a
    warning, never the sweep's failure (its runs are recorded either way)."""
    from rnnbench.analysis.aggregates import publish_aggregates

    try:
        ids = publish_aggregates(sweep, uri)
    except Exception as e:  # noqa: BLE001
        echo(f"warning: seed aggregates not recorded ({type(e).__name__}: {' '.join(str(e).split())[:200]})")
        return
    if ids:
        echo(f"seed aggregates: {len(ids)} runs in the store (MLflow UI: filter tags.sweep_role = \"aggregate\")")


def _search_then_seeds(
    spec: SweepSpec, overrides: list[str] | None, points: list[Point], shared: dict[str, Any], executor: str,
    workers: int | None, progress: bool, dry_run: bool, echo: Callable[[str], None], seeds_batched: bool = True,
) -> SweepSummary:
    """A halving sweep (spec.py): the search stage's populations with successive halving, then each
    grid point's seeds at the sample it chose. The search always trains as populations (halving ranks
    the members of one); the seeds do too unless `seeds_batched` is False (--batch-models off: each
    seed alone, so that each is recorded FINISHED as soon as it stops and none waits for a slower
    batch-mate). Re-running carries on where either stage stopped."""
    from rnnbench.sweep.halving import choose
    from rnnbench.sweep.spec import final_points, grid_key

    assert spec.halving is not None
    rule = (tuple(spec.halving.rungs), spec.halving.reduction)
    if not seeds_batched:
        echo("note: --batch-models off applies to the seeds stage; the search stage trains each grid point's "
             "samples as one population (successive halving ranks its members)")
    echo(f"sweep {spec.name}, search stage: {len(points)} points (successive halving at epochs "
         f"{', '.join(map(str, rule[0]))}, keeping 1/{rule[1]})")
    search = _plan_and_run(spec, overrides, points, shared, executor, workers, progress, dry_run, echo, True, rule)
    _, _, existing = _open_store(shared, spec.name, create=False)
    by_grid: dict[str, list[tuple[int, Any]]] = {}
    for p in points:
        runs = existing.get(p.point_id, [])
        done = next((r for r in runs if r.info.status == "FINISHED"), None)
        by_grid.setdefault(grid_key(spec, p), []).append((p.sample, done) if done is not None else (p.sample, None))
    chosen: dict[str, int] = {}
    for key, pairs in by_grid.items():
        if any(run is None for _, run in pairs):
            echo(f"  grid point {key}: search not finished; its seeds wait for the next run")
            continue
        pick = choose(pairs)
        if pick is None:
            echo(f"  grid point {key}: no sample finished unpruned; nothing to choose")
        else:
            chosen[key] = pick
    final = final_points(spec, chosen, overrides)
    echo(f"sweep {spec.name}, final stage: {len(final)} points ({len(chosen)} grid points chosen)")
    if not final:
        search.total += len(by_grid) * len(spec.halving.seeds)
        return search
    check_points(final)
    seeds = _plan_and_run(spec, overrides, final, shared, executor, workers, progress, dry_run, echo, seeds_batched,
                          batched_stage=True)
    missing = (len(by_grid) - len(chosen)) * len(spec.halving.seeds)
    search.total += seeds.total + missing
    search.already_done += seeds.already_done
    search.outcomes.extend(seeds.outcomes)
    search.foreign_points = seeds.foreign_points
    return search


def _plan_and_run(
    spec: SweepSpec, overrides: list[str] | None, points: list[Point], shared: dict[str, Any], executor: str,
    workers: int | None, progress: bool, dry_run: bool, echo: Callable[[str], None], batched: bool = False,
    halving: tuple[tuple[int, ...], int] | None = None, batched_stage: bool = False,
) -> SweepSummary:
    """Read the store, decide per point, and (unless a dry run) run what is left. (The stages of a
    halving sweep see each other's points in the store: `halving` or `batched_stage` mute that note.)"""
    client, experiment_id, existing = _open_store(shared, spec.name, create=not dry_run)
    planned = [PlannedPoint(p, decide(existing.get(p.point_id, []), shared["checkpoint_dir"])) for p in points]
    summary = SweepSummary(spec.name, shared["tracking_uri"], shared["experiment"], experiment_id, None, len(points), 0)
    summary.foreign_points = len(set(existing) - {p.point_id for p in points} - shared.get("sweep_point_ids", frozenset()))
    summary.already_done = sum(pp.decision.action == "done" for pp in planned)
    counts = {a: sum(pp.decision.action == a for pp in planned) for a in ("done", "resume", "retry", "new")}
    echo(
        f"sweep {spec.name}: {len(points)} points; {counts['done']} already FINISHED, {counts['resume']} to resume, "
        f"{counts['retry']} to retry, {counts['new']} new"
    )
    if summary.foreign_points and halving is None and not batched_stage:
        echo(f"note: {summary.foreign_points} earlier points of sweep {spec.name!r} are not in this spec (spec or overrides changed?)")
    to_do = [pp.point.config for pp in planned if pp.decision.action != "done"]
    if dry_run:
        for pp in planned:
            echo(f"  {pp.decision.action:6s} [{pp.point.point_id}] {pp.point.label}")
        if to_do:
            from rnnbench.sweep.cost import estimate

            for line in estimate(to_do).lines(workers):
                echo(line)
        return summary
    if to_do:
        _announce_cost(to_do, workers, echo)  # for sweeps large enough to be worth it

    _run_planned(spec, overrides, planned, summary, client, experiment_id, shared, executor, workers, progress, echo,
                 batched, halving)
    return summary


def _run_planned(
    spec: SweepSpec, overrides: list[str] | None, planned: list[PlannedPoint], summary: SweepSummary, client: Any,
    experiment_id: str, shared: dict[str, Any], executor: str, workers: int | None, progress: bool,
    echo: Callable[[str], None], batched: bool = False, halving: tuple[tuple[int, ...], int] | None = None,
) -> None:
    """Parent run, retire stale attempts, run the rest (groups of new points together when batched)."""
    if _nothing_to_do(planned, summary, client, experiment_id, spec.name, shared["checkpoint_dir"]):
        return
    spec_hash = spec.spec_hash(overrides)
    parent_tags = {"spec_hash": spec_hash, "n_points": str(summary.total), "mlflow.runName": spec.name}
    if spec.description:  # the MLflow UI shows this tag as the run's description
        parent_tags["mlflow.note.content"] = spec.description
    summary.parent_run_id = parent_id = parent_run(client, experiment_id, spec.name, parent_tags)
    record = {"spec": spec.model_dump(mode="json"), "overrides": list(overrides or [])}
    try:
        client.log_text(parent_id, yaml.safe_dump(record, sort_keys=False), "sweep.yaml")
        for pp in planned:
            for run, why in pp.decision.retire:
                if not getattr(run.info, "exported", False):
                    retire(client, run, why, shared["checkpoint_dir"])
    except BaseException as e:  # the parent must not stay RUNNING (prepare_store checked the usual causes)
        client.set_tag(parent_id, "failure_reason", " ".join(f"{type(e).__name__}: {e}".split())[:500])
        client.set_terminated(parent_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        if isinstance(e, Exception) and not isinstance(e, RnnbenchError):
            raise RnnbenchError(f"sweep {spec.name}: cannot record the sweep ({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None
        raise
    tags = {"sweep": spec.name, "sweep_role": POINT_ROLE, "spec_hash": spec_hash, "mlflow.parentRunId": parent_id}
    jobs = [_job(pp.point, pp.decision, experiment_id, tags, shared, halving) for pp in planned if pp.decision.action != "done"]
    groups, jobs = _batchable(jobs, new_points=batched)
    _execute(jobs, summary, client, executor, workers, progress, echo, groups)


def check_points(points: list[Point]) -> None:
    """Every point's cheap checks (its task's data, the checkpoint folder: rnnbench.train.check_before_run)
    before the store, the parent run or any child run exists; each distinct task is checked once."""
    from rnnbench.train import check_before_run

    seen: set[str] = set()
    for point in points:
        key = point.config.task.model_dump_json() + "\n" + point.config.tracking.checkpoint_dir
        if key in seen:
            continue
        seen.add(key)
        try:
            check_before_run(point.config)
        except RnnbenchError as e:
            raise RnnbenchError(f"point {point.label}: {e}") from None


def _announce_cost(configs: list[Config], workers: int | None, echo: Callable[[str], None]) -> None:
    """Print the estimate of what is left to run; above WARN_CORE_HOURS, say so loudly, then go on."""
    from rnnbench.sweep import cost as costs

    if not costs.worth_estimating(configs):
        return
    cost = costs.estimate(configs)
    lines = cost.lines(workers)
    if cost.core_hours > costs.WARN_CORE_HOURS:
        echo(f"warning: a large sweep: {lines[0]}")
        echo("  (Ctrl-C stops it safely; re-running the same command resumes it. `--dry-run` shows this without running.)")
    else:
        echo(f"estimate: {lines[0]}")


def _nothing_to_do(
    planned: list[PlannedPoint], summary: SweepSummary, client: Any, experiment_id: str, sweep: str, checkpoint_dir: str
) -> bool:
    """Every point FINISHED and the parent closed FINISHED: retire leftover attempts, leave the parent
    alone (reopening it would move its end time: a 33-second sweep re-run later showed 42 minutes)."""
    if any(pp.decision.action != "done" for pp in planned):
        return False
    parent = find_parent(client, experiment_id, sweep)
    if parent is None or parent.info.status != "FINISHED":
        return False
    summary.parent_run_id = parent.info.run_id
    for pp in planned:
        for run, why in pp.decision.retire:
            if not getattr(run.info, "exported", False):
                retire(client, run, why, checkpoint_dir)
    return True


BATCH_MODES = ("auto", "on", "off")


def _batching_on(mode: str, executor: str) -> bool:
    """auto: only where CUDA is available, where one small model leaves the device idle. On the CPU
    `on` can gain too (the population rows of results/bench/bench_cpu.md; each member keeps its own
    sequence length there), but holds K members' activations in memory at once and keeps a
    population until its slowest member stops, so there it is a choice, not the default. Ray spreads
    points over nodes instead."""
    if mode == "off" or executor != "local":
        return False
    if mode == "on":
        return True
    import torch

    return torch.cuda.is_available()


def _batchable(jobs: list[Job], new_points: bool = True) -> tuple[list[list[Job]], list[Job]]:
    """(populations of >= 2 points that train together, the points that train alone). With batching
    on (`new_points`), points of one population key train together, new and resumed alike (a member's
    checkpoint resumes in any population of its kind); with it off, every point trains alone."""
    from rnnbench.config import Config
    from rnnbench.training.loop import population_key

    if not new_points:
        return [], sorted(jobs, key=lambda j: j.index)
    by_key: dict[Any, list[Job]] = {}
    for job in jobs:
        by_key.setdefault(population_key(Config.from_dict(job.config)), []).append(job)
    groups = [g for g in by_key.values() if len(g) >= 2]
    rest = [g[0] for g in by_key.values() if len(g) == 1]
    return groups, sorted(rest, key=lambda j: j.index)


@contextmanager
def _one_driver(uri: str, sweep: str) -> Iterator[None]:
    """For a SQLite store, refuse a second driver of the same sweep while one runs (it would take
    the first one's RUNNING points for dead ones). The lock dies with its process, SIGKILL included.
    With a tracking server nothing is locked: run one driver per sweep."""
    from rnnbench.tracking import sqlite_path

    db = sqlite_path(uri)
    if db is None:
        yield
        return
    import fcntl

    lock = db.parent / f".rnnbench-sweep-{sweep}.lock"
    if not lock.parent.is_dir():  # prepare_store reports the missing directory in one line
        yield
        return
    try:
        handle = open(lock, "w")  # noqa: SIM115 - closed below
    except OSError as e:
        raise RnnbenchError(f"the store's folder {lock.parent} is not writable ({e.strerror or e})") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RnnbenchError(f"sweep {sweep!r} is already running against this store (lock {lock})") from None
        yield


def _open_store(shared: dict[str, Any], sweep: str, create: bool) -> tuple[Any, str, dict[str, list[Any]]]:
    """(client, experiment id, child runs by point). With `create`, make the store and experiment
    here, once, before any worker starts (tracking.prepare_store: atomic, one line on any problem);
    without, only read: a dry run creates nothing, and a store that is not there has no runs yet."""
    from mlflow.tracking import MlflowClient

    from rnnbench.tracking import check_reachable, prepare_store, sqlite_path, sqlite_store_problem

    uri, experiment = shared["tracking_uri"], shared["experiment"]
    if create:
        experiment_id = prepare_store(uri, experiment)
        client = MlflowClient(tracking_uri=uri)
        return client, experiment_id, _with_exported(child_runs(client, experiment_id, sweep), shared, sweep)
    check_reachable(uri)
    db = sqlite_path(uri)
    if db is not None:
        problem = sqlite_store_problem(db) if db.is_file() else "empty"
        if problem == "empty":  # no store yet: only the exports' runs are done
            return None, "-", _with_exported({}, shared, sweep)
        if problem:
            raise RnnbenchError(problem)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return client, "-", _with_exported({}, shared, sweep)
    return client, exp.experiment_id, _with_exported(child_runs(client, exp.experiment_id, sweep), shared, sweep)


def _with_exported(by_point: dict[str, list[Any]], shared: dict[str, Any], sweep: str) -> dict[str, list[Any]]:
    """The store's runs by point, with the FINISHED runs of the sweep's exports (`--exported`) first:
    points recorded by another chunk (another machine's store) count as done, and a halving sweep's
    search reads its choice from them."""
    folder = shared.get("exported")
    if not folder:
        return by_point
    from rnnbench.analysis.exports import exported_runs, path_of

    if not path_of(folder, sweep, "runs").is_file():
        return by_point
    out = {k: list(v) for k, v in by_point.items()}
    for run in exported_runs(folder, [sweep]):
        pid = run.data.tags.get("point_id")
        if pid and run.info.status == "FINISHED" and all(r.info.run_id != run.info.run_id for r in out.get(pid, [])):
            run.info.exported = True  # never retired: it is not in this store
            out.setdefault(pid, []).append(run)
    return out


def _execute(
    jobs: list[Job], summary: SweepSummary, client: Any, executor: str, workers: int | None, progress: bool,
    echo: Callable[[str], None], groups: list[list[Job]] | None = None,
) -> None:
    """Run the jobs; close the parent run FINISHED (all points are), FAILED or KILLED (Ctrl-C)."""
    from mlflow.entities import Metric

    from rnnbench.sweep.executors import make_executor

    from rnnbench.sweep.jobs import run_group

    status = "FAILED"
    try:
        if groups and executor == "local" and (workers or 1) > 1:
            _run_groups_concurrently(groups, workers or 1, summary, echo)
        else:
            for group in groups or []:  # in this process, one after another
                echo(f"training {len(group)} points together (seeds x learning rates of {_group_label(group)})")
                summary.outcomes.extend(run_group(group))
        if jobs:
            pool = make_executor(executor, workers)
            echo(f"running {len(jobs)} points {pool.description}")
            try:
                _drive(pool, jobs, summary, progress)
            except BaseException:
                pool.close(cancel=True)
                raise
            pool.close()
        status = "FINISHED" if summary.ok else "FAILED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise Interrupted(
            f"sweep {summary.name}: its parent run {summary.parent_run_id} and the points in progress marked KILLED, "
            "their checkpoints kept",
            "to resume them, run",
        ) from None
    finally:
        now = int(time.time() * 1000)
        counts = {
            "points_total": summary.total,
            "points_finished": summary.already_done + len(summary.finished),
            "points_failed": len(summary.failed),
        }
        client.log_batch(summary.parent_run_id, metrics=[Metric(k, v, now, 0) for k, v in counts.items()])
        client.set_terminated(summary.parent_run_id, status)


def _group_label(group: list[Job]) -> str:
    return group[0].label.split(" seed=")[0]


def _run_groups_concurrently(groups: list[list[Job]], workers: int, summary: SweepSummary, echo: Callable[[str], None]) -> None:
    """Groups in `workers` spawned processes at once: for hosts with many CPU cores. On one GPU the
    processes time-slice the device and each runs several times slower (results/bench/GRID_GPU.md)."""
    import concurrent.futures as cf

    from rnnbench.sweep.executors import in_worker, lost, pinned_pool, stop_pool
    from rnnbench.sweep.jobs import run_group

    n = min(workers, len(groups))
    echo(f"training {len(groups)} groups of points together, {n} groups at a time in worker processes")
    pool = pinned_pool(n)  # each population's worker on its own GPU where there are several
    try:
        futures = {pool.submit(in_worker, run_group, g): g for g in groups}
        for future in cf.as_completed(futures):
            group = futures[future]
            try:
                outcomes = future.result()
            except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - a worker died or was stopped alone:
                outcomes = [lost(j, e) for j in group]  # its runs are KILLED or RUNNING, resumed next time
            summary.outcomes.extend(outcomes)
            done = sum(o.status == "FINISHED" for o in outcomes)
            echo(f"group done: {_group_label(group)}: {done}/{len(group)} FINISHED")
    except BaseException:
        stop_pool(pool)  # running groups close their runs KILLED (resumable)
        raise
    pool.shutdown()


def _drive(pool: Any, jobs: list[Job], summary: SweepSummary, progress: bool) -> None:
    """Keep the executor full, collect outcomes, show progress: done / failed / running / ETA."""
    from collections import deque

    from tqdm import tqdm

    from rnnbench.interrupts import stop_requested

    queue = deque(jobs)
    in_flight = 0
    bar = tqdm(total=summary.total, initial=summary.already_done + len(summary.outcomes), desc=summary.name, unit="point",
               disable=not progress, dynamic_ncols=True, file=sys.stderr, mininterval=0.5)
    try:
        while queue or in_flight:
            while queue and in_flight < pool.capacity:
                pool.submit(queue.popleft())
                in_flight += 1
            bar.set_postfix(failed=len(summary.failed), running=in_flight, refresh=True)
            outcome = pool.next_done()
            in_flight -= 1
            summary.outcomes.append(outcome)
            if outcome.status != "FINISHED":
                bar.write(f"FAILED {outcome.label}: {outcome.reason}", file=sys.stderr)
            bar.update(1)
            if stop_requested():  # Ctrl-C/SIGTERM handed to Lightning came after its last check: stop here
                raise KeyboardInterrupt
        bar.set_postfix(failed=len(summary.failed), running=0, refresh=True)
    finally:
        bar.close()
