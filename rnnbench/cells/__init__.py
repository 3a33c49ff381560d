"""Registry of recurrent cells. A new cell is one new module plus one import line below.

Names: tanh, lstm, gru (fused cuDNN/ATen kernels), lstm_peephole, gru_reset_before (Chung et al. 2014
forms that no fused kernel offers). Equations: ../shared/docs/cells.md and each class's docstring.
"""

from __future__ import annotations

from rnnbench.cells.base import RecurrentLayer, State
from rnnbench.errors import RnnbenchError

CELLS: dict[str, type[RecurrentLayer]] = {}


def register_cell(cls: type[RecurrentLayer]) -> type[RecurrentLayer]:
    """Class decorator: make `cls` available under `cls.name`."""
    CELLS[cls.name] = cls
    return cls


def get_cell(name: str) -> type[RecurrentLayer]:
    """The cell class registered as `name`, or a one-line error listing the valid names."""
    try:
        return CELLS[name]
    except KeyError:
        raise RnnbenchError(f"unknown cell {name!r}; valid cells: {', '.join(sorted(CELLS))}") from None


# Registration: importing each module runs its @register_cell.
from rnnbench.cells import fused, gru_reset_before, lstm_peephole  # noqa: E402,F401

__all__ = ["CELLS", "RecurrentLayer", "State", "get_cell", "register_cell"]
