"""The registry of cells: name -> Cell class. Cells register themselves with @register_cell."""

from __future__ import annotations

from rnnbench.cells.base import Cell
from rnnbench.errors import RnnbenchError

CELLS: dict[str, type[Cell]] = {}


def register_cell(cls: type[Cell]) -> type[Cell]:
    """Class decorator: make `cls` available under `cls.name`."""
    CELLS[cls.name] = cls
    return cls


def get_cell(name: str | type[Cell]) -> type[Cell]:
    """The cell class registered as `name` (a class is returned as is), or a one-line error listing the valid names."""
    if isinstance(name, type):
        return name
    try:
        return CELLS[name]
    except KeyError:
        raise RnnbenchError(f"unknown cell {name!r}; valid cells: {', '.join(sorted(CELLS))}") from None
