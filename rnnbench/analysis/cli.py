"""The `rnnbench report` sub-command (mounted by rnnbench/cli.py as `report`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def command(
    sweep: Optional[list[str]] = typer.Option(None, "--sweep", help="sweep name (tag `sweep`); repeat for several; default: every run"),
    # Not results/: the committed report is regenerated on purpose (`--out results/`), never by default.
    out: Path = typer.Option(Path("rnnbench_report"), "--out", help="directory to (re)generate (its old contents are replaced)"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or ./mlflow.db)"),
    experiment: Optional[list[str]] = typer.Option(None, "--experiment", help="restrict to these experiments (name or id); repeatable"),
    tuned: Optional[list[str]] = typer.Option(None, "--tuned", help="params chosen on validation per cell (default: train.lr); repeatable"),
    specs: Path = typer.Option(Path("experiments"), "--specs", help="folder of sweep specs, read for `solved:` criteria"),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="draw the figures"),
) -> None:
    """Regenerate REPORT.md, tables, figures, runs.csv and histories.csv from the MLflow store."""
    from rnnbench.analysis.report import build_report

    path = build_report(
        out, sweeps=sweep or None, tracking_uri=tracking_uri, experiments=experiment or None,
        tuned=tuple(tuned) if tuned else ("train.lr",), spec_dir=specs, figures=figures,
    )
    typer.echo(f"wrote {path}")
