"""PyTorch's fused recurrent kernels (cuDNN on GPU, ATen on CPU): tanh RNN, LSTM, and the cuDNN GRU.

The whole time loop runs inside one kernel call, never a Python loop. torch keeps two bias vectors
per layer, b_ih and b_hh. Where they only ever appear as a sum (tanh, LSTM) b_hh is frozen at zero
(requires_grad=False) so the trainable count is the equation count; in the cuDNN GRU b_hn sits
inside the reset product, so b_hh stays trainable. Weights live in `self.rnn` under torch's names
(rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0, ...).

On the CPU, torch's kernels are slow for the small models of this study: nn.LSTM runs oneDNN's fused
LSTM (aten::mkldnn_rnn_layer), but nn.RNN and nn.GRU fall back to a per-step chain of ATen ops under
autograd (~15 nodes and 2 small matmuls a step for the GRU). Each cell therefore runs, on CPU
float32/float64 tensors with impl "auto", the compiled time loop of rnnbench/cells/_fast.py over the
same weights (same function, same state_dict) where that loop was measured faster: always for tanh
(2.9-5.8x nn.RNN at H = 36-100, bench_cpu.md) and the GRU (2.7-6.7x nn.GRU), and for the LSTM below
H = 64 (1.61x nn.LSTM at 36, 1.22x at 46; in a side-by-side probe 1.12x at 56, 0.87x at 64, 0.9x at
80: oneDNN threads its step products, which pays from there on). On CUDA they keep cuDNN. Findings and timings: results/bench/GRU_CPU.md, results/bench/bench_cpu.md.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from rnnbench.cells import _fast, register_cell
from rnnbench.cells.base import RecurrentLayer, State


class _Fused(RecurrentLayer):
    """Shared plumbing: forward through `self.rnn` (or the compiled loop), uniform init, frozen biases."""

    fused = True
    freeze_bias_hh: ClassVar[bool] = True  # b_hh redundant with b_ih: frozen at zero
    # "auto": the compiled loop for CPU float32/float64 input where `_cpp_wins` and it builds, else
    # torch's kernel; "torch": always torch's kernel; otherwise one of `loops` (rnnbench/cells/_fast.py).
    impl: str = "auto"
    loops: ClassVar[tuple[str, ...]] = ("cpp",)
    rnn: nn.RNNBase

    def _setup(self) -> None:
        """Call at the end of a subclass's __init__, once self.rnn exists."""
        for l in range(self.num_layers):
            getattr(self.rnn, f"bias_hh_l{l}").requires_grad_(not self.freeze_bias_hh)
        self._fix_biases()

    def _cpp_wins(self) -> bool:
        """Whether the compiled loop was measured faster than torch's CPU kernel at this size."""
        return True

    def _loop_impl(self, x: torch.Tensor) -> str | None:
        """The _fast loop to run for x ('cpp', or 'python' where a cell has one), or None for torch's kernel."""
        if self.impl == "torch" or x.dim() != 3:
            return None
        if self.impl == "auto":
            return "cpp" if self._cpp_wins() and _fast.cpp_eligible(x) and _fast.load_extension() else None
        if self.impl not in self.loops:
            raise ValueError(f"{self.name}: impl must be one of auto, torch, {', '.join(self.loops)}; got {self.impl!r}")
        return _fast.resolve(self.impl, x)

    def forward(self, x: torch.Tensor, state: State = None) -> tuple[torch.Tensor, State]:
        impl = self._loop_impl(x)
        if impl is None:
            return self.rnn(x, state)
        r = self.rnn
        if state is None:
            state = self._zero_state(x)
        finals = []
        x = x.transpose(0, 1)  # time major inside the stack
        for l in range(self.num_layers):
            w = {n: getattr(r, f"{n}_l{l}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
            x, final = self._layer(x, state, l, w, impl)  # layer l's h_t is layer l+1's x_t
            finals.append(final)
        return x.transpose(0, 1).contiguous(), self._stack_states(finals)

    def _zero_state(self, x: torch.Tensor) -> State:
        return x.new_zeros(self.num_layers, x.shape[0], self.hidden_size)

    def _layer(self, x: torch.Tensor, state: State, l: int, w: dict[str, torch.Tensor], impl: str) -> tuple[torch.Tensor, Any]:
        """(hs, final state) of layer l on time-major x by the compiled loop."""
        raise NotImplementedError

    @staticmethod
    def _stack_states(finals: list[Any]) -> State:
        return torch.stack(finals)

    def recurrence(self, device: torch.device | str, dtype: torch.dtype) -> str:
        return self._loop_impl(torch.zeros(1, 1, 1, device=device, dtype=dtype)) or "torch"

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

    def _layer(self, x, state, l, w, impl):  # type: ignore[override]
        return _fast.tanh_rnn(F.linear(x, w["weight_ih"], w["bias_ih"] + w["bias_hh"]), state[l], w["weight_hh"])

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

    def _cpp_wins(self) -> bool:
        return self.hidden_size < 64  # the measured crossover with oneDNN's LSTM (module docstring)

    def _zero_state(self, x: torch.Tensor) -> State:
        z = super()._zero_state(x)
        return z, z

    def _layer(self, x, state, l, w, impl):  # type: ignore[override]
        xw = F.linear(x, w["weight_ih"], w["bias_ih"] + w["bias_hh"])
        hs, h, c = _fast.lstm(xw, state[0][l], state[1][l], w["weight_hh"])
        return hs, (h, c)

    @staticmethod
    def _stack_states(finals: list[Any]) -> State:
        return torch.stack([h for h, _ in finals]), torch.stack([c for _, c in finals])

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
    loops = ("cpp", "python")  # "python": the same loop in torch ops (any device), for tests and the bench

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, forget_bias: float = 0.0) -> None:
        super().__init__(input_size, hidden_size, num_layers, forget_bias)
        self.rnn = nn.GRU(input_size, hidden_size, num_layers, batch_first=True)
        self._setup()

    def _layer(self, x, state, l, w, impl):  # type: ignore[override]
        gi = F.linear(x, w["weight_ih"], w["bias_ih"])
        return _fast.gru_reset_after(gi, state[l], w["weight_hh"], w["bias_hh"], impl=impl)

    @classmethod
    def count_params(cls, input_size: int, hidden_size: int, num_layers: int = 1) -> int:
        H = hidden_size
        return sum(3 * (d * H + H * H + 2 * H) for d in [input_size] + [H] * (num_layers - 1))
