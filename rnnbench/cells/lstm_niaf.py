"""Greff et al. 2015's NIAF: the peephole LSTM without its input activation (a linear block input)."""

from __future__ import annotations

import torch

from rnnbench.cells import compiled, triton_steps
from rnnbench.cells.lstm_peephole import PeepholeLSTM
from rnnbench.cells.registry import register_cell


@register_cell
class NoInputActivation(PeepholeLSTM):
    """LSTM ablation NIAF (Greff et al. 2015): no input activation function, g_t linear:

        i_t = σ(W_xi x_t + W_hi h_{t-1} + w_ci ⊙ c_{t-1} + b_i)      gate order in the weights: i, f, g, o
        f_t = σ(W_xf x_t + W_hf h_{t-1} + w_cf ⊙ c_{t-1} + b_f)
        c_t = f_t ⊙ c_{t-1} + i_t ⊙ (W_xg x_t + W_hg h_{t-1} + b_g)
        o_t = σ(W_xo x_t + W_ho h_{t-1} + w_co ⊙ c_t + b_o)
        h_t = o_t ⊙ tanh(c_t)

    Weights and count as lstm_peephole's: 4(DH + H² + H) + 3H per layer. State (h, c). Fast loops
    "cpp" and "triton": the peephole loops with the block input's tanh compiled out (ops lstm_niaf_*_stacked).
    """

    name = "lstm_niaf"
    variant_of = "lstm_peephole"  # Greff et al. 2015's NIAF
    loops = {"cpp": compiled.member_loop("lstm_niaf", "weight_hh", "w_ci", "w_cf", "w_co"),
             "triton": triton_steps.peephole_loop(triton_steps.LINEAR_INPUT)}

    @staticmethod
    def block_input(a: torch.Tensor) -> torch.Tensor:
        return a
