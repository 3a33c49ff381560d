"""Fast time loops for the Chung-form cells (no fused kernel offers them) and for torch's cells on the CPU.

Each loop takes the input projection of every step, xw = x W_ih^T + b, computed by the caller with one
autograd-tracked matmul, time major (T, B, gates*H); it runs the recurrence with a hand-written
backward through time, so autograd records one node per layer instead of ~15 per step. Two
implementations of each loop, both checked against the cells' step-by-step `forward_reference` in
float64 by tests/test_fast_cells.py (outputs, final states, input, state and weight gradients):

  "cpp"     csrc/fast_rnn.cpp, compiled on first use with torch.utils.cpp_extension.load_inline and
            cached in torch's extension directory (TORCH_EXTENSIONS_DIR). Only per-operator ATen headers
            are included, so the build takes ~7-15 s on 2 cores (0.1 s to load once cached);
            concurrent processes share one build through torch's file lock. CPU, float32 and float64.
            Per step: one small MKL product (two for the reset-before GRU), single-threaded (MKL's
            threads cost more than these products: 2.3x slower loops on 2 cores), and one vectorised
            pass over the gates (-march=native). Where a step's product is large (gates*H*H >= 16384)
            the forward loop runs the batch's rows in chunks of 16 in parallel over torch's intra-op
            threads (rows are independent through time). Ops *_many (`_ManyCpp`) take lists of K models' tensors
            (lengths may differ) and run the K loops in parallel over those threads
            (rnnbench/many_models.py). The `tanh` and `lstm` cells (torch.nn.RNN / nn.LSTM weights)
            have compiled loops only: elsewhere they run torch's kernels.
  "python"  the same algorithm in torch ops, with the activation derivatives of all steps computed
            before the backward loop (~8 kernels per step): any device and float dtype. The path on
            CUDA without triton, and on the CPU when the extension cannot be built (no compiler,
            RNNBENCH_FAST_EXT=0), after one RuntimeWarning.
  "triton"  the "python" loop with each step's gate arithmetic fused into one or two Triton kernels
            (rnnbench/cells/_triton.py): CUDA (or Triton's CPU interpreter, TRITON_INTERPRET=1).
  "auto"    CPU: "cpp" for float32/float64 when the extension loads, else "python". CUDA: "triton"
            where triton is installed (2.6x the "python" loop for the peephole LSTM, equal for the
            reset-before GRU on an H100; results/bench/triton_cuda.csv), else "python".
"""

from __future__ import annotations

import hashlib
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.autograd.function import once_differentiable

IMPLS = ("auto", "cpp", "python", "triton")
SOURCE = Path(__file__).with_name("csrc") / "fast_rnn.cpp"

_ext: dict[str, Any] = {"state": None, "reason": "", "seconds": 0.0, "name": "", "flags": [], "cached": False}


def _cpu_signature() -> tuple[str, set[str]]:
    """(model name, ISA flags) of this machine, from /proc/cpuinfo ('' and {} where unreadable)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "", set()
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    flags = set(next((ln.split(":", 1)[1] for ln in lines if ln.startswith("flags")), "").split())
    return model, flags


def _cflags() -> tuple[list[str], str]:
    """Compiler flags, and a key naming the machine type they target (part of the cache name)."""
    # No -ffast-math: only the two flags that let the compiler turn the activations' selects into
    # vector blends; arithmetic is evaluated as written.
    # -march=native: the widest vectors of the machine that builds and runs it (AVX-512 here; measured
    # 1.1-1.5x faster gate passes than AVX2); the machine's CPU model and ISA flags are part of the cache
    # name, so a shared cache never hands a library built for one CPU to another.
    flags = ["-O3", "-DNDEBUG", "-fno-trapping-math", "-fno-math-errno"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags.append("-march=native")
    if os.environ.get("RNNBENCH_FAST_NO_BLAS") == "1":  # tests: the path for a BLAS without sgemm_ symbols
        flags.append("-DRNNBENCH_NO_BLAS")
    model, isa = _cpu_signature()
    return flags, model + " " + " ".join(sorted(isa))


STALE_LOCK_S = 300.0  # a build takes ~7-15 s on 2 cores; a lock this old belongs to a dead process


def _load_built(library: Path) -> bool:
    """Load an earlier build of this exact source, flags and machine (the name says so) directly.

    load_inline would first take torch's build lock (a file `lock` in the build directory) and run
    ninja; a process killed while holding it (a SIGKILL'd sweep worker) leaves the file behind, and
    every later load_inline of the extension then waits for it forever. False: not built yet, or not
    loadable (e.g. another process is still linking it), so load_inline must run.
    """
    if not library.is_file():
        return False
    try:
        torch.ops.load_library(str(library))
    except (OSError, RuntimeError):
        return False
    return True


def _clear_stale_lock(build_dir: Path) -> None:
    """Remove torch's build lock when it is older than any real build (its holder died), with a warning."""
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_S:
        lock.unlink(missing_ok=True)
        warnings.warn(f"rnnbench: removed a build lock left {age:.0f} s ago by a process that died while building ({lock})",
                      RuntimeWarning, stacklevel=3)


def load_extension() -> bool:
    """Build (first time) and load the C++ loops; False, with one warning, where that is impossible."""
    if _ext["state"] is not None:
        return bool(_ext["state"])
    if os.environ.get("RNNBENCH_FAST_EXT", "1") == "0":
        _ext.update(state=False, reason="disabled by RNNBENCH_FAST_EXT=0")
        return False
    t0 = time.perf_counter()
    try:
        from torch.utils.cpp_extension import load_inline

        src = SOURCE.read_text()
        flags, machine = _cflags()
        digest = hashlib.sha256("\n".join([src, *flags, machine, torch.__version__]).encode()).hexdigest()[:12]
        name = f"rnnbench_fast_{digest}"
        from torch.utils.cpp_extension import _get_build_directory

        build_dir = Path(_get_build_directory(name, verbose=False))
        cached = _load_built(build_dir / f"{name}.so")
        if not cached:
            _clear_stale_lock(build_dir)
            load_inline(name=name, cpp_sources=[src], extra_cflags=flags, is_python_module=False,
                        no_implicit_headers=True, with_cuda=False, verbose=False)
        torch.ops.rnnbench_fast.peephole_lstm_fwd  # noqa: B018 - raises if the library did not register
        _ext.update(state=True, seconds=time.perf_counter() - t0, name=name, flags=flags, cached=cached)
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja, headers missing: all mean "fall back"
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        _ext.update(state=False, reason=reason, seconds=time.perf_counter() - t0)
        warnings.warn(f"rnnbench: compiled recurrent loops unavailable ({reason}); using the slower Python loops",
                      RuntimeWarning, stacklevel=2)
    return bool(_ext["state"])


def extension_info() -> dict[str, Any]:
    """{'state': True/False/None (not tried yet), 'reason', 'seconds' (build or load), 'name', 'flags',
    'cached' (True: an earlier build was loaded)}."""
    return dict(_ext)


def cpp_eligible(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


def resolve(impl: str, x: torch.Tensor) -> str:
    """The loop that runs for `impl` on tensors like `x`: 'cpp', 'python' or 'triton'."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "cpp":
        if not cpp_eligible(x):
            raise ValueError(f"impl='cpp' needs CPU float32/float64 tensors, got {x.device} {x.dtype}")
        if not load_extension():
            raise RuntimeError(f"impl='cpp' unavailable: {_ext['reason']}")
        return "cpp"
    if impl == "triton":
        from rnnbench.cells import _triton

        if not _triton.available():
            raise ValueError("impl='triton' needs the triton package (it comes with torch's CUDA wheels)")
        if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            raise ValueError(f"impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {x.device}")
        return "triton"
    if impl == "auto":
        if x.is_cuda:
            from rnnbench.cells import _triton

            return "triton" if _triton.available() and not _triton_failed else "python"
        return "cpp" if cpp_eligible(x) and load_extension() else "python"
    return impl


_triton_failed: list[str] = []  # set once a Triton kernel failed to build or run under impl="auto"


def _run_triton(fn: Any, impl: str, *args: torch.Tensor) -> Any:
    """fn.apply(*args); under impl="auto" a Triton failure (no compiler for this GPU, ...) warns once
    and returns None, and "auto" takes the torch-op loop from then on."""
    try:
        return fn.apply(*args)
    except Exception as e:  # noqa: BLE001 - any build or launch error means "fall back"
        if impl == "triton":
            raise
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        _triton_failed.append(reason)
        warnings.warn(f"rnnbench: Triton loop unavailable ({reason}); using the torch-op loop", RuntimeWarning, stacklevel=3)
        return None


def _c(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.contiguous() for t in ts]


def _outputs(hbuf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hs (slots 1..T) and the final state (a copy) of a (T+1, B, H) state buffer."""
    return hbuf[1:], hbuf[-1].clone()


# ==== peephole LSTM ================================================================================
# xw (T, B, 4H), gate order i, f, g, o; h0, c0 (B, H); whh (4H, H); wci, wcf, wco (H).
# Returns hs (T, B, H), h_T, c_T.


def _per_model_product(da: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """sum over steps and rows of da^T h: da (T, B, G), h (T, B, H) -> (G, H); or K models stacked on
    dim 1, da (T, K, B, G), h (T, K, B, H) -> (K, G, H)."""
    if da.dim() == 3:
        return da.reshape(-1, da.shape[-1]).t() @ h.reshape(-1, h.shape[-1])
    T, K, B, G = da.shape
    return torch.bmm(da.permute(1, 3, 0, 2).reshape(K, G, T * B), h.transpose(0, 1).reshape(K, T * B, h.shape[-1]))


def peephole_weight_grads(da: torch.Tensor, hbuf: torch.Tensor, cbuf: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """d W_hh, d w_ci, d w_cf, d w_co from all steps' dA (T, B, 4H) and the state buffers (T+1, B, H)
    (K models: dA (T, K, B, 4H), buffers (T+1, K, B, H), gradients per model)."""
    H = da.shape[-1] // 4
    rows = (0, 1) if da.dim() == 3 else (0, 2)
    cprev = cbuf[:-1]
    dwhh = _per_model_product(da, hbuf[:-1])
    dwci = (da[..., :H] * cprev).sum(rows)
    dwcf = (da[..., H : 2 * H] * cprev).sum(rows)
    dwco = (da[..., 3 * H :] * cbuf[1:]).sum(rows)
    return dwhh, dwci, dwcf, dwco


class _PeepholeCpp(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, xw, h0, c0, whh, wci, wcf, wco):  # type: ignore[override]
        xw, h0, c0, whh, wci, wcf, wco = _c(xw, h0, c0, whh, wci, wcf, wco)
        hbuf, cbuf, gates, tcs = torch.ops.rnnbench_fast.peephole_lstm_fwd(xw, h0, c0, whh, wci, wcf, wco)
        ctx.save_for_backward(whh, wci, wcf, wco, hbuf, cbuf, gates, tcs)
        return *_outputs(hbuf), cbuf[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dhs, dhT, dcT):  # type: ignore[override]
        return tuple(torch.ops.rnnbench_fast.peephole_lstm_bwd(*_c(dhs, dhT, dcT), *ctx.saved_tensors))


class _PeepholePy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, xw, h0, c0, whh, wci, wcf, wco):  # type: ignore[override]
        T, B, G = xw.shape
        H = G // 4
        hbuf, cbuf = xw.new_empty(T + 1, B, H), xw.new_empty(T + 1, B, H)
        gates, tcs = xw.new_empty(T, B, G), xw.new_empty(T, B, H)
        hbuf[0], cbuf[0] = h0, c0
        whh_t = whh.t()
        for t in range(T):
            a_i, a_f, a_g, a_o = torch.addmm(xw[t], hbuf[t], whh_t).split(H, dim=1)
            i, f, g, o = gates[t].split(H, dim=1)
            cp, c = cbuf[t], cbuf[t + 1]
            torch.sigmoid(a_i + wci * cp, out=i)
            torch.sigmoid(a_f + wcf * cp, out=f)
            torch.tanh(a_g, out=g)
            torch.add(f * cp, i * g, out=c)
            torch.sigmoid(a_o + wco * c, out=o)
            torch.tanh(c, out=tcs[t])
            torch.mul(o, tcs[t], out=hbuf[t + 1])
        ctx.save_for_backward(whh, wci, wcf, wco, hbuf, cbuf, gates, tcs)
        return hbuf[1:], hbuf[-1].clone(), cbuf[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dhs, dhT, dcT):  # type: ignore[override]
        whh, wci, wcf, wco, hbuf, cbuf, gates, tcs = ctx.saved_tensors
        T, B, H = tcs.shape
        i, f, g, o = gates.split(H, dim=2)
        cprev = cbuf[:-1]
        # every factor that does not depend on the recursion, for all steps at once
        k_o = tcs * o * (1 - o)  # dA_o = dh * k_o
        k_c = o * (1 - tcs * tcs)  # dc_t += dh * k_c
        k_ifg = torch.cat([g * i * (1 - i), cprev * f * (1 - f), i * (1 - g * g)], dim=2)  # dA_{i,f,g} = dc_t * k
        da = gates.new_empty(T, B, 4 * H)
        dh, dc = dhT, dcT
        for t in range(T - 1, -1, -1):
            dht = dh + dhs[t]
            dao = torch.mul(dht, k_o[t], out=da[t, :, 3 * H :])
            dct = torch.addcmul(dc + dao * wco, dht, k_c[t])
            torch.mul(dct.repeat(1, 3), k_ifg[t], out=da[t, :, : 3 * H])
            dc = torch.addcmul(torch.addcmul(dct * f[t], da[t, :, :H], wci), da[t, :, H : 2 * H], wcf)
            dh = da[t] @ whh
        return da, dh, dc, *peephole_weight_grads(da, hbuf, cbuf)


def peephole_lstm(xw, h0, c0, whh, wci, wcf, wco, impl: str = "auto"):
    """(hs (T, B, H), h_T, c_T) of one peephole LSTM layer; xw = x W_ih^T + b, time major."""
    which = resolve(impl, xw)
    if which == "triton":
        from rnnbench.cells._triton import PeepholeTriton

        out = _run_triton(PeepholeTriton, impl, xw, h0, c0, whh, wci, wcf, wco)
        if out is not None:
            return out
        which = "python"
    fn = _PeepholeCpp if which == "cpp" else _PeepholePy
    return fn.apply(xw, h0, c0, whh, wci, wcf, wco)


# ==== GRU, reset before (Cho et al. 2014; Chung et al. 2014) ======================================
# xw (T, B, 3H), order r, z, h~; h0 (B, H); whh (3H, H) = [U_r; U_z; U_h]. Returns hs (T, B, H), h_T.


def gru_before_weight_grad(da: torch.Tensor, hbuf: torch.Tensor, rh: torch.Tensor) -> torch.Tensor:
    """d [U_r; U_z; U_h] from all steps' dA (T, B, 3H): U_r, U_z see h_{t-1}, U_h sees r_t h_{t-1}
    (K models: dA (T, K, B, 3H), buffers (T(+1), K, B, H), gradients (K, 3H, H))."""
    H = da.shape[-1] // 3
    return torch.cat([_per_model_product(da[..., : 2 * H], hbuf[:-1]), _per_model_product(da[..., 2 * H :], rh)], dim=-2)


class _GRUBeforeCpp(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, xw, h0, whh):  # type: ignore[override]
        xw, h0, whh = _c(xw, h0, whh)
        hbuf, gates, rh = torch.ops.rnnbench_fast.gru_reset_before_fwd(xw, h0, whh)
        ctx.save_for_backward(whh, hbuf, gates, rh)
        return _outputs(hbuf)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dhs, dhT):  # type: ignore[override]
        return tuple(torch.ops.rnnbench_fast.gru_reset_before_bwd(*_c(dhs, dhT), *ctx.saved_tensors))


class _GRUBeforePy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, xw, h0, whh):  # type: ignore[override]
        T, B, G = xw.shape
        H = G // 3
        hbuf, gates, rh = xw.new_empty(T + 1, B, H), xw.new_empty(T, B, G), xw.new_empty(T, B, H)
        hbuf[0] = h0
        u_rz_t, u_h_t = whh[: 2 * H].t(), whh[2 * H :].t()
        for t in range(T):
            hp = hbuf[t]
            rz = torch.sigmoid(torch.addmm(xw[t, :, : 2 * H], hp, u_rz_t), out=gates[t, :, : 2 * H])
            torch.mul(rz[:, :H], hp, out=rh[t])
            ht = torch.tanh(torch.addmm(xw[t, :, 2 * H :], rh[t], u_h_t), out=gates[t, :, 2 * H :])
            torch.add(hp, rz[:, H:] * (ht - hp), out=hbuf[t + 1])
        ctx.save_for_backward(whh, hbuf, gates, rh)
        return hbuf[1:], hbuf[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dhs, dhT):  # type: ignore[override]
        whh, hbuf, gates, rh = ctx.saved_tensors
        T, B, H = rh.shape
        r, z, ht = gates.split(H, dim=2)
        hprev = hbuf[:-1]
        k_z = (ht - hprev) * z * (1 - z)  # dA_z = dh * k_z
        k_h = z * (1 - ht * ht)  # dA_h = dh * k_h
        k_r = hprev * r * (1 - r)  # dA_r = d(r h) * k_r
        u_rz, u_h = whh[: 2 * H], whh[2 * H :]
        da = gates.new_empty(T, B, 3 * H)
        dh = dhT
        for t in range(T - 1, -1, -1):
            dht = dh + dhs[t]
            torch.mul(dht, k_z[t], out=da[t, :, H : 2 * H])
            dah = torch.mul(dht, k_h[t], out=da[t, :, 2 * H :])
            drh = dah @ u_h
            torch.mul(drh, k_r[t], out=da[t, :, :H])
            dh = torch.addmm(torch.addcmul(dht - dht * z[t], drh, r[t]), da[t, :, : 2 * H], u_rz)
        return da, dh, gru_before_weight_grad(da, hbuf, rh)


def gru_reset_before(xw, h0, whh, impl: str = "auto"):
    """(hs (T, B, H), h_T) of one reset-before GRU layer; xw = x W_ih^T + b, time major."""
    which = resolve(impl, xw)
    if which == "triton":
        from rnnbench.cells._triton import GRUBeforeTriton

        out = _run_triton(GRUBeforeTriton, impl, xw, h0, whh)
        if out is not None:
            return out
        which = "python"
    fn = _GRUBeforeCpp if which == "cpp" else _GRUBeforePy
    return fn.apply(xw, h0, whh)


# ==== GRU, reset after (torch.nn.GRU / cuDNN) =====================================================
# gi (T, B, 3H) = x W_ih^T + b_ih, order r, z, n; h0 (B, H); whh (3H, H); bhh (3H). Returns hs, h_T.


class _GRUAfterCpp(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gi, h0, whh, bhh):  # type: ignore[override]
        gi, h0, whh, bhh = _c(gi, h0, whh, bhh)
        hbuf, gates = torch.ops.rnnbench_fast.gru_reset_after_fwd(gi, h0, whh, bhh)
        ctx.save_for_backward(whh, hbuf, gates)
        return _outputs(hbuf)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dhs, dhT):  # type: ignore[override]
        return tuple(torch.ops.rnnbench_fast.gru_reset_after_bwd(*_c(dhs, dhT), *ctx.saved_tensors))


class _GRUAfterPy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gi, h0, whh, bhh):  # type: ignore[override]
        T, B, G = gi.shape
        H = G // 3
        hbuf, gates = gi.new_empty(T + 1, B, H), gi.new_empty(T, B, 4 * H)
        hbuf[0] = h0
        whh_t = whh.t()
        for t in range(T):
            hp = hbuf[t]
            gh = torch.addmm(bhh, hp, whh_t)
            rz = torch.sigmoid(gi[t, :, : 2 * H] + gh[:, : 2 * H], out=gates[t, :, : 2 * H])
            hn = gates[t, :, 3 * H :]
            hn.copy_(gh[:, 2 * H :])
            n = torch.tanh(torch.addcmul(gi[t, :, 2 * H :], hn, rz[:, :H]), out=gates[t, :, 2 * H : 3 * H])
            torch.add(n, (hp - n) * rz[:, H:], out=hbuf[t + 1])
        ctx.save_for_backward(whh, hbuf, gates)
        return hbuf[1:], hbuf[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dhs, dhT):  # type: ignore[override]
        whh, hbuf, gates = ctx.saved_tensors
        T, B, G4 = gates.shape
        H = G4 // 4
        r, z, n, hn = gates.split(H, dim=2)
        hprev = hbuf[:-1]
        k_n = (1 - z) * (1 - n * n)  # dA_n = dh * k_n
        k_z = (hprev - n) * z * (1 - z)  # dA_z = dh * k_z
        k_r = hn * r * (1 - r)  # dA_r = dA_n * k_r
        dgi, dgh = gates.new_empty(T, B, 3 * H), gates.new_empty(T, B, 3 * H)
        dh = dhT
        for t in range(T - 1, -1, -1):
            dht = dh + dhs[t]
            dan = torch.mul(dht, k_n[t], out=dgi[t, :, 2 * H :])
            torch.mul(dht, k_z[t], out=dgi[t, :, H : 2 * H])
            torch.mul(dan, k_r[t], out=dgi[t, :, :H])
            dgh[t, :, : 2 * H] = dgi[t, :, : 2 * H]
            torch.mul(dan, r[t], out=dgh[t, :, 2 * H :])
            dh = torch.addmm(dht * z[t], dgh[t], whh)
        dgh2 = dgh.view(T * B, 3 * H)
        return dgi, dh, dgh2.t() @ hprev.reshape(T * B, H), dgh2.sum(0)


def gru_reset_after(gi, h0, whh, bhh, impl: str = "auto"):
    """(hs (T, B, H), h_T) of one torch.nn.GRU layer; gi = x W_ih^T + b_ih, time major."""
    fn = _GRUAfterCpp if resolve(impl, gi) == "cpp" else _GRUAfterPy
    return fn.apply(gi, h0, whh, bhh)


# ==== torch.nn.LSTM and torch.nn.RNN(tanh) on the CPU (rnnbench/cells/fused.py) ===================
# Compiled loops only: elsewhere the cells run torch's own kernels. xw = x W_ih^T + b_ih + b_hh, time major.


class _LSTMCpp(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, xw, h0, c0, whh):  # type: ignore[override]
        xw, h0, c0, whh = _c(xw, h0, c0, whh)
        hbuf, cbuf, gates, tcs = torch.ops.rnnbench_fast.lstm_fwd(xw, h0, c0, whh)
        ctx.save_for_backward(whh, hbuf, cbuf, gates, tcs)
        return *_outputs(hbuf), cbuf[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dhs, dhT, dcT):  # type: ignore[override]
        return tuple(torch.ops.rnnbench_fast.lstm_bwd(*_c(dhs, dhT, dcT), *ctx.saved_tensors))


class _TanhCpp(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, xw, h0, whh):  # type: ignore[override]
        xw, h0, whh = _c(xw, h0, whh)
        (hbuf,) = torch.ops.rnnbench_fast.tanh_rnn_fwd(xw, h0, whh)
        ctx.save_for_backward(whh, hbuf)
        return _outputs(hbuf)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dhs, dhT):  # type: ignore[override]
        return tuple(torch.ops.rnnbench_fast.tanh_rnn_bwd(*_c(dhs, dhT), *ctx.saved_tensors))


def lstm(xw, h0, c0, whh):
    """(hs (T, B, H), h_T, c_T) of one torch.nn.LSTM layer by the compiled loop (CPU float32/float64)."""
    resolve("cpp", xw)
    return _LSTMCpp.apply(xw, h0, c0, whh)


def tanh_rnn(xw, h0, whh):
    """(hs (T, B, H), h_T) of one torch.nn.RNN(tanh) layer by the compiled loop (CPU float32/float64)."""
    resolve("cpp", xw)
    return _TanhCpp.apply(xw, h0, whh)


# ==== K models at once (rnnbench/many_models.py on the CPU) =======================================
class _ManyCpp(torch.autograd.Function):
    """K independent one-model compiled loops (`op`_fwd / `op`_bwd), run in parallel over the CPU threads
    by the ops `op`_fwd_many / `op`_bwd_many: the same numbers as K calls of the one-model Function.

    apply(op, K, *args): args are the one-model Function's arguments, each as K consecutive tensors (all
    K xw, then all K h0, ...); models may differ in length. Returns, for model after model, what the
    one-model Function returns: hs, h_T (and c_T for the LSTM).
    """

    # per op: (inputs per model, final states besides hs, indices of the inputs the backward needs)
    SPEC: dict[str, tuple[int, int, tuple[int, ...]]] = {
        "peephole_lstm": (7, 2, (3, 4, 5, 6)),  # xw, h0, c0, whh, wci, wcf, wco
        "gru_reset_before": (3, 1, (2,)),  # xw, h0, whh
        "gru_reset_after": (4, 1, (2,)),  # gi, h0, whh, bhh
        "lstm": (4, 2, (3,)),  # xw, h0, c0, whh
        "tanh_rnn": (3, 1, (2,)),  # xw, h0, whh
    }

    @staticmethod
    def forward(ctx: Any, op: str, K: int, *flat):  # type: ignore[override]
        n_in, n_states, needed = _ManyCpp.SPEC[op]
        args = [_c(*flat[i * K : (i + 1) * K]) for i in range(n_in)]
        results = getattr(torch.ops.rnnbench_fast, op + "_fwd_many")(*args)
        n_res = len(results) // K
        outs, saved = [], []
        for k in range(K):
            res = results[k * n_res : (k + 1) * n_res]
            outs += [*_outputs(res[0])] + ([res[1][-1].clone()] if n_states == 2 else [])
            saved += [args[i][k] for i in needed] + list(res)
        ctx.save_for_backward(*saved)
        ctx.op, ctx.K, ctx.per_model = op, K, len(needed) + n_res
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads):  # type: ignore[override]
        op, K, m = ctx.op, ctx.K, ctx.per_model
        n_in, n_states, _ = _ManyCpp.SPEC[op]
        per = 1 + n_states  # outputs per model
        saved = ctx.saved_tensors
        lists = [_c(*grads[j::per]) for j in range(per)] + [list(saved[j::m]) for j in range(m)]
        results = getattr(torch.ops.rnnbench_fast, op + "_bwd_many")(*lists)
        # results: model after model, n_in gradients each; autograd wants all K of input 0, then input 1, ...
        return None, None, *(results[k * n_in + i] for i in range(n_in) for k in range(K))
