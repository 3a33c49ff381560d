"""GRU with the reset gate after the recurrent product: the form of cuDNN and torch.nn.GRU."""

from __future__ import annotations

import torch

from rnnbench.cells import compiled
from rnnbench.cells.base import Cell, State, Weights, recurrent_product
from rnnbench.cells.registry import register_cell


@register_cell
class GRU(Cell):
    """GRU with the reset gate *after* the matrix product, as cuDNN / torch.nn.GRU:

        r_t = σ(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)      gate order in the weights: r, z, n
        z_t = σ(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)
        n_t = tanh(W_in x_t + b_in + r_t ⊙ (W_hn h_{t-1} + b_hn))
        h_t = (1 - z_t) ⊙ n_t + z_t ⊙ h_{t-1}

    Not the Chung et al. 2014 GRU (that is `gru_reset_before`). Weights: weight_ih (3H, D),
    weight_hh (3H, H), bias (3H) = b_i*, bias_hh (3H) = b_h*. b_hn sits inside the reset product, so
    both biases train: 3(DH + H² + 2H) per layer, 3H more than the reset-before form (b_hr and b_hz
    are redundant with b_ir and b_iz, but all are trained and counted). forget_bias is ignored.
    Fast loop: "cpp".
    """

    name = "gru"
    gates = ("reset", "update")
    state_size = 1
    loops = {"cpp": compiled.member_loop("gru_reset_after", "weight_hh", "bias_hh")}

    @classmethod
    def weight_shapes(cls, input_size: int, hidden_size: int) -> dict[str, tuple[int, ...]]:
        H = hidden_size
        return {"weight_ih": (3 * H, input_size), "weight_hh": (3 * H, H), "bias": (3 * H,), "bias_hh": (3 * H,)}

    @classmethod
    def step(cls, w: Weights, xw_t: torch.Tensor, state: State) -> tuple[State, dict[str, torch.Tensor]]:
        (h,) = state
        H = h.shape[-1]
        gh = recurrent_product(h, w["weight_hh"], w["bias_hh"].unsqueeze(1))  # W_h* h + b_h*
        r, z = torch.sigmoid(xw_t[..., : 2 * H] + gh[..., : 2 * H]).chunk(2, dim=-1)
        n = torch.tanh(xw_t[..., 2 * H :] + r * gh[..., 2 * H :])
        h = (1 - z) * n + z * h
        return (h,), {"reset": r, "update": z}
