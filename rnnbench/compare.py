"""`rnnbench compare --data my.npz`: which cell for these sequences? One command, no YAML.

It writes a halving sweep spec for the file (rnnbench/tasks/sequences.py reads it) into --out, runs
it, and writes the report there: every registered cell (or --cells) at one parameter budget, the
same learning-rate samples for every cell searched by successive halving at one seed, then --seeds
seeds at each cell's chosen rate; the report's tables give each cell's test NLL with its interval
and the Holm-corrected tests between cells. The store (SQLite) and checkpoints stay in --out, so
running the same command again resumes or reuses what is done.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from rnnbench.errors import RnnbenchError


def compare_spec(data: Path, out: Path, cells: list[str], seeds: int, samples: int, budget: int, max_epochs: int,
                 target: str, batch_size: int) -> dict[str, Any]:
    """The sweep spec `compare` runs (also written to <out>/compare.yaml, to rerun or edit)."""
    name = "compare_" + "".join(c if c.isalnum() or c in "_-." else "_" for c in data.stem)
    rungs = [r for r in (3, 9, 27, 81) if r < max_epochs] or [1]
    return {
        "name": name,
        "description": f"rnnbench compare on {data.name}: {', '.join(cells)} at ~{budget} recurrent parameters",
        "base": {
            "model": {"budget": budget, "budget_convention": "recurrent"},
            "task": {"name": "sequences", "path": str(data.resolve()), "target": target},
            "train": {"optimizer": "adam", "batch_size": batch_size, "max_epochs": max_epochs, "early_stopping_patience": 10,
                      "gradient_flow": False, "progress_bar": False},
            "tracking": {"tracking_uri": f"sqlite:///{(out / 'mlflow.db').resolve()}", "checkpoint_dir": str((out / "runs").resolve())},
        },
        "grid": {"model.cell": cells},
        "random": {"samples": samples, "seed": 0, "params": {"train.lr": {"loguniform": [1e-4, 3e-2]}}},
        "halving": {"rungs": rungs, "reduction": 3, "search_seed": 0, "seeds": list(range(seeds))},
    }


def command(
    data: Path = typer.Option(..., "--data", help="the .npz of sequences (arrays data, lengths; optional split, labels)"),
    out: Path = typer.Option(Path("rnnbench_compare"), "--out", help="folder for the spec, the store, checkpoints and the report"),
    cells: str = typer.Option("all", "--cells", help="comma-separated cells, or all (the registry)"),
    seeds: int = typer.Option(5, "--seeds", min=2, help="seeds per cell at its chosen learning rate"),
    samples: int = typer.Option(6, "--samples", min=1, help="learning-rate samples per cell, log-uniform on [1e-4, 3e-2]"),
    budget: int = typer.Option(20000, "--budget", min=100, help="recurrent parameters per cell (the hidden size follows)"),
    max_epochs: int = typer.Option(100, "--max-epochs", min=1),
    target: str = typer.Option("auto", "--target", help="auto, binary, real, categorical or label (see rnnbench/tasks/sequences.py)"),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", help="populations at once (default 1)"),
) -> None:
    """Compare the cells on your own sequences: equal parameter and tuning budgets, seeds, a report."""
    import yaml

    from rnnbench.analysis.cli import check_out_folder
    from rnnbench.cells import CELLS
    from rnnbench.tasks.sequences import read_sequences

    names = sorted(CELLS) if cells == "all" else [c.strip() for c in cells.split(",") if c.strip()]
    unknown = [c for c in names if c not in CELLS]
    if unknown or not names:
        raise RnnbenchError(f"--cells: unknown cell {unknown[0] if unknown else cells!r}; cells: {', '.join(sorted(CELLS))}")
    if target not in ("auto", "binary", "real", "categorical", "label"):
        raise RnnbenchError(f"--target must be auto, binary, real, categorical or label, got {target!r}")
    read_sequences(data)  # one line on a bad file, before anything is created
    check_out_folder(out)
    raw = compare_spec(data, out, names, seeds, samples, budget, max_epochs, target, batch_size)
    from rnnbench.analysis.report import build_report
    from rnnbench.sweep.runner import run_sweep
    from rnnbench.sweep.spec import spec_from_dict

    spec = spec_from_dict(raw, where="compare")
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    summary = run_sweep(spec, [], workers=workers, progress=True, batch_models="on")
    for line in summary.lines():
        typer.echo(line)
    report = build_report(out / "report", sweeps=[spec.name], tracking_uri=raw["base"]["tracking"]["tracking_uri"],
                          spec_dir=out, figures=True)
    typer.echo(f"wrote {report}")
    if not summary.ok:
        raise typer.Exit(1)
