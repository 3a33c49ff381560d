"""The `rnnbench report` sub-command (mounted by rnnbench/cli.py as `report`)."""

from __future__ import annotations

import os
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
    source: Optional[Path] = typer.Option(
        None, "--from", help="build from the committed exports in this folder (e.g. results/runs) instead of a store"),
) -> None:
    """Regenerate REPORT.md, tables, figures, runs.csv and histories.csv.gz from the MLflow store or from exports."""
    from rnnbench.errors import RnnbenchError
    from rnnbench.tracking import require_store, resolve_tracking_uri

    uri = None
    if source is None:
        uri = resolve_tracking_uri(tracking_uri)
        require_store(uri)  # reading only: a missing or mistyped store is refused, never created
    else:
        from rnnbench.analysis.exports import sweeps_in

        if not source.is_dir() or not sweeps_in(source):
            raise RnnbenchError(f"--from {source}: no exports there (files <sweep>.runs.csv.gz, from `rnnbench export`)")
    check_out_folder(out)
    from rnnbench.analysis.report import build_report

    try:
        path = build_report(
            out, sweeps=sweep or None, tracking_uri=uri, experiments=experiment or None,
            tuned=tuple(tuned) if tuned else ("train.lr",), spec_dir=specs, figures=figures, exports=source,
        )
    except OSError as e:  # what the check above cannot see ahead (a full disk, a read-only mount)
        where = f" {e.filename}" if e.filename else ""
        raise RnnbenchError(f"cannot write the report in {out}:{where} {e.strerror or e}") from None
    typer.echo(f"wrote {path}")


def check_out_folder(out: Path) -> None:
    """One line, before any run is read, if `out` is not a folder that can be made and written."""
    from rnnbench.errors import RnnbenchError

    if out.exists() and not out.is_dir():
        raise RnnbenchError(f"--out {out} is a file, not a folder")
    ancestor = out.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise RnnbenchError(f"--out {out} cannot be created: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise RnnbenchError(f"--out {out} cannot be written: {ancestor} is not writable")


def export_command(
    sweep: list[str] = typer.Option(..., "--sweep", help="sweep name (tag `sweep`); repeat for several"),
    out: Path = typer.Option(Path("results/runs"), "--out", help="folder of the exports (merged into what is there)"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or ./mlflow.db)"),
) -> None:
    """Export a sweep's runs, curves and probes to <out>/<sweep>.{runs,curves,probes}.csv.gz, merging with
    earlier exports (other chunks of the sweep): what `rnnbench report --from` and a fresh clone rebuild from."""
    from rnnbench.analysis.exports import export_sweeps
    from rnnbench.errors import RnnbenchError
    from rnnbench.tracking import require_store, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    require_store(uri)
    check_out_folder(out)
    try:
        paths = export_sweeps(sweep, uri, out)
    except OSError as e:
        raise RnnbenchError(f"cannot write the exports in {out}: {e.strerror or e}") from None
    for p in paths:
        typer.echo(f"wrote {p}")
