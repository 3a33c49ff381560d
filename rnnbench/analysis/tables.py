"""Tables from the run frame: per task x cell summaries, pairwise tests, Chung 2014 side by side.

Selection rule (Chung et al. 2014 chose the best of 10 learning-rate samples on validation; here
with seeds): within one task setting, variant and cell, each distinct value of the tuned
hyper-parameters (default: `train.lr`) is a candidate; the chosen candidate has the fewest failed
seeds, then the lowest mean best-checkpoint validation metric over its finished seeds. All test
numbers are the chosen candidate's finished seeds.

Statistics over seeds:
  * mean +- 95% t-interval: mean +- t_{0.975, n-1} s / sqrt(n) (s with n - 1 in the denominator);
  * Welch's t-test (scipy.stats.ttest_ind, equal_var=False) and the Mann-Whitney U test
    (scipy.stats.mannwhitneyu, two-sided), for every pair of cells of one task setting and
    variant; each test's p-values Holm-corrected within that family (statsmodels multipletests,
    method='holm'; Holm 1979);
  * effect sizes: Cohen's d = (mean_a - mean_b) / pooled s; Hedges' g = d (1 - 3 / (4(n_a + n_b) - 9))
    (Hedges & Olkin 1985); rank-biserial r = 2 U_a / (n_a n_b) - 1 (Kerby 2014). Positive means
    cell a scores higher, i.e. worse on a minimised metric.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rnnbench.config import ADDED_DEFAULTS, NOT_IDENTITY

# --- Chung et al. 2014 -----------------------------------------------------------------------------
CHUNG2014_CITATION = (
    "Chung, Gulcehre, Cho & Bengio (2014), Empirical Evaluation of Gated Recurrent Neural Networks "
    "on Sequence Modeling, arXiv:1412.3555, Table 2"
)
CHUNG2014_TABLE2: dict[str, dict[str, tuple[float, float]]] = {
    # dataset -> Chung cell -> (train, test): average negative log-likelihood per time step, nats.
    "nottingham": {"tanh": (3.22, 3.13), "GRU": (2.79, 3.23), "LSTM": (3.08, 3.20)},
    "jsb": {"tanh": (8.82, 9.10), "GRU": (6.94, 8.54), "LSTM": (8.15, 8.67)},
    "musedata": {"tanh": (5.64, 6.23), "GRU": (5.06, 5.99), "LSTM": (5.18, 6.23)},
    "pianomidi": {"tanh": (5.64, 9.03), "GRU": (4.93, 8.82), "LSTM": (6.49, 9.03)},
    "ubisoft_a": {"tanh": (6.29, 6.44), "GRU": (2.31, 3.59), "LSTM": (1.44, 2.70)},
    "ubisoft_b": {"tanh": (7.61, 7.62), "GRU": (0.38, 0.88), "LSTM": (0.80, 1.26)},
}
"""Chung et al. 2014, Table 2 (train / test). The Ubisoft speech sets are private: no task here."""

CHUNG_CELL: dict[str, tuple[str, str]] = {
    # our cell -> (Chung's column, how our form relates to Chung's)
    "tanh": ("tanh", "same form"),
    "gru_reset_before": ("GRU", "same form (reset before U)"),
    "gru": ("GRU", "differs: reset after U (cuDNN); Chung used reset before"),
    "lstm_peephole": ("LSTM", "same form (peepholes)"),
    "lstm": ("LSTM", "differs: no peepholes; Chung used peepholes"),
}

# --- the solved criterion for copy and adding ------------------------------------------------------


@dataclass(frozen=True)
class SolvedRule:
    """A seed solves the task when test_<metric> < fraction x test_<metric>_baseline (or < threshold)."""

    metric: str
    fraction_of_baseline: float | None = 0.1
    threshold: float | None = None

    def describe(self) -> str:
        if self.threshold is not None:
            return f"test {self.metric} < {self.threshold:g}"
        return f"test {self.metric} < {self.fraction_of_baseline:g} x the memoryless baseline"

    def solved(self, runs: pd.DataFrame) -> pd.Series:
        value = runs.get(f"test_{self.metric}", pd.Series(np.nan, index=runs.index)).astype(float)
        if self.threshold is not None:
            return value < self.threshold
        base = runs.get(f"test_{self.metric}_baseline", pd.Series(np.nan, index=runs.index)).astype(float)
        return value < self.fraction_of_baseline * base


DEFAULT_SOLVED: dict[str, SolvedRule] = {"copy": SolvedRule("ce"), "adding": SolvedRule("mse")}
"""Default: copy solved if test_ce < 0.1 x 10 ln 8 / (T + 20); adding if test_mse < 0.1 x 1/6."""


def solved_rules_from_specs(spec_dir: str | Path, sweeps: Sequence[str] | None = None) -> dict[str, SolvedRule]:
    """`solved:` criteria of sweep specs (experiments/*.yaml) over the defaults.

    Accepted forms, per spec: `solved: {copy: {...}, adding: {...}}` or, for a one-task spec,
    `solved: {...}` itself; each rule `{metric: ce, fraction_of_baseline: 0.1}` or
    `{metric: mse, threshold: 0.01}` (`fraction` and `below` are read as aliases). Only specs whose
    `name` (or file stem) is one of `sweeps` are read when sweeps are given.
    """
    import yaml

    rules = dict(DEFAULT_SOLVED)
    folder = Path(spec_dir)
    if not folder.is_dir():
        return rules
    for path in sorted(folder.glob("*.y*ml")):
        try:
            spec = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            continue
        if not isinstance(spec, dict) or not isinstance(spec.get("solved"), dict):
            continue
        name = str(spec.get("name", path.stem))
        if sweeps and name not in sweeps and path.stem not in sweeps:
            continue
        solved = spec["solved"]
        task = _spec_task(spec)
        per_task = solved if all(isinstance(v, dict) for v in solved.values()) else {task: solved}
        for task_name, raw in per_task.items():
            if task_name is None or not isinstance(raw, dict):
                continue
            metric = str(raw.get("metric", DEFAULT_SOLVED.get(task_name, SolvedRule("nll")).metric))
            metric = metric.removeprefix("test_")
            threshold = raw.get("threshold", raw.get("below"))
            fraction = raw.get("fraction_of_baseline", raw.get("fraction", None if threshold is not None else 0.1))
            rules[str(task_name)] = SolvedRule(
                metric, None if fraction is None else float(fraction), None if threshold is None else float(threshold)
            )
    return rules


def _spec_task(spec: dict[str, Any]) -> str | None:
    base = spec.get("base", spec)
    task = base.get("task") if isinstance(base, dict) else None
    if isinstance(task, dict):
        return task.get("name")
    return task if isinstance(task, str) else None


# --- runs that learned nothing --------------------------------------------------------------------


def learning_verdict(metrics: Mapping[str, Any], metric: str) -> str | None:
    """Why a finished run learned nothing, or None where it did (or nothing can be said).

    Rule: the run's best-checkpoint validation `<metric>` (`final_val_<metric>`) is not below the
    weakest reference logged beside it (`final_val_<metric>_<name>`, the largest: copy and adding
    the memoryless baseline, music the marginal Bernoulli, speech the i.i.d. Gaussian), i.e. it did
    no better than a predictor that ignores the inputs. Without validation references the test
    split is used. A run that diverged to a finite loss (e.g. `train.lr=1e3`: test CE 4492 against
    a 0.69 baseline) ends FINISHED; this is what tells it apart. Works on a plain dict of final
    metrics too, so the trainer could tag runs with it.
    """
    for split, what in (("final_val", "best-checkpoint validation"), ("test", "test")):
        value = _finite(metrics.get(f"{split}_{metric}"))
        pattern = re.compile(rf"^{re.escape(f'{split}_{metric}')}_([A-Za-z0-9]+)$")
        refs = {m.group(1): _finite(v) for k, v in metrics.items() if (m := pattern.match(str(k)))}
        refs = {name: v for name, v in refs.items() if v is not None}
        if value is None or not refs:
            continue
        name, ref = max(sorted(refs.items()), key=lambda kv: kv[1])
        return f"{what} {metric} {value:.4g} is not below the {name} reference {ref:.4g}" if value >= ref else None
    return None


def _finite(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def not_learned(runs: pd.DataFrame) -> pd.Series:
    """Per run: the learning_verdict reason for FINISHED runs that learned nothing, else None."""
    if runs.empty:
        return pd.Series([], index=runs.index, dtype="object")
    out = [
        learning_verdict(row, str(row["metric"])) if row.get("status") == "FINISHED" else None
        for row in runs.to_dict("records")
    ]
    return pd.Series(out, index=runs.index, dtype="object")


# --- statistics ------------------------------------------------------------------------------------


def _clean(values: Any) -> np.ndarray:
    a = np.asarray(values, dtype=float)
    return a[np.isfinite(a)]


def t_interval(values: Any, confidence: float = 0.95) -> tuple[float, float, float, float]:
    """(mean, low, high, half-width) of the Student t confidence interval for the mean.

    half = t_{(1+confidence)/2, n-1} s / sqrt(n); NaN bounds for fewer than two finite values.
    """
    from scipy import stats

    a = _clean(values)
    if len(a) == 0:
        return (math.nan,) * 4
    mean = float(a.mean())
    if len(a) < 2:
        return mean, math.nan, math.nan, math.nan
    half = float(stats.t.ppf((1 + confidence) / 2, len(a) - 1) * a.std(ddof=1) / math.sqrt(len(a)))
    return mean, mean - half, mean + half, half


def cohens_d(a: Any, b: Any) -> float:
    """(mean_a - mean_b) / s_pooled, s_pooled² = ((n_a-1)s_a² + (n_b-1)s_b²) / (n_a + n_b - 2) (Cohen 1988)."""
    a, b = _clean(a), _clean(b)
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        return math.nan
    pooled = math.sqrt(((na - 1) * a.var(ddof=1) + (nb - 1) * b.var(ddof=1)) / (na + nb - 2))
    return float((a.mean() - b.mean()) / pooled) if pooled > 0 else math.nan


def hedges_g(a: Any, b: Any) -> float:
    """Cohen's d times the small-sample correction J = 1 - 3 / (4(n_a + n_b) - 9) (Hedges & Olkin 1985)."""
    n = len(_clean(a)) + len(_clean(b))
    return cohens_d(a, b) * (1 - 3 / (4 * n - 9)) if n > 3 else math.nan


def rank_biserial(a: Any, b: Any) -> float:
    """2 U_a / (n_a n_b) - 1, with U_a the Mann-Whitney statistic of `a` (Kerby 2014); in [-1, 1]."""
    from scipy import stats

    a, b = _clean(a), _clean(b)
    if len(a) == 0 or len(b) == 0:
        return math.nan
    u = stats.mannwhitneyu(a, b, alternative="two-sided").statistic
    return float(2 * u / (len(a) * len(b)) - 1)


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-adjusted p-values (statsmodels multipletests, method='holm'); NaN stays NaN, out of the family."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = multipletests(p[ok], method="holm")[1]
    return out


def compare(a: Any, b: Any) -> dict[str, float]:
    """Welch's t-test, Mann-Whitney U and effect sizes for two samples (NaN where undefined)."""
    from scipy import stats

    a, b = _clean(a), _clean(b)
    out = dict(welch_t=math.nan, welch_p=math.nan, mwu_u=math.nan, mwu_p=math.nan)
    if len(a) >= 2 and len(b) >= 2 and (a.var() > 0 or b.var() > 0):
        res = stats.ttest_ind(a, b, equal_var=False)
        out.update(welch_t=float(res.statistic), welch_p=float(res.pvalue))
    if len(a) >= 1 and len(b) >= 1:
        res = stats.mannwhitneyu(a, b, alternative="two-sided")
        out.update(mwu_u=float(res.statistic), mwu_p=float(res.pvalue))
    out.update(cohens_d=cohens_d(a, b), hedges_g=hedges_g(a, b), rank_biserial=rank_biserial(a, b))
    return out


# --- settings, variants and the chosen learning rate ----------------------------------------------


def drop_repeats(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(kept, dropped): one run per identity (same config and seed), so a rerun is not a new seed.

    The identity is the `identity` column (runs.runs_frame: from the logged params, without the
    settings that cannot change a number, rnnbench.config.NOT_IDENTITY), else the `config_hash` tag.
    Kept: the newest FINISHED run of each identity, else the newest run. Runs without one are all kept.
    """
    key = "identity" if "identity" in runs else "config_hash"
    if key not in runs or runs.empty:
        return runs, runs.iloc[0:0]
    ranked = runs.assign(_fin=runs["status"].eq("FINISHED"), _t=runs.get("start_time", 0))
    ranked = ranked.sort_values(["_fin", "_t", "run_id"], ascending=[False, False, True], kind="mergesort")
    has_hash = ranked[key].notna()
    repeat = has_hash & ranked.duplicated(key, keep="first")
    dropped = ranked.index[repeat]
    return runs.drop(index=dropped), runs.loc[sorted(dropped)]


def natural_key(text: Any) -> tuple:
    """Sort key that reads numbers inside labels as numbers: 'copy (seq_len=5)' < 'copy (seq_len=10)'."""
    parts = re.split(r"(\d+(?:\.\d+)?(?:e-?\d+)?)", str(text))
    return tuple(float(p) if i % 2 else p for i, p in enumerate(parts))


def ordered(frame: pd.DataFrame, cols: Sequence[str] = ("task", "setting", "variant", "cell")) -> pd.DataFrame:
    """Rows sorted by `cols` (those present), numbers inside the labels compared as numbers; stable."""
    present = [c for c in cols if c in frame]
    if frame.empty or not present:
        return frame.reset_index(drop=True)
    ranks = {}
    for c in present:
        values = sorted(frame[c].astype(str).unique(), key=natural_key)
        ranks[f"_rank_{c}"] = frame[c].astype(str).map({v: i for i, v in enumerate(values)})
    keyed = frame.assign(**ranks)
    return keyed.sort_values(list(ranks), kind="mergesort").drop(columns=list(ranks)).reset_index(drop=True)


NOT_VARIANTS = {"model.cell", "train.seed", "train.device", *NOT_IDENTITY}


def _varying(frame: pd.DataFrame, cols: list[str]) -> list[str]:
    return [c for c in cols if frame[c].astype("str").nunique(dropna=False) > 1]


def label_value(value: Any) -> str:
    """A param value as a label shows it: 'none' for a missing value (a param logged as None, or not
    logged), which pandas holds as None, NaN or pd.NA and would print as '', 'nan' or '<NA>'."""
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return "none"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower()
    if isinstance(value, (float, np.floating)):
        return f"{float(value):g}"
    if isinstance(value, np.integer):
        return str(int(value))
    return str(value)


def _label(row: pd.Series, cols: list[str]) -> str:
    return ", ".join(f"{c.split('.', 1)[-1]}={label_value(row[c])}" for c in cols)


def annotate(runs: pd.DataFrame, tuned: Sequence[str] = ("train.lr",)) -> pd.DataFrame:
    """Add `setting` (task plus the task options that vary), `variant` and `candidate` labels.

    A variant is a setting of the model/train params (other than the tuned ones and the seed) that
    varies within one task setting and cell, e.g. `num_layers=2`; a candidate is one value of the
    tuned params.
    """
    df = runs.copy()
    df["setting"], df["variant"], df["candidate"] = df["task"], "", ""
    # A key added after some runs were recorded (ADDED_DEFAULTS) is missing from those runs: they ran
    # at its default, so they are not another variant of the runs that logged the default.
    known = df.copy()
    for key, default in ADDED_DEFAULTS.items():
        if key in known and default is not None:
            known[key] = known[key].astype(object).where(known[key].notna(), default)
    for task, part in known.groupby("task", sort=True):
        task_cols = sorted(c for c in part.columns if c.startswith("task.") and c != "task.name")
        setting_cols = _varying(part, task_cols)
        setting = part.apply(lambda r: f"{task} ({_label(r, setting_cols)})" if setting_cols else task, axis=1)
        df.loc[part.index, "setting"] = setting
        other = sorted(c for c in part.columns if c.startswith(("model.", "train.")))
        if "model.budget" in part and part["model.budget"].notna().any():
            other = [c for c in other if c != "model.hidden_size"]
        other = [c for c in other if c not in NOT_VARIANTS and c not in tuned]
        variant_cols: set[str] = set()
        for _, group in part.assign(setting=setting).groupby(["setting", "cell"], sort=True):
            variant_cols.update(_varying(group, other))
        cols = sorted(variant_cols)
        if cols:
            df.loc[part.index, "variant"] = part.apply(lambda r: _label(r, cols), axis=1)
        present = [c for c in tuned if c in part.columns]
        if present:
            df.loc[part.index, "candidate"] = part.apply(lambda r: _label(r, present), axis=1)
        if "train.readout" in part:  # a ridge readout uses no learning rate: its penalty was chosen on validation
            ridge = part.index[part["train.readout"].astype(str) == "ridge"]
            df.loc[ridge, "candidate"] = "ridge readout"
    return df


def _val_column(frame: pd.DataFrame, metric: str) -> pd.Series:
    col = f"final_val_{metric}"
    if col in frame:
        return frame[col].astype(float)
    return frame.get("best_val", pd.Series(np.nan, index=frame.index)).astype(float)


GROUP = ["task", "setting", "variant", "cell"]


def candidates_table(runs: pd.DataFrame, tuned: Sequence[str] = ("train.lr",)) -> pd.DataFrame:
    """One row per candidate (tuned-param value) of each task setting x variant x cell, `chosen` marked."""
    df = runs if "candidate" in runs else annotate(runs, tuned)
    rows = []
    for key, group in df.groupby(GROUP + ["candidate"], sort=True, dropna=False):
        finished = group[group["status"] == "FINISHED"]
        metric = str(group["metric"].iloc[0])
        val = _val_column(finished, metric)
        row = dict(zip(GROUP + ["candidate"], key))
        for c in tuned:
            if c in group:
                row[c] = group[c].iloc[0]
        row.update(
            metric=metric,
            n_runs=len(group),
            n_finished=len(finished),
            n_failed=int((group["status"] == "FAILED").sum()),
            n_not_learned=int(not_learned(group).notna().sum()),
            val_mean=float(val.mean()) if val.notna().any() else math.nan,
        )
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table.assign(chosen=pd.Series(dtype=bool))
    order = table.assign(_val=table["val_mean"].fillna(np.inf), _nf=table["n_finished"].eq(0))
    order = order.sort_values(GROUP + ["_nf", "n_failed", "_val", "candidate"], kind="mergesort")
    best = order.groupby(GROUP, sort=False, dropna=False).head(1).index
    table["chosen"] = table.index.isin(best)
    return ordered(table, GROUP + ["candidate"])


def chosen_runs(runs: pd.DataFrame, tuned: Sequence[str] = ("train.lr",)) -> pd.DataFrame:
    """The runs (all statuses) of each group's chosen candidate, with setting/variant labels."""
    df = runs if "candidate" in runs else annotate(runs, tuned)
    cand = candidates_table(df, tuned)
    if cand.empty:
        return df.iloc[0:0]
    keys = cand.loc[cand["chosen"], GROUP + ["candidate"]]
    return df.merge(keys, on=GROUP + ["candidate"], how="inner").pipe(_restore_order, df)


def _restore_order(merged: pd.DataFrame, original: pd.DataFrame) -> pd.DataFrame:
    order = {rid: i for i, rid in enumerate(original["run_id"])}
    return merged.sort_values("run_id", key=lambda s: s.map(order), kind="mergesort").reset_index(drop=True)


def reference_columns(frame: pd.DataFrame, metric: str, prefix: str = "test_") -> dict[str, str]:
    """{reference name: column} for `<prefix><metric>_<word>` columns, e.g. marginal, markov, baseline."""
    pattern = re.compile(rf"^{re.escape(prefix + metric)}_([A-Za-z0-9]+)$")
    out = {}
    for col in sorted(frame.columns):
        m = pattern.match(col)
        if m and frame[col].notna().any():
            out[m.group(1)] = col
    return out


def music_references(task: str, params: dict[str, Any]) -> dict[str, float]:
    """Marginal-Bernoulli and first-order Markov test NLL, fitted on the train split (polyphonic module).

    Used when the runs did not record `test_nll_marginal` / `test_nll_markov`; needs the dataset.
    """
    from rnnbench.tasks import get_task
    from rnnbench.tasks.polyphonic import marginal_bernoulli_nll, markov_nll

    cls = get_task(task)
    fields = cls.Options.model_fields
    options = cls.Options(**{k: v for k, v in params.items() if k in fields and v is not None and v == v})
    rolls = cls(options, seed=0).rolls()
    ff = options.first_frame
    return {
        "marginal": marginal_bernoulli_nll(rolls["train"], rolls["test"], ff),
        "markov": markov_nll(rolls["train"], rolls["test"], ff),
    }


MUSIC_TASKS = ("jsb", "nottingham", "musedata", "pianomidi")


def _mean(frame: pd.DataFrame, col: str) -> float:
    if col not in frame:
        return math.nan
    v = frame[col].astype(float)
    return float(v.mean()) if v.notna().any() else math.nan


SECONDARY_METRICS = ("recall_acc", "acc")
"""Test metrics shown beside the primary one in the summary (mean and 95% half-width over seeds): copy's
recall accuracy on its last 10 steps, a classification task's accuracy."""


def summary_table(
    runs: pd.DataFrame,
    tuned: Sequence[str] = ("train.lr",),
    solved_rules: dict[str, SolvedRule] | None = None,
    compute_missing_references: bool = True,
) -> pd.DataFrame:
    """Per task setting x variant x cell: size, chosen lr, test mean +- 95% CI over seeds, timings, references.

    Columns `ref_<name>` hold each reference's test value (copy/adding memoryless baseline; music
    marginal and Markov; speech Gaussian and linear) and `beats_<name>` whether the mean test metric
    is below it. `solved` counts seeds meeting the task's SolvedRule (copy and adding).
    """
    rules = DEFAULT_SOLVED if solved_rules is None else solved_rules
    df = runs if "candidate" in runs else annotate(runs, tuned)
    cand = candidates_table(df, tuned)
    chosen = chosen_runs(df, tuned)
    rows = []
    for key, group in chosen.groupby(GROUP, sort=True, dropna=False):
        fin = group[group["status"] == "FINISHED"]
        metric = str(group["metric"].iloc[0])
        task = str(key[0])
        mean, lo, hi, half = t_interval(fin.get(f"test_{metric}", pd.Series(dtype=float)))
        c = cand[(cand[GROUP] == pd.Series(dict(zip(GROUP, key)))).all(axis=1)]
        row: dict[str, Any] = dict(zip(GROUP, key))
        row.update(
            metric=metric,
            hidden_size=_mean(fin, "hidden_size") if "hidden_size" in fin else _mean(fin, "model.hidden_size"),
            n_params_recurrent=_mean(fin, "n_params_recurrent"),
            n_params_total=_mean(fin, "n_params_total"),
            **({"n_params_frozen": _mean(fin, "n_params_frozen")} if "n_params_frozen" in fin else {}),  # esn
            candidate=str(group["candidate"].iloc[0]),
            n_candidates=len(c),
            n_seeds=len(fin),
            n_failed=int((group["status"] == "FAILED").sum()),
            n_not_learned=int(not_learned(fin).notna().sum()),  # in the mean, and marked wherever it is shown
            test_mean=mean,
            test_ci_low=lo,
            test_ci_high=hi,
            test_ci_half=half,
            test_sd=float(fin[f"test_{metric}"].std(ddof=1)) if len(fin) > 1 else math.nan,
            train_mean=_mean(fin, f"final_train_{metric}"),
            val_mean=_mean(fin, f"final_val_{metric}"),
            epochs_to_best=_mean(fin, "best_epoch") + 1,
            epochs=_mean(fin, "epochs"),
            seconds_to_best=_mean(fin, "seconds_to_best"),
            seconds_per_epoch=_mean(fin, "seconds_per_epoch"),
            time_steps_per_second=_mean(fin, "time_steps_per_second"),
        )
        for name in tuned:
            if name in group:
                row[name] = group[name].iloc[0]
        # the task's other test metrics (copy: recall_acc on the last 10 steps), beside the primary one
        for col in (f"test_{m}" for m in SECONDARY_METRICS if m != metric and f"test_{m}" in fin and fin[f"test_{m}"].notna().any()):
            sec_mean, _, _, sec_half = t_interval(fin[col])
            row[f"{col}_mean"], row[f"{col}_ci_half"] = sec_mean, sec_half
        refs = {name: _mean(fin, col) for name, col in reference_columns(fin, metric).items()}
        if compute_missing_references and task in MUSIC_TASKS and not {"marginal", "markov"} <= refs.keys() and len(fin):
            try:
                params = {k.split(".", 1)[1]: v for k, v in fin.iloc[0].items() if str(k).startswith("task.")}
                refs.update(music_references(task, params))
            except Exception:  # noqa: BLE001 - data absent: the references stay missing
                pass
        for name, value in sorted(refs.items()):
            row[f"ref_{name}"] = value
            row[f"beats_{name}"] = bool(mean < value) if math.isfinite(mean) and math.isfinite(value) else pd.NA
        rule = rules.get(task)
        if rule is not None:
            row["solved"] = int(rule.solved(fin).sum())
            row["solved_rule"] = rule.describe()
        rows.append(row)
    return ordered(pd.DataFrame(rows))


def pairwise_table(runs: pd.DataFrame, tuned: Sequence[str] = ("train.lr",)) -> pd.DataFrame:
    """Every pair of cells within a task setting x variant, at each cell's chosen lr, on the test metric.

    p-values are Holm-corrected within each (setting, variant) family, separately for each test.
    """
    chosen = chosen_runs(runs, tuned)
    fin = chosen[chosen["status"] == "FINISHED"]
    rows = []
    for key, group in fin.groupby(["task", "setting", "variant"], sort=True, dropna=False):
        metric = str(group["metric"].iloc[0])
        samples = {cell: g[f"test_{metric}"].to_numpy(float) for cell, g in group.groupby("cell", sort=True)}
        family = []
        for a, b in itertools.combinations(sorted(samples), 2):
            xa, xb = _clean(samples[a]), _clean(samples[b])
            row = dict(zip(["task", "setting", "variant"], key))
            row.update(metric=metric, cell_a=a, cell_b=b, n_a=len(xa), n_b=len(xb),
                       mean_a=float(xa.mean()) if len(xa) else math.nan,
                       mean_b=float(xb.mean()) if len(xb) else math.nan)
            row["diff"] = row["mean_a"] - row["mean_b"]
            row.update(compare(xa, xb))
            family.append(row)
        if family:
            welch = holm([r["welch_p"] for r in family])
            mwu = holm([r["mwu_p"] for r in family])
            for r, pw, pm in zip(family, welch, mwu):
                r["welch_p_holm"], r["mwu_p_holm"] = float(pw), float(pm)
            rows.extend(family)
    cols = ["task", "setting", "variant", "metric", "cell_a", "cell_b", "n_a", "n_b", "mean_a", "mean_b", "diff",
            "welch_t", "welch_p", "welch_p_holm", "mwu_u", "mwu_p", "mwu_p_holm", "cohens_d", "hedges_g", "rank_biserial"]
    return ordered(pd.DataFrame(rows, columns=cols), ["task", "setting", "variant", "cell_a", "cell_b"])


VANILLA = "lstm_peephole"
"""Greff et al. 2015's vanilla LSTM (with peepholes): what each of its variants is compared with."""


def variants_of(cell: str) -> list[str]:
    """The registry's variants of `cell` (their `variant_of`), in registration order: for VANILLA,
    Greff et al.'s NIG, NFG, NOG, NIAF, NOAF, NP (`lstm`), CIFG (here without peepholes) and FGR."""
    from rnnbench.cells import CELLS

    return [name for name, cls in CELLS.items() if cls.variant_of == cell]


def variants_table(runs: pd.DataFrame, tuned: Sequence[str] = ("train.lr",)) -> pd.DataFrame:
    """Greff et al. 2015 Fig. 3's comparison: each LSTM variant against the vanilla peephole LSTM, per task
    setting, at each cell's chosen candidate; Welch and Mann-Whitney p-values Holm-corrected over the
    variants of a setting (the family Greff et al. test). Empty where no variant ran beside the vanilla."""
    chosen = chosen_runs(runs, tuned)
    fin = chosen[chosen["status"] == "FINISHED"]
    rows = []
    for key, group in fin.groupby(["task", "setting", "variant"], sort=True, dropna=False):
        metric = str(group["metric"].iloc[0])
        samples = {cell: _clean(g[f"test_{metric}"].to_numpy(float)) for cell, g in group.groupby("cell", sort=True)}
        if VANILLA not in samples:
            continue
        base = samples[VANILLA]
        family = []
        for cell in (c for c in variants_of(VANILLA) if c in samples):
            x = samples[cell]
            row = dict(zip(["task", "setting", "variant"], key), metric=metric, cell=cell, n=len(x), n_vanilla=len(base),
                       mean=float(x.mean()) if len(x) else math.nan, vanilla_mean=float(base.mean()) if len(base) else math.nan)
            row["diff"] = row["mean"] - row["vanilla_mean"]
            row.update({k: v for k, v in compare(x, base).items() if k in ("welch_p", "mwu_p", "hedges_g")})
            family.append(row)
        if family:
            for r, pw, pm in zip(family, holm([r["welch_p"] for r in family]), holm([r["mwu_p"] for r in family])):
                r["welch_p_holm"], r["mwu_p_holm"] = float(pw), float(pm)
            rows.extend(family)
    cols = ["task", "setting", "variant", "metric", "cell", "n", "n_vanilla", "mean", "vanilla_mean", "diff", "welch_p",
            "welch_p_holm", "mwu_p", "mwu_p_holm", "hedges_g"]
    return pd.DataFrame(rows, columns=cols)


ARCHITECTURE_KEYS = ("model.num_layers", "model.bidirectional")
"""The variant keys of the architecture comparison: stacked layers and both directions."""


def _architecture(row: pd.Series) -> tuple[int, bool]:
    """(num_layers, bidirectional) of a run; a key it did not log at its default (1 layer; the
    ADDED_DEFAULTS value of model.bidirectional)."""
    layers, bi = (row.get(k) for k in ARCHITECTURE_KEYS)
    missing = [v is None or (pd.api.types.is_scalar(v) and pd.isna(v)) for v in (layers, bi)]
    bi = ADDED_DEFAULTS["model.bidirectional"] if missing[1] else bi
    return (1 if missing[0] else int(float(layers))), str(bi).strip().lower() == "true"


def architecture_metrics(table: pd.DataFrame) -> list[str]:
    """The secondary test metrics an architecture_table holds (their `<m>_mean` columns)."""
    return [c[: -len("_mean")] for c in table.columns if c.endswith("_mean") and c != "base_mean" and table[c].notna().any()]


def architecture_table(runs: pd.DataFrame, tuned: Sequence[str] = ("train.lr",)) -> pd.DataFrame:
    """Stacked and bidirectional models against the same cell with one unidirectional layer.

    Per task setting whose runs vary `model.num_layers` or `model.bidirectional` (the only variant keys
    there), one row per cell and architecture at the cell's chosen candidate: the test metric and the
    secondary ones (accuracy on a classification task) with 95% t-intervals over seeds, and against the
    cell's one-layer unidirectional runs the difference, Welch's and Mann-Whitney's p-values (Holm over
    the setting's contrasts, every cell's together) and Hedges' g. The one-layer unidirectional row is
    the baseline itself (no contrast). Empty where no setting varies the architecture.
    """
    base_cols = ["task", "setting", "cell", "num_layers", "bidirectional", "variant", "metric", "n", "mean", "ci_half"]
    test_cols = ["base_mean", "diff", "welch_p", "welch_p_holm", "mwu_p", "mwu_p_holm", "hedges_g"]
    chosen = chosen_runs(runs, tuned)
    fin = chosen[chosen["status"] == "FINISHED"]
    if fin.empty or not any(k in fin for k in ARCHITECTURE_KEYS):
        return pd.DataFrame(columns=base_cols + test_cols)
    arch = fin.apply(_architecture, axis=1, result_type="expand")
    fin = fin.assign(num_layers=arch[0].astype(int), bidirectional=arch[1].astype(bool))
    rows = []
    for (task, setting), part in fin.groupby(["task", "setting"], sort=True):
        if part[["num_layers", "bidirectional"]].drop_duplicates().shape[0] < 2:
            continue
        if part.groupby(["cell", "num_layers", "bidirectional"])["variant"].nunique().max() > 1:
            continue  # other variant keys vary too: the architectures are not each one group
        metric = str(part["metric"].iloc[0])
        secondary = [m for m in SECONDARY_METRICS if m != metric and f"test_{m}" in part and part[f"test_{m}"].notna().any()]
        family = []
        for cell, by_cell in part.groupby("cell", sort=True):
            base = by_cell[(by_cell["num_layers"] == 1) & ~by_cell["bidirectional"]]
            xb = _clean(base[f"test_{metric}"].to_numpy(float))
            for (layers, bi), g in by_cell.groupby(["num_layers", "bidirectional"], sort=True):
                x = _clean(g[f"test_{metric}"].to_numpy(float))
                mean, _, _, half = t_interval(x)
                row: dict[str, Any] = dict(task=task, setting=setting, cell=cell, num_layers=int(layers),
                                           bidirectional=bool(bi), variant=str(g["variant"].iloc[0]), metric=metric,
                                           n=len(x), mean=mean, ci_half=half)
                for m in secondary:
                    row[f"{m}_mean"], _, _, row[f"{m}_ci_half"] = t_interval(g[f"test_{m}"])
                is_base = layers == 1 and not bi
                row.update(base_mean=float(xb.mean()) if len(xb) else math.nan)
                row["diff"] = math.nan if is_base else row["mean"] - row["base_mean"]
                if not is_base and len(xb):
                    row.update({k: v for k, v in compare(x, xb).items() if k in ("welch_p", "mwu_p", "hedges_g")})
                    family.append(row)
                rows.append(row)
        if family:
            for r, pw, pm_ in zip(family, holm([r["welch_p"] for r in family]), holm([r["mwu_p"] for r in family])):
                r["welch_p_holm"], r["mwu_p_holm"] = float(pw), float(pm_)
    if not rows:
        return pd.DataFrame(columns=base_cols + test_cols)
    table = pd.DataFrame(rows)
    secondary_cols = [c for c in table.columns if c.endswith(("_mean", "_ci_half")) and c != "base_mean"]
    return table.reindex(columns=base_cols + secondary_cols + test_cols)


def chung_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Our music results beside Chung et al. 2014 Table 2: differences, and whether Chung's test value
    lies inside our 95% interval. Cells map to Chung's columns by CHUNG_CELL (form differences noted)."""
    rows = []
    for _, s in summary.iterrows():
        if s["task"] not in CHUNG2014_TABLE2 or s["cell"] not in CHUNG_CELL:
            continue
        chung_cell, form = CHUNG_CELL[s["cell"]]
        c_train, c_test = CHUNG2014_TABLE2[s["task"]][chung_cell]
        inside = (s["test_ci_low"] <= c_test <= s["test_ci_high"]) if math.isfinite(s["test_ci_half"]) else pd.NA
        rows.append(dict(
            task=s["task"], setting=s["setting"], variant=s["variant"], cell=s["cell"], chung_cell=chung_cell,
            form=form, n_seeds=s["n_seeds"], train=s["train_mean"], chung_train=c_train,
            train_diff=s["train_mean"] - c_train, test=s["test_mean"], test_ci_low=s["test_ci_low"],
            test_ci_high=s["test_ci_high"], chung_test=c_test, test_diff=s["test_mean"] - c_test,
            chung_inside_ci=inside,
        ))
    cols = ["task", "setting", "variant", "cell", "chung_cell", "form", "n_seeds", "train", "chung_train", "train_diff",
            "test", "test_ci_low", "test_ci_high", "chung_test", "test_diff", "chung_inside_ci"]
    return pd.DataFrame(rows, columns=cols)


# --- byte-stable output ----------------------------------------------------------------------------


def fmt(value: Any, spec: str = ".4g") -> str:
    """One value as text: '' for missing, ints as ints, floats with `spec`, booleans yes/no."""
    if value is None or value is pd.NA:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            return "" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return format(float(value), spec)
    return str(value)


def pm(mean: float, half: float, spec: str = ".4f") -> str:
    """'mean ± half' ('mean' alone when the half-width is undefined)."""
    if not math.isfinite(mean):
        return ""
    return f"{mean:{spec}} ± {half:{spec}}" if math.isfinite(half) else f"{mean:{spec}}"


def markdown_table(frame: pd.DataFrame, formats: dict[str, str | Callable[[Any], str]] | None = None,
                   default: str = ".4g") -> str:
    """A GitHub Markdown table, formatted cell by cell (no dependency on `tabulate`, byte-stable)."""
    formats = formats or {}

    def cell(col: str, v: Any) -> str:
        f = formats.get(col, default)
        text = f(v) if callable(f) else fmt(v, f)
        return text.replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(cell(c, v) for c, v in zip(frame.columns, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def write_csv(frame: pd.DataFrame, path: str | Path, float_format: str = "%.6g") -> Path:
    """CSV with fixed float formatting and '\\n' line ends (byte-stable for equal input)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # .gz: gzip without a time in its header, so equal frames still give equal bytes
    compression = {"method": "gzip", "mtime": 0} if path.suffix == ".gz" else None
    frame.to_csv(path, index=False, float_format=float_format, lineterminator="\n", compression=compression)
    return path


# --- the display forms used in REPORT.md -----------------------------------------------------------


def summary_display(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary as REPORT.md shows it: strings, one row per cell."""
    out = pd.DataFrame({
        "cell": summary["cell"],
        "variant": summary["variant"],
        "H": summary["hidden_size"].map(lambda v: fmt(v, ".0f")),
        "params rec / total": [f"{fmt(a, ',.0f')} / {fmt(b, ',.0f')}" + ("" if pd.isna(f) else f" (+{fmt(f, ',.0f')} frozen)")
                               for a, b, f in zip(summary["n_params_recurrent"], summary["n_params_total"],
                                                  summary.get("n_params_frozen", pd.Series(math.nan, index=summary.index)))],
        "chosen": summary["candidate"],
        "seeds (failed)": [f"{n} ({f})" for n, f in zip(summary["n_seeds"], summary["n_failed"])],
        "not learned": [f"{k}/{n} {NOT_LEARNED_MARK}" if k else f"0/{n}"
                        for k, n in zip(summary.get("n_not_learned", [0] * len(summary)), summary["n_seeds"])],
        "test mean ± 95% CI": [pm(m, h) + (f" {NOT_LEARNED_MARK}" if k else "") for m, h, k in
                               zip(summary["test_mean"], summary["test_ci_half"],
                                   summary.get("n_not_learned", [0] * len(summary)))],
        **{f"test {m} ± 95% CI": [pm(a, b) for a, b in zip(summary[f"test_{m}_mean"], summary[f"test_{m}_ci_half"])]
           for m in SECONDARY_METRICS if f"test_{m}_mean" in summary},
        "train": summary["train_mean"].map(lambda v: fmt(v, ".4f")),
        "epochs to best": summary["epochs_to_best"].map(lambda v: fmt(v, ".1f")),
        "s to best": summary["seconds_to_best"].map(lambda v: fmt(v, ".1f")),
        "s / epoch": summary["seconds_per_epoch"].map(lambda v: fmt(v, ".2f")),
        "steps / s": summary["time_steps_per_second"].map(lambda v: fmt(v, ",.0f")),
    })
    for col in sorted(c for c in summary.columns if c.startswith("ref_")):
        name = col[4:]
        if summary[col].isna().all():  # another task's reference (the summary holds every task's)
            continue
        out[f"{name} (beats?)"] = [
            f"{fmt(r, '.4f')} ({fmt(b)})" for r, b in zip(summary[col], summary.get(f"beats_{name}", [pd.NA] * len(summary)))
        ]
    if "solved" in summary:
        out["solved"] = [
            "" if pd.isna(s) else f"{int(s)}/{n}" for s, n in zip(summary["solved"], summary["n_seeds"])
        ]
        if (out["solved"] == "").all():
            out = out.drop(columns="solved")
    if (out["variant"] == "").all():
        out = out.drop(columns="variant")
    out = out.drop(columns=[c for c in out.columns if c.startswith("test ") and c != "test mean ± 95% CI" and (out[c] == "").all()])
    if not summary.get("n_not_learned", pd.Series(0, index=summary.index)).fillna(0).astype(bool).any():
        out = out.drop(columns="not learned")
    return out


NOT_LEARNED_MARK = "⚠"
"""Beside a mean that includes seeds that learned nothing (learning_verdict)."""


PAIRWISE_FORMATS: dict[str, str] = {
    "mean_a": ".4f", "mean_b": ".4f", "diff": ".4f", "welch_t": ".3f", "welch_p": ".3g", "welch_p_holm": ".3g",
    "mwu_u": ".1f", "mwu_p": ".3g", "mwu_p_holm": ".3g", "cohens_d": ".3f", "hedges_g": ".3f", "rank_biserial": ".3f",
}
CHUNG_FORMATS: dict[str, str] = {
    "train": ".3f", "chung_train": ".2f", "train_diff": "+.3f", "test": ".3f", "test_ci_low": ".3f",
    "test_ci_high": ".3f", "chung_test": ".2f", "test_diff": "+.3f",
}


# --- a halving sweep's learning-rate search ----------------------------------------------------------
def split_search(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the runs the analysis compares, the search stage's runs) for halving sweeps (tag `stage`).

    The comparison keeps every run not of a search stage, and the search run of each (sweep, task
    setting, cell) at the chosen sample (its final stage's rate: the search seed's complete run);
    the other samples' runs are the search, shown by `search_table`."""
    if "stage" not in runs or not runs["stage"].eq("search").any():
        return runs, runs.iloc[0:0]
    key = ["sweep", "setting", "variant", "cell"]
    final = runs[runs["stage"] == "final"]
    chosen = set(map(tuple, final[key + ["candidate"]].astype(str).to_numpy()))
    is_search = runs["stage"].eq("search").to_numpy()
    at_choice = [tuple(r) in chosen for r in runs[key + ["candidate"]].astype(str).to_numpy()]
    keep = ~is_search | pd.Series(at_choice, index=runs.index).to_numpy()
    return runs[keep], runs[is_search]


def search_table(search: pd.DataFrame, analysed: pd.DataFrame) -> pd.DataFrame:
    """One row per search run: where it stopped (epochs trained, pruned or not), its best validation
    score, and whether it is the chosen sample (the one the seeds were trained at)."""
    cols = ["sweep", "setting", "cell", "sample", "train.lr", "epochs", "best_val", "stopped_by", "chosen"]
    if search.empty:
        return pd.DataFrame(columns=cols)
    chosen_ids = set(analysed["run_id"])
    out = search.assign(chosen=search["run_id"].isin(chosen_ids),
                        sample=pd.to_numeric(search["sample"], errors="coerce").astype("Int64"))
    out = out[[c for c in cols if c in out]].copy()
    return out.sort_values(["sweep", "setting", "cell", "sample"], kind="mergesort").reset_index(drop=True)


def search_markdown(table: pd.DataFrame) -> list[str]:
    """Per task setting: a row per cell, a column per sample (its rate), each cell of the table the
    epochs that sample trained, `cut` where successive halving stopped it, `chosen` for the pick."""
    lines: list[str] = []
    for (sweep, setting), part in table.groupby(["sweep", "setting"], sort=True):
        samples = part.drop_duplicates("sample").sort_values(["train.lr", "sample"], kind="mergesort")
        head = ["cell", *[f"lr {lr:.3g}" for lr in samples["train.lr"]]]
        lines += [f"**{setting}** ({sweep}): epochs trained per learning-rate sample; cut: stopped at a rung; "
                  "chosen: the best validation score among the samples never cut, trained with every seed.", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for cell, rows in part.groupby("cell", sort=True):
            by_sample = {int(r["sample"]): r for _, r in rows.iterrows()}
            cells = []
            for s in samples["sample"]:
                r = by_sample.get(int(s))
                if r is None:
                    cells.append("")
                    continue
                mark = " chosen" if r["chosen"] else " cut" if r.get("stopped_by") == "pruned" else ""
                cells.append(f"{int(r['epochs'])} ({r['best_val']:.3f}){mark}")
            lines.append("| " + " | ".join([cell, *cells]) + " |")
        lines.append("")
    return lines
