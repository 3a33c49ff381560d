"""LSTM with forget gate and no peepholes, the form of torch.nn.LSTM with one bias per gate."""

from __future__ import annotations

import torch

from rnnbench.cells import compiled
from rnnbench.cells.base import Cell, State, Weights, recurrent_product
from rnnbench.cells.lstm_peephole import without_peepholes
from rnnbench.cells.registry import register_cell


@register_cell
class LSTM(Cell):
    """LSTM with forget gate, no peepholes (Hochreiter & Schmidhuber 1997; Gers et al. 2000), as torch.nn.LSTM:

        i_t = σ(W_xi x_t + W_hi h_{t-1} + b_i)      gate order in the weights: i, f, g, o
        f_t = σ(W_xf x_t + W_hf h_{t-1} + b_f)
        g_t = tanh(W_xg x_t + W_hg h_{t-1} + b_g)
        o_t = σ(W_xo x_t + W_ho h_{t-1} + b_o)
        c_t = f_t ⊙ c_{t-1} + i_t ⊙ g_t
        h_t = o_t ⊙ tanh(c_t)

    Weights: weight_ih (4H, D), weight_hh (4H, H), bias (4H) (torch's b_ih + b_hh as one vector).
    b_f starts at `forget_bias`. Trainable per layer: 4(DH + H² + H). State (h, c). Fast loops: "cpp", and "triton" (the peephole
    kernels with zero peepholes: lstm_peephole.without_peepholes).
    """

    name = "lstm"
    variant_of = "lstm_peephole"  # Greff et al. 2015's NP
    gates = ("input", "forget", "output")
    state_size = 2
    loops = {"cpp": compiled.member_loop("lstm", "weight_hh"), "triton": without_peepholes("triton")}

    @classmethod
    def weight_shapes(cls, input_size: int, hidden_size: int) -> dict[str, tuple[int, ...]]:
        H = hidden_size
        return {"weight_ih": (4 * H, input_size), "weight_hh": (4 * H, H), "bias": (4 * H,)}

    @classmethod
    def init_(cls, w: Weights, hidden_size: int, forget_bias: float) -> None:
        w["bias"][:, hidden_size : 2 * hidden_size] = forget_bias

    @classmethod
    def step(cls, w: Weights, xw_t: torch.Tensor, state: State) -> tuple[State, dict[str, torch.Tensor]]:
        h, c = state
        a_i, a_f, a_g, a_o = recurrent_product(h, w["weight_hh"], xw_t).chunk(4, dim=-1)
        i, f, o = torch.sigmoid(a_i), torch.sigmoid(a_f), torch.sigmoid(a_o)
        c = f * c + i * torch.tanh(a_g)
        h = o * torch.tanh(c)
        return (h, c), {"input": i, "forget": f, "output": o}
