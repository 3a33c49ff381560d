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
import time
from abc import ABC, abstractmethod
from collections import deque
from typing import Callable

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
    """The outcome of a job whose worker died (its run, if any, stays RUNNING and is resumed next time)."""
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


def _init_worker(threads: int, slots: "multiprocessing.queues.Queue[int] | None" = None, gpus: tuple[str, ...] = ()) -> None:
    # Worker k of the pool (k taken from `slots`) sees only GPU k mod len(gpus), as its cuda:0, so N
    # workers on a multi-GPU host spread over the GPUs instead of all sharing the first. Set before
    # anything initialises CUDA in this fresh (spawned) process.
    if slots is not None and len(gpus) > 1:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[slots.get() % len(gpus)]
    import torch

    torch.set_num_threads(threads)


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
        context = multiprocessing.get_context("spawn")
        slots = None
        if len(self._gpus) > 1:
            slots = context.Queue()
            for k in range(self.capacity):
                slots.put(k)
        return cf.ProcessPoolExecutor(
            max_workers=self.capacity,
            mp_context=context,
            initializer=_init_worker,
            initargs=(self._threads, slots, self._gpus),
        )

    def submit(self, job: Job) -> None:
        try:
            future = self._pool.submit(run_point, job)
        except cf.process.BrokenProcessPool:  # a worker died (OOM, killed): start a fresh pool
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
            future = self._pool.submit(run_point, job)
        self._futures[future] = job

    def next_done(self) -> Outcome:
        done, _ = cf.wait(self._futures, return_when=cf.FIRST_COMPLETED)
        future = next(iter(done))
        job = self._futures.pop(future)
        try:
            return future.result()
        except Exception as e:  # noqa: BLE001 - BrokenProcessPool and the like
            return lost(job, e)

    def close(self, cancel: bool = False) -> None:
        # No public way to stop running workers before Python 3.14 (terminate_workers): after a
        # Ctrl-C they stop on their own; others (the driver alone was signalled) get 10 s, then SIGTERM.
        processes = list((getattr(self._pool, "_processes", None) or {}).values())
        self._pool.shutdown(wait=not cancel, cancel_futures=cancel)
        if cancel:
            deadline = time.monotonic() + CANCEL_GRACE_S
            for process in processes:
                process.join(max(0.0, deadline - time.monotonic()))
                if process.is_alive():
                    process.terminate()


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
