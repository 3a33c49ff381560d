"""The LSTM of Graves 2013 with diagonal peepholes, as used by Chung et al. 2014 (no fused kernel has it).

Fast loops: "cpp" (compiled.py) and "triton" (triton_steps.py), both with a hand-written backward
through time: the autograd step loop's cost is per-op dispatch and bookkeeping (~15 nodes a step),
not arithmetic, so the compiled loop does one small BLAS product and one vectorised gate pass per
step, and the Triton loop one batched product and one gate kernel. Speeds: results/bench/.
"""

from __future__ import annotations

import torch

from rnnbench.cells import compiled, triton_steps
from rnnbench.cells.base import Cell, Loop, State, Weights, recurrent_product
from rnnbench.cells.registry import register_cell


_peephole_cpp = compiled.member_loop("peephole_lstm", "weight_hh", "w_ci", "w_cf", "w_co")
SATURATED = 1e4  # σ(1e4) is exactly 1 and σ'(1e4) = σ(1 - σ) exactly 0, in float32 and in float64
PEEPHOLE_LOOPS: dict[str, Loop] = {"cpp": _peephole_cpp, "triton": triton_steps.peephole_lstm_loop}


def gates_dropped_loop(blocks: str, impl: str = "cpp") -> Loop:
    """The `impl` ("cpp" or "triton") Loop of an ablation that keeps only `blocks` of i, f, g, o
    (Greff et al.'s NIG, NFG, NOG): the peephole loop, with each dropped gate's pre-activation the
    constant SATURATED and its recurrent rows and peephole zero, so that gate is exactly 1 and passes
    exactly no gradient; autograd carries the gradients of the kept rows back through the concatenations."""
    base = PEEPHOLE_LOOPS[impl]

    def loop(w: Weights, xw: torch.Tensor, state: State, steps: torch.Tensor | None) -> tuple[torch.Tensor, State]:
        H = w["weight_hh"].shape[-1]
        xk = xw.transpose(0, 1)  # (K, T, B, nH): the member-major storage `project` made
        K, T, B, _ = xk.shape
        x_of = dict(zip(blocks, xk.split(H, dim=-1)))
        hh_of = dict(zip(blocks, w["weight_hh"].split(H, dim=1)))
        const = xk.new_full((K, T, B, H), SATURATED)
        xw4 = torch.cat([x_of.get(b, const) for b in "ifgo"], dim=-1).transpose(0, 1)
        whh = torch.cat([hh_of.get(b, w["weight_hh"].new_zeros(K, H, H)) for b in "ifgo"], dim=1)
        peep = {f"w_c{b}": w[f"w_c{b}"] if f"w_c{b}" in w else w["weight_hh"].new_zeros(K, H) for b in "ifo"}
        return base({"weight_hh": whh, **peep}, xw4, state, steps)

    return loop


def without_peepholes(impl: str) -> Loop:
    """The `impl` Loop of an LSTM without peepholes (weights weight_hh only, gate order i, f, g, o):
    the peephole loop with its peepholes zero, which is exactly the plain LSTM (the triton loops of
    `lstm` and `cifg`)."""
    base = PEEPHOLE_LOOPS[impl]

    def loop(w: Weights, xw: torch.Tensor, state: State, steps: torch.Tensor | None) -> tuple[torch.Tensor, State]:
        zero = w["weight_hh"].new_zeros(w["weight_hh"].shape[0], w["weight_hh"].shape[-1])
        return base({"weight_hh": w["weight_hh"], "w_ci": zero, "w_cf": zero, "w_co": zero}, xw, state, steps)

    return loop


@register_cell
class PeepholeLSTM(Cell):
    """LSTM with diagonal peepholes (Graves 2013, eqs. 7-11; the LSTM of Chung et al. 2014):

        i_t = σ(W_xi x_t + W_hi h_{t-1} + w_ci ⊙ c_{t-1} + b_i)
        f_t = σ(W_xf x_t + W_hf h_{t-1} + w_cf ⊙ c_{t-1} + b_f)
        c_t = f_t ⊙ c_{t-1} + i_t ⊙ tanh(W_xg x_t + W_hg h_{t-1} + b_g)
        o_t = σ(W_xo x_t + W_ho h_{t-1} + w_co ⊙ c_t + b_o)      (the output gate sees the new c_t)
        h_t = o_t ⊙ tanh(c_t)

    Weights: weight_ih (4H, D), weight_hh (4H, H), bias (4H) in gate order i, f, g, o; peepholes
    w_ci, w_cf, w_co (H). b_f starts at `forget_bias`. Trainable per layer: 4(DH + H² + H) + 3H.
    State (h, c).
    """

    name = "lstm_peephole"
    gates = ("input", "forget", "output")
    state_size = 2
    loops = PEEPHOLE_LOOPS

    blocks = "ifgo"  # the gates (and the block input g) this cell has, in the weights' order

    @classmethod
    def weight_shapes(cls, input_size: int, hidden_size: int) -> dict[str, tuple[int, ...]]:
        H, n = hidden_size, len(cls.blocks)
        peep = {f"w_c{b}": (H,) for b in "ifo" if b in cls.blocks}
        return {"weight_ih": (n * H, input_size), "weight_hh": (n * H, H), "bias": (n * H,), **peep}

    @classmethod
    def init_(cls, w: Weights, hidden_size: int, forget_bias: float) -> None:
        if "f" in cls.blocks:
            k = cls.blocks.index("f")
            w["bias"][:, k * hidden_size : (k + 1) * hidden_size] = forget_bias

    @staticmethod
    def block_input(a: torch.Tensor) -> torch.Tensor:
        """g's activation (Greff et al.'s "input activation"): tanh."""
        return torch.tanh(a)

    @staticmethod
    def output_activation(c: torch.Tensor) -> torch.Tensor:
        """h's activation of the cell state (Greff et al.'s "output activation"): tanh."""
        return torch.tanh(c)

    @classmethod
    def step(cls, w: Weights, xw_t: torch.Tensor, state: State) -> tuple[State, dict[str, torch.Tensor]]:
        # Written once for the vanilla LSTM and its ablations (Greff et al. 2015): a gate a variant
        # drops is the constant 1, and its activations come from the two methods above.
        h, c = state
        a = dict(zip(cls.blocks, recurrent_product(h, w["weight_hh"], xw_t).chunk(len(cls.blocks), dim=-1)))
        gates: dict[str, torch.Tensor] = {}
        if "i" in a:
            gates["input"] = torch.sigmoid(a["i"] + w["w_ci"].unsqueeze(1) * c)
        if "f" in a:
            gates["forget"] = torch.sigmoid(a["f"] + w["w_cf"].unsqueeze(1) * c)
        kept = gates["forget"] * c if "f" in a else c
        new = gates["input"] * cls.block_input(a["g"]) if "i" in a else cls.block_input(a["g"])
        c = kept + new
        if "o" in a:
            gates["output"] = torch.sigmoid(a["o"] + w["w_co"].unsqueeze(1) * c)
            h = gates["output"] * cls.output_activation(c)
        else:
            h = cls.output_activation(c)
        return (h, c), gates
