"""Greff et al. 2015's NFG: the peephole LSTM without its forget gate (f_t = 1)."""

from __future__ import annotations

from rnnbench.cells.lstm_peephole import PeepholeLSTM, gates_dropped_loop
from rnnbench.cells.registry import register_cell


@register_cell
class NoForgetGate(PeepholeLSTM):
    """LSTM ablation NFG (Greff et al. 2015): no forget gate, f_t = 1 (the LSTM of Hochreiter & Schmidhuber 1997):

        i_t = σ(W_xi x_t + W_hi h_{t-1} + w_ci ⊙ c_{t-1} + b_i)      gate order in the weights: i, g, o
        c_t = c_{t-1} + i_t ⊙ tanh(W_xg x_t + W_hg h_{t-1} + b_g)
        o_t = σ(W_xo x_t + W_ho h_{t-1} + w_co ⊙ c_t + b_o)
        h_t = o_t ⊙ tanh(c_t)

    There is no forget-gate bias to set: `model.forget_bias` has no effect.

    Weights as lstm_peephole's without the dropped gate's rows and peephole. Trainable per layer:
    3(DH + H² + H) + 2H. State (h, c). Its step is
    lstm_peephole's (written once); fast loops "cpp" and "triton": the peephole loops with the dropped
    gate held at exactly 1 (lstm_peephole.gates_dropped_loop).
    """

    name = "lstm_nfg"
    variant_of = "lstm_peephole"  # Greff et al. 2015's NFG
    blocks = "igo"
    gates = ("input", "output")
    loops = {"cpp": gates_dropped_loop(blocks, "cpp"), "triton": gates_dropped_loop(blocks, "triton")}
