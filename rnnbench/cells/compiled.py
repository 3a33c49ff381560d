"""The compiled CPU time loops (csrc/fast_rnn.cpp) over weights stacked for K models.

Each loop takes the input projection of every step, xw = x W_ih^T + b (computed by the cell's
`project`, one autograd-tracked batched product), and runs the recurrence with a hand-written
backward through time, so autograd records one node per layer instead of ~15 per step.

The C++ source is compiled on first use with torch.utils.cpp_extension.load_inline and cached in
torch's extension directory (TORCH_EXTENSIONS_DIR); only per-operator ATen headers are included, so
the build is short and loading a cached build is immediate; concurrent processes share one build
through torch's file lock. CPU, float32 and float64. Per step: one small BLAS product (two for the
reset-before GRU), single-threaded (BLAS threads cost more than these products), and one vectorised
pass over the gates (-march=native). Where a step's product is large (gates*H*H >= 16384) the forward
loop runs the batch's rows in chunks of 16 in parallel over torch's intra-op threads.

The ops *_stacked take K models' tensors stacked member-major, with each member's own number of
steps (or each sequence's, its rows longest first), and run the K loops in parallel over those threads,
each on views of its own rows: member k runs its first steps[k] steps, each sequence stops at its own
end, and the outputs after it are zeros. Without a compiler (or RNNBENCH_FAST_EXT=0) the
extension does not load, after one RuntimeWarning, and the dispatch (loops.py) runs the reference.
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

from rnnbench.cells.base import Loop, State, Weights

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
    # -fopenmp-simd: `#pragma omp simd` only (a vectorised sum; no OpenMP runtime is linked).
    flags = ["-O3", "-DNDEBUG", "-fno-trapping-math", "-fno-math-errno", "-fopenmp-simd"]
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
        warnings.warn(f"rnnbench: compiled recurrent loops unavailable ({reason}); using the reference step loop",
                      RuntimeWarning, stacklevel=2)
    return bool(_ext["state"])


def extension_info() -> dict[str, Any]:
    """{'state': True/False/None (not tried yet), 'reason', 'seconds' (build or load), 'name', 'flags',
    'cached' (True: an earlier build was loaded)}."""
    return dict(_ext)


def cpp_eligible(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether the compiled loops can take tensors of this device and dtype (CPU float32/float64)."""
    return torch.device(device).type == "cpu" and dtype in (torch.float32, torch.float64)


class ManyCppLoops(torch.autograd.Function):
    """K independent one-model compiled loops over STACKED tensors, run in parallel over the CPU threads
    by the ops `op`_fwd_stacked / `op`_bwd_stacked: the same numbers as K calls of the one-model loop.

    apply(op, lengths, xw (T, K, B, G), *states (K, B, H), *weights (K, ...)): lengths has K entries
    (member k runs its own lengths[k] steps) or K x B, member-major (each sequence stops at its own
    length; each member's rows sorted longest first). Returns hs (T, K, B, H) (zeros after each
    member's, or sequence's, end) and the final states (K, B, H), each after its own last step. The ops work on views of the stacked tensors, so
    nothing is sliced or copied per member here, and gradients come back stacked, one tensor per input
    (slicing under autograd would make every member's backward fill and add a whole stacked tensor).
    """

    # per op: (inputs per model, final states besides hs, indices of the inputs the backward needs)
    SPEC: dict[str, tuple[int, int, tuple[int, ...]]] = {
        "peephole_lstm": (7, 2, (3, 4, 5, 6)),  # xw, h0, c0, whh, wci, wcf, wco
        "gru_reset_before": (3, 1, (2,)),  # xw, h0, whh
        "gru_reset_after": (4, 1, (2,)),  # gi, h0, whh, bhh
        "lstm": (4, 2, (3,)),  # xw, h0, c0, whh
        "tanh_rnn": (3, 1, (2,)),  # xw, h0, whh
        "lstm_niaf": (7, 2, (3, 4, 5, 6)),  # as peephole_lstm, with a linear block input
        "lstm_noaf": (7, 2, (3, 4, 5, 6)),  # as peephole_lstm, with a linear output activation
        "lstm_fgr": (7, 2, (3, 4, 5, 6)),  # as peephole_lstm over z = [h, i, f, o]: z0 (K, B, 4H), whh (K, 4H, 4H)
    }

    @staticmethod
    def forward(ctx: Any, op: str, lengths: tuple[int, ...], xw: torch.Tensor, *rest: torch.Tensor):  # type: ignore[override]
        _, n_states, needed = ManyCppLoops.SPEC[op]
        inputs = (xw.transpose(0, 1).contiguous(), *(t.contiguous() for t in rest))  # member-major: no copy from `project`
        results = getattr(torch.ops.rnnbench_fast, op + "_fwd_stacked")(inputs[0], list(lengths), *inputs[1:])
        ctx.save_for_backward(*(inputs[i] for i in needed), *results)
        ctx.op, ctx.lengths = op, lengths
        # final states: each member's (or sequence's) buffer slot after its own last step (slot 0 holds h0)
        K, B = xw.shape[1], xw.shape[2]
        last = torch.tensor(lengths, device=xw.device)
        if len(lengths) == K:
            members = torch.arange(K, device=xw.device)
            finals = [results[i][members, last] for i in range(n_states)]
        else:
            members = torch.arange(K, device=xw.device).repeat_interleave(B)
            rows = torch.arange(B, device=xw.device).repeat(K)
            finals = [results[i][members, last, rows].view(K, B, -1) for i in range(n_states)]
        return (results[0][:, 1:].transpose(0, 1), *finals)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dhs: torch.Tensor, *dfinals: torch.Tensor):  # type: ignore[override]
        n_in = ManyCppLoops.SPEC[ctx.op][0]
        grads = getattr(torch.ops.rnnbench_fast, ctx.op + "_bwd_stacked")(
            dhs.transpose(0, 1).contiguous(), list(ctx.lengths), *(d.contiguous() for d in dfinals), *ctx.saved_tensors)
        return None, None, grads[0].transpose(0, 1), *grads[1:n_in]


def _longest_first_order(lengths: torch.Tensor) -> torch.Tensor | None:
    """lengths (K, B) -> each member's row order longest first (K, B) (stable), or None when they
    are in that order already (the tasks' collates sort their batches so)."""
    if bool((lengths[:, 1:] <= lengths[:, :-1]).all()):
        return None
    return torch.sort(lengths.cpu(), dim=1, descending=True, stable=True).indices


def _rows(t: torch.Tensor, order: torch.Tensor, dim: int) -> torch.Tensor:
    """t with each member's rows (dim `dim`, members on the dim before it) in `order` (K, B)."""
    shape = [1] * t.dim()
    shape[dim - 1], shape[dim] = order.shape
    return t.gather(dim, order.to(t.device).view(shape).expand_as(t))


def member_loop(op: str, *weight_names: str) -> Loop:
    """The cpp Loop of a cell whose one-model op `op` takes (xw, *state, *weights named weight_names).

    Member k runs its own steps[k] steps (steps (K,)), or each sequence its own (steps (K, B): the
    loop skips the steps after a sequence's end); all K in one *_stacked call on the stacked tensors.
    """
    n_in, n_states, _ = ManyCppLoops.SPEC[op]
    if n_in != 1 + n_states + len(weight_names):
        raise ValueError(f"{op} takes {n_in} inputs, got xw, {n_states} state(s) and {len(weight_names)} weights")

    def loop(w: Weights, xw: torch.Tensor, state: State, steps: torch.Tensor | None) -> tuple[torch.Tensor, State]:
        T, K = xw.shape[:2]
        weights = [w[name] for name in weight_names]
        if steps is None or steps.dim() == 1:
            lengths = (T,) * K if steps is None else tuple(int(s) for s in steps.tolist())
            hs, *finals = ManyCppLoops.apply(op, lengths, xw, *state, *weights)
            return hs, tuple(finals)
        order = _longest_first_order(steps)
        if order is not None:  # the loops need each member's rows longest first: run them in that order
            back = order.argsort(dim=1)
            xw, state = _rows(xw, order, 2), tuple(_rows(s, order, 1) for s in state)
            steps = steps.gather(1, order.to(steps.device))
        hs, *finals = ManyCppLoops.apply(op, tuple(steps.flatten().tolist()), xw, *state, *weights)
        if order is not None:
            hs, finals = _rows(hs, back, 2), [_rows(s, back, 1) for s in finals]
        return hs, tuple(finals)

    return loop


class RowsLinear(torch.autograd.Function):
    """y = x W_k^T + b_k on each member's rows of x (R, D): member k owns rows starts[k] .. starts[k] +
    counts[k] - 1; rows no member owns are 0 (and pass no gradient). W (K, O, D), b (K, O). One product
    per member, the members in parallel (op rows_linear_fwd / _bwd). With `coords` (R, x.dim() - 1),
    row r is x's row at those coordinates, x any (..., D) view with a unit last stride, read where it
    lies; its gradient is dense in the layout x views (the loop's own, so nothing is copied back)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, starts: list[int], counts: list[int], W: torch.Tensor, b: torch.Tensor,  # type: ignore[override]
                coords: torch.Tensor | None = None):
        if coords is None:
            x, coords = x.contiguous(), _NO_ROWS
        else:
            coords = coords.contiguous()  # nonzero()'s result is a transposed view
            if x.stride(-1) != 1:
                x = x.contiguous()
        W, b = W.contiguous(), b.contiguous()
        ctx.save_for_backward(x, W, coords)
        ctx.rows = (starts, counts)
        return torch.ops.rnnbench_fast.rows_linear_fwd(x, coords, starts, counts, W, b)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor):  # type: ignore[override]
        x, W, coords = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]  # not for the input projection of the data
        dx, dW, db = torch.ops.rnnbench_fast.rows_linear_bwd(dy.contiguous(), x, coords, *ctx.rows, W, need_dx)
        return dx if need_dx else None, None, None, dW, db, None


_NO_ROWS = torch.empty(0, dtype=torch.int64)  # the ops' "no index": rows in order


def rows_linear(x: torch.Tensor, starts: list[int], counts: list[int], W: torch.Tensor, b: torch.Tensor,
                coords: torch.Tensor | None = None) -> torch.Tensor:
    """Each member's linear map over its own rows of x (R, D), or of x's rows at `coords`, -> (R, O); see RowsLinear."""
    return RowsLinear.apply(x, list(starts), list(counts), W, b, coords)


class StepsLinear(torch.autograd.Function):
    """y[k, t, b] = W_k x[k, t, b] + b_k for each sequence's own steps (t < lengths[k, b]), 0 after:
    x (K, T, B, D) with a unit last stride (no copy of a permuted input), lengths K x B member-major,
    W (K, O, D), b (K, O) -> y (K, T, B, O). One strided product per sequence, the members in
    parallel (op steps_linear_fwd / _bwd): no padded step is computed."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lengths: list[int], W: torch.Tensor, b: torch.Tensor):  # type: ignore[override]
        if x.stride(-1) != 1:
            x = x.contiguous()
        W, b = W.contiguous(), b.contiguous()
        ctx.save_for_backward(x, W)
        ctx.lengths = lengths
        return torch.ops.rnnbench_fast.steps_linear_fwd(x, lengths, W, b)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor):  # type: ignore[override]
        x, W = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]  # not for the input projection of the data
        dx, dW, db = torch.ops.rnnbench_fast.steps_linear_bwd(dy.contiguous(), x, ctx.lengths, W, need_dx)
        return dx if need_dx else None, None, dW, db


def steps_linear(x: torch.Tensor, lengths: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Each member's linear map over each sequence's own steps of x (K, T, B, D); see StepsLinear."""
    return StepsLinear.apply(x, lengths.flatten().tolist(), W, b)


class BernoulliNLL(torch.autograd.Function):
    """nll (R,) = sum over D of softplus(z) - y z for logits z (R, D) and 0/1 targets y (R, D), or y (N, D)
    read at rows y_rows (R,): the Bernoulli NLL of each row (binary_cross_entropy_with_logits summed
    over the last dim), forward and backward in one pass each (ops bernoulli_nll_fwd / _bwd). No
    gradient for y. `parallel`: rows in chunks on torch's threads (the caller's choice, by size)."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, y: torch.Tensor, y_rows: torch.Tensor | None = None,  # type: ignore[override]
                parallel: bool = False):
        z, y = z.contiguous(), y.contiguous()
        rows = _NO_ROWS if y_rows is None else y_rows.contiguous()
        ctx.save_for_backward(z, y, rows)
        ctx.parallel = parallel
        return torch.ops.rnnbench_fast.bernoulli_nll_fwd(z, y, rows, parallel)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor):  # type: ignore[override]
        z, y, rows = ctx.saved_tensors
        return torch.ops.rnnbench_fast.bernoulli_nll_bwd(g.contiguous(), z, y, rows, ctx.parallel), None, None, None
