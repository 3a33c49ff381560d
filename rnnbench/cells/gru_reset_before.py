"""The GRU of Cho et al. 2014 / Chung et al. 2014, reset gate *before* the recurrent matrix product.

cuDNN and torch.nn.GRU only offer the reset-after form (`gru`), a different function. Two paths, the
same numbers:
  forward            the input projection of all steps as one matmul, then a time loop with a
                     hand-written backward through time (rnnbench/cells/_fast.py): on the CPU a C++
                     loop compiled once with torch.utils.cpp_extension.load_inline, on CUDA the same
                     loop with each step's gate arithmetic in Triton kernels (rnnbench/cells/_triton.py),
                     elsewhere (no compiler, no triton) the same algorithm in torch ops.
  forward_reference  the readable step function looped over time under autograd: the definition the
                     fast path is tested against (float64, outputs and gradients, tests/test_fast_cells.py).

The choice and its measurements are those of lstm_peephole.py (results/bench/bench_cpu.md): per-op
dispatch and autograd bookkeeping, not arithmetic, dominate the step loop; the compiled loop does two
small MKL products and two vectorised gate passes per step (r must be known before U_h (r h)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rnnbench.cells import _fast, register_cell
from rnnbench.cells.base import RecurrentLayer, State


class GRUResetBeforeLayer(nn.Module):
    """One layer. weight_ih (3H, D), weight_hh (3H, H), bias (3H) in gate order r, z, h~."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        H = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(3 * H, input_size))
        self.weight_hh = nn.Parameter(torch.empty(3 * H, H))
        self.bias = nn.Parameter(torch.empty(3 * H))

    def forward(self, x: torch.Tensor, h: torch.Tensor, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """Time major: x (T, B, D), h (B, H) -> (all h_t (T, B, H), h_T). The fast loop."""
        xw = F.linear(x, self.weight_ih, self.bias)  # (T, B, 3H): W x_t + b for every t at once
        return _fast.gru_reset_before(xw, h, self.weight_hh, impl=impl)

    def forward_reference(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch first: x (B, T, D), h (B, H) -> (all h_t (B, T, H), h_T). One step at a time."""
        H = h.shape[1]
        xw = x @ self.weight_ih.T + self.bias  # (B, T, 3H): W x_t + b for every t at once
        U_rz, U_h = self.weight_hh[: 2 * H], self.weight_hh[2 * H :]
        outs = []
        for t in range(x.shape[1]):
            a_rz, a_h = xw[:, t, : 2 * H], xw[:, t, 2 * H :]
            r, z = torch.sigmoid(a_rz + h @ U_rz.T).chunk(2, dim=1)
            h_tilde = torch.tanh(a_h + (r * h) @ U_h.T)  # reset before U
            h = (1 - z) * h + z * h_tilde
            outs.append(h)
        return torch.stack(outs, dim=1), h


@register_cell
class GRUResetBefore(RecurrentLayer):
    """GRU with the reset gate before the matrix product (Cho et al. 2014; Chung et al. 2014, eqs. 5-8):

        r_t = σ(W_xr x_t + W_hr h_{t-1} + b_r)
        z_t = σ(W_xz x_t + W_hz h_{t-1} + b_z)
        h~_t = tanh(W_xh x_t + W_hh (r_t ⊙ h_{t-1}) + b_h)
        h_t = (1 - z_t) ⊙ h_{t-1} + z_t ⊙ h~_t

    One bias per gate. Trainable per layer: 3(DH + H² + H). forget_bias is ignored.
    Default init: every weight from U(-1/√H, 1/√H), as torch.nn.GRU.
    """

    name = "gru_reset_before"
    impl: str = "auto"  # time loop: "auto" | "cpp" | "python" | "triton" (rnnbench/cells/_fast.py) | "reference"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, forget_bias: float = 0.0) -> None:
        super().__init__(input_size, hidden_size, num_layers, forget_bias)
        sizes = [input_size] + [hidden_size] * (num_layers - 1)
        self.layers = nn.ModuleList(GRUResetBeforeLayer(d, hidden_size) for d in sizes)
        self.init_uniform_(1.0 / math.sqrt(hidden_size))

    def forward(self, x: torch.Tensor, state: State = None) -> tuple[torch.Tensor, State]:
        if self.impl == "reference":
            return self.forward_reference(x, state)
        if state is None:
            state = x.new_zeros(self.num_layers, x.shape[0], self.hidden_size)
        hs = []
        x = x.transpose(0, 1)  # time major inside the stack
        for l, layer in enumerate(self.layers):
            x, h = layer(x, state[l], impl=self.impl)  # layer l's h_t is layer l+1's x_t
            hs.append(h)
        return x.transpose(0, 1).contiguous(), torch.stack(hs)

    def forward_reference(self, x: torch.Tensor, state: State = None) -> tuple[torch.Tensor, State]:
        """The same function as forward, one autograd-recorded step at a time (the tests' reference)."""
        if state is None:
            state = x.new_zeros(self.num_layers, x.shape[0], self.hidden_size)
        hs = []
        for l, layer in enumerate(self.layers):
            x, h = layer.forward_reference(x, state[l])
            hs.append(h)
        return x, torch.stack(hs)

    @torch.no_grad()
    def init_uniform_(self, scale: float) -> None:
        """Every weight and bias from U(-scale, scale)."""
        for p in self.parameters():
            p.uniform_(-scale, scale)

    @classmethod
    def count_params(cls, input_size: int, hidden_size: int, num_layers: int = 1) -> int:
        H = hidden_size
        return sum(3 * (d * H + H * H + H) for d in [input_size] + [H] * (num_layers - 1))
