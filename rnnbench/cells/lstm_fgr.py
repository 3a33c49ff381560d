"""Greff et al. 2015's FGR: the peephole LSTM with full gate recurrence (each gate sees all three gates' last values)."""

from __future__ import annotations

import torch

from rnnbench.cells import compiled, triton_steps
from rnnbench.cells.base import Loop, State, Weights, recurrent_product
from rnnbench.cells.lstm_peephole import PeepholeLSTM
from rnnbench.cells.registry import register_cell


def over_gate_state(wide: Loop) -> Loop:
    """FGR's Loop from `wide`, a peephole LSTM loop that takes the state z = [h, i, f, o] (4H wide) in
    place of h and the recurrent matrix [W_hh | R'] (4H, 4H), R' being R with a zero block of rows for
    the block input g (g reads no gates), and returns every step's z: the peephole loop's equations
    with R's products added. autograd carries the gradients back through the concatenations."""

    def loop(w: Weights, xw: torch.Tensor, state: State, steps: torch.Tensor | None) -> tuple[torch.Tensor, State]:
        h, c, i, f, o = state
        H = h.shape[-1]
        r = w["weight_gg"]
        r_wide = torch.cat([r[:, : 2 * H], r.new_zeros(r.shape[0], H, 3 * H), r[:, 2 * H :]], dim=1)  # rows i, f, (g), o
        weights = {"weight_hh": torch.cat([w["weight_hh"], r_wide], dim=2), "w_ci": w["w_ci"], "w_cf": w["w_cf"],
                   "w_co": w["w_co"]}
        zs, (z, c) = wide(weights, xw, (torch.cat([h, i, f, o], dim=-1), c), steps)
        h, i, f, o = z.split(H, dim=-1)
        return zs[..., :H], (h, c, i, f, o)

    return loop


FGR_LOOPS: dict[str, Loop] = {
    "cpp": over_gate_state(compiled.member_loop("lstm_fgr", "weight_hh", "w_ci", "w_cf", "w_co")),
    "triton": over_gate_state(triton_steps.peephole_lstm_loop),  # the kernels take z when h0 is 4H wide
}


@register_cell
class FullGateRecurrence(PeepholeLSTM):
    """LSTM ablation FGR (Greff et al. 2015): the vanilla peephole LSTM whose input, forget and output
    gates also read the previous step's gate activations g_{t-1} = [i_{t-1}, f_{t-1}, o_{t-1}]
    through a full (3H, 3H) matrix R (nine H x H blocks, R_ii ... R_oo; zeros before the first step):

        [r_i, r_f, r_o] = R g_{t-1}
        i_t = σ(W_xi x_t + W_hi h_{t-1} + w_ci ⊙ c_{t-1} + r_i + b_i)     gate order in the weights: i, f, g, o
        f_t = σ(W_xf x_t + W_hf h_{t-1} + w_cf ⊙ c_{t-1} + r_f + b_f)
        c_t = f_t ⊙ c_{t-1} + i_t ⊙ tanh(W_xg x_t + W_hg h_{t-1} + b_g)
        o_t = σ(W_xo x_t + W_ho h_{t-1} + w_co ⊙ c_t + r_o + b_o)
        h_t = o_t ⊙ tanh(c_t)

    Weights: lstm_peephole's plus weight_gg (3H, 3H). Trainable per layer: 4(DH + H² + H) + 3H + 9H².
    State (h, c, i, f, o). Fast loops: "cpp" and "triton", the peephole LSTM's over z = [h, i, f, o].
    """

    name = "lstm_fgr"
    variant_of = "lstm_peephole"  # Greff et al. 2015's FGR
    state_size = 5
    loops = FGR_LOOPS

    @classmethod
    def weight_shapes(cls, input_size: int, hidden_size: int) -> dict[str, tuple[int, ...]]:
        return {**super().weight_shapes(input_size, hidden_size), "weight_gg": (3 * hidden_size, 3 * hidden_size)}

    @classmethod
    def step(cls, w: Weights, xw_t: torch.Tensor, state: State) -> tuple[State, dict[str, torch.Tensor]]:
        h, c, *previous = state
        r_i, r_f, r_o = recurrent_product(torch.cat(previous, dim=-1), w["weight_gg"],
                                          torch.zeros_like(xw_t[..., : 3 * h.shape[-1]])).chunk(3, dim=-1)
        a_i, a_f, a_g, a_o = recurrent_product(h, w["weight_hh"], xw_t).chunk(4, dim=-1)
        i = torch.sigmoid(a_i + w["w_ci"].unsqueeze(1) * c + r_i)
        f = torch.sigmoid(a_f + w["w_cf"].unsqueeze(1) * c + r_f)
        c = f * c + i * torch.tanh(a_g)
        o = torch.sigmoid(a_o + w["w_co"].unsqueeze(1) * c + r_o)
        h = o * torch.tanh(c)
        return (h, c, i, f, o), {"input": i, "forget": f, "output": o}
