"""Every registered cell against the contract, and the known cells against their equations written out.

The equation references below are independent code: they take one member's weights, split them into
the per-gate matrices of the equations and loop over layers and time one step at a time. The rest
is parametrised from the registry, so a new cell is checked with no edit here.
"""

from __future__ import annotations

import math
from typing import Callable

import pytest
import torch

from rnnbench.cells import CELLS, get_cell, implementation, init_weights, run, run_steps
from rnnbench.errors import RnnbenchError

ALL = sorted(CELLS)
B, T, D, H = 3, 7, 4, 5
sig, tanh = torch.sigmoid, torch.tanh


def lin(W: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return v @ W.T


# --- the equations, one per line; P: one member's weights of one layer, x (B, D), s the state ---------
def step_tanh(P: dict, x: torch.Tensor, s: tuple) -> tuple:
    return (tanh(lin(P["weight_ih"], x) + lin(P["weight_hh"], s[0]) + P["bias"]),)


def step_esn(P: dict, x: torch.Tensor, s: tuple) -> tuple:
    a = 0.5  # the leak rate (Lukoševičius 2012, eq. 3), the cell's default
    # W held sparse: row i has the values weight_hh[i] at the columns index_hh[i]
    W = torch.zeros(P["bias"].shape[0], s[0].shape[-1], dtype=s[0].dtype).scatter_add_(1, P["index_hh"].long(), P["weight_hh"])
    return ((1 - a) * s[0] + a * tanh(lin(P["weight_ih"], x) + lin(W, s[0]) + P["bias"]),)


def step_lstm(P: dict, x: torch.Tensor, s: tuple) -> tuple:
    h, c = s
    W_xi, W_xf, W_xg, W_xo = P["weight_ih"].chunk(4)
    W_hi, W_hf, W_hg, W_ho = P["weight_hh"].chunk(4)
    b_i, b_f, b_g, b_o = P["bias"].chunk(4)
    i = sig(lin(W_xi, x) + lin(W_hi, h) + b_i)
    f = sig(lin(W_xf, x) + lin(W_hf, h) + b_f)
    g = tanh(lin(W_xg, x) + lin(W_hg, h) + b_g)
    o = sig(lin(W_xo, x) + lin(W_ho, h) + b_o)
    c = f * c + i * g
    return o * tanh(c), c


def step_gru_reset_after(P: dict, x: torch.Tensor, s: tuple) -> tuple:
    (h,) = s
    W_ir, W_iz, W_in = P["weight_ih"].chunk(3)
    W_hr, W_hz, W_hn = P["weight_hh"].chunk(3)
    b_ir, b_iz, b_in = P["bias"].chunk(3)
    b_hr, b_hz, b_hn = P["bias_hh"].chunk(3)
    r = sig(lin(W_ir, x) + b_ir + lin(W_hr, h) + b_hr)
    z = sig(lin(W_iz, x) + b_iz + lin(W_hz, h) + b_hz)
    n = tanh(lin(W_in, x) + b_in + r * (lin(W_hn, h) + b_hn))
    return ((1 - z) * n + z * h,)


def step_lstm_peephole(P: dict, x: torch.Tensor, s: tuple) -> tuple:
    h, c_prev = s
    W_xi, W_xf, W_xg, W_xo = P["weight_ih"].chunk(4)
    W_hi, W_hf, W_hg, W_ho = P["weight_hh"].chunk(4)
    b_i, b_f, b_g, b_o = P["bias"].chunk(4)
    i = sig(lin(W_xi, x) + lin(W_hi, h) + P["w_ci"] * c_prev + b_i)
    f = sig(lin(W_xf, x) + lin(W_hf, h) + P["w_cf"] * c_prev + b_f)
    c = f * c_prev + i * tanh(lin(W_xg, x) + lin(W_hg, h) + b_g)
    o = sig(lin(W_xo, x) + lin(W_ho, h) + P["w_co"] * c + b_o)
    return o * tanh(c), c


def step_gru_reset_before(P: dict, x: torch.Tensor, s: tuple) -> tuple:
    (h,) = s
    W_xr, W_xz, W_xh = P["weight_ih"].chunk(3)
    W_hr, W_hz, W_hh = P["weight_hh"].chunk(3)
    b_r, b_z, b_h = P["bias"].chunk(3)
    r = sig(lin(W_xr, x) + lin(W_hr, h) + b_r)
    z = sig(lin(W_xz, x) + lin(W_hz, h) + b_z)
    h_tilde = tanh(lin(W_xh, x) + lin(W_hh, r * h) + b_h)
    return ((1 - z) * h + z * h_tilde,)


def step_cifg(P: dict, x: torch.Tensor, s: tuple) -> tuple:
    h, c = s
    W_xf, W_xg, W_xo = P["weight_ih"].chunk(3)
    W_hf, W_hg, W_ho = P["weight_hh"].chunk(3)
    b_f, b_g, b_o = P["bias"].chunk(3)
    f = sig(lin(W_xf, x) + lin(W_hf, h) + b_f)
    g = tanh(lin(W_xg, x) + lin(W_hg, h) + b_g)
    o = sig(lin(W_xo, x) + lin(W_ho, h) + b_o)
    c = f * c + (1 - f) * g  # i = 1 - f
    return o * tanh(c), c


# Greff et al. 2015's ablations of the peephole LSTM, each written out on its own
def step_lstm_nig(P: dict, x: torch.Tensor, s: tuple) -> tuple:
    h, c_prev = s
    W_xf, W_xg, W_xo = P["weight_ih"].chunk(3)
    W_hf, W_hg, W_ho = P["weight_hh"].chunk(3)
    b_f, b_g, b_o = P["bias"].chunk(3)
    f = sig(lin(W_xf, x) + lin(W_hf, h) + P["w_cf"] * c_prev + b_f)
    c = f * c_prev + tanh(lin(W_xg, x) + lin(W_hg, h) + b_g)  # i = 1
    o = sig(lin(W_xo, x) + lin(W_ho, h) + P["w_co"] * c + b_o)
    return o * tanh(c), c


def step_lstm_nfg(P: dict, x: torch.Tensor, s: tuple) -> tuple:
    h, c_prev = s
    W_xi, W_xg, W_xo = P["weight_ih"].chunk(3)
    W_hi, W_hg, W_ho = P["weight_hh"].chunk(3)
    b_i, b_g, b_o = P["bias"].chunk(3)
    i = sig(lin(W_xi, x) + lin(W_hi, h) + P["w_ci"] * c_prev + b_i)
    c = c_prev + i * tanh(lin(W_xg, x) + lin(W_hg, h) + b_g)  # f = 1
    o = sig(lin(W_xo, x) + lin(W_ho, h) + P["w_co"] * c + b_o)
    return o * tanh(c), c


def step_lstm_nog(P: dict, x: torch.Tensor, s: tuple) -> tuple:
    h, c_prev = s
    W_xi, W_xf, W_xg = P["weight_ih"].chunk(3)
    W_hi, W_hf, W_hg = P["weight_hh"].chunk(3)
    b_i, b_f, b_g = P["bias"].chunk(3)
    i = sig(lin(W_xi, x) + lin(W_hi, h) + P["w_ci"] * c_prev + b_i)
    f = sig(lin(W_xf, x) + lin(W_hf, h) + P["w_cf"] * c_prev + b_f)
    c = f * c_prev + i * tanh(lin(W_xg, x) + lin(W_hg, h) + b_g)
    return tanh(c), c  # o = 1


def step_lstm_niaf(P: dict, x: torch.Tensor, s: tuple) -> tuple:
    h, c_prev = s
    W_xi, W_xf, W_xg, W_xo = P["weight_ih"].chunk(4)
    W_hi, W_hf, W_hg, W_ho = P["weight_hh"].chunk(4)
    b_i, b_f, b_g, b_o = P["bias"].chunk(4)
    i = sig(lin(W_xi, x) + lin(W_hi, h) + P["w_ci"] * c_prev + b_i)
    f = sig(lin(W_xf, x) + lin(W_hf, h) + P["w_cf"] * c_prev + b_f)
    c = f * c_prev + i * (lin(W_xg, x) + lin(W_hg, h) + b_g)  # no tanh on the block input
    o = sig(lin(W_xo, x) + lin(W_ho, h) + P["w_co"] * c + b_o)
    return o * tanh(c), c


def step_lstm_noaf(P: dict, x: torch.Tensor, s: tuple) -> tuple:
    h, c_prev = s
    W_xi, W_xf, W_xg, W_xo = P["weight_ih"].chunk(4)
    W_hi, W_hf, W_hg, W_ho = P["weight_hh"].chunk(4)
    b_i, b_f, b_g, b_o = P["bias"].chunk(4)
    i = sig(lin(W_xi, x) + lin(W_hi, h) + P["w_ci"] * c_prev + b_i)
    f = sig(lin(W_xf, x) + lin(W_hf, h) + P["w_cf"] * c_prev + b_f)
    c = f * c_prev + i * tanh(lin(W_xg, x) + lin(W_hg, h) + b_g)
    o = sig(lin(W_xo, x) + lin(W_ho, h) + P["w_co"] * c + b_o)
    return o * c, c  # no tanh on the state


def step_lstm_fgr(P: dict, x: torch.Tensor, s: tuple) -> tuple:
    h, c_prev, i_prev, f_prev, o_prev = s
    W_xi, W_xf, W_xg, W_xo = P["weight_ih"].chunk(4)
    W_hi, W_hf, W_hg, W_ho = P["weight_hh"].chunk(4)
    b_i, b_f, b_g, b_o = P["bias"].chunk(4)
    R = P["weight_gg"]  # rows: into i, f, o; columns: from i, f, o
    (R_ii, R_if, R_io), (R_fi, R_ff, R_fo), (R_oi, R_of, R_oo) = (row.chunk(3, dim=1) for row in R.chunk(3))
    i = sig(lin(W_xi, x) + lin(W_hi, h) + P["w_ci"] * c_prev + lin(R_ii, i_prev) + lin(R_if, f_prev) + lin(R_io, o_prev) + b_i)
    f = sig(lin(W_xf, x) + lin(W_hf, h) + P["w_cf"] * c_prev + lin(R_fi, i_prev) + lin(R_ff, f_prev) + lin(R_fo, o_prev) + b_f)
    c = f * c_prev + i * tanh(lin(W_xg, x) + lin(W_hg, h) + b_g)
    o = sig(lin(W_xo, x) + lin(W_ho, h) + P["w_co"] * c + lin(R_oi, i_prev) + lin(R_of, f_prev) + lin(R_oo, o_prev) + b_o)
    return o * tanh(c), c, i, f, o


EQUATIONS: dict[str, Callable] = {"tanh": step_tanh, "lstm": step_lstm, "gru": step_gru_reset_after,
                                  "lstm_peephole": step_lstm_peephole, "gru_reset_before": step_gru_reset_before,
                                  "cifg": step_cifg, "lstm_nig": step_lstm_nig, "lstm_nfg": step_lstm_nfg,
                                  "lstm_nog": step_lstm_nog, "lstm_niaf": step_lstm_niaf, "lstm_noaf": step_lstm_noaf,
                                  "lstm_fgr": step_lstm_fgr, "esn": step_esn}
# Parameter counts per layer (Chung et al. 2014 Table 1 for tanh, gru_reset_before, lstm_peephole).
FORMULAS: dict[str, Callable[[int, int], int]] = {
    "tanh": lambda d, h: d * h + h * h + h,
    "lstm": lambda d, h: 4 * (d * h + h * h + h),
    "gru": lambda d, h: 3 * (d * h + h * h + 2 * h),
    "lstm_peephole": lambda d, h: 4 * (d * h + h * h + h) + 3 * h,
    "gru_reset_before": lambda d, h: 3 * (d * h + h * h + h),
    "cifg": lambda d, h: 3 * (d * h + h * h + h),
    "lstm_nig": lambda d, h: 3 * (d * h + h * h + h) + 2 * h,
    "lstm_nfg": lambda d, h: 3 * (d * h + h * h + h) + 2 * h,
    "lstm_nog": lambda d, h: 3 * (d * h + h * h + h) + 2 * h,
    "lstm_niaf": lambda d, h: 4 * (d * h + h * h + h) + 3 * h,
    "lstm_noaf": lambda d, h: 4 * (d * h + h * h + h) + 3 * h,
    "lstm_fgr": lambda d, h: 4 * (d * h + h * h + h) + 3 * h + 9 * h * h,
    "esn": lambda d, h: 0,  # trained: none (the reservoir's d * h + h + h * C are frozen)
}
# Where init_ puts the forget-gate bias, for the cells that have one.
FORGET_BIAS = {"lstm": slice(H, 2 * H), "lstm_peephole": slice(H, 2 * H), "cifg": slice(0, H), "lstm_nig": slice(0, H),
               "lstm_nog": slice(H, 2 * H), "lstm_niaf": slice(H, 2 * H), "lstm_noaf": slice(H, 2 * H),
               "lstm_fgr": slice(H, 2 * H)}


def weights(cell: str, num_layers: int = 1, K: int = 1, seed: int = 0, scale: float | None = 0.5,
            forget_bias: float = 0.7, hidden: int = H) -> list[dict[str, torch.Tensor]]:
    gens = [torch.Generator().manual_seed(seed + k) for k in range(K)]
    return init_weights(cell, D, hidden, num_layers, gens, scale, forget_bias, torch.float64)


def equations(cell: str, layers: list[dict], x: torch.Tensor, state: list[tuple]) -> tuple[torch.Tensor, list[tuple]]:
    """Member 0 by the written-out equations: x (B, T, D), state per layer of (B, H) -> (out (B, T, H), finals)."""
    finals = []
    for l, w in enumerate(layers):
        P = {k: v[0] for k, v in w.items()}
        s, outs = state[l], []
        for t in range(x.shape[1]):
            s = EQUATIONS[cell](P, x[:, t], s)
            outs.append(s[0])
        x = torch.stack(outs, dim=1)  # layer l's h_t is layer l+1's x_t
        finals.append(s)
    return x, finals


def leaves(layers: list[dict]) -> list[dict]:
    return [{k: v.clone().requires_grad_() for k, v in w.items()} for w in layers]


# --- the registry ---------------------------------------------------------------------------------


def test_registry_has_the_known_cells() -> None:
    assert set(EQUATIONS) <= set(CELLS)
    for name, cls in CELLS.items():
        assert cls.name == name and cls.state_size >= 1 and isinstance(cls.gates, tuple)


def test_unknown_cell_lists_valid_names() -> None:
    with pytest.raises(RnnbenchError) as e:
        get_cell("lstn")
    msg = str(e.value)
    assert "\n" not in msg and "lstn" in msg and all(n in msg for n in CELLS)


# --- the equations --------------------------------------------------------------------------------


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("cell", sorted(EQUATIONS))
def test_reference_matches_equations_forward_and_backward(cell: str, num_layers: int) -> None:
    n_state = get_cell(cell).state_size
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    state = [tuple(torch.randn(B, H, generator=g, dtype=torch.float64) for _ in range(n_state)) for _ in range(num_layers)]
    g_out = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    g_fin = [[torch.randn(B, H, generator=g, dtype=torch.float64) for _ in range(n_state)] for _ in range(num_layers)]

    def loss(out, finals):
        return (out * g_out).sum() + sum((s * gs).sum() for f, gf in zip(finals, g_fin) for s, gs in zip(f, gf))

    base = weights(cell, num_layers)
    got_w, ref_w = leaves(base), leaves(base)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, finals = run(cell, got_w, x1.unsqueeze(0), impl="reference", state=[tuple(s.unsqueeze(0) for s in st) for st in state])
    loss(out[0], [tuple(s[0] for s in f) for f in finals]).backward()
    ref_out, ref_finals = equations(cell, ref_w, x2, state)
    loss(ref_out, ref_finals).backward()

    torch.testing.assert_close(out[0], ref_out, rtol=1e-10, atol=1e-12)
    for f, r in zip(finals, ref_finals, strict=True):
        for a, b in zip(f, r, strict=True):
            torch.testing.assert_close(a[0], b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-9, atol=1e-11)
    for l in range(num_layers):
        for k in got_w[l]:
            if k in get_cell(cell).frozen and got_w[l][k].grad is None:
                continue  # a frozen weight the cell's code keeps out of autograd (the ESN's sparse W)
            torch.testing.assert_close(got_w[l][k].grad, ref_w[l][k].grad, rtol=1e-9, atol=1e-11, msg=f"grad of {k}")


@pytest.mark.parametrize("cell", sorted(FORMULAS))
def test_count_formula(cell: str) -> None:
    for num_layers in (1, 2, 3):
        expected = FORMULAS[cell](D, H) + (num_layers - 1) * FORMULAS[cell](H, H)
        assert get_cell(cell).count_params(D, H, num_layers) == expected


# --- the contract, for every registered cell --------------------------------------------------------


@pytest.mark.parametrize("cell", ALL)
def test_count_params_is_the_numel_of_the_weights(cell: str) -> None:
    for num_layers in (1, 2, 3):
        layers = weights(cell, num_layers, K=2)
        frozen = get_cell(cell).frozen  # drawn, never trained (esn): not counted as trained
        assert get_cell(cell).count_params(D, H, num_layers) == sum(v[0].numel() for w in layers for k, v in w.items()
                                                                   if k not in frozen)
        for l, w in enumerate(layers):
            shapes = get_cell(cell).weight_shapes(D if l == 0 else H, H)
            assert list(w) == list(shapes) and all(w[k].shape == (2, *s) for k, s in shapes.items())


@pytest.mark.parametrize("cell", ALL)
def test_member_init_depends_only_on_its_generator(cell: str) -> None:
    alone = weights(cell, 2, K=1, seed=11)
    together = weights(cell, 2, K=3, seed=10)  # generators seeded 10, 11, 12: member 1 is seed 11
    for a, b in zip(alone, together, strict=True):
        for k in a:
            assert torch.equal(a[k][0], b[k][1]), k
    other = weights(cell, 2, K=1, seed=12)
    assert not all(torch.equal(a[k], o[k]) for a, o in zip(alone, other) for k in a)


@pytest.mark.parametrize("cell", [c for c in ALL if not CELLS[c].frozen])  # a reservoir's draw: tests/test_esn.py
def test_init_bounds_and_forget_bias(cell: str) -> None:
    hidden = 16
    for scale, bound in ((0.1, 0.1), (None, 1 / math.sqrt(hidden))):
        layers = weights(cell, 2, K=2, scale=scale, forget_bias=1.0, hidden=hidden)
        for w in layers:
            for k, v in w.items():
                values = v.clone()
                if k == "bias" and cell in FORGET_BIAS:
                    fb = slice(FORGET_BIAS[cell].start * hidden // H, FORGET_BIAS[cell].stop * hidden // H)
                    assert torch.equal(values[:, fb], torch.ones_like(values[:, fb]))
                    values[:, fb] = 0
                assert values.abs().max() <= bound, k
                if values.numel() >= 96:  # drawn from the whole interval, not a constant
                    assert values.max() > bound / 2 and values.min() < -bound / 2, k


@pytest.mark.parametrize("cell", sorted(FORGET_BIAS))
def test_forget_bias_acts(cell: str) -> None:
    """With every other weight at zero, f_t = σ(1) and c_1 = σ(1) c_0."""
    layers = weights(cell, 1, forget_bias=1.0)
    w = {k: torch.zeros_like(v) for k, v in layers[0].items()}
    w["bias"][:, FORGET_BIAS[cell]] = 1.0
    c0 = torch.randn(1, 2, H, dtype=torch.float64)
    extra = [torch.zeros_like(c0)] * (get_cell(cell).state_size - 2)  # lstm_fgr also carries its gates
    _, finals = run(cell, [w], torch.zeros(1, 2, 1, D, dtype=torch.float64), impl="reference",
                    state=[(torch.zeros_like(c0), c0, *extra)])
    torch.testing.assert_close(finals[0][1], torch.sigmoid(torch.tensor(1.0, dtype=torch.float64)) * c0)


@pytest.mark.parametrize("cell", ALL)
def test_zero_state_is_the_default_and_chunks_equal_the_whole(cell: str) -> None:
    layers = weights(cell, 2, K=2)
    x = torch.randn(2, B, T, D, dtype=torch.float64)
    whole, final = run(cell, layers, x, impl="reference")
    zeros = [tuple(torch.zeros(2, B, H, dtype=torch.float64) for _ in range(get_cell(cell).state_size))] * 2
    out0, final0 = run(cell, layers, x, impl="reference", state=zeros)
    torch.testing.assert_close(out0, whole)
    parts, state = [], None
    for lo, hi in ((0, 3), (3, 4), (4, T)):
        out, state = run(cell, layers, x[:, :, lo:hi], impl="reference", state=state)
        parts.append(out)
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, rtol=1e-12, atol=1e-12)
    for fs in (final0, state):
        for a, b in zip(fs, final, strict=True):
            for u, v in zip(a, b, strict=True):
                torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cell", ALL)
def test_run_steps_equals_run_and_names_the_gates(cell: str) -> None:
    cls = get_cell(cell)
    layers = weights(cell, 2, K=2)
    x = torch.randn(2, B, T, D, dtype=torch.float64)
    out, finals = run(cell, layers, x)  # auto: the fast loop where the cell has one
    trace = run_steps(cell, layers, x)
    torch.testing.assert_close(trace.out, out, rtol=1e-10, atol=1e-12)
    assert len(trace.hs) == T and all(len(row) == 2 for row in trace.hs)
    torch.testing.assert_close(trace.hs[-1][0], finals[0][0], rtol=1e-10, atol=1e-12)
    for a, b in zip(trace.final, finals, strict=True):
        for u, v in zip(a, b, strict=True):
            torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)
    assert set(trace.gates) == {(l, g) for l in range(2) for g in cls.gates}
    for v in trace.gates.values():
        assert v.shape == (2, B, T, H) and bool(((v > 0) & (v < 1)).all())


@pytest.mark.parametrize("cell", ALL)
def test_padded_member_equals_its_unpadded_sequence(cell: str) -> None:
    """Reference loop: member k with steps[k] < T, zero-padded, gives its own short sequence's numbers."""
    layers = weights(cell, 2, K=3)
    steps = torch.tensor([T, 2, 5])
    x = torch.randn(3, B, T, D, dtype=torch.float64)
    for k, s in enumerate(steps.tolist()):
        x[k, :, s:] = 0
    out, finals = run(cell, layers, x, steps, impl="reference")
    for k, s in enumerate(steps.tolist()):
        member = [{n: v[k : k + 1] for n, v in w.items()} for w in layers]
        alone, alone_finals = run(cell, member, x[k : k + 1, :, :s], impl="reference")
        torch.testing.assert_close(out[k : k + 1, :, :s], alone, rtol=1e-12, atol=1e-13)
        assert torch.count_nonzero(out[k, :, s:]) == 0
        for a, b in zip(finals, alone_finals, strict=True):
            for u, v in zip(a, b, strict=True):
                torch.testing.assert_close(u[k : k + 1], v, rtol=1e-12, atol=1e-13)


def test_implementation_names_and_errors() -> None:
    assert implementation("cifg", "cpu", torch.float64, "reference") == "reference"
    with pytest.raises(RnnbenchError, match="impl must be one of"):
        implementation("lstm", "cpu", torch.float64, "fortran")
    no_cpp = [c for c in ALL if "cpp" not in CELLS[c].loops]
    for cell in no_cpp:
        assert implementation(cell, "cpu", torch.float64) == "reference"
        with pytest.raises(RnnbenchError, match="has no cpp loop"):
            implementation(cell, "cpu", torch.float64, "cpp")
    with pytest.raises(ValueError, match="steps must lie in"):
        run("tanh", weights("tanh"), torch.zeros(1, B, T, D, dtype=torch.float64), torch.tensor([T + 1]))
