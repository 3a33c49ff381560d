"""`rnnbench sweep SPEC.yaml [--executor local|ray] [--workers N] [key=value ...]`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

OVERRIDES = typer.Argument(None, help="key=value overrides of the spec's base, e.g. train.max_epochs=3", show_default=False)


def command(
    spec: Path = typer.Argument(..., help="YAML sweep spec (see experiments/)"),
    overrides: Optional[list[str]] = OVERRIDES,
    executor: str = typer.Option("local", "--executor", "-e", help="where points run: local or ray"),
    workers: Optional[int] = typer.Option(
        None, "--workers", "-w", help="points at once (local: 1 runs in this process; ray: default all CPUs); populations at once with --batch-models"
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="list the points, what would be done and an upper bound of the cost (timed here); run nothing"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show the progress bar"),
    exported: Optional[Path] = typer.Option(
        None, "--exported", help="folder of exports (rnnbench export): points FINISHED there are done (another chunk's)"
    ),
    only: Optional[list[str]] = typer.Option(
        None, "--only", help="run one chunk: a grid key cut to a value, e.g. task.name=jsb (repeatable)"
    ),
    batch_models: str = typer.Option(
        "auto", "--batch-models", help="train points that differ only in per-member keys (seed, lr, ...) as one population: auto (where CUDA is), on, off (a halving sweep's search always trains as populations; off trains its seeds alone)"
    ),
) -> None:
    """Run a grid/random sweep; re-running it skips FINISHED points and resumes interrupted ones.

    Exit status 0 only when every point of the sweep is FINISHED in the store.
    """
    from rnnbench.sweep.runner import run_sweep
    from rnnbench.sweep.spec import load_spec, restrict

    whole = load_spec(spec)
    sweep = restrict(whole, only) if only else whole
    summary = run_sweep(sweep, overrides or [], executor=executor, workers=workers, progress=progress, dry_run=dry_run,
                        batch_models=batch_models, exported=exported, chunk_of=whole if only else None)
    if dry_run:
        return
    for line in summary.lines():
        typer.echo(line)
    if not summary.ok:
        raise typer.Exit(1)
