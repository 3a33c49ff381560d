"""Successive halving over a grid point's random samples (Jamieson & Talwalkar 2016; Li et al. 2018).

All samples of a grid point train together as one population, so every sample reaches a rung in the
same epoch: this is the synchronous rule, decided on all of them at once. (Optuna's
SuccessiveHalvingPruner and Ray Tune's ASHA are its asynchronous form: a trial is judged against
the trials that reached the rung before it, so the cut depends on the order in which trials report;
with the whole rung known at once that form is not needed.)

At rung r (an epoch count), the field is every sample not already pruned and not failed: those still
training and those that stopped on their own (early stopping) before r, which competed fully. They
are ranked by their best validation score so far (lower is better; NaN last), the best
ceil(field / reduction) keep their place, and the samples still training outside it stop with
stopped_by = pruned. Samples that stopped on their own keep their place in the ranking, so a good one
leaves fewer places to the rest.

`choose` then picks, per grid point, the sample with the best validation score among the FINISHED
runs never pruned: a complete run, the same numbers as training that sample alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SuccessiveHalving:
    """A Pruner (rnnbench.training.loop.Pruner): rungs in epochs, keep 1/reduction at each."""

    rungs: tuple[int, ...]
    reduction: int = 3

    def __call__(self, epoch: int, members: list[Any]) -> list[int]:
        if epoch not in self.rungs:
            return []
        field = [i for i, m in enumerate(members) if m.status != "failed" and m.stopped_by != "pruned"]
        ranked = sorted(field, key=lambda i: (_score(members[i].best_score), i))
        places = max(1, math.ceil(len(ranked) / self.reduction))
        return [i for i in ranked[places:] if members[i].status == "training"]


def _score(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def choose(runs: list[tuple[int, Any]]) -> int | None:
    """The chosen sample among (sample index, MLflow run) pairs of one grid point's search: the best
    `best_val` of the FINISHED runs not pruned (ties: the lower sample index); None when there is none."""
    best: tuple[float, int] | None = None
    for sample, run in runs:
        if run.info.status != "FINISHED" or run.data.tags.get("stopped_by") == "pruned":
            continue
        score = _score(float(run.data.metrics.get("best_val", math.nan)))
        if math.isfinite(score) and (best is None or (score, sample) < best):
            best = (score, sample)
    return None if best is None else best[1]
