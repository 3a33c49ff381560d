"""What an executor sends to a worker (`Job`), what comes back (`Outcome`), and the worker's function.

Jobs carry plain data only (the config as a dict, the tracking URI and experiment id resolved by
the driver), so the same `run_point` runs in this process, in a spawned process or on a Ray node.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# How long a point waits for another process that still trains it (a worker of a driver that was
# killed closes its run and exits within seconds: rnnbench.sweep.executors). Past that the point is
# reported FAILED for this invocation and its run is left untouched, to be resumed next time.
POINT_LOCK_WAIT_S = 120.0


@dataclass(frozen=True)
class Job:
    index: int
    point_id: str
    label: str
    config: dict[str, Any]  # Config.to_dict(), tracking settings already resolved by the driver
    experiment_id: str
    tags: dict[str, str] = field(default_factory=dict)
    resume_run_id: str | None = None  # a run left RUNNING/KILLED with a checkpoint: continue it
    halving: tuple[tuple[int, ...], int] | None = None  # search stage: (rungs, reduction) of its population


@dataclass(frozen=True)
class Outcome:
    index: int
    point_id: str
    label: str
    run_id: str | None
    status: str  # FINISHED | FAILED
    reason: str | None = None
    seconds: float = 0.0
    resumed: bool = False


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return (f"{type(error).__name__}: {text}" if text else type(error).__name__)[:500]


class PointBusy(Exception):
    """Another process holds the lock of a point this job would train."""


def _lock_file(job: Job) -> Path:
    return Path(job.config["tracking"]["checkpoint_dir"]) / ".locks" / f"{job.point_id}.lock"


@contextmanager
def point_locks(jobs: list[Job], wait_s: float = POINT_LOCK_WAIT_S) -> Iterator[None]:
    """Hold an exclusive lock per point (a file under the checkpoint folder) while its run trains, so
    two processes never train one run into one checkpoint, whatever killed whose driver. The lock
    dies with its process, SIGKILL included. Raises PointBusy after `wait_s`."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the driver's own lock and the workers' watchdogs remain
        yield
        return
    with ExitStack() as held:
        for job in sorted(jobs, key=lambda j: j.point_id):  # one order everywhere: no deadlock
            path = _lock_file(job)
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = held.enter_context(open(path, "a"))
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise PointBusy(f"point {job.point_id} is still being trained by another process (lock {path}); "
                                        "its run is left as it is, re-run the sweep later") from None
                    time.sleep(0.2)
        yield


def _finished_meanwhile(job: Job) -> bool:
    """True if the run this job would resume was FINISHED by whoever held its lock before us."""
    from mlflow.tracking import MlflowClient

    if job.resume_run_id is None:
        return False
    client = MlflowClient(tracking_uri=job.config["tracking"]["tracking_uri"])
    return client.get_run(job.resume_run_id).info.status == "FINISHED"


def run_point(job: Job) -> Outcome:
    """Train one point; never raises for a failed run (the reason is in MLflow and the Outcome)."""
    start = time.perf_counter()
    try:
        with point_locks([job]):
            if _finished_meanwhile(job):
                return Outcome(job.index, job.point_id, job.label, job.resume_run_id, "FINISHED", None,
                               time.perf_counter() - start, True)
            outcome = _train_point(job, start)
    except PointBusy as e:  # nothing recorded: the run belongs to the process that holds the lock
        return Outcome(job.index, job.point_id, job.label, job.resume_run_id, "FAILED", str(e),
                       time.perf_counter() - start, job.resume_run_id is not None)
    except Exception as e:  # noqa: BLE001 - e.g. the lock file cannot be created
        return Outcome(job.index, job.point_id, job.label, _record_failure(job, None, one_line(e)), "FAILED", one_line(e),
                       time.perf_counter() - start, job.resume_run_id is not None)
    return outcome


def _train_point(job: Job, start: float) -> Outcome:
    from rnnbench.config import Config
    from rnnbench.errors import RnnbenchError
    from rnnbench.train import train

    if job.resume_run_id is not None:  # Lightning warns that the run's checkpoint folder exists: it should
        warnings.filterwarnings("ignore", ".*exists and is not empty.*")
    config: Config | None = None
    try:
        config = Config.from_dict(job.config)
        result = train(config, run_id=job.resume_run_id, experiment_id=job.experiment_id, tags=job.tags)
        run_id, status, reason = result.run_id, result.status, result.reason
    except SystemExit as e:  # Lightning turns Ctrl-C inside fit() into sys.exit(1), bypassing train()'s handler
        _mark_killed(job)
        raise KeyboardInterrupt from e
    except RnnbenchError as e:  # train() records these as FAILED, then re-raises
        run_id, status, reason = _record_failure(job, config, str(e)), "FAILED", " ".join(str(e).split())[:500]
    except Exception as e:  # noqa: BLE001 - e.g. raised before train() created its run
        run_id, status, reason = _record_failure(job, config, one_line(e)), "FAILED", one_line(e)
    return Outcome(
        job.index, job.point_id, job.label, run_id, status, reason, time.perf_counter() - start, job.resume_run_id is not None
    )


def _mark_killed(job: Job) -> None:
    """Close this attempt's run as KILLED (it keeps its checkpoint; the next invocation resumes it)."""
    from rnnbench.sweep.runs import point_runs
    from rnnbench.training.recorder import RunRecorder, tracking_client

    try:
        client = tracking_client(job.config["tracking"]["tracking_uri"])
        RunRecorder.kill_running(client, point_runs(client, job.experiment_id, job.tags["sweep"], job.point_id))
    except Exception:  # noqa: BLE001 - left RUNNING instead: the next invocation handles that too
        pass


def _record_failure(job: Job, config: Any, reason: str) -> str | None:
    """Make sure MLflow holds this attempt as a FAILED run with its reason; return that run's id.

    train() fails some runs itself; errors raised before it creates its run (a bad task option, an
    unreadable dataset) would otherwise leave no trace in the store.
    """
    from rnnbench.sweep.runs import point_runs
    from rnnbench.training.recorder import RunRecorder, tracking_client

    try:
        client = tracking_client(job.config["tracking"]["tracking_uri"])
        if job.resume_run_id is not None:
            RunRecorder(client, job.resume_run_id).fail(reason)
            return job.resume_run_id
        # the driver retired earlier attempts, so an active run of this point is this attempt's
        mine = point_runs(client, job.experiment_id, job.tags["sweep"], job.point_id)
        if mine:
            if mine[0].info.status != "FAILED":
                RunRecorder(client, mine[0].info.run_id).fail(reason)
            return mine[0].info.run_id
        return RunRecorder.record_early_failure(client, job.experiment_id, reason, tags=job.tags,
                                                run_name=job.config["tracking"].get("run_name"), config=config).run_id
    except Exception:  # noqa: BLE001 - the store itself is unreachable: the summary still has the reason
        return None


def run_group(jobs: list[Job]) -> list[Outcome]:
    """Train points that differ only in per-member keys (seed, learning rate, ...) as one population
    (rnnbench.training). Each point still gets its own run with the tags its job carries; a
    population error fails every point of it, and the sweep goes on."""
    from rnnbench.config import Config
    from rnnbench.sweep.halving import SuccessiveHalving
    from rnnbench.training.loop import train_population

    start = time.perf_counter()
    pruner = SuccessiveHalving(*jobs[0].halving) if jobs[0].halving else None
    try:
        with point_locks(jobs):
            results = train_population([Config.from_dict(j.config) for j in jobs], experiment_id=jobs[0].experiment_id,
                                       tags=[j.tags for j in jobs], run_ids=[j.resume_run_id for j in jobs], pruner=pruner)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - train_population already closed its runs as FAILED
        reason = one_line(e)
        return [Outcome(j.index, j.point_id, j.label, j.resume_run_id, "FAILED", reason, time.perf_counter() - start,
                        j.resume_run_id is not None) for j in jobs]
    seconds = time.perf_counter() - start
    return [Outcome(j.index, j.point_id, j.label, r.run_id, r.status, r.reason, seconds, j.resume_run_id is not None)
            for j, r in zip(jobs, results)]
