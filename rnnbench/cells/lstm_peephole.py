"""The LSTM of Graves 2013 with diagonal peepholes, as used by Chung et al. 2014 (no fused kernel has it).

Fast loops: "cpp" (compiled.py) and "triton" (triton_steps.py), both with a hand-written backward
through time: the autograd step loop's cost is per-op dispatch and bookkeeping (~15 nodes a step),
not arithmetic, so the compiled loop does one small BLAS product and one vectorised gate pass per
step, and the Triton loop one batched product and one gate kernel. Speeds: results/bench/.
"""

from __future__ import annotations

import torch

from rnnbench.cells import compiled, triton_steps
from rnnbench.cells.base import Cell, State, Weights, recurrent_product
from rnnbench.cells.registry import register_cell


@register_cell
class PeepholeLSTM(Cell):
    """LSTM with diagonal peepholes (Graves 2013, eqs. 7-11; the LSTM of Chung et al. 2014):

        i_t = σ(W_xi x_t + W_hi h_{t-1} + w_ci ⊙ c_{t-1} + b_i)
        f_t = σ(W_xf x_t + W_hf h_{t-1} + w_cf ⊙ c_{t-1} + b_f)
        c_t = f_t ⊙ c_{t-1} + i_t ⊙ tanh(W_xg x_t + W_hg h_{t-1} + b_g)
        o_t = σ(W_xo x_t + W_ho h_{t-1} + w_co ⊙ c_t + b_o)      (the output gate sees the new c_t)
        h_t = o_t ⊙ tanh(c_t)

    Weights: weight_ih (4H, D), weight_hh (4H, H), bias (4H) in gate order i, f, g, o; peepholes
    w_ci, w_cf, w_co (H). b_f starts at `forget_bias`. Trainable per layer: 4(DH + H² + H) + 3H.
    State (h, c).
    """

    name = "lstm_peephole"
    gates = ("input", "forget", "output")
    state_size = 2
    loops = {"cpp": compiled.member_loop("peephole_lstm", "weight_hh", "w_ci", "w_cf", "w_co"),
             "triton": triton_steps.peephole_lstm_loop}

    @classmethod
    def weight_shapes(cls, input_size: int, hidden_size: int) -> dict[str, tuple[int, ...]]:
        H = hidden_size
        return {"weight_ih": (4 * H, input_size), "weight_hh": (4 * H, H), "bias": (4 * H,),
                "w_ci": (H,), "w_cf": (H,), "w_co": (H,)}

    @classmethod
    def init_(cls, w: Weights, hidden_size: int, forget_bias: float) -> None:
        w["bias"][:, hidden_size : 2 * hidden_size] = forget_bias

    @classmethod
    def step(cls, w: Weights, xw_t: torch.Tensor, state: State) -> tuple[State, dict[str, torch.Tensor]]:
        h, c = state
        a_i, a_f, a_g, a_o = recurrent_product(h, w["weight_hh"], xw_t).chunk(4, dim=-1)
        i = torch.sigmoid(a_i + w["w_ci"].unsqueeze(1) * c)
        f = torch.sigmoid(a_f + w["w_cf"].unsqueeze(1) * c)
        c = f * c + i * torch.tanh(a_g)
        o = torch.sigmoid(a_o + w["w_co"].unsqueeze(1) * c)
        h = o * torch.tanh(c)
        return (h, c), {"input": i, "forget": f, "output": o}
