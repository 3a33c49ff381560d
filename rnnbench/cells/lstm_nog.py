"""Greff et al. 2015's NOG: the peephole LSTM without its output gate (o_t = 1)."""

from __future__ import annotations

from rnnbench.cells.lstm_peephole import PeepholeLSTM, gates_dropped_loop
from rnnbench.cells.registry import register_cell


@register_cell
class NoOutputGate(PeepholeLSTM):
    """LSTM ablation NOG (Greff et al. 2015): no output gate, o_t = 1:

        i_t = σ(W_xi x_t + W_hi h_{t-1} + w_ci ⊙ c_{t-1} + b_i)      gate order in the weights: i, f, g
        f_t = σ(W_xf x_t + W_hf h_{t-1} + w_cf ⊙ c_{t-1} + b_f)
        c_t = f_t ⊙ c_{t-1} + i_t ⊙ tanh(W_xg x_t + W_hg h_{t-1} + b_g)
        h_t = tanh(c_t)

    Weights as lstm_peephole's without the dropped gate's rows and peephole. Trainable per layer:
    3(DH + H² + H) + 2H. State (h, c). Its step is
    lstm_peephole's (written once); fast loops "cpp" and "triton": the peephole loops with the dropped
    gate held at exactly 1 (lstm_peephole.gates_dropped_loop).
    """

    name = "lstm_nog"
    variant_of = "lstm_peephole"  # Greff et al. 2015's NOG
    blocks = "ifg"
    gates = ("input", "forget")
    loops = {"cpp": gates_dropped_loop(blocks, "cpp"), "triton": gates_dropped_loop(blocks, "triton")}
