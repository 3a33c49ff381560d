"""Parameter counts per cell, and the hidden size that meets a parameter budget.

Chung et al. 2014 (Table 1) count the recurrent layer only:
    tanh  DH + H² + H,   GRU (reset before)  3(DH + H² + H),   peephole LSTM  4(DH + H² + H) + 3H.
The "total" convention adds the output layer Linear(H, O) with bias: HO + O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rnnbench.cells import get_cell
from rnnbench.errors import RnnbenchError

if TYPE_CHECKING:
    from rnnbench.config import Config

PRESETS: dict[str, int] = {"music": 20_000, "speech": 168_500}
"""Chung et al. 2014, Table 1 budgets, recurrent layer only (output layer excluded):
music ≈20K (tanh 100 units ≈20.1K, GRU 46 ≈20.2K, LSTM 36 ≈19.8K; fits D ≈ 100) and
speech ≈170K with D = 20 (tanh 400 units 168,400; GRU 227 168,888; peephole LSTM 195 169,065)."""

CONVENTIONS = ("recurrent", "total")


def count_params(cell: str, input_size: int, hidden_size: int, num_layers: int = 1, bidirectional: bool = False) -> int:
    """Trainable parameters of the recurrent layers only (the Chung Table 1 convention)."""
    return get_cell(cell).count_params(input_size, hidden_size, num_layers, bidirectional)


def param_counts(cell: str, input_size: int, hidden_size: int, output_size: int, num_layers: int = 1,
                 bidirectional: bool = False) -> dict[str, int]:
    """Trained parameters: {"recurrent": recurrent layers only, "total": plus the output Linear(H', O)
    with bias, H'O + O, H' = H, or 2H when bidirectional}; and "frozen": the weights a cell never
    trains (its `frozen`), only where it has any."""
    recurrent = count_params(cell, input_size, hidden_size, num_layers, bidirectional)
    head_in = (2 if bidirectional else 1) * hidden_size
    counts = {"recurrent": recurrent, "total": recurrent + head_in * output_size + output_size}
    frozen = get_cell(cell).count_params(input_size, hidden_size, num_layers, bidirectional, trained=False) - recurrent
    if frozen:  # an echo-state reservoir: counted apart, never in a budget
        counts["frozen"] = frozen
    return counts


def hidden_size_for_budget(
    cell: str,
    input_size: int,
    budget: int,
    *,
    convention: str = "recurrent",
    output_size: int | None = None,
    num_layers: int = 1,
    bidirectional: bool = False,
) -> int:
    """The hidden size whose count (recurrent-only or total) is nearest `budget`; ties go to the smaller."""
    if convention not in CONVENTIONS:
        raise RnnbenchError(f"unknown budget convention {convention!r}; valid: {', '.join(CONVENTIONS)}")
    if convention == "total" and output_size is None:
        raise RnnbenchError("the 'total' budget convention needs output_size")
    if num_layers < 1 or input_size < 1:
        raise RnnbenchError(f"need num_layers >= 1 and input_size >= 1, got {num_layers} and {input_size}")

    def count(h: int) -> int:
        if convention == "total":
            return param_counts(cell, input_size, h, output_size, num_layers, bidirectional)["total"]  # type: ignore[arg-type]
        return count_params(cell, input_size, h, num_layers, bidirectional)

    if count(1) == count(2):  # nothing in the counted part grows with h: no hidden size meets a budget
        raise RnnbenchError(f"{cell} trains no recurrent weights, so a {convention} budget cannot pick its size: "
                            "use model.budget_convention=total (its trained parameters are the output layer's) "
                            "or set model.hidden_size")
    smallest = count(1)
    if budget < smallest:
        raise RnnbenchError(f"budget {budget:,} is below the smallest {cell} model ({smallest:,} parameters at hidden size 1)")
    if budget == smallest:
        return 1
    # count grows with h: find the smallest h with count(h) >= budget by doubling then bisection.
    lo, hi = 1, 2  # invariant: count(lo) < budget
    while count(hi) < budget:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(mid) >= budget:
            hi = mid
        else:
            lo = mid
    return lo if budget - count(lo) <= count(hi) - budget else hi


def hidden_size_of(config: Config, input_size: int, output_size: int) -> int:
    """model.hidden_size as given, or the size whose parameter count is nearest model.budget."""
    m = config.model
    if m.budget is None:
        assert m.hidden_size is not None
        return m.hidden_size
    budget = PRESETS[m.budget] if isinstance(m.budget, str) else m.budget
    return hidden_size_for_budget(m.cell, input_size, budget, convention=m.budget_convention,
                                  output_size=output_size, num_layers=m.num_layers, bidirectional=m.bidirectional)
