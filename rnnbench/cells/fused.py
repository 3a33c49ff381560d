"""PyTorch's fused recurrent kernels (cuDNN on GPU, ATen on CPU): tanh RNN, LSTM, and the cuDNN GRU.

The whole time loop runs inside one kernel call, never a Python loop. torch keeps two bias vectors
per layer, b_ih and b_hh. Where they only ever appear as a sum (tanh, LSTM) b_hh is frozen at zero
(requires_grad=False) so the trainable count is the equation count; in the cuDNN GRU b_hn sits
inside the reset product, so b_hh stays trainable. Weights live in `self.rnn` under torch's names
(rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0, ...).

One exception, the GRU on the CPU: torch runs nn.LSTM there through oneDNN's fused LSTM kernel
(aten::mkldnn_rnn_layer, forward and backward), but has no such kernel for the GRU, which falls back
to a per-step chain of ATen ops under autograd (~15 nodes and 2 small matmuls a step). The `gru`
cell therefore runs, on CPU float32/float64 tensors, the compiled time loop of rnnbench/cells/_fast.py
over the same weights (same function, same state_dict), several times faster; on CUDA it keeps
cuDNN. Findings and timings: results/bench/GRU_CPU.md.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from rnnbench.cells import _fast, register_cell
from rnnbench.cells.base import RecurrentLayer, State


class _Fused(RecurrentLayer):
    """Shared plumbing: forward through `self.rnn`, uniform init, frozen biases kept at zero."""

    fused = True
    freeze_bias_hh: ClassVar[bool] = True  # b_hh redundant with b_ih: frozen at zero
    rnn: nn.RNNBase

    def _setup(self) -> None:
        """Call at the end of a subclass's __init__, once self.rnn exists."""
        for l in range(self.num_layers):
            getattr(self.rnn, f"bias_hh_l{l}").requires_grad_(not self.freeze_bias_hh)
        self._fix_biases()

    def forward(self, x: torch.Tensor, state: State = None) -> tuple[torch.Tensor, State]:
        return self.rnn(x, state)

    @torch.no_grad()
    def init_uniform_(self, scale: float) -> None:
        """Every trainable weight and bias from U(-scale, scale); then the fixed biases re-applied."""
        for p in self.rnn.parameters():
            if p.requires_grad:
                p.uniform_(-scale, scale)
        self._fix_biases()

    @torch.no_grad()
    def _fix_biases(self) -> None:
        if self.freeze_bias_hh:
            for l in range(self.num_layers):
                getattr(self.rnn, f"bias_hh_l{l}").zero_()


@register_cell
class TanhRNN(_Fused):
    """Elman tanh RNN, torch.nn.RNN(nonlinearity="tanh"):

        h_t = tanh(W_x x_t + W_h h_{t-1} + b)

    b is bias_ih; bias_hh is frozen at zero. Trainable per layer: DH + H² + H (D = H above layer 0).
    forget_bias is ignored (no forget gate).
    """

    name = "tanh"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, forget_bias: float = 0.0) -> None:
        super().__init__(input_size, hidden_size, num_layers, forget_bias)
        self.rnn = nn.RNN(input_size, hidden_size, num_layers, nonlinearity="tanh", batch_first=True)
        self._setup()

    @classmethod
    def count_params(cls, input_size: int, hidden_size: int, num_layers: int = 1) -> int:
        H = hidden_size
        return sum(d * H + H * H + H for d in [input_size] + [H] * (num_layers - 1))


@register_cell
class LSTM(_Fused):
    """LSTM with forget gate, no peepholes (Hochreiter & Schmidhuber 1997; Gers et al. 2000), torch.nn.LSTM:

        i_t = σ(W_xi x_t + W_hi h_{t-1} + b_i)      gate order in the weights: i, f, g, o
        f_t = σ(W_xf x_t + W_hf h_{t-1} + b_f)
        g_t = tanh(W_xg x_t + W_hg h_{t-1} + b_g)
        o_t = σ(W_xo x_t + W_ho h_{t-1} + b_o)
        c_t = f_t ⊙ c_{t-1} + i_t ⊙ g_t
        h_t = o_t ⊙ tanh(c_t)

    b is bias_ih; bias_hh is frozen at zero. b_f starts at `forget_bias` (at construction and after
    init_uniform_). Trainable per layer: 4(DH + H² + H). State: (h, c), each (num_layers, B, H).
    """

    name = "lstm"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, forget_bias: float = 0.0) -> None:
        super().__init__(input_size, hidden_size, num_layers, forget_bias)
        self.rnn = nn.LSTM(input_size, hidden_size, num_layers, batch_first=True)
        self._setup()

    @torch.no_grad()
    def _fix_biases(self) -> None:
        super()._fix_biases()
        H = self.hidden_size
        for l in range(self.num_layers):
            getattr(self.rnn, f"bias_ih_l{l}")[H : 2 * H].fill_(self.forget_bias)

    @classmethod
    def count_params(cls, input_size: int, hidden_size: int, num_layers: int = 1) -> int:
        H = hidden_size
        return sum(4 * (d * H + H * H + H) for d in [input_size] + [H] * (num_layers - 1))


@register_cell
class GRU(_Fused):
    """GRU with the reset gate *after* the matrix product, as cuDNN / torch.nn.GRU:

        r_t = σ(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)      gate order in the weights: r, z, n
        z_t = σ(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)
        n_t = tanh(W_in x_t + b_in + r_t ⊙ (W_hn h_{t-1} + b_hn))
        h_t = (1 - z_t) ⊙ n_t + z_t ⊙ h_{t-1}

    Not the Chung et al. 2014 GRU (that is `gru_reset_before`). b_hn sits inside the reset product,
    so bias_hh stays trainable and the trainable count per layer is 3(DH + H² + 2H): 3H more than
    the 3(DH + H² + H) of the reset-before form. (b_hr and b_hz are redundant with b_ir and b_iz, so
    the function has 3(DH + H² + H) + H free parameters, but all 3(DH + H² + 2H) are trained and
    counted.) forget_bias is ignored.
    """

    name = "gru"
    freeze_bias_hh = False
    # "auto": the compiled loop for CPU float32/float64 input when it builds, else torch's kernel;
    # "torch": always torch.nn.GRU; "cpp" / "python": that loop of rnnbench/cells/_fast.py.
    impl: str = "auto"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, forget_bias: float = 0.0) -> None:
        super().__init__(input_size, hidden_size, num_layers, forget_bias)
        self.rnn = nn.GRU(input_size, hidden_size, num_layers, batch_first=True)
        self._setup()

    def _loop_impl(self, x: torch.Tensor) -> str | None:
        """The _fast loop to run for x, or None for torch.nn.GRU."""
        if self.impl == "torch" or x.dim() != 3:
            return None
        if self.impl == "auto":
            return "cpp" if _fast.cpp_eligible(x) and _fast.load_extension() else None
        return self.impl

    def forward(self, x: torch.Tensor, state: State = None) -> tuple[torch.Tensor, State]:
        impl = self._loop_impl(x)
        if impl is None:
            return self.rnn(x, state)
        if state is None:
            state = x.new_zeros(self.num_layers, x.shape[0], self.hidden_size)
        r, hs = self.rnn, []
        x = x.transpose(0, 1)  # time major inside the stack
        for l in range(self.num_layers):
            gi = F.linear(x, getattr(r, f"weight_ih_l{l}"), getattr(r, f"bias_ih_l{l}"))
            x, h = _fast.gru_reset_after(gi, state[l], getattr(r, f"weight_hh_l{l}"), getattr(r, f"bias_hh_l{l}"), impl=impl)
            hs.append(h)
        return x.transpose(0, 1).contiguous(), torch.stack(hs)

    @classmethod
    def count_params(cls, input_size: int, hidden_size: int, num_layers: int = 1) -> int:
        H = hidden_size
        return sum(3 * (d * H + H * H + 2 * H) for d in [input_size] + [H] * (num_layers - 1))
