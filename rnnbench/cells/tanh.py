"""Elman tanh RNN, the form of torch.nn.RNN(nonlinearity="tanh") with one bias."""

from __future__ import annotations

import torch

from rnnbench.cells import compiled
from rnnbench.cells.base import Cell, State, Weights, recurrent_product
from rnnbench.cells.registry import register_cell


@register_cell
class TanhRNN(Cell):
    """Elman tanh RNN (Elman 1990; the tanh unit of Chung et al. 2014):

        h_t = tanh(W_x x_t + W_h h_{t-1} + b)

    Weights: weight_ih (H, D), weight_hh (H, H), bias (H). Trainable per layer: DH + H² + H.
    forget_bias is ignored (no forget gate). Fast loop: "cpp".
    """

    name = "tanh"
    gates = ()
    state_size = 1
    loops = {"cpp": compiled.member_loop("tanh_rnn", "weight_hh")}

    @classmethod
    def weight_shapes(cls, input_size: int, hidden_size: int) -> dict[str, tuple[int, ...]]:
        H = hidden_size
        return {"weight_ih": (H, input_size), "weight_hh": (H, H), "bias": (H,)}

    @classmethod
    def step(cls, w: Weights, xw_t: torch.Tensor, state: State) -> tuple[State, dict[str, torch.Tensor]]:
        (h,) = state
        return (torch.tanh(recurrent_product(h, w["weight_hh"], xw_t)),), {}
