"""What each part of a study cost, and which runs the budget cut while they were still improving.

A run recorded with `core_seconds` (each epoch's seconds x threads, split over the members that
computed that epoch, plus its share of its population's setup) costs exactly that, wherever its
epochs ran: resumed in another population, or alone. For older runs, a population (runs trained
together: tag `population_id`, or for runs recorded before that tag the runs of one sweep, stage,
task setting, cell and variant whose `population` tag says they were batched) shares one wall
clock: its cost is its longest member's training time (epochs x seconds per epoch, validation
included) plus its setup. Core-hours = that time x the torch threads it used
(param `threads_used`). Summed per part: sweep x task setting x stage (search, final, or none).
"""

from __future__ import annotations

import math

import pandas as pd

CUT_WINDOW = 0.1  # a run is "still improving" when its best epoch is in the last 10% of its epochs (or the last 5)


def _population_key(run: pd.Series) -> str:
    pid = run.get("population_id")
    if isinstance(pid, str) and pid:
        return pid
    k = float(pd.to_numeric(run.get("population"), errors="coerce"))
    if not (math.isfinite(k) and k > 1):
        return str(run["run_id"])
    parts = [run.get(c) for c in ("sweep", "stage", "setting", "cell", "variant")]
    if run.get("stage") != "search":
        parts.append(run.get("candidate"))
    return "|".join(str(p) for p in parts)


def cost_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per part: machine, populations, runs, serial hours (populations one after another), core-hours."""
    cols = ["sweep", "setting", "stage", "machine", "populations", "runs", "serial_hours", "core_hours"]
    need = {"epochs", "seconds_per_epoch"}
    fin = runs[runs["status"] == "FINISHED"] if "status" in runs else runs
    if fin.empty or not need <= set(fin.columns):
        return pd.DataFrame(columns=cols)
    fin = fin.assign(
        stage=fin["stage"].fillna("") if "stage" in fin else "",
        machine=fin["machine"].fillna("not recorded") if "machine" in fin else "not recorded",
        _pop=fin.apply(_population_key, axis=1),
        _train=fin["epochs"].astype(float) * fin["seconds_per_epoch"].astype(float),
        _setup=fin["setup_seconds"].astype(float) if "setup_seconds" in fin else 0.0,
        _threads=pd.to_numeric(fin["threads_used"], errors="coerce").fillna(1.0) if "threads_used" in fin else 1.0,
        _shared=pd.to_numeric(fin["core_seconds"], errors="coerce") if "core_seconds" in fin else math.nan,
    )
    keys = ["sweep", "setting", "stage", "_pop"]
    shared, old = fin[fin["_shared"].notna()], fin[fin["_shared"].isna()]
    # A population's runs recorded with their shares add up; older ones cost the longest member.
    new_pops = shared.assign(_serial=shared["_shared"] / shared["_threads"]).groupby(keys, sort=True).agg(
        machine=("machine", "first"), runs=("run_id", "size"), seconds=("_serial", "sum"),
        core_seconds=("_shared", "sum")).reset_index()
    pops = old.groupby(keys, sort=True).agg(
        machine=("machine", "first"), runs=("run_id", "size"), train=("_train", "max"), setup=("_setup", "max"),
        threads=("_threads", "max")).reset_index()
    pops["seconds"] = pops["train"] + pops["setup"]
    pops["core_seconds"] = pops["seconds"] * pops["threads"]
    parts = [f for f in (pops[new_pops.columns], new_pops) if not f.empty]
    if not parts:  # e.g. only runs outside any sweep
        return pd.DataFrame(columns=cols)
    pops = pd.concat(parts, ignore_index=True)
    out = pops.groupby(["sweep", "setting", "stage"], sort=True).agg(
        machine=("machine", lambda m: ", ".join(sorted(set(m)))), populations=("_pop", "size"), runs=("runs", "sum"),
        serial_hours=("seconds", lambda s: s.sum() / 3600), core_hours=("core_seconds", lambda s: s.sum() / 3600)).reset_index()
    return out[cols]


def cut_while_improving(runs: pd.DataFrame) -> pd.DataFrame:
    """FINISHED runs that the epoch budget stopped (stopped_by max_epochs / max_steps; for runs without
    that tag: epochs reached train.max_epochs) with their best epoch in the last 10% (or 5) of epochs."""
    cols = ["run_id", "setting", "cell", "candidate", "seed", "epochs", "best_epoch"]
    if runs.empty or "epochs" not in runs or "best_epoch" not in runs:
        return pd.DataFrame(columns=cols)
    fin = runs[runs["status"] == "FINISHED"]
    epochs, best = fin["epochs"].astype(float), fin["best_epoch"].astype(float)
    tagged = fin["stopped_by"] if "stopped_by" in fin else pd.Series(None, index=fin.index, dtype="object")
    at_max = epochs >= pd.to_numeric(fin["train.max_epochs"], errors="coerce") if "train.max_epochs" in fin else False
    budget = tagged.isin(["max_epochs", "max_steps"]) | (tagged.isna() & at_max)
    window = (epochs * CUT_WINDOW).clip(lower=5)
    cut = fin[budget & (best >= epochs - window)]
    return cut[[c for c in cols if c in cut]].reset_index(drop=True)
