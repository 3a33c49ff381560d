"""Figures (seaborn on matplotlib's Agg backend), each written as PNG and SVG, byte-identical across runs.

Byte stability: a fixed `svg.hashsalt`, no date or software stamp in the files, bootstrap bands
with a fixed seed (seaborn `seed=0`), and every input sorted before plotting.

  * learning curves, as Chung et al. 2014 Figs. 2-3: validation metric against updates (mean and 95%
    bootstrap band over seeds) and against wall-clock seconds (one line per seed), chosen lr per cell;
  * test metric per cell and task setting: each seed as a dot, the mean with a 95% percentile
    bootstrap interval over seeds (inside the seeds' range, so never below zero for a non-negative
    metric, unlike the tables' t-interval), one colour per cell across every panel, with a legend;
  * gradient flow ‖∂L_T/∂h_t‖ / ‖∂L_T/∂h_T‖ against the distance T - t, log scale (median and
    min-max band over seeds), at each probe tag (e.g. init, trained);
  * copy/adding: fraction of seeds solved against sequence length, one marker and line style per
    cell and a small vertical offset per cell so equal values do not hide each other.
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
    """One colour per cell, the same in every figure: by the cell's place among all registered cells."""
    import seaborn as sns

    from rnnbench.cells import CELLS

    # The study's five cells first (they share most figures), then the rest of the registry: a new
    # cell never takes the colour of one of the five.
    first = [c for c in STUDY_CELLS if c in CELLS or c in cells]
    known = first + sorted((set(CELLS) | set(cells)) - set(first))
    # seaborn's colorblind palette, reordered so that its two oranges (1 and 3) and two pinks (4 and 6)
    # are far apart, and grey comes before brown (close to orange); black for the seventh cell (in
    # today's registry the echo-state network, which shares figures with the five: sky blue there sat
    # next to gru's blue); then the dark variant, so that up to 21 cells get distinct colours.
    base = sns.color_palette("colorblind", n_colors=10)
    order = (0, 1, 2, 4, 7, 5, 8, 9, 3, 6)
    colours = [base[i] for i in order[:6]] + [(0.0, 0.0, 0.0)] + [base[i] for i in order[6:]]
    colours += [sns.color_palette("dark", n_colors=10)[i] for i in order]
    return {c: colours[known.index(c) % len(colours)] for c in sorted(cells)}


STUDY_CELLS = ("gru", "gru_reset_before", "lstm", "lstm_peephole", "tanh")


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
DASHES = ("-", "--", ":", "-.")
CURVE_TOP_OVER_REFERENCE = 1.5  # a linear learning-curve axis ends there when the first epochs reach above it
LINE_DASHES = ("", (5, 2), (1.5, 1.5), (6, 2, 1.5, 2), (3, 1), (8, 2, 1.5, 2, 1.5, 2))  # seaborn's (on, off, ...)


def bootstrap_interval(values: Any, confidence: float = 0.95, n_boot: int = N_BOOT, seed: int = SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (numpy, fixed seed): always inside [min, max] of the values."""
    a = np.asarray(values, dtype=float)
    a = a[np.isfinite(a)]
    if len(a) == 0:
        return math.nan, math.nan
    if len(a) == 1:
        return float(a[0]), float(a[0])
    rng = np.random.default_rng(seed)
    means = a[rng.integers(0, len(a), size=(n_boot, len(a)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


class SeabornBootstrap:
    """seaborn's errorbar=("ci", level) with n_boot=N_BOOT, seed=SEED, as a callable errorbar that
    gives its very numbers at a fraction of the cost. seaborn (0.13) seeds a new generator with SEED at
    every point of a curve and draws N_BOOT resamples of the point's n values, one call each, so every
    point with n values resamples with the same indices: drawn here once per n, in the same calls, and
    applied to all such points in one product. On the report's curves (tens of thousands of points)
    seaborn's loop took most of the report's time."""

    def __init__(self, level: float = 95.0, n_boot: int = N_BOOT, seed: int = SEED) -> None:
        self.level, self.n_boot, self.seed = level, n_boot, seed
        self.indices: dict[int, np.ndarray] = {}

    def __call__(self, values: Any) -> tuple[float, float]:
        v = np.asarray(values)
        n = len(v)
        if n not in self.indices:
            rng = np.random.default_rng(self.seed)
            self.indices[n] = np.stack([rng.integers(0, n, n, dtype=np.intp) for _ in range(int(self.n_boot))])
        mean = np.nanmean if np.isnan(np.sum(v)) else np.mean  # seaborn's choice of function
        boots = mean(v[self.indices[n]], axis=1)
        edge = (100 - self.level) / 2
        lo, hi = np.nanpercentile(boots, (edge, 100 - edge))
        return float(lo), float(hi)


def _log_fits(values: pd.Series, ratio: float) -> bool:
    """A log axis when the finite values span more than `ratio`; never when one is <= 0 (a density's
    NLL, e.g. speech, goes below zero, and a log axis would drop those points off its bottom)."""
    v = values[np.isfinite(values)]
    return bool(len(v)) and bool((v > 0).all()) and v.max() / v.min() > ratio


def _maybe_log(ax: Any, values: pd.Series) -> None:
    if _log_fits(values, 10):  # a spike or a solved task would flatten the rest on a linear axis
        ax.set_yscale("log")
        v = values[np.isfinite(values)]
        if v.max() / v.min() < 100:
            # Under two decades matplotlib labels every minor tick in 2 x 10^-1 style, and they crowd:
            # label 1, 2 and 5 of each decade as plain numbers instead, and leave the minor ticks bare.
            from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())


def learning_curves(chosen: pd.DataFrame, histories: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Per task setting x variant: val metric vs updates (mean, 95% bootstrap band; an X where each cell's
    runs ended) and vs wall-clock seconds, as Chung et al. 2014 Figs. 2-3; against epochs instead where
    runs predate the `updates` record."""
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
            fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))  # one y range below, each panel labelled
            x = "updates" if "updates" in data and data["updates"].notna().all() else "epoch"
            # a dash pattern per cell as well as a colour: cells stuck on the same plateau overlap
            dashes = {c: LINE_DASHES[i % len(LINE_DASHES)] for i, c in enumerate(sorted(pal))}
            sns.lineplot(data=data, x=x, y=key, hue="cell", palette=pal, style="cell", dashes=dashes, errorbar=SeabornBootstrap(95),
                         lw=1.3, ax=axes[0])
            if "wall_seconds" in data:
                sns.lineplot(data=data, x="wall_seconds", y=key, hue="cell", palette=pal, style="cell", dashes=dashes,
                             units="seed", estimator=None, alpha=0.7, lw=1.1, legend=False, ax=axes[1])
            # where each cell's runs ended (the last seed's last record): curves that stopped on a plateau
            # beside another cell's stay findable
            for cell, c in data.groupby("cell", sort=True):
                last = c[c[x] == c[x].max()]
                axes[0].plot([c[x].max()], [last[key].mean()], marker="X", ms=7, color=pal[cell], mec="white", mew=0.6,
                             ls="none", zorder=5)
            refs = []
            for col in sorted(c for c in g.columns if re.fullmatch(rf"final_val_{metric}_[A-Za-z0-9]+", c)):
                ref = g[col].astype(float).mean()
                if math.isfinite(ref):
                    refs.append(ref)
                    for ax in axes:
                        ax.axhline(ref, color="0.4", ls="--", lw=0.8)
                    axes[1].annotate(col.rsplit("_", 1)[1], (1.0, ref), xycoords=("axes fraction", "data"),
                                     ha="right", va="bottom", fontsize=7, color="0.3")
            _maybe_log(axes[0], data[key])
            axes[1].set_yscale(axes[0].get_yscale())
            lows, highs = zip(axes[0].get_ylim(), axes[1].get_ylim())
            top = max(highs) * (2.0 if axes[0].get_yscale() == "log" else 1.0)  # room above a plateau at the top
            cut = ""
            if axes[0].get_yscale() == "linear" and refs and top > CURVE_TOP_OVER_REFERENCE * max(refs):
                # the first epochs' values (e.g. 58 nats against references near 10) would flatten the rest
                top, cut = CURVE_TOP_OVER_REFERENCE * max(refs), f" (y cut at {CURVE_TOP_OVER_REFERENCE:g} x the highest reference)"
            for ax in axes:
                ax.set_ylim(min(lows), top)
            title = _title(setting, variant)
            axes[0].set(xlabel="updates" if x == "updates" else "epoch", ylabel=f"validation {metric}{cut}",
                        title="mean and 95% bootstrap band over seeds")
            axes[1].set(xlabel="wall-clock seconds (training)", ylabel=f"validation {metric}",
                        title="each seed against time")
            fig.suptitle(title, fontsize=11)  # once, above both: in each panel's title a long setting ran into the other's
            # one legend below both panels: inside a panel it hides the curves it names
            handles, labels = axes[0].get_legend_handles_labels()
            if axes[0].get_legend() is not None:
                axes[0].get_legend().remove()
            fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False, bbox_to_anchor=(0.5, -0.02))
            fig.subplots_adjust(bottom=0.24)
            files += save(fig, out_dir, f"curves_{slug(setting)}" + (f"_{slug(variant)}" if variant else ""))
    return files


def test_metric_figure(summary: pd.DataFrame, chosen: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Test metric per cell, one panel per task setting x variant: seeds as dots, the mean with a 95%
    bootstrap interval over seeds, the references as dashed lines; one legend of cell colours."""
    from matplotlib.lines import Line2D

    if summary.empty:
        return []
    panels = list(summary[["setting", "variant"]].drop_duplicates().itertuples(index=False, name=None))  # table order
    fin = chosen[chosen["status"] == "FINISHED"]
    pal = _palette(list(summary["cell"].astype(str).unique()))  # one colour per cell in every panel
    cols = min(len(panels), 4)
    rows = math.ceil(len(panels) / cols)
    with _context():
        plt = _plt()
        fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.3 * rows + 0.6), squeeze=False)
        for ax, (setting, variant) in zip(axes.flat, panels):
            s = summary[(summary["setting"] == setting) & (summary["variant"] == variant)].sort_values("cell")
            metric = str(s["metric"].iloc[0])
            col = f"test_{metric}"
            cells = [str(c) for c in s["cell"]]
            pts = fin[(fin["setting"] == setting) & (fin["variant"] == variant)].sort_values(["cell", "seed"])
            shown: list[float] = []
            for i, cell in enumerate(cells):
                values = pts.loc[pts["cell"] == cell, col].astype(float).to_numpy() if col in pts else np.array([])
                values = values[np.isfinite(values)]
                if len(values) == 0:  # every seed of this cell failed
                    continue
                ax.scatter(np.full(len(values), i - 0.12), values, s=14, color=pal[cell], alpha=0.7, lw=0, zorder=2)
                mean = float(values.mean())
                lo, hi = bootstrap_interval(values)
                ax.errorbar([i + 0.12], [mean], yerr=[[mean - lo], [hi - mean]], fmt="o", color=pal[cell],
                            mec="black", ecolor="black", capsize=3, ms=5, zorder=3)
                shown += [*values, lo, hi]
            for ref_col in sorted(c for c in s.columns if c.startswith("ref_")):
                ref = s[ref_col].astype(float).mean()
                if math.isfinite(ref):
                    ax.axhline(ref, color="0.4", ls="--", lw=0.8)
                    ax.annotate(ref_col[4:], (1.0, ref), xycoords=("axes fraction", "data"), ha="right",
                                va="bottom", fontsize=7, color="0.3")
            _maybe_log(ax, pd.Series(shown, dtype=float))
            crowded = len(cells) > 6  # e.g. JSB with Greff et al.'s variants: names upright would overlap
            ax.set_xticks(range(len(cells)), cells if crowded else [c.replace("_", "_\n") for c in cells],
                          rotation=90 if crowded else 0, fontsize=7)
            ax.set_xlim(-0.6, len(cells) - 0.4)
            ax.set(xlabel="", ylabel=f"test {metric}", title=_title(setting, variant))
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        handles = [Line2D([], [], ls="", marker="o", color=c, label=cell) for cell, c in pal.items()]
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, title=None,
                   bbox_to_anchor=(0.5, 0.0))
        fig.text(0.5, 1.0, "dots: seeds; marker and bar: mean and 95% percentile bootstrap interval over seeds; "
                 "dashed: references", ha="center", va="bottom", fontsize=8, color="0.3")
        fig.tight_layout(rect=(0, 0.06, 1, 0.98))
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
            ax.annotate("1e-3: vanished", (1.0, 1e-3), xycoords=("axes fraction", "data"), ha="right", va="bottom",
                        fontsize=7, color="0.3")
            ax.set(xlabel="distance T - t (steps)", ylabel="‖∂L_T/∂h_t‖ / ‖∂L_T/∂h_T‖",
                   title=f"{_title(setting, variant)}: median over seeds, band min to max")
            sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)  # off the curves
            files += save(fig, out_dir, f"gradient_flow_{slug(setting)}" + (f"_{slug(variant)}" if variant else ""))
    return files


def success_figure(success: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Fraction of seeds solved against sequence length, one panel per task and protocol (copy, adding).

    Cells with equal values would hide each other: each cell has its own marker and line style and
    is drawn a little above or below the true value (at most OFFSET; said on the figure); the x ticks
    are the sequence lengths run.
    """
    if success.empty or success["seq_len"].nunique() < 1:
        return []
    if "protocol" not in success:
        success = success.assign(protocol="")
    panels = sorted(set(map(tuple, success[["task", "protocol"]].astype(str).to_numpy())))
    cells = sorted(success["cell"].astype(str).unique())
    pal = _palette(cells)
    step = SUCCESS_OFFSET / max(len(cells) - 1, 1) * 2
    with _context():
        plt = _plt()
        fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.6), squeeze=False)
        for ax, (task, protocol) in zip(axes.flat, panels):
            g = success[(success["task"] == task) & (success["protocol"].astype(str) == protocol)]
            g = g.sort_values(["cell", "seq_len"], kind="mergesort")
            lengths = sorted(int(v) for v in g["seq_len"].unique())
            for i, cell in enumerate(cells):
                c = g[g["cell"] == cell]
                if c.empty:
                    continue
                offset = -SUCCESS_OFFSET + i * step if len(cells) > 1 else 0.0
                ax.plot(c["seq_len"], c["solved_fraction"] + offset, color=pal[cell], marker=MARKERS[i % len(MARKERS)],
                        ls=DASHES[i % len(DASHES)], ms=5, lw=1.3, label=cell)
            if len(lengths) > 1 and lengths[-1] / max(lengths[0], 1) >= 8:
                ax.set_xscale("log")
            ax.set_xticks(lengths, [str(v) for v in lengths])
            ax.xaxis.set_minor_locator(_null_locator())
            if len(lengths) == 1:
                ax.set_xlim(lengths[0] * 0.8, lengths[0] * 1.2)
            ax.set(ylim=(-0.08, 1.08), xlabel="sequence length T", ylabel="fraction of seeds solved",
                   title=f"{task} ({protocol})" if protocol else task)
            ax.legend(fontsize=7, title=None, loc="best")
        fig.text(0.5, 0.0, f"Lines are offset vertically by up to ±{SUCCESS_OFFSET:g} per cell so that equal values "
                 "stay visible.", ha="center", va="top", fontsize=7, color="0.3")
        fig.tight_layout()
        return save(fig, out_dir, "success_vs_length")


SUCCESS_OFFSET = 0.02
"""The largest vertical offset of a cell's line in success_vs_length (fraction of seeds)."""


def _null_locator() -> Any:
    from matplotlib.ticker import NullLocator

    return NullLocator()


def tuning_budget_figure(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Per task setting x variant: expected best validation score of n learning-rate samples, and the
    expected test score of the sample picked, against n (rnnbench/analysis/tuning_budget.py)."""
    files: list[Path] = []
    if table.empty:
        return files
    with _context():
        plt = _plt()
        for (setting, variant), g in table.groupby(["setting", "variant"], sort=True):
            cells = sorted(g["cell"].astype(str).unique())
            pal = _palette(cells)
            fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
            for i, cell in enumerate(cells):
                c = g[g["cell"] == cell].sort_values("n_samples")
                for ax, col in zip(axes, ("expected_val", "expected_test")):
                    ax.plot(c["n_samples"], c[col], color=pal[cell], marker=MARKERS[i % len(MARKERS)], ms=4, lw=1.3,
                            ls=DASHES[i % len(DASHES)], label=cell)
            top = int(g["of"].max())
            title = _title(setting, variant)
            for ax, col in zip(axes, ("expected_val", "expected_test")):
                if _log_fits(g[col], 1.5):  # n = 1 averages in the hopeless samples: log keeps the rest visible
                    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

                    ax.set_yscale("log")
                    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)))
                    ax.yaxis.set_major_formatter(ScalarFormatter())
                    ax.yaxis.set_minor_formatter(NullFormatter())
            for ax, what in zip(axes, ("validation", "test")):
                ax.set_xticks(range(1, top + 1))
                ax.set(xlabel="learning-rate samples tried (n)", ylabel=f"expected {what} score",
                       title=f"{title}: expected best {what}" if what == "validation" else f"{title}: test of the pick")
            axes[0].legend(fontsize=7, loc="best")
            fig.text(0.5, 0.0, "Expected value over the draws of n of the samples without replacement (Tang et al. 2020).",
                     ha="center", va="top", fontsize=7, color="0.3")
            fig.tight_layout()
            files += save(fig, out_dir, f"tuning_budget_{slug(setting)}" + (f"_{slug(variant)}" if variant else ""))
    return files


def architecture_figure(table: pd.DataFrame, chosen: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Stacked and bidirectional models (tables.architecture_table), one figure per task setting: a panel
    per test metric (the primary one and e.g. accuracy), the cells along x, each cell's architectures side
    by side in one colour each; seeds as dots, the mean with a 95% percentile bootstrap interval over seeds
    (inside the seeds' range, so an accuracy's stays within [0, 1]; the table gives the t-interval);
    references dashed."""
    from matplotlib.lines import Line2D

    from rnnbench.analysis.tables import architecture_metrics, reference_columns

    if table.empty:
        return []
    fin = chosen[chosen["status"] == "FINISHED"]
    paths: list[Path] = []
    for setting, part in table.groupby("setting", sort=True):
        metric = str(part["metric"].iloc[0])
        metrics = [metric] + architecture_metrics(part)
        archs = sorted(set(zip(part["num_layers"], part["bidirectional"])))
        names = {a: f"{a[0]} layer{'s' if a[0] > 1 else ''}, {'bidirectional' if a[1] else 'unidirectional'}" for a in archs}
        colours = dict(zip(archs, _arch_colours(len(archs))))
        cells = sorted(part["cell"].astype(str).unique())
        runs = fin[fin["setting"] == setting]
        width = 0.8 / len(archs)
        with _context():
            plt = _plt()
            fig, axes = plt.subplots(1, len(metrics), figsize=(max(4.0, 1.1 * len(cells) + 1.5) * len(metrics) / 1.4, 3.6),
                                     squeeze=False)
            for ax, m in zip(axes.flat, metrics):
                col, mean_col = f"test_{m}", ("mean" if m == metric else f"{m}_mean")
                for j, a in enumerate(archs):
                    offset = (j - (len(archs) - 1) / 2) * width
                    for i, cell in enumerate(cells):
                        r = part[(part["cell"] == cell) & (part["num_layers"] == a[0]) & (part["bidirectional"] == a[1])]
                        if r.empty or not math.isfinite(float(r[mean_col].iloc[0])):
                            continue
                        seeds = runs[(runs["cell"] == cell) & (runs["variant"] == r["variant"].iloc[0])]
                        values = seeds[col].astype(float).to_numpy() if col in seeds else np.array([])
                        values = np.sort(values[np.isfinite(values)])
                        ax.scatter(np.full(len(values), i + offset), values, s=9, color=colours[a], alpha=0.6, lw=0, zorder=2)
                        if len(values) == 0:
                            continue
                        mean = float(values.mean())
                        lo, hi = bootstrap_interval(values)
                        ax.errorbar([i + offset], [mean], yerr=[[mean - lo], [hi - mean]], fmt="o", color=colours[a],
                                    mec="black", ecolor="black", capsize=2, ms=4, zorder=3)
                for ref, ref_col in sorted(reference_columns(runs, m).items()):
                    value = float(runs[ref_col].astype(float).mean())
                    ax.axhline(value, color="0.4", ls="--", lw=0.8)
                    ax.annotate(ref, (1.0, value), xycoords=("axes fraction", "data"), ha="right", va="bottom",
                                fontsize=7, color="0.3")
                ax.set_xticks(range(len(cells)), [c.replace("_", "_\n") for c in cells], fontsize=7)
                ax.set_xlim(-0.6, len(cells) - 0.4)
                ax.set(xlabel="", ylabel=f"test {m}", title=f"{setting}: test {m}")
            handles = [Line2D([], [], ls="", marker="o", color=colours[a], mec="black", label=names[a]) for a in archs]
            fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, bbox_to_anchor=(0.5, 0.0))
            fig.text(0.5, 1.0, "dots: seeds; marker and bar: mean and 95% percentile bootstrap interval over seeds; "
                     "dashed: references",
                     ha="center", va="bottom", fontsize=8, color="0.3")
            fig.tight_layout(rect=(0, 0.08, 1, 0.98))
            paths += save(fig, out_dir, f"architectures_{slug(str(setting))}")
    return paths


def _arch_colours(n: int) -> list[Any]:
    """Blue, orange, green, pink, ... of seaborn's colorblind palette (its two oranges kept apart)."""
    import seaborn as sns

    base = sns.color_palette("colorblind", n_colors=10)
    return [base[i] for i in (0, 1, 2, 4, 7, 5, 8, 9, 3, 6)[:n]] if n <= 10 else list(sns.color_palette("husl", n))
