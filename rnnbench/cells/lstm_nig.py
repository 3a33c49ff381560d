"""Greff et al. 2015's NIG: the peephole LSTM without its input gate (i_t = 1)."""

from __future__ import annotations

from rnnbench.cells.lstm_peephole import PeepholeLSTM, gates_dropped_loop
from rnnbench.cells.registry import register_cell


@register_cell
class NoInputGate(PeepholeLSTM):
    """LSTM ablation NIG (Greff et al. 2015, "LSTM: A Search Space Odyssey"): no input gate, i_t = 1:

        f_t = σ(W_xf x_t + W_hf h_{t-1} + w_cf ⊙ c_{t-1} + b_f)      gate order in the weights: f, g, o
        c_t = f_t ⊙ c_{t-1} + tanh(W_xg x_t + W_hg h_{t-1} + b_g)
        o_t = σ(W_xo x_t + W_ho h_{t-1} + w_co ⊙ c_t + b_o)
        h_t = o_t ⊙ tanh(c_t)

    Weights as lstm_peephole's without the dropped gate's rows and peephole. Trainable per layer:
    3(DH + H² + H) + 2H. State (h, c). Its step is
    lstm_peephole's (written once); fast loops "cpp" and "triton": the peephole loops with the dropped
    gate held at exactly 1 (lstm_peephole.gates_dropped_loop).
    """

    name = "lstm_nig"
    variant_of = "lstm_peephole"  # Greff et al. 2015's NIG
    blocks = "fgo"
    gates = ("forget", "output")
    loops = {"cpp": gates_dropped_loop(blocks, "cpp"), "triton": gates_dropped_loop(blocks, "triton")}
