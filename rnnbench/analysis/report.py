"""`rnnbench report`: regenerate REPORT.md, tables, figures and CSV exports from an MLflow store.

Everything is computed from the runs; nothing is typed in by hand except Chung et al.'s published
numbers (tables.CHUNG2014_TABLE2). The output is byte-identical for the same store: no timestamps
or paths in any file, every table sorted, fixed float formats, fixed seeds for bootstrap bands.

Layout of the out directory:
  REPORT.md                      tables, figures and one computed paragraph of findings per task setting
  runs.csv                       every run: ids, tags, params, final metrics (no per-epoch curves);
                                 `repeat` marks reruns of one config and seed, left out of the analysis
  histories.csv.gz               per-epoch curves, long form: run_id, key, epoch, value
  gradient_flow.csv.gz, gates.csv  the gradient-flow probes' curves and gate statistics (when logged)
  tables/*.csv, tables/*.md      summary, pairwise, chung2014, candidates, gradient_flow
  figures/*.png, figures/*.svg
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from math import comb
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rnnbench.analysis import tables as T
from rnnbench.analysis.runs import load_artifact_csvs, load_histories, load_runs

ALPHA = 0.05
ID_COLUMNS = [
    "run_id", "experiment_id", "experiment", "sweep", "task", "setting", "variant", "cell", "candidate", "seed",
    "status", "point_id", "sample", "parent_run_id", "config_hash", "identity", "git_commit", "torch_version", "device",
    "failure_reason", "not_learned",
]
SUBSET_OPTIONS = ("task.max_sequences", "task.max_recordings", "task.max_samples", "task.max_seconds")
"""Task options that take a subset of a corpus: a comparison with published numbers says so."""
TOP_FILES = ("REPORT.md", "runs.csv", "histories.csv.gz", "gradient_flow.csv.gz", "gates.csv",
             "histories.csv", "gradient_flow.csv")  # (the last two: their earlier, uncompressed names)
GENERATED = {"tables": ("*.csv", "*.md"), "figures": ("*.png", "*.svg")}


def export_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """runs.csv: identity and tag columns, then params (sorted), then final metrics (sorted); stable rows."""
    ids = [c for c in ID_COLUMNS if c in runs]
    params = sorted(c for c in runs.columns if "." in c and c not in ids)
    metrics = sorted(c for c in runs.columns if c not in ids and c not in params and c not in ("start_time", "metric"))
    out = runs[ids + ["metric"] + params + metrics] if "metric" in runs else runs[ids + params + metrics]
    keys = [c for c in ("task", "setting", "variant", "cell", "train.lr", "seed", "run_id") if c in out]
    return out.sort_values(keys, kind="mergesort", na_position="last").reset_index(drop=True)


def _clean_out(out: Path) -> None:
    """Remove what an earlier report generated (only our own file names and kinds)."""
    for name in TOP_FILES:
        (out / name).unlink(missing_ok=True)
    for folder, patterns in GENERATED.items():
        d = out / folder
        if d.is_dir():
            for pattern in patterns:
                for f in d.glob(pattern):
                    f.unlink()


def success_frame(chosen: pd.DataFrame, rules: dict[str, T.SolvedRule]) -> pd.DataFrame:
    """Per task (with a solved rule) x protocol x variant x cell x sequence length: fraction of seeds solved.

    The protocol labels the task's options other than the length that vary between its runs (e.g.
    copy on 2,000 or on 20,000 training sequences): runs of different protocols are never pooled."""
    cols = ["task", "protocol", "variant", "cell", "seq_len", "n_seeds", "solved", "solved_fraction"]
    fin = chosen[(chosen["status"] == "FINISHED") & chosen["task"].isin(list(rules))]
    if fin.empty or "task.seq_len" not in fin:
        return pd.DataFrame(columns=cols)
    rows = []
    for task, part in fin.groupby("task", sort=True):
        options = [c for c in sorted(part.columns) if c.startswith("task.") and c not in ("task.name", "task.seq_len")
                   and part[c].astype("str").nunique(dropna=False) > 1]
        protocol = part.apply(lambda r: ", ".join(f"{c.split('.', 1)[1]}={T.label_value(r[c])}" for c in options), axis=1)
        part = part.assign(protocol=protocol if options else "")
        for (proto, variant, cell, seq_len), g in part.groupby(["protocol", "variant", "cell", "task.seq_len"], sort=True):
            solved = int(rules[task].solved(g).sum())
            label = f"{cell} [{variant}]" if variant else cell
            rows.append(dict(task=task, protocol=proto, variant=variant, cell=label, seq_len=int(seq_len), n_seeds=len(g),
                             solved=solved, solved_fraction=solved / len(g)))
    return pd.DataFrame(rows)


def gradient_flow_table(chosen: pd.DataFrame) -> pd.DataFrame:
    """Per task setting x variant x cell x probe tag: the logged gradflow_<tag>_* metrics over seeds."""
    fin = chosen[chosen["status"] == "FINISHED"]
    tags = sorted({m.group(1) for c in fin.columns if (m := re.fullmatch(r"gradflow_(.+)_vanish_distance", c))})
    rows = []
    for tag in tags:
        for key, g in fin.groupby(T.GROUP, sort=True, dropna=False):
            d = g[f"gradflow_{tag}_vanish_distance"].astype(float)
            steps = g.get(f"gradflow_{tag}_steps", pd.Series(np.nan, index=g.index)).astype(float)
            if steps.notna().sum() == 0:
                continue
            row: dict[str, Any] = dict(zip(T.GROUP, key))
            row.update(
                probe=tag, n_seeds=int(steps.notna().sum()), steps=float(steps.mean()),
                vanished=int(d.notna().sum()),
                vanish_distance_mean=float(d.mean()) if d.notna().any() else math.nan,
                log10_first_over_last=float(g[f"gradflow_{tag}_log10_first_over_last"].astype(float).mean()),
            )
            for col in sorted(c for c in g.columns if c.startswith(f"gradflow_{tag}_sat_")):
                row[f"sat_{col.rsplit('_sat_', 1)[1]}"] = float(g[col].astype(float).mean())
            rows.append(row)
    return T.ordered(pd.DataFrame(rows), ["probe", "task", "setting", "variant", "cell"])


# --- findings, computed from the tables ------------------------------------------------------------


def _min_mwu_p(na: int, nb: int) -> float:
    """Smallest two-sided exact Mann-Whitney p attainable with na and nb values (no ties)."""
    return min(1.0, 2 / comb(na + nb, na)) if na and nb else math.nan


def _pair(pairs: pd.DataFrame, a: str, b: str) -> tuple[pd.Series | None, float]:
    """The pairwise row of cells a and b, and the sign that makes its differences read a - b."""
    hit = pairs[(pairs["cell_a"] == a) & (pairs["cell_b"] == b)]
    if len(hit):
        return hit.iloc[0], 1.0
    hit = pairs[(pairs["cell_a"] == b) & (pairs["cell_b"] == a)]
    return (hit.iloc[0], -1.0) if len(hit) else (None, 1.0)


def _is_false(value: Any) -> bool:
    return value is not None and value is not pd.NA and not pd.isna(value) and not bool(value)


def findings(summary: pd.DataFrame, pairs: pd.DataFrame, chung: pd.DataFrame, candidates: pd.DataFrame,
             tuned: Sequence[str], qualifiers: dict[str, Any] | None = None) -> str:
    """One paragraph for one task setting x variant, every statement computed from the numbers.

    `qualifiers`: task options that make a comparison with Chung et al. unfair when set (e.g.
    `task.max_sequences`), with their values in these runs.
    """
    qualifiers = qualifiers or {}
    s = summary[summary["n_seeds"] > 0].sort_values(["test_mean", "cell"], kind="mergesort")
    if s.empty:
        return "No finished runs: nothing to compare."
    metric = str(s["metric"].iloc[0])
    out = []
    ranking = " < ".join(
        f"{r.cell} {T.pm(r.test_mean, r.test_ci_half)} (n={r.n_seeds})" for r in s.itertuples()
    )
    out.append(f"Mean test {metric} at each cell's chosen learning rate, best first: {ranking}.")
    best = s.iloc[0]
    if len(s) > 1:
        parts, mwu_floor = [], []
        for other in s.iloc[1:].itertuples():
            row, sign = _pair(pairs, best["cell"], other.cell)
            if row is None:
                continue
            sig = [name for name, p in (("Welch", row["welch_p_holm"]), ("Mann-Whitney", row["mwu_p_holm"]))
                   if math.isfinite(p) and p < ALPHA]
            verdict = f"significant at {ALPHA:g} by {' and '.join(sig)}" if sig else "not significant with either test"
            parts.append(
                f"{best['cell']} vs {other.cell}: difference {sign * row['diff']:+.4g}, Holm-corrected p = "
                f"{T.fmt(row['welch_p_holm'], '.3g') or 'n/a'} (Welch) / {T.fmt(row['mwu_p_holm'], '.3g') or 'n/a'} "
                f"(Mann-Whitney), Hedges' g = {T.fmt(sign * row['hedges_g'], '+.2f') or 'n/a'}: {verdict}"
            )
            mwu_floor.append(_min_mwu_p(int(row["n_a"]), int(row["n_b"])))
        if parts:
            out.append("; ".join(parts) + ".")
        if mwu_floor and all(math.isfinite(p) and p >= ALPHA for p in mwu_floor):
            out.append(
                f"With these seed counts the smallest attainable two-sided Mann-Whitney p is {min(mwu_floor):.3g}, "
                f"so that test cannot reach {ALPHA:g} here; more seeds are needed for a rank-based verdict."
            )
    for col in sorted(c for c in s.columns if c.startswith("ref_")):
        name = col[4:]
        ref = s[col].astype(float)
        if ref.notna().sum() == 0:
            continue
        losers = [r["cell"] for _, r in s.iterrows() if _is_false(r.get(f"beats_{name}"))]
        value = float(ref.mean())
        if losers:
            out.append(f"Not better than the {name} reference ({value:.4g}): {', '.join(sorted(losers))}.")
        else:
            out.append(f"Every cell's mean is below the {name} reference ({value:.4g}).")
    if "n_not_learned" in s and s["n_not_learned"].fillna(0).gt(0).any():
        flagged = ", ".join(f"{r['cell']} {int(r['n_not_learned'])}/{int(r['n_seeds'])}"
                            for _, r in s.sort_values("cell").iterrows() if r["n_not_learned"] > 0)
        out.append(f"{T.NOT_LEARNED_MARK} Seeds that learned nothing (best validation {metric} not below the weakest "
                   f"reference; they are in the means above): {flagged}.")
    if "solved" in s and s["solved"].notna().any():
        rule = s["solved_rule"].dropna().iloc[0]
        solved = ", ".join(f"{r['cell']} {int(r['solved'])}/{int(r['n_seeds'])}" for _, r in s.sort_values("cell").iterrows())
        out.append(f"Seeds solved ({rule}): {solved}.")
    edges = []
    for name in tuned:
        if name not in candidates:
            continue
        for cell, c in candidates.groupby("cell", sort=True):
            values = pd.to_numeric(c[name], errors="coerce")
            if values.nunique() < 2 or not c["chosen"].any():
                continue
            chosen_value = float(pd.to_numeric(c.loc[c["chosen"], name], errors="coerce").iloc[0])
            if chosen_value in (values.min(), values.max()):
                edges.append(f"{cell} ({name.split('.')[-1]}={chosen_value:g})")
    if edges:
        out.append(f"Chosen value at the edge of the searched range, so the optimum may lie outside it: {', '.join(edges)}.")
    fastest = s.sort_values(["seconds_per_epoch", "cell"], kind="mergesort").iloc[0]
    if math.isfinite(fastest["seconds_per_epoch"]):
        out.append(
            f"Fastest per epoch: {fastest['cell']} ({fastest['seconds_per_epoch']:.3g} s/epoch, "
            f"{fastest['time_steps_per_second']:,.0f} time steps/s in training)."
        )
    if not chung.empty:
        ours_best = chung.sort_values(["test", "cell"], kind="mergesort").iloc[0]
        paper = T.CHUNG2014_TABLE2[str(chung["task"].iloc[0])]
        paper_best = min(paper, key=lambda k: paper[k][1])
        diffs = ", ".join(
            f"{r.cell} {r.test:.3f} vs {r.chung_test:.2f} ({r.test_diff:+.3f}"
            + ("; Chung inside our CI" if r.chung_inside_ci is True else "; Chung outside our CI" if r.chung_inside_ci is False else "")
            + ")"
            for r in chung.sort_values("cell").itertuples()
        )
        subset = [f"{c.split('.', 1)[1]}={v}" for c, v in sorted(qualifiers.items()) if v is not None and v == v]
        covered = {T.CHUNG_CELL[c][0] for c in chung["cell"]}
        if covered >= set(paper):
            agree = "agrees with" if T.CHUNG_CELL[ours_best["cell"]][0] == paper_best else "differs from"
            ranking = f"here best {ours_best['cell']}, which {agree} the paper"
        else:  # a corpus whose other cells have not run yet: no ranking to compare
            ranking = f"not compared here: only {', '.join(sorted(covered))} of its {', '.join(sorted(paper))} have run"
        out.append(
            f"Chung et al. 2014 Table 2 (test NLL, one run each): best {paper_best}; {ranking}. Ours vs Chung: {diffs}."
            + (f" Caution: these runs use {', '.join(subset)} (a subset of the corpus), not Chung's full data." if subset else "")
        )
        markov = s["ref_markov"].dropna() if "ref_markov" in s else pd.Series(dtype=float)
        paper_tests = [test for _, test in paper.values()]
        if len(markov) and float(markov.iloc[0]) < min(paper_tests):
            out.append(
                f"The per-key first-order Markov reference ({float(markov.iloc[0]):.3f}) is below every test number of "
                f"Chung et al.'s Table 2 for this corpus (best {min(paper_tests):.2f}): a chain that only carries each key "
                "on or off from the previous frame predicts this test set better than every model in the paper, so "
                "beating the paper here is not yet evidence of learned structure; compare with the reference."
            )
    return " ".join(out)


# --- the report ------------------------------------------------------------------------------------


def _constant_task_options(chosen: pd.DataFrame) -> str:
    cols = sorted(c for c in chosen.columns if c.startswith("task.") and c != "task.name")
    parts = []
    for c in cols:
        values = chosen[c].dropna().astype(str).unique()
        if len(values) == 1:
            parts.append(f"{c.split('.', 1)[1]}={values[0]}")
    return ", ".join(parts)


def _method(runs: pd.DataFrame, rules: dict[str, T.SolvedRule], tuned: Sequence[str]) -> list[str]:
    metric_by_task = ", ".join(f"{t}: {m}" for t, m in sorted(runs.groupby("task")["metric"].first().items()))
    lines = [
        "## Method",
        "",
        f"- Primary metric per task (minimised): {metric_by_task}. Music: Bernoulli NLL in nats summed over keys, "
        "averaged over every predicted time step of the split (Boulanger-Lewandowski et al. 2012 convention); "
        "how the first frame is treated is the task option `first_frame`, listed with each task below.",
        f"- Selection: per task setting x cell, each value of {', '.join(f'`{t}`' for t in tuned)} is a candidate; "
        "the chosen one has the fewest failed seeds, then the lowest mean best-checkpoint validation metric over seeds "
        "(Chung et al. chose the best of their learning-rate samples on validation, one run each). Test, train and "
        "timings are the chosen candidate's finished seeds, each re-scored at its best-validation checkpoint."
        + (" In a halving sweep (runs tagged `stage`) the candidates were searched by successive halving first "
           "(see 'Learning-rate search' below): only the chosen sample was trained with every seed, so it is the "
           "one candidate compared; the other samples' single-seed runs appear in the search table only."
           if "stage" in runs and runs["stage"].eq("final").any() else ""),
        "- Intervals: mean ± 95% Student t half-width over seeds, t(0.975, n-1) s / sqrt(n).",
        "- Pairwise tests on the test metric at each cell's chosen candidate: Welch's t-test (unequal variances) and "
        "two-sided Mann-Whitney U; p-values Holm-corrected within each task setting, separately per test. Effect "
        "sizes: Cohen's d (pooled SD), Hedges' g (d x (1 - 3/(4(n_a+n_b)-9))), rank-biserial r = 2U/(n_a n_b) - 1; "
        "positive means the first cell scores higher (worse).",
        "- References: any logged `test_<metric>_<name>` beside the metric (copy/adding memoryless baseline; music "
        "per-key marginal Bernoulli and first-order Markov chain fitted on the training split; speech Gaussian, "
        "linear predictor, and linear predictor with the residual std following the local loudness). A cell "
        "'beats' a reference when its mean test metric is below it.",
        f"- Not learned ({T.NOT_LEARNED_MARK}): a finished run whose best-checkpoint validation metric is not below "
        "the weakest reference logged beside it (the largest: memoryless baseline, marginal, Gaussian), i.e. no "
        "better than ignoring the inputs, e.g. a run that diverged to a finite loss. Such seeds stay in the means and "
        "tests, are counted in `not learned` and marked beside the mean, and are listed under 'Runs that learned "
        "nothing'.",
    ]
    if "n_params_frozen" in runs and runs["n_params_frozen"].notna().any():
        lines.append("- Parameters: `params rec / total` count trained parameters only (the recurrent layers; with the "
                     "output layer). Weights a cell never trains (an echo-state reservoir) are shown as `(+N frozen)` "
                     "and count in no budget: an equal budget compares trained parameters.")
    solved = [f"{task}: {rule.describe()}" for task, rule in sorted(rules.items()) if task in set(runs["task"])]
    if solved:
        lines.append(f"- Solved (per seed): {'; '.join(solved)}.")
    lines.append("")
    return lines


def build_report(
    out: str | Path = "results",
    sweeps: Sequence[str] | None = None,
    tracking_uri: str | None = None,
    experiments: Sequence[str] | None = None,
    tuned: Sequence[str] = ("train.lr",),
    spec_dir: str | Path = "experiments",
    figures: bool = True,
    exports: str | Path | None = None,
) -> Path:
    """Read the runs (from the store, or from the committed exports in the folder `exports`:
    rnnbench/analysis/exports.py), write every table, figure and export, and REPORT.md into `out`;
    return its path. The same runs give the same bytes from either source."""
    from rnnbench.analysis import costs as C
    from rnnbench.analysis import exports as X
    from rnnbench.analysis import importance as I
    from rnnbench.analysis import tuning_budget as TB
    from rnnbench.analysis import figures as F
    from rnnbench.analysis.runs import runs_frame
    from rnnbench.errors import RnnbenchError

    if exports is not None:
        exported = X.exported_runs(exports, sweeps)
        names = {r.info.experiment_id: r.info.experiment_name for r in exported}
        runs = runs_frame(exported, names)
        if experiments:
            runs = runs[runs["experiment"].isin(experiments) | runs["experiment_id"].isin(experiments)]

        def histories_of(ids: Any) -> pd.DataFrame:
            return X.exported_table(exports, "curves", list(ids), sweeps)

        def probes_of(ids: Any) -> pd.DataFrame:
            return X.exported_table(exports, "probes", list(ids), sweeps)
    else:
        runs = load_runs(tracking_uri, sweeps=sweeps, experiments=experiments)

        def histories_of(ids: Any) -> pd.DataFrame:
            return load_histories(ids, tracking_uri)

        def probes_of(ids: Any) -> pd.DataFrame:
            return load_artifact_csvs(ids, "gradient_flow", tracking_uri)
    if runs.empty:
        what = f"sweep(s) {', '.join(sweeps)}" if sweeps else ("the store" if exports is None else f"the exports in {exports}")
        raise RnnbenchError(f"no training runs found in {what}")
    tuned = tuple(tuned)
    rules = T.solved_rules_from_specs(spec_dir, sweeps)
    everything = T.annotate(runs, tuned)
    everything["not_learned"] = T.not_learned(everything)
    runs, repeats = T.drop_repeats(everything)
    costs = C.cost_table(runs)  # every run trained, the search included
    runs, search = T.split_search(runs)
    search_rows = T.search_table(search, runs)
    cut = C.cut_while_improving(runs)
    budget_curves = TB.tuning_budget_table(runs, search)
    importance = I.importance_table(runs, search, tuned)
    variants = T.variants_table(runs, tuned)
    architectures = T.architecture_table(runs, tuned)
    candidates = T.candidates_table(runs, tuned)
    chosen = T.chosen_runs(runs, tuned)
    summary = T.summary_table(runs, tuned, rules)
    pairs = T.pairwise_table(runs, tuned)
    chung = T.chung_table(summary)
    flow = gradient_flow_table(chosen)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _clean_out(out)
    finished = sorted(runs.loc[runs["status"] == "FINISHED", "run_id"])
    histories = histories_of(finished)
    T.write_csv(export_runs(everything.assign(repeat=everything["run_id"].isin(repeats["run_id"]))), out / "runs.csv",
                float_format="%.10g")
    T.write_csv(histories, out / "histories.csv.gz", float_format="%.8g")  # MBs as text
    artifacts = probes_of(chosen.loc[chosen["status"] == "FINISHED", "run_id"])
    curves = gates = pd.DataFrame()
    if not artifacts.empty:
        is_gates = artifacts["artifact"].str.endswith("_gates")
        probes = artifacts.rename(columns={"artifact": "probe"})
        curves = probes[~is_gates].dropna(axis=1, how="all")
        # tanh logs no gate file: with no gate rows, every column is all-NaN and dropna would drop `probe` too
        gates = probes[is_gates].dropna(axis=1, how="all") if is_gates.any() else pd.DataFrame()
        if not gates.empty:
            gates = gates.assign(probe=gates["probe"].str.replace(r"_gates$", "", regex=True))
        T.write_csv(curves.sort_values(["run_id", "probe", "t"], kind="mergesort"), out / "gradient_flow.csv.gz", "%.8g")  # MBs as text
        if not gates.empty:
            T.write_csv(gates.sort_values(["run_id", "probe", "layer", "gate"], kind="mergesort"), out / "gates.csv")

    tdir = out / "tables"
    for name, frame in (("summary", summary), ("pairwise", pairs), ("chung2014", chung), ("candidates", candidates),
                        ("gradient_flow", flow), ("search", search_rows), ("costs", costs), ("cut_while_improving", cut),
                        ("tuning_budget", budget_curves), ("importance", importance),
                        ("lstm_variants", variants), ("architectures", architectures)):
        T.write_csv(frame, tdir / f"{name}.csv")
        (tdir / f"{name}.md").write_text(T.markdown_table(frame, {**T.PAIRWISE_FORMATS, **T.CHUNG_FORMATS}), newline="\n")

    figs: dict[str, list[Path]] = {}
    success = success_frame(chosen, rules)
    if figures:
        fdir = out / "figures"
        figs["curves"] = F.learning_curves(chosen, histories, fdir)
        figs["test"] = F.test_metric_figure(summary, chosen, fdir)
        if not curves.empty:
            figs["flow"] = F.gradient_flow_figure(curves, chosen, fdir)
        figs["success"] = F.success_figure(success, fdir)
        figs["tuning"] = F.tuning_budget_figure(budget_curves, fdir)
        figs["architectures"] = F.architecture_figure(architectures, chosen, fdir)

    # halving sweeps in progress: cells searched in a setting whose seeds have not landed yet
    compared = set(map(tuple, summary[["setting", "variant", "cell"]].astype(str).to_numpy())) if len(summary) else set()
    pending: dict[tuple[str, str], list[str]] = {}
    for r in search_rows[["setting", "cell"]].drop_duplicates().itertuples() if not search_rows.empty else []:
        if (str(r.setting), "", str(r.cell)) not in compared:
            pending.setdefault((str(r.setting), ""), []).append(str(r.cell))
    report = _render(runs, summary, pairs, chung, candidates, flow, success, rules, tuned, figs, out, sweeps, repeats,
                     pending)
    report += _extra_sections(search_rows, costs, cut, budget_curves, figs.get("tuning", []), out, importance, variants,
                              architectures, figs.get("architectures", []))
    if (out / "DISCUSSION.md").is_file():  # hand-written reading of these numbers; never generated
        report += ("\n## Discussion\n\nWhy our numbers differ from Chung et al. 2014, and what they do not show: "
                   "[DISCUSSION.md](DISCUSSION.md) (written by hand about the runs exported here).\n")
    path = out / "REPORT.md"
    path.write_text(report, newline="\n")
    return path


def _img(paths: list[Path], out: Path, stem: str) -> str:
    for p in paths:
        if p.suffix == ".png" and p.stem == stem:
            return f"![{stem}]({p.relative_to(out).as_posix()})"
    return ""


def _render(runs: pd.DataFrame, summary: pd.DataFrame, pairs: pd.DataFrame, chung: pd.DataFrame,
            candidates: pd.DataFrame, flow: pd.DataFrame, success: pd.DataFrame, rules: dict[str, T.SolvedRule],
            tuned: Sequence[str], figs: dict[str, list[Path]], out: Path, sweeps: Sequence[str] | None,
            repeats: pd.DataFrame, pending: dict[tuple[str, str], list[str]] | None = None) -> str:
    from rnnbench.analysis.figures import slug

    pending = pending or {}

    status = runs["status"].value_counts().sort_index()
    def listing(col: str) -> str:
        return ", ".join(sorted(runs[col].dropna().astype(str).unique())) or "unknown"

    lines = [
        "# rnnbench report",
        "",
        "Regenerated by `rnnbench report` from the recorded runs (the committed exports under `runs/`, or an MLflow "
        "store: the same runs give the same bytes): every number and sentence below is computed from them "
        "(exports of this report: `runs.csv`, `histories.csv.gz`; tables under `tables/`).",
        "",
        f"- Sweeps: {', '.join(sorted(sweeps)) if sweeps else listing('sweep') if runs['sweep'].notna().any() else 'all runs'}",
        f"- Experiments: {listing('experiment')}",
        f"- Runs: {len(runs)} ({', '.join(f'{k} {v}' for k, v in status.items())})",
        f"- Code: git {listing('git_commit')}; torch {listing('torch_version')}; devices: {listing('device')}",
    ]
    if len(repeats):
        lines.append(f"- Left out as repeats of the same config and seed (the newest finished run kept): "
                     f"{len(repeats)} run(s): {', '.join(sorted(repeats['run_id']))}")
    lines.append("")
    lines += _method(runs, rules, tuned)
    all_figs = [p for ps in figs.values() for p in ps]
    sections = summary[["task", "setting", "variant"]].drop_duplicates()  # summary is already in natural order
    for task, setting, variant in sections.itertuples(index=False):
        s = summary[(summary["setting"] == setting) & (summary["variant"] == variant)]
        title = f"{setting} [{variant}]" if variant else setting
        sel = (runs["setting"] == setting) & (runs["variant"] == variant)
        lines += [f"## {title}", ""]
        options = _constant_task_options(runs[sel])
        if options:
            lines += [f"Task options: {options}.", ""]
        lines += [T.markdown_table(T.summary_display(s.sort_values("cell")), default=""), ""]
        p = pairs[(pairs["setting"] == setting) & (pairs["variant"] == variant)]
        c = chung[(chung["setting"] == setting) & (chung["variant"] == variant)]
        cand = candidates[(candidates["setting"] == setting) & (candidates["variant"] == variant)]
        qual = {k: runs.loc[sel, k].dropna().iloc[0] for k in SUBSET_OPTIONS if k in runs and runs.loc[sel, k].notna().any()}
        waiting = pending.get((setting, variant), [])
        lines += ["**Findings.** " + findings(s, p, c, cand, tuned, qual)
                  + (f" Not compared yet: {', '.join(sorted(waiting))} (searched; their seeds have not run), so the "
                     "ranking above covers only the cells listed in the table." if waiting else ""), ""]
        stem = f"curves_{slug(setting)}" + (f"_{slug(variant)}" if variant else "")
        img = _img(all_figs, out, stem)
        if img:
            lines += [img, ""]
    if figs.get("test"):
        lines += ["## Test metric per cell", "", _img(figs["test"], out, "test_metric"), ""]
    if not success.empty and figs.get("success"):
        lines += ["## Copy and adding: success against sequence length", "",
                  T.markdown_table(success[["task", "protocol", "cell", "seq_len", "n_seeds", "solved"]] if success["protocol"].astype(bool).any() else success[["task", "cell", "seq_len", "n_seeds", "solved"]]), "",
                  _img(figs["success"], out, "success_vs_length"), ""]
    if not pairs.empty:
        shown = pairs.drop(columns=["task"]).copy()
        if (shown["variant"] == "").all():
            shown = shown.drop(columns=["variant"])
        lines += ["## Pairwise comparisons (test metric, chosen learning rates)", "",
                  T.markdown_table(shown, T.PAIRWISE_FORMATS), ""]
    lines += ["## Chung et al. 2014, Table 2, side by side", "", f"Source: {T.CHUNG2014_CITATION}. Chung et al. report "
              "one run per cell (no seeds, no intervals), sizes of Table 1 (≈20K recurrent parameters on music). "
              "Their LSTM has peepholes and their GRU applies the reset before the recurrent product; the `form` "
              "column says where our cell differs. Their Ubisoft speech sets are private, so the speech task here "
              "(a different corpus and scale) is not compared.", ""]
    if chung.empty:
        lines += ["No music runs in this report: nothing to compare.", ""]
    else:
        shown = chung.drop(columns=["task"])
        if (shown["variant"] == "").all():
            shown = shown.drop(columns=["variant"])
        lines += [T.markdown_table(shown, T.CHUNG_FORMATS), ""]
        differ = chung[chung["chung_inside_ci"] == False]  # noqa: E712 - pandas element-wise
        if len(differ):
            lines += ["Where Chung's test value lies outside our 95% interval: " + "; ".join(
                f"{r.setting} {r.cell}: {r.test:.3f} vs {r.chung_test:.2f} ({r.test_diff:+.3f})"
                for r in differ.itertuples()) + ".", ""]
    if not flow.empty:
        lines += ["## Gradient flow", "", "‖∂L_T/∂h_t‖ with the loss at the last step only (Pascanu et al. 2013), "
                  "probed per step through the true recurrent path; `vanish_distance_mean` is the mean over seeds "
                  "(that vanished) of the distance T - t at which the norm falls below 1e-3 of its value at t = T, "
                  "`vanished` how many seeds got there within the sequence; `sat_<gate>` the fraction of gate "
                  "activations below 0.1 or above 0.9 (Karpathy et al. 2015).", ""]
        shown = flow.drop(columns=["task"])
        if (shown["variant"] == "").all():
            shown = shown.drop(columns=["variant"])
        lines += [T.markdown_table(shown, {"steps": ".0f", "vanish_distance_mean": ".1f",
                                           "log10_first_over_last": ".2f"}, default=".3f"), ""]
        for p in figs.get("flow", []):
            if p.suffix == ".png":
                lines += [f"![{p.stem}]({p.relative_to(out).as_posix()})", ""]
    if len(candidates):
        shown = candidates.drop(columns=["task"])
        if (shown["variant"] == "").all():
            shown = shown.drop(columns=["variant"])
        lines += ["## All candidates (validation, mean over finished seeds)", "",
                  T.markdown_table(shown, {"val_mean": ".4f"}), ""]
    flagged = runs[runs["not_learned"].notna()] if "not_learned" in runs else runs.iloc[0:0]
    if len(flagged):
        cols = ["run_id", "setting", "variant", "cell", "candidate", "seed", "not_learned"]
        shown = flagged[cols] if (flagged["variant"] != "").any() else flagged[cols].drop(columns="variant")
        lines += [f"## Runs that learned nothing ({T.NOT_LEARNED_MARK})", "", T.markdown_table(shown), ""]
    failed = runs[runs["status"] != "FINISHED"]
    if len(failed):
        cols = ["run_id", "setting", "cell", "candidate", "seed", "status", "failure_reason"]
        lines += ["## Runs that did not finish", "", T.markdown_table(failed[cols]), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def architecture_section(table: pd.DataFrame, figs: list[Path], out: Path) -> list[str]:
    """'Stacked and bidirectional models': per setting, each cell's architectures against its one-layer
    unidirectional runs (T.architecture_table), the verdicts in words, and the figure."""
    lines = ["", "## Stacked and bidirectional models", "",
             "Each cell with 2 layers, both directions, or both, against the same cell with one unidirectional "
             "layer, at one recurrent-parameter budget (the hidden size follows from each architecture's count), "
             "at each cell's chosen candidate (`tables/architectures.csv`). Mean ± 95% t-interval over seeds; "
             "`diff` is the test metric's difference from the one-layer unidirectional mean (positive: worse); "
             "p-values Holm-corrected over all the contrasts of a setting, every cell's together.", ""]
    for setting, part in table.groupby("setting", sort=False):
        metric = str(part["metric"].iloc[0])
        secondary = T.architecture_metrics(part)
        shown = pd.DataFrame({
            "cell": part["cell"], "layers": part["num_layers"], "bidirectional": part["bidirectional"].map(T.label_value),
            "seeds": part["n"],
            f"test {metric} ± 95% CI": [T.pm(m, h) for m, h in zip(part["mean"], part["ci_half"])],
            **{f"test {m} ± 95% CI": [T.pm(a, b) for a, b in zip(part[f"{m}_mean"], part[f"{m}_ci_half"])] for m in secondary},
            "diff": part["diff"], "welch_p_holm": part["welch_p_holm"], "mwu_p_holm": part["mwu_p_holm"],
            "hedges_g": part["hedges_g"]})
        lines += [f"### {setting}", "", T.markdown_table(shown, {"diff": "+.4f", "welch_p_holm": ".3g", "mwu_p_holm": ".3g",
                                                                 "hedges_g": ".2f"})]
        found = part[part["welch_p_holm"].astype(float) < 0.05]
        verdicts = [f"{r.cell} with {r.num_layers} layer{'s' if r.num_layers > 1 else ''}"
                    f"{', bidirectional' if r.bidirectional else ''} is {'worse' if r.diff > 0 else 'better'} "
                    f"({r.diff:+.4f} {metric}, Holm-corrected Welch p = {r.welch_p_holm:.3g})" for r in found.itertuples()]
        n_contrasts = int(part["welch_p"].notna().sum())
        lines += ["**Findings.** " + (f"Of {n_contrasts} contrasts, {len(found)} differ from the one-layer "
                                      f"unidirectional model at 0.05 (Welch, Holm): " + "; ".join(verdicts) + "."
                                      if verdicts else f"None of the {n_contrasts} contrasts differs from the one-layer "
                                      "unidirectional model at 0.05 (Welch, Holm)."), ""]
    lines += [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in figs if p.suffix == ".png"]
    return lines


def _extra_sections(search: pd.DataFrame, costs: pd.DataFrame, cut: pd.DataFrame, budget_curves: pd.DataFrame,
                    tuning_figs: list[Path], out: Path, importance: pd.DataFrame, variants: pd.DataFrame,
                    architectures: pd.DataFrame, architecture_figs: list[Path]) -> str:
    """The LSTM variants, stacked and bidirectional models, the tuning-budget curves, hyperparameter
    importance, the search's trajectory, the runs cut while improving, the cost of each part."""
    from rnnbench.analysis import tuning_budget as TB

    lines: list[str] = []
    if not variants.empty:
        lines += ["", "## LSTM variants against the vanilla LSTM (Greff et al. 2015, Fig. 3)", "",
                  f"Each variant's test metric against the peephole LSTM's (`{T.VANILLA}`), at each cell's chosen "
                  "candidate; p-values Holm-corrected over the variants of a setting. Positive `diff`: the variant "
                  "is worse.", "",
                  T.markdown_table(variants.drop(columns=["task"]).drop(columns=["variant"] if (variants["variant"] == "").all() else []),
                                   {**T.PAIRWISE_FORMATS, "mean": ".4f", "vanilla_mean": ".4f", "hedges_g": ".2f"})]
    if not architectures.empty:
        lines += architecture_section(architectures, architecture_figs, out)
    if not budget_curves.empty:
        lines += ["", "## Tuning budget: the expected best of n learning-rate samples", "",
                  "Per cell, the expected best validation score of n of its learning-rate samples (drawn without "
                  "replacement; Dodge et al. 2019 with the unbiased estimator of Tang et al. 2020) and the test score "
                  "of the sample picked (`tables/tuning_budget.csv`); in a halving sweep a sample that was cut counts with "
                  "the score it had when cut, as the search saw it. Where the curves cross, the verdict depends on "
                  "how much tuning each cell gets. " + " ".join(TB.leaders(budget_curves)), ""]
        lines += [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in tuning_figs if p.suffix == ".png"]
    if not importance.empty:
        single = importance.groupby([*T.GROUP])["param"].nunique().max() == 1
        lines += ["", "## Hyperparameter importance (functional ANOVA)", "",
                  "Share of the validation score's variance over the searched hyperparameters that each explains "
                  "(fANOVA, Optuna's FanovaImportanceEvaluator, seed 0; `tables/importance.csv`)."
                  + (" Only one hyperparameter was searched here, so it takes all of it: a search over more (e.g. "
                     "momentum, clipping, weight noise as `random.params`) is what would rank them." if single else ""), "",
                  T.markdown_table(importance.drop(columns=["task"]).drop(columns=["variant"] if (importance["variant"] == "").all() else []),
                                   {"importance": ".3f", "n_trials": ".0f"})]
    if not search.empty:
        lines += ["", "## Learning-rate search (successive halving)", "",
                  "Per task setting and cell the same learning-rate samples trained together at one seed; at each "
                  "rung the samples still training were ranked with those already stopped by their best validation "
                  "score, and all but the best third stopped (rnnbench/sweep/halving.py). The seeds were then "
                  "trained at the chosen sample.", ""]
        lines += T.search_markdown(search)
    if not cut.empty:
        lines += ["", "## Runs the epoch budget cut while they were still improving", "",
                  "Their best validation epoch is among their last 10% of epochs (or last 5): a longer budget "
                  "would likely have lowered their numbers.", "", T.markdown_table(cut, {"epochs": ".0f", "best_epoch": ".0f"})]
    if not costs.empty:
        total_core, total_serial = costs["core_hours"].sum(), costs["serial_hours"].sum()
        lines += ["", "## What each part cost", "",
                  "Per part, summed: `core_hours`, each run's recorded `core_seconds` (every epoch's seconds, "
                  "validation included, times the torch threads, split over the members that trained in it, plus "
                  "a share of its population's setup), or for runs recorded before that metric their population's "
                  "wall clock (its longest member plus setup) times its threads; `serial_hours`, the same without "
                  f"the threads: as if the populations ran one after another. In all: {total_serial:.2f} serial "
                  f"hours, {total_core:.2f} core-hours.", "", T.markdown_table(costs, {"serial_hours": ".2f", "core_hours": ".2f"})]
    return ("\n".join(lines).rstrip("\n") + "\n") if lines else ""

