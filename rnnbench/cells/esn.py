"""Echo-state network: a fixed random reservoir of leaky tanh units; only the readout is trained."""

from __future__ import annotations

import torch

from rnnbench.cells.base import Cell, State, Weights, recurrent_product
from rnnbench.cells.registry import register_cell


@register_cell
class EchoState(Cell):
    """Leaky-integrator echo-state network (Jaeger 2001; Lukoševičius 2012, "A Practical Guide to
    Applying Echo State Networks", eqs. 2-3, with the bias as W_in's column for the constant 1):

        h~_t = tanh(W_in x_t + b + W h_{t-1})
        h_t  = (1 - a) h_{t-1} + a h~_t

    W_in and b ~ U(-input_scale, input_scale); W sparse: each entry non-zero with probability
    connections / H (about `connections` inputs per unit), its values U(-1, 1), then scaled so that
    its spectral radius (largest |eigenvalue|) is `spectral_radius`. a is the leak rate. All three
    are drawn from the member's seed and never trained (`frozen`): only the output layer Linear(H, O)
    is, by the run's optimizer (not ridge regression), so the model trains like every other cell.

    Weights (all frozen): weight_ih (H, D), weight_hh (H, H), bias (H). Trained per layer: 0, so a
    budget counts its output layer (model.budget_convention=total); run records n_params_frozen.
    To try other reservoir settings, subclass and change the class attributes (one file).
    forget_bias and init_scale are ignored. No fast loop: nothing in the reservoir needs a gradient,
    so the reference loop runs without autograd.
    """

    name = "esn"
    gates = ()
    state_size = 1
    frozen = ("weight_ih", "weight_hh", "bias")
    spectral_radius = 0.95  # below 1: the echo-state property in practice (Lukoševičius 2012, 3.2.1)
    leak_rate = 0.5
    input_scale = 1.0
    connections = 10  # expected non-zero inputs per unit of W

    @classmethod
    def weight_shapes(cls, input_size: int, hidden_size: int) -> dict[str, tuple[int, ...]]:
        H = hidden_size
        return {"weight_ih": (H, input_size), "weight_hh": (H, H), "bias": (H,)}

    @classmethod
    def draw_(cls, w: Weights, hidden_size: int, generator: torch.Generator) -> None:
        H, dtype = hidden_size, w["weight_hh"].dtype
        s = cls.input_scale
        w["weight_ih"].uniform_(-s, s, generator=generator)
        w["bias"].uniform_(-s, s, generator=generator)
        keep = torch.rand(H, H, generator=generator, dtype=torch.float64) < min(1.0, cls.connections / H)
        W = torch.empty(H, H, dtype=torch.float64).uniform_(-1.0, 1.0, generator=generator) * keep
        radius = float(torch.linalg.eigvals(W).abs().max()) if keep.any() else 0.0
        w["weight_hh"].copy_((W * (cls.spectral_radius / radius) if radius > 0 else W).to(dtype))

    @classmethod
    def step(cls, w: Weights, xw_t: torch.Tensor, state: State) -> tuple[State, dict[str, torch.Tensor]]:
        (h,) = state
        a = cls.leak_rate
        return ((1 - a) * h + a * torch.tanh(recurrent_product(h, w["weight_hh"], xw_t)),), {}
