"""The GRU of Cho et al. 2014 / Chung et al. 2014, reset gate *before* the recurrent matrix product.

cuDNN and torch.nn.GRU only offer the reset-after form (`gru`), a different function. Fast loops:
"cpp" (compiled.py: two small BLAS products and two gate passes a step, since r must be known before
U_h (r ⊙ h)) and "triton" (triton_steps.py), each with a hand-written backward through time.
"""

from __future__ import annotations

import torch

from rnnbench.cells import compiled, triton_steps
from rnnbench.cells.base import Cell, State, Weights
from rnnbench.cells.registry import register_cell


@register_cell
class GRUResetBefore(Cell):
    """GRU with the reset gate before the matrix product (Cho et al. 2014; Chung et al. 2014, eqs. 5-8):

        r_t = σ(W_xr x_t + W_hr h_{t-1} + b_r)
        z_t = σ(W_xz x_t + W_hz h_{t-1} + b_z)
        h~_t = tanh(W_xh x_t + W_hh (r_t ⊙ h_{t-1}) + b_h)
        h_t = (1 - z_t) ⊙ h_{t-1} + z_t ⊙ h~_t

    Weights: weight_ih (3H, D), weight_hh (3H, H) = [W_hr; W_hz; W_hh], bias (3H), order r, z, h~.
    Trainable per layer: 3(DH + H² + H). forget_bias is ignored.
    """

    name = "gru_reset_before"
    gates = ("reset", "update")
    state_size = 1
    loops = {"cpp": compiled.member_loop("gru_reset_before", "weight_hh"), "triton": triton_steps.gru_reset_before_loop}

    @classmethod
    def weight_shapes(cls, input_size: int, hidden_size: int) -> dict[str, tuple[int, ...]]:
        H = hidden_size
        return {"weight_ih": (3 * H, input_size), "weight_hh": (3 * H, H), "bias": (3 * H,)}

    @classmethod
    def step(cls, w: Weights, xw_t: torch.Tensor, state: State) -> tuple[State, dict[str, torch.Tensor]]:
        (h,) = state
        H = h.shape[-1]
        u = w["weight_hh"].transpose(1, 2)  # (K, H, 3H)
        r, z = torch.sigmoid(torch.baddbmm(xw_t[..., : 2 * H], h, u[..., : 2 * H])).chunk(2, dim=-1)
        h_tilde = torch.tanh(torch.baddbmm(xw_t[..., 2 * H :], r * h, u[..., 2 * H :]))  # reset before U
        h = (1 - z) * h + z * h_tilde
        return (h,), {"reset": r, "update": z}
