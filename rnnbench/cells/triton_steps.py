"""The Chung-form time loops (peephole LSTM, reset-before GRU) with each step's gates in Triton kernels.

Over weights stacked for K models: xw (T, K, B, G), states (K, B, H), weights (K, ...). A step's
recurrent products are one batched matmul over the K models and its gate arithmetic one or two
kernels over all K·B rows (the peephole kernels find row b's model as b // B), so the kernel count
per step does not depend on K:

  peephole LSTM  forward  per step: baddbmm (xw_t + W_hh h_{t-1}), one kernel for i, f, g, c, o, tanh c, h
                 backward per step: one kernel for dA_{i,f,g,o} and dc_{t-1}, one bmm for dh_{t-1}
  GRU reset-before forward  per step: baddbmm, kernel (r, z, r h), baddbmm, kernel (h~, h)
                   backward per step: kernel (dA_z, dA_h), bmm, kernel (dA_r, dh part), baddbmm

A Chung-size step is launch-bound, so kernel count is what sets the speed; the loops are meant to be
captured in a CUDA graph. The loops run all T steps for every member; `peephole_lstm_loop` and
`gru_reset_before_loop` then zero member k's outputs after steps[k] and take its final state at its
own last step (the recurrence is causal, so the earlier steps are exact). CUDA, or Triton's CPU
interpreter (TRITON_INTERPRET=1) in the tests, against the reference step loop in float64.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from rnnbench.cells.base import Loop, State, Weights

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU wheels of torch come without triton
    triton = None


def available() -> bool:
    return triton is not None


BLOCK = 256
# Which of the peephole LSTM's two tanh activations are the identity (Greff et al. 2015's NIAF, NOAF);
# the values of csrc/fast_rnn.cpp's `Act`.
TANH_BOTH, LINEAR_INPUT, LINEAR_OUTPUT = 0, 1, 2

if triton is not None:

    @triton.jit
    def _sigmoid(x):
        return 1.0 / (1.0 + tl.exp(-x))

    @triton.jit
    def _tanh(x):
        # 2 sigma(2x) - 1: exact in real arithmetic, no cancellation trouble in the gate range
        return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0

    @triton.jit
    def _peephole_fwd_step(a_ptr, cp_ptr, wci_ptr, wcf_ptr, wco_ptr, g_ptr, c_ptr, tc_ptr, h_ptr, H, N, RB,
                           BLOCK: tl.constexpr, ACT: tl.constexpr, FULL: tl.constexpr):
        # a (R, 4H) pre-activations i, f, g, o; cp, c, tc (R, H); h (R, H), or with FULL (Greff et al.'s
        # FGR) z (R, 4H) = [h, i, f, o], the gate values the next step reads; g (R, 4H) gate activations
        # out; R = K * RB rows, model k's peepholes at w + k H
        n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = n < N
        b = n // H
        j = n % H
        if FULL:
            z = b * 4 * H + j
        else:
            z = n
        row = b * 4 * H
        w = (b // RB) * H + j
        a_i = tl.load(a_ptr + row + j, mask=m)
        a_f = tl.load(a_ptr + row + H + j, mask=m)
        a_g = tl.load(a_ptr + row + 2 * H + j, mask=m)
        a_o = tl.load(a_ptr + row + 3 * H + j, mask=m)
        cp = tl.load(cp_ptr + n, mask=m)
        i = _sigmoid(a_i + tl.load(wci_ptr + w, mask=m) * cp)
        f = _sigmoid(a_f + tl.load(wcf_ptr + w, mask=m) * cp)
        if ACT == 1:  # LINEAR_INPUT
            g = a_g
        else:
            g = _tanh(a_g)
        c = f * cp + i * g
        o = _sigmoid(a_o + tl.load(wco_ptr + w, mask=m) * c)
        if ACT == 2:  # LINEAR_OUTPUT: tc holds the output activation's value, c itself
            tc = c
        else:
            tc = _tanh(c)
        tl.store(g_ptr + row + j, i, mask=m)
        tl.store(g_ptr + row + H + j, f, mask=m)
        tl.store(g_ptr + row + 2 * H + j, g, mask=m)
        tl.store(g_ptr + row + 3 * H + j, o, mask=m)
        tl.store(c_ptr + n, c, mask=m)
        tl.store(tc_ptr + n, tc, mask=m)
        tl.store(h_ptr + z, o * tc, mask=m)
        if FULL:
            tl.store(h_ptr + z + H, i, mask=m)
            tl.store(h_ptr + z + 2 * H, f, mask=m)
            tl.store(h_ptr + z + 3 * H, o, mask=m)

    @triton.jit
    def _peephole_bwd_step(dh_ptr, dhs_ptr, dc_ptr, g_ptr, cp_ptr, c_ptr, tc_ptr, wci_ptr, wcf_ptr, wco_ptr,
                           da_ptr, dc_out_ptr, H, N, RB, BLOCK: tl.constexpr, ACT: tl.constexpr, FULL: tl.constexpr):
        # dh (R, H) from step t+1, dhs (R, H) from the output (FULL: both (R, 4H), gradients of z);
        # dc (R, H) carried; da (R, 4H) out
        n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = n < N
        b = n // H
        j = n % H
        if FULL:
            z = b * 4 * H + j
        else:
            z = n
        row = b * 4 * H
        w = (b // RB) * H + j
        i = tl.load(g_ptr + row + j, mask=m)
        f = tl.load(g_ptr + row + H + j, mask=m)
        g = tl.load(g_ptr + row + 2 * H + j, mask=m)
        o = tl.load(g_ptr + row + 3 * H + j, mask=m)
        cp = tl.load(cp_ptr + n, mask=m)
        tc = tl.load(tc_ptr + n, mask=m)
        dht = tl.load(dh_ptr + z, mask=m) + tl.load(dhs_ptr + z, mask=m)
        if FULL:  # the gradients of this step's gate values through the next step's gates
            ei = tl.load(dh_ptr + z + H, mask=m) + tl.load(dhs_ptr + z + H, mask=m)
            ef = tl.load(dh_ptr + z + 2 * H, mask=m) + tl.load(dhs_ptr + z + 2 * H, mask=m)
            eo = tl.load(dh_ptr + z + 3 * H, mask=m) + tl.load(dhs_ptr + z + 3 * H, mask=m)
        else:
            ei = 0.0
            ef = 0.0
            eo = 0.0
        dao = (dht * tc + eo) * o * (1.0 - o)
        if ACT == 2:
            dtc = dht * o
        else:
            dtc = dht * o * (1.0 - tc * tc)
        dct = tl.load(dc_ptr + n, mask=m) + dao * tl.load(wco_ptr + w, mask=m) + dtc
        dai = (dct * g + ei) * i * (1.0 - i)
        daf = (dct * cp + ef) * f * (1.0 - f)
        if ACT == 1:
            dag = dct * i
        else:
            dag = dct * i * (1.0 - g * g)
        tl.store(da_ptr + row + j, dai, mask=m)
        tl.store(da_ptr + row + H + j, daf, mask=m)
        tl.store(da_ptr + row + 2 * H + j, dag, mask=m)
        tl.store(da_ptr + row + 3 * H + j, dao, mask=m)
        dcp = dct * f + dai * tl.load(wci_ptr + w, mask=m) + daf * tl.load(wcf_ptr + w, mask=m)
        tl.store(dc_out_ptr + n, dcp, mask=m)

    @triton.jit
    def _grub_fwd_rz(a_ptr, h_ptr, g_ptr, rh_ptr, H, N, BLOCK: tl.constexpr):
        # a (B, 2H) pre-activations r, z; h (B, H) = h_{t-1}; g (B, 3H): r, z written; rh = r h
        n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = n < N
        b = n // H
        j = n % H
        r = _sigmoid(tl.load(a_ptr + b * 2 * H + j, mask=m))
        z = _sigmoid(tl.load(a_ptr + b * 2 * H + H + j, mask=m))
        tl.store(g_ptr + b * 3 * H + j, r, mask=m)
        tl.store(g_ptr + b * 3 * H + H + j, z, mask=m)
        tl.store(rh_ptr + n, r * tl.load(h_ptr + n, mask=m), mask=m)

    @triton.jit
    def _grub_fwd_h(a_ptr, hp_ptr, g_ptr, h_ptr, H, N, BLOCK: tl.constexpr):
        # a (B, H) pre-activation of h~; h = h_{t-1} + z (h~ - h_{t-1})
        n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = n < N
        b = n // H
        j = n % H
        ht = _tanh(tl.load(a_ptr + n, mask=m))
        z = tl.load(g_ptr + b * 3 * H + H + j, mask=m)
        hp = tl.load(hp_ptr + n, mask=m)
        tl.store(g_ptr + b * 3 * H + 2 * H + j, ht, mask=m)
        tl.store(h_ptr + n, hp + z * (ht - hp), mask=m)

    @triton.jit
    def _grub_bwd_zh(dh_ptr, dhs_ptr, g_ptr, hp_ptr, da_ptr, dht_ptr, H, N, BLOCK: tl.constexpr):
        # dA_z, dA_h into da (B, 3H); dht = dh + dhs kept for the second kernel
        n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = n < N
        b = n // H
        j = n % H
        z = tl.load(g_ptr + b * 3 * H + H + j, mask=m)
        ht = tl.load(g_ptr + b * 3 * H + 2 * H + j, mask=m)
        hp = tl.load(hp_ptr + n, mask=m)
        dht = tl.load(dh_ptr + n, mask=m) + tl.load(dhs_ptr + n, mask=m)
        tl.store(da_ptr + b * 3 * H + H + j, dht * (ht - hp) * z * (1.0 - z), mask=m)
        tl.store(da_ptr + b * 3 * H + 2 * H + j, dht * z * (1.0 - ht * ht), mask=m)
        tl.store(dht_ptr + n, dht, mask=m)

    @triton.jit
    def _grub_bwd_r(drh_ptr, dht_ptr, g_ptr, hp_ptr, da_ptr, base_ptr, H, N, BLOCK: tl.constexpr):
        # dA_r = d(r h) h (r (1 - r)); base = dht (1 - z) + d(r h) r, to which [dA_r dA_z] U_rz is added
        n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = n < N
        b = n // H
        j = n % H
        r = tl.load(g_ptr + b * 3 * H + j, mask=m)
        z = tl.load(g_ptr + b * 3 * H + H + j, mask=m)
        drh = tl.load(drh_ptr + n, mask=m)
        dht = tl.load(dht_ptr + n, mask=m)
        tl.store(da_ptr + b * 3 * H + j, drh * tl.load(hp_ptr + n, mask=m) * r * (1.0 - r), mask=m)
        tl.store(base_ptr + n, dht * (1.0 - z) + drh * r, mask=m)


def _per_model_product(da: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """sum over steps and rows of da^T h for each model: da (T, K, B, G), h (T, K, B, H) -> (K, G, H)."""
    T, K, B, G = da.shape
    return torch.bmm(da.permute(1, 3, 0, 2).reshape(K, G, T * B), h.transpose(0, 1).reshape(K, T * B, h.shape[-1]))


def peephole_weight_grads(da: torch.Tensor, hbuf: torch.Tensor, cbuf: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """d W_hh, d w_ci, d w_cf, d w_co per model from all steps' dA (T, K, B, 4H) and the state buffers
    (T+1, K, B, H)."""
    H = da.shape[-1] // 4
    cprev = cbuf[:-1]
    dwhh = _per_model_product(da, hbuf[:-1])
    dwci = (da[..., :H] * cprev).sum((0, 2))
    dwcf = (da[..., H : 2 * H] * cprev).sum((0, 2))
    dwco = (da[..., 3 * H :] * cbuf[1:]).sum((0, 2))
    return dwhh, dwci, dwcf, dwco


def gru_before_weight_grad(da: torch.Tensor, hbuf: torch.Tensor, rh: torch.Tensor) -> torch.Tensor:
    """d [U_r; U_z; U_h] per model from all steps' dA (T, K, B, 3H): U_r, U_z see h_{t-1}, U_h sees r_t h_{t-1}."""
    H = da.shape[-1] // 3
    return torch.cat([_per_model_product(da[..., : 2 * H], hbuf[:-1]), _per_model_product(da[..., 2 * H :], rh)], dim=-2)


def _grid(n: int) -> tuple[int]:
    return ((n + BLOCK - 1) // BLOCK,)


def _addmm(bias: torch.Tensor, h: torch.Tensor, w_t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = bias + h w_t for K models (one batched product)."""
    return torch.baddbmm(bias, h, w_t, out=out)


def _mm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.bmm(a, w, out=out)


class PeepholeTriton(torch.autograd.Function):
    """(hs, cs): all steps' h_t and c_t (T, K, B, H) of one peephole LSTM layer of K models; xw (T, K, B, 4H),
    h0, c0 (K, B, H), whh (K, 4H, H), wci, wcf, wco (K, H); act: TANH_BOTH, LINEAR_INPUT or LINEAR_OUTPUT.
    cs is returned so that a member's final c can be read at its own last step; its gradient is added
    only where something used it. Greff et al.'s FGR: h0 (K, B, 4H) is z_0 = [h, i, f, o] and whh
    (K, 4H, 4H) = [W_hh | R] (lstm_fgr.py); hs is then every step's z_t (T, K, B, 4H)."""

    @staticmethod
    def forward(ctx: Any, xw, h0, c0, whh, wci, wcf, wco, act=TANH_BOTH):  # type: ignore[override]
        T, *rows, G = xw.shape  # rows: (B,) or (K, B)
        H, Z = G // 4, h0.shape[-1]
        xw, whh, wci, wcf, wco = (t.contiguous() for t in (xw, whh, wci, wcf, wco))
        hbuf, cbuf = xw.new_empty(T + 1, *rows, Z), xw.new_empty(T + 1, *rows, H)
        gates, tcs, a = xw.new_empty(T, *rows, G), xw.new_empty(T, *rows, H), xw.new_empty(*rows, G)
        hbuf[0], cbuf[0] = h0, c0
        whh_t, N, RB = whh.transpose(-1, -2), cbuf[0].numel(), rows[-1]
        for t in range(T):
            _addmm(xw[t], hbuf[t], whh_t, out=a)
            _peephole_fwd_step[_grid(N)](a, cbuf[t], wci, wcf, wco, gates[t], cbuf[t + 1], tcs[t], hbuf[t + 1],
                                         H, N, RB, BLOCK=BLOCK, ACT=act, FULL=Z != H)
        ctx.save_for_backward(whh, wci, wcf, wco, hbuf, cbuf, gates, tcs)
        ctx.act = act
        ctx.set_materialize_grads(False)  # an unused cs gets no gradient pass
        return hbuf[1:], cbuf[1:]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dhs, dcs):  # type: ignore[override]
        whh, wci, wcf, wco, hbuf, cbuf, gates, tcs = ctx.saved_tensors
        T, *rows, H = tcs.shape
        Z = hbuf.shape[-1]
        dhs = torch.zeros_like(hbuf[1:]) if dhs is None else dhs.contiguous()
        da = gates.new_empty(T, *rows, 4 * H)
        dh, dc, dc_next = gates.new_zeros(*rows, Z), gates.new_zeros(*rows, H), gates.new_empty(*rows, H)
        N, RB = dc.numel(), rows[-1]
        for t in range(T - 1, -1, -1):
            if dcs is not None:
                dc.add_(dcs[t])
            _peephole_bwd_step[_grid(N)](dh, dhs[t], dc, gates[t], cbuf[t], cbuf[t + 1], tcs[t], wci, wcf, wco,
                                         da[t], dc_next, H, N, RB, BLOCK=BLOCK, ACT=ctx.act, FULL=Z != H)
            dc, dc_next = dc_next, dc
            _mm(da[t], whh, out=dh)
        return da, dh, dc, *peephole_weight_grads(da, hbuf, cbuf), None


class GRUBeforeTriton(torch.autograd.Function):
    """(hs (T, K, B, H), h_T) of one reset-before GRU layer of K models; xw (T, K, B, 3H), h0 (K, B, H),
    whh (K, 3H, H)."""

    @staticmethod
    def forward(ctx: Any, xw, h0, whh):  # type: ignore[override]
        T, *rows, G = xw.shape
        H = G // 3
        xw, whh = xw.contiguous(), whh.contiguous()
        hbuf, gates, rh = xw.new_empty(T + 1, *rows, H), xw.new_empty(T, *rows, G), xw.new_empty(T, *rows, H)
        a_rz, a_h = xw.new_empty(*rows, 2 * H), xw.new_empty(*rows, H)
        hbuf[0] = h0
        u_rz_t, u_h_t = whh[..., : 2 * H, :].transpose(-1, -2), whh[..., 2 * H :, :].transpose(-1, -2)
        N = hbuf[0].numel()
        for t in range(T):
            _addmm(xw[t, ..., : 2 * H], hbuf[t], u_rz_t, out=a_rz)
            _grub_fwd_rz[_grid(N)](a_rz, hbuf[t], gates[t], rh[t], H, N, BLOCK=BLOCK)
            _addmm(xw[t, ..., 2 * H :], rh[t], u_h_t, out=a_h)
            _grub_fwd_h[_grid(N)](a_h, hbuf[t], gates[t], hbuf[t + 1], H, N, BLOCK=BLOCK)
        ctx.save_for_backward(whh, hbuf, gates, rh)
        return hbuf[1:], hbuf[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dhs, dhT):  # type: ignore[override]
        whh, hbuf, gates, rh = ctx.saved_tensors
        T, *rows, H = rh.shape
        dhs = dhs.contiguous()
        u_rz, u_h = whh[..., : 2 * H, :], whh[..., 2 * H :, :]
        da = gates.new_empty(T, *rows, 3 * H)
        dh = dhT.contiguous().clone()
        dht, drh, base = (gates.new_empty(*rows, H) for _ in range(3))
        N = dh.numel()
        for t in range(T - 1, -1, -1):
            _grub_bwd_zh[_grid(N)](dh, dhs[t], gates[t], hbuf[t], da[t], dht, H, N, BLOCK=BLOCK)
            _mm(da[t, ..., 2 * H :], u_h, out=drh)
            _grub_bwd_r[_grid(N)](drh, dht, gates[t], hbuf[t], da[t], base, H, N, BLOCK=BLOCK)
            _addmm(base, da[t, ..., : 2 * H], u_rz, out=dh)
        return da, dh, gru_before_weight_grad(da, hbuf, rh)


def _at_own_end(seq: torch.Tensor, steps: torch.Tensor | None) -> torch.Tensor:
    """seq (T, K, B, H) -> (K, B, H): member k's entry at its last step, steps[k] - 1 (steps (K, B):
    each sequence's at its own)."""
    if steps is None:
        return seq[-1]
    T, K, B = seq.shape[:3]
    last = (steps.to(seq.device) - 1).view(K, -1).expand(K, B)
    members = torch.arange(K, device=seq.device).view(K, 1).expand(K, B)
    return seq[last, members, torch.arange(B, device=seq.device).expand(K, B)]


def _zero_after_end(hs: torch.Tensor, steps: torch.Tensor | None) -> torch.Tensor:
    if steps is None:
        return hs
    K = hs.shape[1]
    valid = torch.arange(hs.shape[0], device=hs.device).view(-1, 1, 1) < steps.to(hs.device).view(1, K, -1)
    return hs * valid.unsqueeze(-1).to(hs.dtype)


def peephole_loop(act: int = TANH_BOTH) -> Loop:
    """The triton Loop (rnnbench/cells/base.py) of the peephole LSTM whose activations `act` says."""

    def loop(w: Weights, xw: torch.Tensor, state: State, steps: torch.Tensor | None) -> tuple[torch.Tensor, State]:
        h0, c0 = state
        hs, cs = PeepholeTriton.apply(xw, h0, c0, w["weight_hh"], w["w_ci"], w["w_cf"], w["w_co"], act)
        return _zero_after_end(hs, steps), (_at_own_end(hs, steps), _at_own_end(cs, steps))

    return loop


peephole_lstm_loop = peephole_loop(TANH_BOTH)


def gru_reset_before_loop(w: Weights, xw: torch.Tensor, state: State, steps: torch.Tensor | None) -> tuple[torch.Tensor, State]:
    """The triton Loop of the reset-before GRU (rnnbench/cells/base.py: Loop)."""
    hs, _ = GRUBeforeTriton.apply(xw, state[0], w["weight_hh"])
    return _zero_after_end(hs, steps), (_at_own_end(hs, steps),)
