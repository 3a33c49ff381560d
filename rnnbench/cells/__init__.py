"""The recurrent cells: one module per cell, the registry, and the public API over stacked weights.

A new cell is one new module (a Cell subclass with @register_cell; rnnbench/cells/base.py gives the
contract) plus one name in the import line below; tests, bench and probes take cells from CELLS.
Equations: each class's docstring and ../shared/docs/cells.md.
"""

from __future__ import annotations

from rnnbench.cells.base import Cell, State, Weights
from rnnbench.cells.loops import (IMPLS, StepTrace, bernoulli_nll, final_states, implementation, init_weights,
                                  reverse_within, rows_linear, rows_linear_available, run, run_bidirectional, run_steps)
from rnnbench.cells.registry import CELLS, get_cell, register_cell

# Registration: importing each module runs its @register_cell.
from rnnbench.cells import cifg, gru, gru_reset_before, lstm, lstm_peephole, tanh  # noqa: E402,F401,I001
from rnnbench.cells import esn  # noqa: E402,F401  Jaeger 2001: only the readout is trained
from rnnbench.cells import lstm_fgr, lstm_nfg, lstm_niaf, lstm_nig, lstm_noaf, lstm_nog  # noqa: E402,F401,I001  Greff et al. 2015

__all__ = ["CELLS", "IMPLS", "Cell", "State", "StepTrace", "Weights", "bernoulli_nll", "final_states", "get_cell",
           "implementation",
           "init_weights", "register_cell", "reverse_within", "rows_linear", "rows_linear_available", "run",
           "run_bidirectional", "run_steps"]
