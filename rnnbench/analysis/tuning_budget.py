"""How the verdict depends on the tuning budget: expected best validation score of n learning-rate
samples, and the test score of the sample it picks, against n (Dodge et al. 2019, "Show Your Work").

The N candidates of a (setting, cell) are its learning-rate samples, each scored by its validation
metric (mean over its finished seeds of `final_val_<metric>`; for a halving sweep's search, the
search run's, at the epoch where it stopped, as the search saw it) and the test metric of the same
runs. With the N validation scores sorted best first, v_(1) <= ... <= v_(N), the best of n samples
drawn without replacement is v_(i) with probability C(N - i, n - 1) / C(N, n): the unbiased
estimator of Tang et al. (2020), where Dodge et al.'s empirical-CDF form samples with replacement
and is biased for n close to N. The matching test score is the same weighted sum over the test scores
of those candidates. Ties in validation are broken by the candidate's order, deterministically.
"""

from __future__ import annotations

from math import comb

import numpy as np
import pandas as pd

from rnnbench.analysis import tables as T


def expected_best(values: np.ndarray, n: int) -> np.ndarray:
    """Weights w (N,) over values sorted best (lowest) first: E[best of n without replacement] = w @ sorted."""
    N = len(values)
    return np.array([comb(N - i, n - 1) / comb(N, n) for i in range(1, N + 1)])


def candidate_scores(runs: pd.DataFrame, search: pd.DataFrame) -> pd.DataFrame:
    """Per (setting, variant, cell, candidate): validation and test score (means over finished seeds)."""
    frames = []
    for source in (search, runs):
        if source.empty:
            continue
        fin = source[source["status"] == "FINISHED"]
        if fin.empty:
            continue
        metric = fin["metric"]
        val = [r.get(f"final_val_{m}") for (_, r), m in zip(fin.iterrows(), metric)]
        test = [r.get(f"test_{m}") for (_, r), m in zip(fin.iterrows(), metric)]
        frames.append(fin.assign(_val=pd.to_numeric(pd.Series(val, index=fin.index), errors="coerce"),
                                 _test=pd.to_numeric(pd.Series(test, index=fin.index), errors="coerce")))
    if not frames:
        return pd.DataFrame(columns=[*T.GROUP, "candidate", "val", "test"])
    both = pd.concat(frames, ignore_index=True).drop_duplicates("run_id")
    if "stage" in both and both["stage"].eq("search").any():
        # a halving sweep: each sample once, by its search run (the seeds of the chosen one are not samples)
        both = both[both["stage"] == "search"]
    out = both.groupby([*T.GROUP, "candidate"], sort=True, dropna=False).agg(val=("_val", "mean"), test=("_test", "mean"))
    return out.reset_index()


def tuning_budget_table(runs: pd.DataFrame, search: pd.DataFrame) -> pd.DataFrame:
    """Per (setting, variant, cell) and n = 1..N: the expected best validation score of n samples and the
    expected test score of the sample picked."""
    scores = candidate_scores(runs, search)
    rows = []
    for key, g in scores.groupby(T.GROUP, sort=True, dropna=False):
        g = g.dropna(subset=["val"]).sort_values(["val", "candidate"], kind="mergesort")
        N = len(g)
        if N < 2:
            continue
        for n in range(1, N + 1):
            w = expected_best(g["val"].to_numpy(), n)
            rows.append({**dict(zip(T.GROUP, key)), "n_samples": n, "of": N,
                         "expected_val": float(w @ g["val"].to_numpy()),
                         "expected_test": float(w @ g["test"].fillna(np.nan).to_numpy())})
    return pd.DataFrame(rows, columns=[*T.GROUP, "n_samples", "of", "expected_val", "expected_test"])


def leaders(table: pd.DataFrame) -> list[str]:
    """Per setting: which cell has the best expected validation score at n = 1 and at n = N (sentences)."""
    lines = []
    for (setting, variant), g in table.groupby(["setting", "variant"], sort=True):
        first = g[g["n_samples"] == 1].sort_values(["expected_val", "cell"], kind="mergesort")
        last = g[g["n_samples"] == g["of"]].sort_values(["expected_val", "cell"], kind="mergesort")
        if first.empty or last.empty or g["cell"].nunique() < 2:  # one cell so far: nothing to rank
            continue
        a, b = first.iloc[0], last.iloc[0]
        where = f"{setting}{f' [{variant}]' if variant else ''}"
        verdict = "the same cell" if a["cell"] == b["cell"] else "a different cell"
        lines.append(f"{where}: with one learning-rate sample the best expected validation score is {a['cell']}'s "
                     f"({a['expected_val']:.4f}); with all {int(b['of'])} it is {b['cell']}'s ({b['expected_val']:.4f}): "
                     f"{verdict}.")
    return lines
