"""One checkpoint format: a file per member, `<checkpoint_dir>/<run_id>/member.pt`, written at every
epoch's end, after which the epoch goes to MLflow (so a kill between the two loses nothing).

A member's file holds its rows of every stacked tensor (weights, best weights, optimizer state, step
counters) and its bookkeeping (epoch, per-epoch record, early-stopping state, its data order's
generator), so a member can resume in any population of its kind: alone, or beside other members.
Written atomically and read with weights_only=True (rnnbench/checkpoints.py): nothing in it can run code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rnnbench import checkpoints

FILE = "member.pt"
FORMAT = 1


def member_path(checkpoint_dir: str | Path, run_id: str) -> Path:
    return Path(checkpoint_dir) / run_id / FILE


def row_state(population: Any, row: int) -> dict[str, Any]:
    """Everything of the member at `row` needed to continue it exactly."""
    i = population.ids[row]
    weights = [p.detach()[row].clone() for p in population.weights()]
    best = [b[i].clone() for b in population.best]
    counters = {name: buf[row].clone() for name, buf in population.named_buffers()}
    return {"format": FORMAT, "weights": weights, "best": best, "counters": counters,
            "optimizer": population.optimizer.member_state(row), "member": population.members[i].state()}


def save(population: Any, row: int) -> None:
    m = population.members[population.ids[row]]
    checkpoints.save(row_state(population, row), member_path(m.config.tracking.checkpoint_dir, m.run_id))


def load(path: Path) -> dict[str, Any]:
    """A member's state, or a one-line CheckpointError (truncated, empty, unsafe, another format)."""
    state = checkpoints.load(path, map_location="cpu")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise checkpoints.CheckpointError(f"{path} is not an rnnbench member checkpoint (format {FORMAT})")
    return state


def restore(population: Any, row: int, state: dict[str, Any]) -> None:
    """Put a member's saved state into `row` of a freshly built population (before training)."""
    i = population.ids[row]
    with torch.no_grad():
        for p, w in zip(population.weights(), state["weights"]):
            p[row].copy_(w)
        for b, w in zip(population.best, state["best"]):
            b[i].copy_(w)
        buffers = dict(population.named_buffers())
        for name, value in state["counters"].items():
            buffers[name][row].copy_(value)
    population.optimizer.load_member_state(row, state["optimizer"])
    population.members[i].load_state(state["member"])
