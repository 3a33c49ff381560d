"""Figures (seaborn on matplotlib's Agg backend), each written as PNG and SVG, byte-identical across runs.

Byte stability: a fixed `svg.hashsalt`, no date or software stamp in the files, bootstrap bands
with a fixed seed (seaborn `seed=0`), and every input sorted before plotting.

  * learning curves, as Chung et al. 2014 Figs. 2-3: validation metric against updates (mean and 95%
    bootstrap band over seeds) and against wall-clock seconds (one line per seed), chosen lr per cell;
  * test metric per cell and task setting, with the tables' t-intervals and each seed as a dot;
  * gradient flow ‖∂L_T/∂h_t‖ / ‖∂L_T/∂h_T‖ against the distance T - t, log scale (median and
    min-max band over seeds), at each probe tag (e.g. init, trained);
  * copy/adding: fraction of seeds solved against sequence length.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

SEED = 0
N_BOOT = 500
RC: dict[str, Any] = {
    "svg.hashsalt": "rnnbench",
    "svg.fonttype": "path",
    "figure.dpi": 100,
    "savefig.dpi": 120,
    "font.family": "DejaVu Sans",
    "axes.titlesize": "medium",
}


def slug(text: str) -> str:
    """A file-name-safe form of a label."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "all"


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, out_dir: Path, name: str) -> list[Path]:
    """Write `name`.png and `name`.svg without timestamps; close the figure."""
    plt = _plt()
    out_dir.mkdir(parents=True, exist_ok=True)
    png, svg = out_dir / f"{name}.png", out_dir / f"{name}.svg"
    fig.savefig(png, metadata={"Software": None}, bbox_inches="tight")
    fig.savefig(svg, metadata={"Date": None, "Creator": None}, bbox_inches="tight")
    plt.close(fig)
    return [png, svg]


@contextlib.contextmanager
def _context() -> Iterator[None]:
    """seaborn's theme plus RC, restored on exit (the caller's matplotlib state is left as it was)."""
    import seaborn as sns

    _plt()
    import matplotlib

    with matplotlib.rc_context():
        sns.set_theme(style="whitegrid", context="paper")
        matplotlib.rcParams.update(RC)
        yield


def _groups(runs: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    out = []
    for (setting, variant), g in runs.groupby(["setting", "variant"], sort=True, dropna=False):
        out.append((str(setting), str(variant), g))
    return out


def _title(setting: str, variant: str) -> str:
    return f"{setting} [{variant}]" if variant else setting


def _palette(cells: list[str]) -> dict[str, Any]:
    import seaborn as sns

    colours = sns.color_palette("colorblind", n_colors=max(len(cells), 1))
    return {c: colours[i] for i, c in enumerate(sorted(cells))}


def _maybe_log(ax: Any, values: pd.Series) -> None:
    v = values[np.isfinite(values) & (values > 0)]
    if len(v) and v.max() / v.min() > 100:
        ax.set_yscale("log")


def learning_curves(chosen: pd.DataFrame, histories: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Per task setting x variant: val metric vs updates (mean, 95% bootstrap band) and vs wall-clock seconds,
    as Chung et al. 2014 Figs. 2-3; against epochs instead where runs predate the `updates` record."""
    import seaborn as sns

    from rnnbench.analysis.runs import wide_histories

    files: list[Path] = []
    if histories.empty or chosen.empty:
        return files
    wide = wide_histories(histories)
    fin = chosen[chosen["status"] == "FINISHED"]
    with _context():
        plt = _plt()
        for setting, variant, g in _groups(fin):
            metric = str(g["metric"].iloc[0])
            key = f"val_{metric}"
            data = wide[wide["run_id"].isin(g["run_id"])].merge(g[["run_id", "cell", "seed"]], on="run_id")
            if key not in data or data[key].notna().sum() == 0:
                continue
            data = data.dropna(subset=[key]).sort_values(["cell", "seed", "epoch"], kind="mergesort")
            data = data.assign(epoch=data["epoch"] + 1)
            pal = _palette(list(data["cell"].unique()))
            fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
            x = "updates" if "updates" in data and data["updates"].notna().all() else "epoch"
            sns.lineplot(data=data, x=x, y=key, hue="cell", palette=pal, errorbar=("ci", 95),
                         n_boot=N_BOOT, seed=SEED, ax=axes[0])
            if "wall_seconds" in data:
                sns.lineplot(data=data, x="wall_seconds", y=key, hue="cell", palette=pal, units="seed",
                             estimator=None, alpha=0.7, legend=False, ax=axes[1])
            for col in sorted(c for c in g.columns if re.fullmatch(rf"final_val_{metric}_[A-Za-z0-9]+", c)):
                ref = g[col].astype(float).mean()
                if math.isfinite(ref):
                    for ax in axes:
                        ax.axhline(ref, color="0.4", ls="--", lw=0.8)
                    axes[1].annotate(col.rsplit("_", 1)[1], (1.0, ref), xycoords=("axes fraction", "data"),
                                     ha="right", va="bottom", fontsize=7, color="0.3")
            _maybe_log(axes[0], data[key])
            axes[0].set(xlabel="updates" if x == "updates" else "epoch", ylabel=f"validation {metric}", title=_title(setting, variant))
            axes[1].set(xlabel="wall-clock seconds", title="one line per seed")
            files += save(fig, out_dir, f"curves_{slug(setting)}" + (f"_{slug(variant)}" if variant else ""))
    return files


def test_metric_figure(summary: pd.DataFrame, chosen: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Test metric per cell, one panel per task setting x variant: mean, t-interval, seeds as dots."""
    import seaborn as sns

    if summary.empty:
        return []
    panels = list(summary[["setting", "variant"]].drop_duplicates().itertuples(index=False, name=None))  # table order
    fin = chosen[chosen["status"] == "FINISHED"]
    cols = min(len(panels), 4)
    rows = math.ceil(len(panels) / cols)
    with _context():
        plt = _plt()
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
        for ax, (setting, variant) in zip(axes.flat, panels):
            s = summary[(summary["setting"] == setting) & (summary["variant"] == variant)].sort_values("cell")
            metric = str(s["metric"].iloc[0])
            cells = list(s["cell"])
            pal = _palette(cells)
            pts = fin[(fin["setting"] == setting) & (fin["variant"] == variant)].sort_values(["cell", "seed"])
            if f"test_{metric}" not in pts or pts.empty:  # every run of this panel failed
                pts = pd.DataFrame({"cell": [], f"test_{metric}": []})
            else:
                sns.stripplot(data=pts, x="cell", y=f"test_{metric}", hue="cell", order=cells, palette=pal,
                              jitter=False, size=4, alpha=0.6, legend=False, ax=ax)
            half = s["test_ci_half"].fillna(0).to_numpy()
            ax.errorbar(np.arange(len(cells)) + 0.15, s["test_mean"], yerr=half, fmt="o", color="black",
                        capsize=3, ms=4)
            for col in sorted(c for c in s.columns if c.startswith("ref_")):
                ref = s[col].astype(float).mean()
                if math.isfinite(ref):
                    ax.axhline(ref, color="0.4", ls="--", lw=0.8)
                    ax.annotate(col[4:], (1.0, ref), xycoords=("axes fraction", "data"), ha="right",
                                va="bottom", fontsize=7, color="0.3")
            _maybe_log(ax, pd.concat([pts[f"test_{metric}"].astype(float), s["test_mean"]]))
            ax.set(xlabel="", ylabel=f"test {metric}", title=_title(setting, variant))
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        fig.tight_layout()
        return save(fig, out_dir, "test_metric")


def gradient_flow_figure(curves: pd.DataFrame, runs: pd.DataFrame, out_dir: Path) -> list[Path]:
    """‖∂L_T/∂h_t‖ relative to t = T against distance T - t, log y; median and min-max band over seeds."""
    import seaborn as sns

    if curves.empty or runs.empty:
        return []
    data = curves.merge(runs[["run_id", "setting", "variant", "cell", "seed"]], on="run_id")  # curves: run_id, probe, ...
    if data.empty:
        return []
    data = data.assign(relative=data["relative"].where(data["relative"] > 0))
    data = data.sort_values(["setting", "variant", "cell", "probe", "seed", "distance"], kind="mergesort")
    files: list[Path] = []
    with _context():
        plt = _plt()
        for setting, variant, g in _groups(data):
            pal = _palette(list(g["cell"].unique()))
            fig, ax = plt.subplots(figsize=(6, 3.8))
            sns.lineplot(data=g, x="distance", y="relative", hue="cell", style="probe", palette=pal,
                         estimator="median", errorbar=("pi", 100), ax=ax)
            ax.set_yscale("log")
            ax.axhline(1e-3, color="0.4", ls=":", lw=0.8)
            ax.set(xlabel="distance T - t (steps)", ylabel="‖∂L_T/∂h_t‖ / ‖∂L_T/∂h_T‖", title=_title(setting, variant))
            files += save(fig, out_dir, f"gradient_flow_{slug(setting)}" + (f"_{slug(variant)}" if variant else ""))
    return files


def success_figure(success: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Fraction of seeds solved against sequence length, one panel per task (copy, adding)."""
    import seaborn as sns

    if success.empty or success["seq_len"].nunique() < 1:
        return []
    tasks = sorted(success["task"].unique())
    with _context():
        plt = _plt()
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
        for ax, task in zip(axes.flat, tasks):
            g = success[success["task"] == task].sort_values(["cell", "seq_len"], kind="mergesort")
            sns.lineplot(data=g, x="seq_len", y="solved_fraction", hue="cell", palette=_palette(list(g["cell"].unique())),
                         marker="o", errorbar=None, ax=ax)
            ax.set(ylim=(-0.05, 1.05), xlabel="sequence length T", ylabel="fraction of seeds solved", title=task)
            if g["seq_len"].nunique() > 1 and g["seq_len"].max() / max(g["seq_len"].min(), 1) >= 8:
                ax.set_xscale("log")
        fig.tight_layout()
        return save(fig, out_dir, "success_vs_length")
