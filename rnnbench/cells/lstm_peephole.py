"""The LSTM of Graves 2013 with diagonal peepholes, as used by Chung et al. 2014 (no fused kernel has it).

Two paths, the same numbers:
  forward            the input projection of all steps as one matmul, then a time loop with a
                     hand-written backward through time (rnnbench/cells/_fast.py): on the CPU a C++
                     loop compiled once with torch.utils.cpp_extension.load_inline, elsewhere (CUDA,
                     or no compiler) the same algorithm in torch ops.
  forward_reference  the readable step function looped over time under autograd: the definition the
                     fast path is tested against (float64, outputs and gradients, tests/test_fast_cells.py).

Why this choice (throughput relative to the fused nn.LSTM, which runs oneDNN's LSTM kernel; measured
side by side by `rnnbench bench` on the project's 2-core AMD EPYC, seq 200, batch 32, input 88, fwd+bwd,
float32; results/bench/bench_cpu.md):
  autograd step loop (forward_reference)          0.11x (h 36)   0.21x (h 100)
  TorchScript of that loop (a separate probe)     0.12x (h 36): same per-op autograd nodes, no gain
  autograd.Function, backward by hand, torch ops  0.27x (h 36)   0.58x (h 100)   ("python")
  the same algorithm compiled (load_inline)       0.79x (h 36)   1.02x (h 100)   ("cpp", the default)
The step loop's cost is per-op dispatch and autograd bookkeeping (~15 nodes a step), not arithmetic;
the compiled loop does one small MKL product and one vectorised gate pass per step. Exact: float64
agrees with forward_reference to ~1e-13. Build ~7-15 s on 2 cores, once, cached; without a compiler
the "python" loop runs, after one warning. CUDA runs the loop with each step's gates fused into one
Triton kernel ("triton", rnnbench/cells/_triton.py): on an H100 at seq 200, batch 32, 0.04x cuDNN's
LSTM as it is, 0.23x (hidden 36) and 0.38x (hidden 100) captured in a CUDA graph, against 0.02x and
0.12x for the torch-op loop (results/bench/triton_cuda.csv).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rnnbench.cells import _fast, register_cell
from rnnbench.cells.base import RecurrentLayer, State


class PeepholeLSTMLayer(nn.Module):
    """One layer. weight_ih (4H, D), weight_hh (4H, H), bias (4H) in gate order i, f, g, o;
    diagonal peepholes w_ci, w_cf, w_co (H each)."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        H = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(4 * H, input_size))
        self.weight_hh = nn.Parameter(torch.empty(4 * H, H))
        self.bias = nn.Parameter(torch.empty(4 * H))
        self.w_ci = nn.Parameter(torch.empty(H))
        self.w_cf = nn.Parameter(torch.empty(H))
        self.w_co = nn.Parameter(torch.empty(H))

    def forward(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Time major: x (T, B, D), h and c (B, H) -> (all h_t (T, B, H), h_T, c_T). The fast loop."""
        xw = F.linear(x, self.weight_ih, self.bias)  # (T, B, 4H): W x_t + b for every t at once
        return _fast.peephole_lstm(xw, h, c, self.weight_hh, self.w_ci, self.w_cf, self.w_co, impl=impl)

    def forward_reference(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batch first: x (B, T, D), h and c (B, H) -> (all h_t (B, T, H), h_T, c_T). One step at a time."""
        xw = x @ self.weight_ih.T + self.bias  # (B, T, 4H): W x_t + b for every t at once
        outs = []
        for t in range(x.shape[1]):
            a_i, a_f, a_g, a_o = (xw[:, t] + h @ self.weight_hh.T).chunk(4, dim=1)
            i = torch.sigmoid(a_i + self.w_ci * c)
            f = torch.sigmoid(a_f + self.w_cf * c)
            c = f * c + i * torch.tanh(a_g)
            o = torch.sigmoid(a_o + self.w_co * c)  # the output gate sees the new cell c_t
            h = o * torch.tanh(c)
            outs.append(h)
        return torch.stack(outs, dim=1), h, c


@register_cell
class PeepholeLSTM(RecurrentLayer):
    """LSTM with diagonal peepholes (Graves 2013, eqs. 7-11; the LSTM of Chung et al. 2014):

        i_t = σ(W_xi x_t + W_hi h_{t-1} + w_ci ⊙ c_{t-1} + b_i)
        f_t = σ(W_xf x_t + W_hf h_{t-1} + w_cf ⊙ c_{t-1} + b_f)
        c_t = f_t ⊙ c_{t-1} + i_t ⊙ tanh(W_xg x_t + W_hg h_{t-1} + b_g)
        o_t = σ(W_xo x_t + W_ho h_{t-1} + w_co ⊙ c_t + b_o)
        h_t = o_t ⊙ tanh(c_t)

    One bias per gate; b_f starts at `forget_bias` (at construction and after init_uniform_).
    Trainable per layer: 4(DH + H² + H) + 3H. State: (h, c), each (num_layers, B, H).
    Default init: every weight from U(-1/√H, 1/√H), as torch.nn.LSTM.
    """

    name = "lstm_peephole"
    impl: str = "auto"  # time loop: "auto" | "cpp" | "python" | "triton" (rnnbench/cells/_fast.py) | "reference"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, forget_bias: float = 0.0) -> None:
        super().__init__(input_size, hidden_size, num_layers, forget_bias)
        sizes = [input_size] + [hidden_size] * (num_layers - 1)
        self.layers = nn.ModuleList(PeepholeLSTMLayer(d, hidden_size) for d in sizes)
        self.init_uniform_(1.0 / math.sqrt(hidden_size))

    def forward(self, x: torch.Tensor, state: State = None) -> tuple[torch.Tensor, State]:
        if self.impl == "reference":
            return self.forward_reference(x, state)
        h0, c0 = self._initial(x, state)
        hs, cs = [], []
        x = x.transpose(0, 1)  # time major inside the stack
        for l, layer in enumerate(self.layers):
            x, h, c = layer(x, h0[l], c0[l], impl=self.impl)  # layer l's h_t is layer l+1's x_t
            hs.append(h)
            cs.append(c)
        return x.transpose(0, 1).contiguous(), (torch.stack(hs), torch.stack(cs))

    def forward_reference(self, x: torch.Tensor, state: State = None) -> tuple[torch.Tensor, State]:
        """The same function as forward, one autograd-recorded step at a time (the tests' reference)."""
        h0, c0 = self._initial(x, state)
        hs, cs = [], []
        for l, layer in enumerate(self.layers):
            x, h, c = layer.forward_reference(x, h0[l], c0[l])
            hs.append(h)
            cs.append(c)
        return x, (torch.stack(hs), torch.stack(cs))

    def _initial(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, torch.Tensor]:
        if state is None:
            zeros = x.new_zeros(self.num_layers, x.shape[0], self.hidden_size)
            return zeros, zeros
        return state

    @torch.no_grad()
    def init_uniform_(self, scale: float) -> None:
        """Every weight, bias and peephole from U(-scale, scale); then b_f = forget_bias."""
        for p in self.parameters():
            p.uniform_(-scale, scale)
        H = self.hidden_size
        for layer in self.layers:
            layer.bias[H : 2 * H].fill_(self.forget_bias)

    @classmethod
    def count_params(cls, input_size: int, hidden_size: int, num_layers: int = 1) -> int:
        H = hidden_size
        return sum(4 * (d * H + H * H + H) + 3 * H for d in [input_size] + [H] * (num_layers - 1))
