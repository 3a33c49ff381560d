"""The contract every recurrent cell follows: one class per cell, over weights stacked for K models.

A cell is a set of classmethods on stacked tensors, never an nn.Module: the population trainer owns
the parameters (K, ...) and their optimizer state, the cell only knows its equations.

  Weights  dict[str, Tensor] of one layer, each (K, *shape) for the shapes of `weight_shapes`;
           the ones named in `frozen` are drawn once and never trained (an echo-state reservoir).
  State    tuple of (K, B, H) tensors, e.g. (h,) or (h, c): `state_size` of them, state[0] is h.

`step` is the definition (the readable, autograd-recorded reference); the optional fast loops in
`loops` ("cpp", "triton") must give its numbers (float64: to rounding; tests/test_fast_cells.py).
The dispatch that picks one is rnnbench/cells/loops.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch

Weights = dict[str, torch.Tensor]
State = tuple[torch.Tensor, ...]
# A fast time loop of one layer over stacked weights:
#   loop(w, xw (T, K, B, G), state, steps (K,) or (K, B) int64 or None) -> (hs (T, K, B, H), final state)
# member k runs steps[k] steps (all T when None); hs is zero after member k's end and its final
# state is the state after its own last step. steps (K, B): the same for each sequence at its own
# length (the loop may skip the steps after it).
Loop = Callable[[Weights, torch.Tensor, State, "torch.Tensor | None"], tuple[torch.Tensor, State]]


class Cell:
    """One recurrent cell. Subclasses set the class attributes and `weight_shapes`, `step`
    (and `init_` / `project` where the defaults do not fit), then register with @register_cell."""

    name: ClassVar[str]
    gates: ClassVar[tuple[str, ...]] = ()  # names `step` reports, for gate-saturation statistics
    state_size: ClassVar[int] = 1  # 1: (h,); 2: (h, c); more where a cell carries more (lstm_fgr: its gates)
    loops: ClassVar[dict[str, Loop]] = {}  # fast implementations of the time loop, by name
    frozen: ClassVar[tuple[str, ...]] = ()  # weights drawn at init and never trained (not counted as trained)
    structure: ClassVar[tuple[str, ...]] = ()  # frozen tensors that hold structure, not parameters (never counted)
    variant_of: ClassVar[str] = ""  # the cell this one is a variant of (Greff et al. 2015's: lstm_peephole); the report compares them

    @classmethod
    def weight_shapes(cls, input_size: int, hidden_size: int) -> dict[str, tuple[int, ...]]:  # pragma: no cover
        """Shapes of one layer's weights (without the leading K), in the order they are drawn."""
        raise NotImplementedError

    @classmethod
    def hidden_size_of(cls, w: Weights) -> int:
        """H of one layer's stacked weights. Default: W_hh's last dimension."""
        return int(w["weight_hh"].shape[-1])

    @classmethod
    def init_(cls, w: Weights, hidden_size: int, forget_bias: float) -> None:
        """Fix-ups after the uniform draw, in place (e.g. the forget-gate bias). Default: none."""

    @classmethod
    def draw_(cls, w: Weights, hidden_size: int, generator: torch.Generator) -> None:
        """One member's own draw after the uniform one, in place on its (unstacked) layer weights, from
        its generator (e.g. a sparse reservoir scaled to a spectral radius). Default: none, so no
        cell without it draws more numbers than before."""

    @classmethod
    def project(cls, w: Weights, x: torch.Tensor) -> torch.Tensor:
        """x (T, K, B, D) time major -> xw (T, K, B, G) = x W_ih^T + bias for every step at once.

        One batched product over the K models; the result is a time-major view of a (K, T, B, G)
        tensor, so member k's first steps, xw[:s, k], are contiguous (what the compiled loops take).
        """
        T, K, B, D = x.shape
        w_ih = w["weight_ih"]
        xk = x.permute(1, 0, 2, 3).reshape(K, T * B, D)
        xw = torch.baddbmm(w["bias"].unsqueeze(1), xk, w_ih.transpose(1, 2))
        return xw.view(K, T, B, -1).transpose(0, 1)

    @classmethod
    def step(cls, w: Weights, xw_t: torch.Tensor, state: State) -> tuple[State, dict[str, torch.Tensor]]:  # pragma: no cover
        """One step of all K models: xw_t (K, B, G) -> (new state, {gate name: activation (K, B, H)})."""
        raise NotImplementedError

    @classmethod
    def count_params(cls, input_size: int, hidden_size: int, num_layers: int = 1, bidirectional: bool = False,
                     trained: bool = True) -> int:
        """Trained scalars of one model's `num_layers` layers (all of them, frozen too, with
        trained=False); layer l > 0 sees input_size = hidden_size, or 2 * hidden_size when
        bidirectional: then every layer is there twice, one per direction."""
        directions = 2 if bidirectional else 1
        sizes = [input_size] + [directions * hidden_size] * (num_layers - 1)
        return directions * sum(math.prod(s) for d in sizes for n, s in cls.weight_shapes(d, hidden_size).items()
                                if not (trained and n in cls.frozen) and n not in cls.structure)


def recurrent_product(h: torch.Tensor, w_hh: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    """add + h W_hh^T for K models at once: h (K, B, H), w_hh (K, G, H), add (K, B, G) or (K, 1, G)."""
    return torch.baddbmm(add, h, w_hh.transpose(1, 2))
