"""`rnnbench data ...`: fetch, verify and describe the datasets (mounted by rnnbench/cli.py).

Only typer and the registry are imported here; numpy, scipy and pooch load inside the commands.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from rnnbench.datasets.sources import DATASETS, get_source
from rnnbench.errors import RnnbenchError

data_app = typer.Typer(
    help="Fetch, verify and describe the datasets (BL 2012 polyphonic music, FSDD speech).",
    no_args_is_help=True,
)


def _names(names: list[str]) -> list[str]:
    """Expand 'all' and check every name (unknown -> RnnbenchError listing the valid ones)."""
    if "all" in names:
        return list(DATASETS)
    for name in names:
        get_source(name)
    return list(dict.fromkeys(names))


@data_app.command("fetch")
def fetch_command(
    names: Annotated[list[str], typer.Argument(help=f"dataset names ({', '.join(DATASETS)}) or 'all'")],
    base_url: Annotated[
        Optional[str],
        typer.Option(help="download from this mirror of the data layout instead of the canonical URLs"),
    ] = None,
    deadline: Annotated[
        Optional[float],
        typer.Option(help="seconds one download may take in all (default: $RNNBENCH_DOWNLOAD_DEADLINE or 900)",
                     show_default=False),
    ] = None,
) -> None:
    """Download (or check in RNNBENCH_DATA_DIR) the named datasets, verifying every hash."""
    from rnnbench.datasets.download import download_deadline, fetch

    if deadline is not None:
        download_deadline(deadline)  # a bad value is one line before anything is fetched
    for name in _names(names):
        typer.echo(f"{name}: {fetch(name, base_url=base_url, deadline_s=deadline)}")


@data_app.command("verify")
def verify_command(
    names: Annotated[Optional[list[str]], typer.Argument(help="dataset names (default: all)")] = None,
) -> None:
    """Re-hash every dataset file present in the data directory; exit non-zero on any problem."""
    from rnnbench.datasets.download import data_root, verify

    problems = verify(_names(names) if names else None)
    for problem in problems:
        typer.echo(problem)
    if problems:
        raise RnnbenchError(f"verify: {len(problems)} problem(s) under {data_root()}")
    typer.echo(f"OK: every dataset file present under {data_root()} matches its SHA-256")


@data_app.command("stats")
def stats_command(name: Annotated[str, typer.Argument(help=f"one of {', '.join(DATASETS)}")]) -> None:
    """Print per-split sequence and time-step counts."""
    get_source(name)  # a name error before any loading
    from rnnbench.datasets.readers import stats

    rows = stats(name)
    columns = list(rows[0])
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    typer.echo(f"{get_source(name).title}")
    typer.echo("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(columns, widths))))
    for r in cells:
        typer.echo("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
