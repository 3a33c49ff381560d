"""Sweeps: seed grids and random searches under the Chung 2014 protocol, resumable and parallel.

    rnnbench sweep experiments/smoke.yaml [--executor local|ray] [--workers N] [key=value ...]

spec.py      the YAML spec (pydantic) and its expansion into points with stable ids
runs.py      the sweep's parent and child runs in MLflow; what to skip, resume or retry
jobs.py      the picklable job a worker gets and the function it runs
executors.py in-process, process-pool (and, lazily, Ray: ray_executor.py) executors
runner.py    the driver: store once, plan, fan out, progress, summary
cli.py       the `rnnbench sweep` command
"""

from __future__ import annotations

from rnnbench.sweep.runner import SweepSummary, run_sweep
from rnnbench.sweep.spec import Point, SweepSpec, expand, load_spec, spec_from_dict

__all__ = ["Point", "SweepSpec", "SweepSummary", "expand", "load_spec", "run_sweep", "spec_from_dict"]
