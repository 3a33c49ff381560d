"""The coupled input-forget gate LSTM (CIFG) of Greff et al. 2015: the input gate is 1 - the forget gate."""

from __future__ import annotations

import torch

from rnnbench.cells.base import Cell, Loop, State, Weights, recurrent_product
from rnnbench.cells.lstm import LSTM
from rnnbench.cells.registry import register_cell


def _as_lstm(impl: str) -> Loop:
    """The `impl` Loop: the CIFG is the plain LSTM whose input gate reads the negated forget-gate
    pre-activation, σ(-a_f) = 1 - σ(a_f). So the LSTM loop (compiled, or the Triton peephole kernels
    with zero peepholes) runs it on [-a_f, a_f, a_g, a_o] and [-W_hf; W_hf; W_hg; W_ho]; autograd
    carries the gradients back through the two concatenations."""
    base = LSTM.loops[impl]

    def loop(w: Weights, xw: torch.Tensor, state: State, steps: torch.Tensor | None) -> tuple[torch.Tensor, State]:
        H = w["weight_hh"].shape[-1]
        xk = xw.transpose(0, 1)  # (K, T, B, 3H): the member-major storage `project` made
        xw4 = torch.cat([-xk[..., :H], xk], dim=-1).transpose(0, 1)
        whh = w["weight_hh"]
        return base({"weight_hh": torch.cat([-whh[:, :H], whh], dim=1)}, xw4, state, steps)

    return loop


@register_cell
class CIFG(Cell):
    """LSTM with coupled input and forget gates, no peepholes (Greff et al. 2015, "LSTM: A Search Space
    Odyssey", variant CIFG):

        f_t = σ(W_xf x_t + W_hf h_{t-1} + b_f)      gate order in the weights: f, g, o
        g_t = tanh(W_xg x_t + W_hg h_{t-1} + b_g)
        o_t = σ(W_xo x_t + W_ho h_{t-1} + b_o)
        c_t = f_t ⊙ c_{t-1} + (1 - f_t) ⊙ g_t       (i_t = 1 - f_t)
        h_t = o_t ⊙ tanh(c_t)

    Weights: weight_ih (3H, D), weight_hh (3H, H), bias (3H). b_f starts at `forget_bias`.
    Trainable per layer: 3(DH + H² + H). State (h, c). Fast loops: "cpp" and "triton" (the LSTM's, see
    `_as_lstm`).
    """

    name = "cifg"
    variant_of = "lstm_peephole"  # Greff et al. 2015's CIFG
    gates = ("forget", "output")
    state_size = 2
    loops = {"cpp": _as_lstm("cpp"), "triton": _as_lstm("triton")}

    @classmethod
    def weight_shapes(cls, input_size: int, hidden_size: int) -> dict[str, tuple[int, ...]]:
        H = hidden_size
        return {"weight_ih": (3 * H, input_size), "weight_hh": (3 * H, H), "bias": (3 * H,)}

    @classmethod
    def init_(cls, w: Weights, hidden_size: int, forget_bias: float) -> None:
        w["bias"][:, :hidden_size] = forget_bias

    @classmethod
    def step(cls, w: Weights, xw_t: torch.Tensor, state: State) -> tuple[State, dict[str, torch.Tensor]]:
        h, c = state
        a_f, a_g, a_o = recurrent_product(h, w["weight_hh"], xw_t).chunk(3, dim=-1)
        f, o = torch.sigmoid(a_f), torch.sigmoid(a_o)
        c = f * c + (1 - f) * torch.tanh(a_g)
        h = o * torch.tanh(c)
        return (h, c), {"forget": f, "output": o}
