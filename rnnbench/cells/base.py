"""The uniform interface every recurrent cell implementation follows (one registry, as in fastrnns/haste)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

# A cell's state is whatever it carries between steps: h for tanh/GRU, (h, c) for LSTMs,
# each shaped (num_layers, batch, hidden) like torch.nn.RNN/LSTM/GRU.
State = Any


class RecurrentLayer(nn.Module):
    """A stack of `num_layers` recurrent layers over a batch-first sequence.

    forward(x: (B, T, D), state=None) -> (out: (B, T, H) of the top layer, final state).
    A state of None means zeros. Passing the returned state back continues the sequence, so
    running T steps one at a time gives the same numbers as one call over T steps (the
    gradient-flow probe relies on it).
    """

    name: ClassVar[str]
    fused: ClassVar[bool] = False  # True where a cuDNN/ATen kernel runs the whole time loop

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, forget_bias: float = 0.0) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.forget_bias = forget_bias

    def forward(self, x: torch.Tensor, state: State = None) -> tuple[torch.Tensor, State]:  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def count_params(cls, input_size: int, hidden_size: int, num_layers: int = 1) -> int:  # pragma: no cover
        """Exact number of trainable scalars of this layer, from the formula (no module built)."""
        raise NotImplementedError

    def recurrence(self, device: torch.device | str, dtype: torch.dtype) -> str:
        """The time loop forward runs for inputs on `device` of `dtype` ('cpp', 'triton', 'python',
        'torch', 'reference'), recorded with every run: implementations agree only to float rounding."""
        from rnnbench.cells import _fast

        impl = getattr(self, "impl", "auto")
        return impl if impl == "reference" else _fast.resolve(impl, torch.zeros(1, 1, 1, device=device, dtype=dtype))

    def hidden_states(self, state: State) -> torch.Tensor:
        """The h part of a state, (num_layers, B, H)."""
        return state[0] if isinstance(state, tuple) else state
