"""Executors: where the points of a sweep run. Each one takes jobs and hands back outcomes.

    local, 1 worker     in this process, one point after another
    local, N workers    N spawned worker processes (each imports torch once, then runs many points)
    ray                 Ray tasks, on a local instance or the cluster at $RAY_ADDRESS (ray_executor.py)

The driver keeps at most `capacity` jobs in flight, so it always knows how many are running.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import signal
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from typing import Any, Callable

from rnnbench.errors import RnnbenchError
from rnnbench.sweep.jobs import Job, Outcome, one_line, run_point


CANCEL_GRACE_S = 10.0


class Executor(ABC):
    """Runs jobs; `next_done` blocks until one in-flight job ends and returns its outcome."""

    capacity: int = 1
    description: str = ""

    @abstractmethod
    def submit(self, job: Job) -> None: ...

    @abstractmethod
    def next_done(self) -> Outcome: ...

    def close(self, cancel: bool = False) -> None:
        """Release workers; with `cancel`, drop jobs not yet started."""


def lost(job: Job, error: BaseException) -> Outcome:
    """The outcome of a job whose worker died or was stopped alone (its run, if any, is left RUNNING or
    KILLED with its checkpoint, and is resumed next time)."""
    return Outcome(job.index, job.point_id, job.label, job.resume_run_id, "FAILED", f"worker lost: {one_line(error)}")


class InProcessExecutor(Executor):
    """One point at a time, in the driver's own process."""

    def __init__(self) -> None:
        self.capacity = 1
        self.description = "in this process"
        self._queue: deque[Job] = deque()

    def submit(self, job: Job) -> None:
        self._queue.append(job)

    def next_done(self) -> Outcome:
        return run_point(self._queue.popleft())


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries (its list where set, else 0..n-1)."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return listed[:n] if listed else [str(i) for i in range(n)]


# --- worker processes never outlive their driver --------------------------------------------------
# A worker stops its run the way Ctrl-C does (rnnbench.interrupts: the run is closed KILLED and keeps
# its checkpoint, so the next invocation resumes it) when
#   * SIGTERM or SIGINT reaches it (the driver stopping its pool, a signal to the process group);
#   * the driver dies, even by SIGKILL: on Linux the kernel sends PARENT_DEATH_SIGNAL at once
#     (prctl PR_SET_PDEATHSIG), elsewhere a watchdog thread sees os.getppid() change within
#     WATCHDOG_PERIOD_S. PR_SET_PDEATHSIG fires when the *thread* that spawned the worker ends, and
#     concurrent.futures spawns replacement workers from its management thread: so the signal is not
#     SIGTERM but PARENT_DEATH_SIGNAL, whose handler stops the worker only if its parent process is
#     really gone (getppid changed), and ignores the end of a mere thread.
# An orphaned worker exits once its run is closed (at most ORPHAN_GRACE_S later), so a re-run of the
# sweep does not find it still training; run_point's per-point lock (jobs.py) is the guarantee.
PARENT_DEATH_SIGNAL = signal.SIGUSR2
WATCHDOG_PERIOD_S = 0.5
ORPHAN_GRACE_S = 20.0
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

_worker_state: dict[str, Any] = {"busy": False, "parent": 0}


def _orphaned() -> bool:
    return os.getppid() != _worker_state["parent"]


def _on_parent_death_signal(signum: int, frame: Any) -> None:
    if _orphaned():  # the driver process is gone, not merely the thread that spawned us
        os.kill(os.getpid(), signal.SIGTERM)  # through whatever handler is installed (Lightning's while training)


def _watch_parent() -> None:
    """Portable fallback for PR_SET_PDEATHSIG; also makes an orphan exit once its run is closed."""
    while not _orphaned():
        time.sleep(WATCHDOG_PERIOD_S)
    os.kill(os.getpid(), signal.SIGTERM)  # the main thread closes the run KILLED (or exits if idle)
    deadline = time.monotonic() + ORPHAN_GRACE_S
    while _worker_state["busy"] and time.monotonic() < deadline:
        time.sleep(0.1)
    os._exit(1)


def _set_parent_death_signal() -> None:
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(PARENT_DEATH_SIGNAL), 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: the watchdog thread alone notices
        pass


def guard_worker(parent: int) -> None:
    """Tie this worker process to its driver (pid `parent`); call first in a pool's initializer."""
    from rnnbench.interrupts import stop_on_signals

    _worker_state["parent"] = parent
    stop_on_signals(idle=lambda: not _worker_state["busy"])
    signal.signal(PARENT_DEATH_SIGNAL, _on_parent_death_signal)
    _set_parent_death_signal()
    threading.Thread(target=_watch_parent, name="rnnbench-parent-watchdog", daemon=True).start()
    if _orphaned():  # the driver died before the signal was armed
        os._exit(1)


def in_worker(fn: Callable[..., Any], *args: Any) -> Any:
    """Run one task in a guarded worker. A worker already told to stop takes no new task (one can
    still reach it after its pool was cancelled: concurrent.futures queues a task ahead)."""
    from rnnbench.interrupts import stop_requested

    if stop_requested():
        os._exit(1)
    _worker_state["busy"] = True
    try:
        return fn(*args)
    finally:
        _worker_state["busy"] = False


def _init_worker(parent: int, threads: int, slots: "multiprocessing.queues.Queue[int] | None" = None,
                 gpus: tuple[str, ...] = ()) -> None:
    guard_worker(parent)
    # Worker k of the pool (k taken from `slots`) sees only GPU k mod len(gpus), as its cuda:0, so N
    # workers on a multi-GPU host spread over the GPUs instead of all sharing the first. Set before
    # anything initialises CUDA in this fresh (spawned) process.
    if slots is not None and len(gpus) > 1:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[slots.get() % len(gpus)]
    import torch

    torch.set_num_threads(threads)


def worker_pool(workers: int, threads: int | None = None, slots: Any = None, gpus: tuple[str, ...] = ()) -> cf.ProcessPoolExecutor:
    """A pool of `workers` spawned, guarded processes with `threads` torch threads each (default
    cpu_count / workers). Submit tasks as `pool.submit(in_worker, fn, *args)`."""
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    return cf.ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(os.getpid(), threads, slots, gpus),
    )


def stop_pool(pool: cf.ProcessPoolExecutor, grace_s: float = CANCEL_GRACE_S) -> None:
    """Cancel what has not started and stop the workers now: SIGTERM closes each running point's run
    KILLED (resumable); a worker still alive after `grace_s` is killed."""
    # No public way to reach the processes before Python 3.14 (terminate_workers).
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + grace_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join(1.0)


def pinned_pool(workers: int, gpus: tuple[str, ...] | None = None) -> cf.ProcessPoolExecutor:
    """`workers` spawned processes with cpu_count // workers torch threads each and, on a host with
    several GPUs, worker k pinned to GPU k mod their number (single points and populations alike)."""
    gpus = tuple(visible_gpus()) if gpus is None else gpus
    slots = None
    if len(gpus) > 1:
        slots = multiprocessing.get_context("spawn").Queue()
        for k in range(workers):
            slots.put(k)
    return worker_pool(workers, max(1, (os.cpu_count() or 1) // workers), slots, gpus)


class ProcessPoolExecutor(Executor):
    """N worker processes (spawn start method: no forked torch/MLflow state, same as on macOS/Windows).

    The store and experiment exist before the workers start (the driver made them), so concurrent
    writers to a SQLite store only add rows. Each worker gets cpu_count / N torch threads and, on a
    host with several GPUs, one of them (worker k: GPU k mod the GPU count).
    """

    def __init__(self, workers: int) -> None:
        self.capacity = workers
        self._threads = max(1, (os.cpu_count() or 1) // workers)
        self._gpus = tuple(visible_gpus())
        self.description = f"on {workers} worker processes" + (f" over GPUs {','.join(self._gpus)}" if len(self._gpus) > 1 else "")
        self._pool = self._new_pool()
        self._futures: dict[cf.Future, Job] = {}

    def _new_pool(self) -> cf.ProcessPoolExecutor:
        return pinned_pool(self.capacity, self._gpus)

    def submit(self, job: Job) -> None:
        try:
            future = self._pool.submit(in_worker, run_point, job)
        except cf.process.BrokenProcessPool:  # a worker died (OOM, killed): start a fresh pool
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
            future = self._pool.submit(in_worker, run_point, job)
        self._futures[future] = job

    def next_done(self) -> Outcome:
        done, _ = cf.wait(self._futures, return_when=cf.FIRST_COMPLETED)
        future = next(iter(done))
        job = self._futures.pop(future)
        try:
            return future.result()
        # KeyboardInterrupt: that worker alone was stopped by a signal (its run is KILLED, resumable);
        # Exception: BrokenProcessPool and the like
        except (KeyboardInterrupt, Exception) as e:  # noqa: BLE001
            return lost(job, e)

    def close(self, cancel: bool = False) -> None:
        if cancel:
            stop_pool(self._pool)
        else:
            self._pool.shutdown(wait=True)


def local_executor(workers: int | None) -> Executor:
    """`--executor local`: in process for one worker, a process pool for more."""
    workers = 1 if workers is None else workers
    return InProcessExecutor() if workers == 1 else ProcessPoolExecutor(workers)


def ray_executor(workers: int | None) -> Executor:
    """`--executor ray` (imports Ray only now)."""
    from rnnbench.sweep.ray_executor import RayExecutor

    return RayExecutor(workers)


EXECUTORS: dict[str, Callable[[int | None], Executor]] = {
    "local": local_executor,
    "ray": ray_executor,
}


def make_executor(name: str, workers: int | None) -> Executor:
    """The executor registered as `name`, or a one-line error listing the valid names."""
    if workers is not None and workers < 1:
        raise RnnbenchError(f"--workers must be at least 1 (got {workers})")
    try:
        factory = EXECUTORS[name]
    except KeyError:
        raise RnnbenchError(f"unknown executor {name!r}; valid executors: {', '.join(EXECUTORS)}") from None
    return factory(workers)
