"""Which searched hyperparameters matter, per task setting and cell: functional ANOVA (Hutter et al.
2014; the method of Greff et al. 2015's LSTM study) by Optuna's FanovaImportanceEvaluator.

The trials are the candidates of `rnnbench.analysis.tuning_budget.candidate_scores` (each learning-
rate sample, or each combination of the tuned params, with its validation score); each tuned param
that is numeric becomes a distribution over the values tried (log-scaled where they span more than a
factor of 10). Importances sum to 1 over the params; with one searched param it takes all of it,
and the table says so rather than suggesting a finding. The evaluator's forest has a fixed seed, so
the same runs give the same numbers.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import pandas as pd

from rnnbench.analysis import tables as T
from rnnbench.analysis.tuning_budget import candidate_scores

MIN_TRIALS = 4


def importance_table(runs: pd.DataFrame, search: pd.DataFrame, tuned: Sequence[str]) -> pd.DataFrame:
    """Per (setting, variant, cell, param): the fANOVA importance of that param for the validation score."""
    cols = [*T.GROUP, "param", "importance", "n_trials"]
    scores = candidate_scores(runs, search)
    if scores.empty:
        return pd.DataFrame(columns=cols)
    both = pd.concat([runs, search], ignore_index=True)
    values = both.drop_duplicates([*T.GROUP, "candidate"]).set_index([*T.GROUP, "candidate"])
    rows = []
    for key, g in scores.groupby(T.GROUP, sort=True, dropna=False):
        g = g.dropna(subset=["val"])
        params = [p for p in tuned if p in values.columns]
        if len(g) < MIN_TRIALS or not params:
            continue
        trial_params = [{p: values.loc[(*key, c), p] for p in params} for c in g["candidate"]]
        numeric = [p for p in params if all(isinstance(tp[p], (int, float)) and math.isfinite(float(tp[p])) for tp in trial_params)]
        if not numeric:
            continue
        for param, importance in _fanova(trial_params, list(g["val"]), numeric).items():
            rows.append({**dict(zip(T.GROUP, key)), "param": param, "importance": importance, "n_trials": len(g)})
    return pd.DataFrame(rows, columns=cols)


def _fanova(trial_params: list[dict[str, float]], scores: list[float], params: list[str]) -> dict[str, float]:
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = {}
    for p in params:
        vs = [float(tp[p]) for tp in trial_params]
        lo, hi = min(vs), max(vs)
        hi = hi if hi > lo else lo + abs(lo) * 1e-6 + 1e-12
        dists[p] = FloatDistribution(lo, hi, log=lo > 0 and hi / lo > 10)
    study = optuna.create_study(direction="minimize")
    for tp, score in zip(trial_params, scores):
        study.add_trial(optuna.trial.create_trial(params={p: float(tp[p]) for p in params}, distributions=dists, value=float(score)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its importance API experimental
        got = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0), normalize=True)
    return {p: float(got.get(p, 0.0)) for p in params}
