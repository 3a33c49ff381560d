"""Greff et al. 2015's NOAF: the peephole LSTM without its output activation (h = o ⊙ c)."""

from __future__ import annotations

import torch

from rnnbench.cells import compiled, triton_steps
from rnnbench.cells.lstm_peephole import PeepholeLSTM
from rnnbench.cells.registry import register_cell


@register_cell
class NoOutputActivation(PeepholeLSTM):
    """LSTM ablation NOAF (Greff et al. 2015): no output activation function, h_t = o_t ⊙ c_t:

        i_t = σ(W_xi x_t + W_hi h_{t-1} + w_ci ⊙ c_{t-1} + b_i)      gate order in the weights: i, f, g, o
        f_t = σ(W_xf x_t + W_hf h_{t-1} + w_cf ⊙ c_{t-1} + b_f)
        c_t = f_t ⊙ c_{t-1} + i_t ⊙ tanh(W_xg x_t + W_hg h_{t-1} + b_g)
        o_t = σ(W_xo x_t + W_ho h_{t-1} + w_co ⊙ c_t + b_o)
        h_t = o_t ⊙ c_t

    Weights and count as lstm_peephole's: 4(DH + H² + H) + 3H per layer. State (h, c). Fast loops
    "cpp" and "triton": the peephole loops with the output activation's tanh compiled out (ops lstm_noaf_*_stacked).
    """

    name = "lstm_noaf"
    variant_of = "lstm_peephole"  # Greff et al. 2015's NOAF
    loops = {"cpp": compiled.member_loop("lstm_noaf", "weight_hh", "w_ci", "w_cf", "w_co"),
             "triton": triton_steps.peephole_loop(triton_steps.LINEAR_OUTPUT)}

    @staticmethod
    def output_activation(c: torch.Tensor) -> torch.Tensor:
        return c
