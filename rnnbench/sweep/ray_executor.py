"""The Ray executor: each point is one Ray task (1 CPU), on a local instance or an existing cluster.

Connects to the cluster at $RAY_ADDRESS when set (e.g. under `ray job submit`), else starts a local
instance with `--workers` CPUs (default: all of this machine's). Workers write to the tracking URI
and experiment id the driver resolved and created; on a cluster that URI must be a server every
node reaches (an MLflow server backed by PostgreSQL), and the checkpoint directory a shared path
if runs killed with a node are to be resumed rather than restarted.

Tasks are not retried by Ray (max_retries=0): a point lost with its node stays RUNNING in MLflow
and is resumed (or restarted) by the next invocation of the same sweep.

GPUs: a task that requests none is either hidden from every GPU (older Ray: CUDA_VISIBLE_DEVICES="",
so it trains on the CPU) or sees them all (newer Ray, e.g. 2.60: every task on cuda:0). So on a
cluster with GPUs each task asks for a share of one, GPUs / tasks at a time (at most 1): Ray then
sets CUDA_VISIBLE_DEVICES to the one GPU it assigns, and no GPU runs more than its share of points.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from rnnbench.errors import RnnbenchError
from rnnbench.sweep.executors import Executor, lost
from rnnbench.sweep.jobs import Job, Outcome, run_point


class RayExecutor(Executor):
    def __init__(self, workers: int | None) -> None:
        try:
            import ray
        except ImportError:
            raise RnnbenchError("--executor ray needs Ray: pip install 'rnnbench[ray]'") from None
        self._ray = ray
        address = os.environ.get("RAY_ADDRESS")
        self._started = not ray.is_initialized()
        if self._started:
            kwargs: dict[str, Any] = dict(log_to_driver=False, logging_level=logging.WARNING, include_dashboard=False)
            try:
                if address:
                    ray.init(address=address, **kwargs)
                else:
                    ray.init(address="local", num_cpus=workers or os.cpu_count() or 1, **kwargs)
            except Exception as e:  # noqa: BLE001 - connection refused, bad address, ...
                raise RnnbenchError(f"could not start or reach Ray ({'RAY_ADDRESS=' + address if address else 'local'}): {e}") from None
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.capacity = max(1, min(workers, cpus) if workers else cpus)
        gpus = float(ray.cluster_resources().get("GPU", 0))
        self.gpu_share = max(1e-4, round(min(1.0, gpus / self.capacity), 4)) if gpus else 0.0  # Ray's granularity: 1e-4
        where = f"Ray cluster at {address}" if address else "a local Ray instance"
        self.description = f"on {where}, {self.capacity} at a time" + (f", {self.gpu_share:g} GPU each" if gpus else "")
        self._remote = ray.remote(num_cpus=1, num_gpus=self.gpu_share, max_retries=0)(run_point)
        self._refs: dict[Any, Job] = {}

    def submit(self, job: Job) -> None:
        self._refs[self._remote.remote(job)] = job

    def next_done(self) -> Outcome:
        (ready,), _ = self._ray.wait(list(self._refs), num_returns=1)
        job = self._refs.pop(ready)
        try:
            return self._ray.get(ready)
        except Exception as e:  # noqa: BLE001 - the worker process or node died
            return lost(job, e)

    def close(self, cancel: bool = False) -> None:
        if cancel:
            for ref in self._refs:
                self._ray.cancel(ref, force=True)
        self._refs.clear()
        if self._started:
            self._ray.shutdown()
