"""Seed aggregates in the MLflow UI: one summary run per (task setting, variant, cell) of a sweep.

After a sweep, `publish_aggregates` reads the sweep's runs as the report does (repeats dropped, a
halving sweep's search left out, each cell's chosen candidate) and records, per group, the mean, the
95% Student t bounds and n over seeds of each final metric: `<metric>_mean`, `<metric>_ci_low`,
`<metric>_ci_high`, `<metric>_n` (the report's `t_interval`, so its numbers are the report's). The
runs are tagged `aggregates_sweep` (the sweep's name), `sweep_role=aggregate` and `aggregate_of` (the
group) and sit under the sweep's parent run. They carry neither the `sweep` nor the `cell` tag, so
no search for a sweep's runs, no report and no sweep decision counts them as training runs. In the UI,
filter `tags.sweep_role = "aggregate"` and compare the cells in the table or the charts. Publishing
again updates the same runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from rnnbench.analysis import tables as T

ROLE = "aggregate"
RUN_METRICS = ("epochs", "best_epoch", "seconds_per_epoch", "time_steps_per_second")


def metric_columns(runs: pd.DataFrame, metric: str) -> list[str]:
    """The final metrics aggregated for a task whose primary metric is `metric`."""
    names = [metric, *(m for m in T.SECONDARY_METRICS if m != metric)]
    cols = [f"{prefix}{m}" for m in names for prefix in ("test_", "final_val_", "final_train_")]
    return [c for c in (*cols, *RUN_METRICS) if c in runs and runs[c].notna().any()]


def seed_aggregates(runs: pd.DataFrame, tuned: Sequence[str] = ("train.lr",)) -> pd.DataFrame:
    """One row per (task, setting, variant, cell): its chosen candidate and, for each final metric,
    `<metric>_mean`, `_ci_low`, `_ci_high`, `_n` over the chosen candidate's finished seeds."""
    everything = T.annotate(runs, tuned)
    kept, _ = T.drop_repeats(everything)
    kept, _ = T.split_search(kept)
    chosen = T.chosen_runs(kept, tuned)
    rows = []
    for key, group in chosen.groupby(T.GROUP, sort=True, dropna=False):
        fin = group[group["status"] == "FINISHED"]
        row = dict(zip(T.GROUP, key), candidate=str(group["candidate"].iloc[0]), metric=str(group["metric"].iloc[0]))
        for col in metric_columns(fin, row["metric"]):
            mean, lo, hi, _ = T.t_interval(fin[col])
            row.update({f"{col}_mean": mean, f"{col}_ci_low": lo, f"{col}_ci_high": hi,
                        f"{col}_n": float(fin[col].notna().sum())})
        rows.append(row)
    return pd.DataFrame(rows)


def publish_aggregates(sweep: str, tracking_uri: str | None = None) -> list[str]:
    """Record (or update) the sweep's aggregate runs; returns their run ids."""
    from mlflow.entities import Metric, Param, RunTag

    from rnnbench.analysis.runs import client_for, load_runs

    runs = load_runs(tracking_uri, sweeps=[sweep])
    if runs.empty:
        return []
    client = client_for(tracking_uri)
    experiment_id = str(runs["experiment_id"].iloc[0])
    existing = {r.data.tags.get("aggregate_of"): r for r in client.search_runs(
        [experiment_id], f"tags.aggregates_sweep = '{sweep}' AND tags.sweep_role = '{ROLE}'", max_results=5000)}
    parents = client.search_runs([experiment_id], f"tags.sweep = '{sweep}' AND tags.sweep_role = 'parent'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    ids = []
    for row in seed_aggregates(runs).to_dict("records"):
        label = " ".join(str(row[k]) for k in ("setting", "variant", "cell") if row[k])
        run = existing.get(label)
        if run is None:
            tags = {"aggregates_sweep": sweep, "sweep_role": ROLE, "aggregate_of": label,
                    "mlflow.runName": f"{row['cell']} {row['setting']} (seeds aggregated)"}
            if parents:
                tags["mlflow.parentRunId"] = parents[0].info.run_id
            run_id = client.create_run(experiment_id, tags=tags).info.run_id
            client.log_batch(run_id, params=[Param("setting", str(row["setting"])), Param("cell", str(row["cell"])),
                                             Param("variant", str(row["variant"]))])
        else:
            run_id = run.info.run_id
        client.log_batch(run_id, tags=[RunTag("candidate", row["candidate"])])  # a tag: it may change as runs land
        values = [Metric(k, float(v), 0, 0) for k, v in sorted(row.items())
                  if k.endswith(("_mean", "_ci_low", "_ci_high", "_n")) and isinstance(v, float) and math.isfinite(v)]
        client.log_batch(run_id, metrics=values)
        client.set_terminated(run_id, "FINISHED")
        ids.append(run_id)
    return ids
