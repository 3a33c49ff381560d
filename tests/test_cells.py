"""Every cell against its equations (../shared/docs/cells.md) written out step by step in plain torch.

The references below are independent code: they read the weights out of the module, split them
into the per-gate matrices of the equations and loop over layers and time one step at a time.
Outputs, final states, input gradients and every weight gradient are compared in float64.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from rnnbench.cells import CELLS, get_cell
from rnnbench.errors import RnnbenchError

NAMES = ["tanh", "lstm", "gru", "lstm_peephole", "gru_reset_before"]
LSTMS = ["lstm", "lstm_peephole"]
B, T, D, H = 3, 7, 4, 5

sig, tanh = torch.sigmoid, torch.tanh


# --- reference steps, one equation per line ------------------------------------------------------
# Each takes the layer's weights P (a dict of the module's tensors), x_t (B, D) and the previous
# state, and returns the new state. `lin(W, v)` is W v for a batch of row vectors.


def lin(W: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return v @ W.T


def step_tanh(P: dict, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    W_x, W_h, b = P["weight_ih"], P["weight_hh"], P["bias_ih"]
    return tanh(lin(W_x, x) + lin(W_h, h) + b)


def step_lstm(P: dict, x: torch.Tensor, s: tuple) -> tuple:
    h, c = s
    W_xi, W_xf, W_xg, W_xo = P["weight_ih"].chunk(4)
    W_hi, W_hf, W_hg, W_ho = P["weight_hh"].chunk(4)
    b_i, b_f, b_g, b_o = P["bias_ih"].chunk(4)
    i = sig(lin(W_xi, x) + lin(W_hi, h) + b_i)
    f = sig(lin(W_xf, x) + lin(W_hf, h) + b_f)
    g = tanh(lin(W_xg, x) + lin(W_hg, h) + b_g)
    o = sig(lin(W_xo, x) + lin(W_ho, h) + b_o)
    c = f * c + i * g
    h = o * tanh(c)
    return h, c


def step_gru_reset_after(P: dict, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    W_ir, W_iz, W_in = P["weight_ih"].chunk(3)
    W_hr, W_hz, W_hn = P["weight_hh"].chunk(3)
    b_ir, b_iz, b_in = P["bias_ih"].chunk(3)
    b_hr, b_hz, b_hn = P["bias_hh"].chunk(3)
    r = sig(lin(W_ir, x) + b_ir + lin(W_hr, h) + b_hr)
    z = sig(lin(W_iz, x) + b_iz + lin(W_hz, h) + b_hz)
    n = tanh(lin(W_in, x) + b_in + r * (lin(W_hn, h) + b_hn))
    return (1 - z) * n + z * h


def step_lstm_peephole(P: dict, x: torch.Tensor, s: tuple) -> tuple:
    h, c_prev = s
    W_xi, W_xf, W_xg, W_xo = P["weight_ih"].chunk(4)
    W_hi, W_hf, W_hg, W_ho = P["weight_hh"].chunk(4)
    b_i, b_f, b_g, b_o = P["bias"].chunk(4)
    i = sig(lin(W_xi, x) + lin(W_hi, h) + P["w_ci"] * c_prev + b_i)
    f = sig(lin(W_xf, x) + lin(W_hf, h) + P["w_cf"] * c_prev + b_f)
    c = f * c_prev + i * tanh(lin(W_xg, x) + lin(W_hg, h) + b_g)
    o = sig(lin(W_xo, x) + lin(W_ho, h) + P["w_co"] * c + b_o)
    h = o * tanh(c)
    return h, c


def step_gru_reset_before(P: dict, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    W_xr, W_xz, W_xh = P["weight_ih"].chunk(3)
    W_hr, W_hz, W_hh = P["weight_hh"].chunk(3)
    b_r, b_z, b_h = P["bias"].chunk(3)
    r = sig(lin(W_xr, x) + lin(W_hr, h) + b_r)
    z = sig(lin(W_xz, x) + lin(W_hz, h) + b_z)
    h_tilde = tanh(lin(W_xh, x) + lin(W_hh, r * h) + b_h)
    return (1 - z) * h + z * h_tilde


STEPS: dict[str, Callable] = {
    "tanh": step_tanh,
    "lstm": step_lstm,
    "gru": step_gru_reset_after,
    "lstm_peephole": step_lstm_peephole,
    "gru_reset_before": step_gru_reset_before,
}


def layer_params(cell: str, P: dict[str, torch.Tensor], l: int) -> dict[str, torch.Tensor]:
    """Layer l's tensors under short names, from the module's parameter names."""
    if cell in ("tanh", "lstm", "gru"):  # torch.nn.RNN/LSTM/GRU names: rnn.weight_ih_l0, ...
        return {k: P[f"rnn.{k}_l{l}"] for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
    prefix = f"layers.{l}."
    return {k[len(prefix) :]: v for k, v in P.items() if k.startswith(prefix)}


def reference(cell: str, P: dict, x: torch.Tensor, state=None, num_layers: int = 1):
    """Loop over layers, then time, one reference step at a time. Returns (out, final state)."""
    lstm = cell in LSTMS
    if state is None:
        zeros = x.new_zeros(num_layers, x.shape[0], H)
        state = (zeros, zeros) if lstm else zeros
    finals = []
    for l in range(num_layers):
        s = (state[0][l], state[1][l]) if lstm else state[l]
        outs = []
        for t in range(x.shape[1]):
            s = STEPS[cell](layer_params(cell, P, l), x[:, t], s)
            outs.append(s[0] if lstm else s)
        x = torch.stack(outs, dim=1)  # layer l's h_t is layer l+1's x_t
        finals.append(s)
    if lstm:
        return x, (torch.stack([s[0] for s in finals]), torch.stack([s[1] for s in finals]))
    return x, torch.stack(finals)


def flat(state) -> list[torch.Tensor]:
    return list(state) if isinstance(state, tuple) else [state]


def make(cell: str, num_layers: int = 1, forget_bias: float = 0.0, seed: int = 0):
    torch.manual_seed(seed)
    layer = get_cell(cell)(D, H, num_layers=num_layers, forget_bias=forget_bias).double()
    layer.init_uniform_(0.5)  # random weights large enough that every nonlinearity matters
    return layer


# --- the tests ------------------------------------------------------------------------------------


def test_registry_has_all_cells() -> None:
    assert set(NAMES) <= set(CELLS)
    assert {n for n in NAMES if CELLS[n].fused} == {"tanh", "lstm", "gru"}


def test_unknown_cell_lists_valid_names() -> None:
    with pytest.raises(RnnbenchError) as e:
        get_cell("lstn")
    msg = str(e.value)
    assert "\n" not in msg and "lstn" in msg
    assert all(n in msg for n in NAMES)


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("cell", NAMES)
def test_matches_equations_forward_and_backward(cell: str, num_layers: int) -> None:
    layer = make(cell, num_layers, forget_bias=0.7)
    torch.manual_seed(1)
    x = torch.randn(B, T, D, dtype=torch.float64)
    state = tuple(torch.randn(num_layers, B, H, dtype=torch.float64) for _ in range(2 if cell in LSTMS else 1))
    state = state if cell in LSTMS else state[0]
    # the gradients are taken of a random linear function of out and the final state
    g_out = torch.randn(B, T, H, dtype=torch.float64)
    g_state = [torch.randn(num_layers, B, H, dtype=torch.float64) for _ in flat(state)]

    def loss(out, final):
        return (out * g_out).sum() + sum((s * g).sum() for s, g in zip(flat(final), g_state))

    x1 = x.clone().requires_grad_()
    out, final = layer(x1, state)
    loss(out, final).backward()

    trainable = {k: p for k, p in layer.named_parameters() if p.requires_grad}
    P = {k: p.detach().clone().requires_grad_(k in trainable) for k, p in layer.named_parameters()}
    x2 = x.clone().requires_grad_()
    ref_out, ref_final = reference(cell, P, x2, state, num_layers)
    loss(ref_out, ref_final).backward()

    assert out.shape == (B, T, H)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    for s, r in zip(flat(final), flat(ref_final), strict=True):
        assert s.shape == (num_layers, B, H)
        torch.testing.assert_close(s, r, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-9, atol=1e-11)
    for k, p in trainable.items():
        torch.testing.assert_close(p.grad, P[k].grad, rtol=1e-9, atol=1e-11, msg=f"grad of {k}")


@pytest.mark.parametrize("cell", NAMES)
def test_zero_state_is_the_default(cell: str) -> None:
    layer = make(cell, num_layers=2)
    x = torch.randn(B, T, D, dtype=torch.float64)
    zeros = torch.zeros(2, B, H, dtype=torch.float64)
    out, final = layer(x)
    out0, final0 = layer(x, (zeros, zeros) if cell in LSTMS else zeros)
    torch.testing.assert_close(out, out0)
    for a, b in zip(flat(final), flat(final0), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cell", NAMES)
def test_chunked_equals_whole_sequence(cell: str) -> None:
    layer = make(cell, num_layers=2)
    x = torch.randn(B, T, D, dtype=torch.float64)
    whole, final = layer(x)
    parts, state = [], None
    for chunk in (x[:, :3], x[:, 3:4], x[:, 4:]):  # 3 steps, 1 step, the rest
        out, state = layer(chunk, state)
        parts.append(out)
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=1e-12, atol=1e-12)
    for a, b in zip(flat(state), flat(final), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def forget_bias_of(layer, cell: str, l: int) -> torch.Tensor:
    """The total bias the forget gate sees in layer l (both torch bias vectors for the fused LSTM)."""
    P = dict(layer.named_parameters())
    if cell == "lstm":
        return (P[f"rnn.bias_ih_l{l}"] + P[f"rnn.bias_hh_l{l}"])[H : 2 * H]
    return P[f"layers.{l}.bias"][H : 2 * H]


@pytest.mark.parametrize("cell", LSTMS)
def test_forget_bias_is_set(cell: str) -> None:
    layer = get_cell(cell)(D, H, num_layers=2, forget_bias=1.0)
    for l in range(2):
        assert torch.equal(forget_bias_of(layer, cell, l), torch.ones(H))
    layer.init_uniform_(0.1)
    for l in range(2):
        assert torch.equal(forget_bias_of(layer, cell, l), torch.ones(H))
    # and it acts: with every other weight at zero, f_t = σ(1) and c_1 = σ(1) c_0
    with torch.no_grad():
        for k, p in layer.named_parameters():
            f_bias = p[H : 2 * H].clone()
            p.zero_()
            if "bias" in k:
                p[H : 2 * H] = f_bias
    c0 = torch.randn(2, 1, H)
    _, (_, c1) = layer(torch.zeros(1, 1, D), (torch.zeros(2, 1, H), c0))
    torch.testing.assert_close(c1, torch.sigmoid(torch.tensor(1.0)) * c0)


@pytest.mark.parametrize("cell", ["tanh", "lstm"])
def test_redundant_torch_bias_is_frozen_at_zero(cell: str) -> None:
    layer = get_cell(cell)(D, H, num_layers=2, forget_bias=1.0)
    layer.init_uniform_(0.3)
    for l in range(2):
        b = getattr(layer.rnn, f"bias_hh_l{l}")
        assert not b.requires_grad and torch.equal(b, torch.zeros_like(b))
    gru = get_cell("gru")(D, H, num_layers=2)  # reset after: b_hn is not redundant, so it trains
    assert all(getattr(gru.rnn, f"bias_hh_l{l}").requires_grad for l in range(2))


@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("cell", NAMES)
def test_count_formula_equals_module(cell: str, num_layers: int) -> None:
    cls = get_cell(cell)
    layer = cls(D, H, num_layers=num_layers)
    assert cls.count_params(D, H, num_layers) == sum(p.numel() for p in layer.parameters() if p.requires_grad)


@pytest.mark.parametrize("cell", NAMES)
def test_init_uniform_bounds(cell: str) -> None:
    torch.manual_seed(0)
    layer = get_cell(cell)(D, 16, num_layers=2, forget_bias=1.0)
    layer.init_uniform_(0.1)
    for k, p in layer.named_parameters():
        values = p.detach().clone()
        if cell in LSTMS and "bias" in k and ("ih" in k or cell == "lstm_peephole"):
            assert torch.equal(values[16:32], torch.ones(16))  # forget-gate bias re-applied
            values = torch.cat([values[:16], values[32:]])
        if not p.requires_grad:
            assert torch.equal(values, torch.zeros_like(values)), k
            continue
        assert values.abs().max() <= 0.1, k
        if values.numel() >= 48:  # drawn from the whole interval, not a constant
            assert values.max() > 0.05 and values.min() < -0.05, k
