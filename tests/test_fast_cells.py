"""Every fast loop of every registered cell against the reference step loop, in float64.

For each cell and each implementation in its `loops` ("cpp": the compiled CPU loops; "triton": the
Triton-fused steps, on the CPU through Triton's interpreter where triton imports), K in {1, 3},
1 and 2 layers, unequal lengths (zero-padded): outputs, final states and the gradients of a random
linear function of them with respect to the input, the initial state and every weight equal the
reference's; and member k of a K-stack equals its weights run alone. No timings here: speed lives
in `rnnbench bench`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from rnnbench.cells import CELLS, compiled, get_cell, implementation, init_weights, loops, run
from rnnbench.errors import RnnbenchError

B, T, D, H = 3, 9, 4, 5
STEPS = {1: [6], 3: [T, 3, 7]}  # member lengths; K = 1 shorter than T too: padding is exact
FAST = [pytest.param(c, i, id=f"{c}-{i}") for c in sorted(CELLS) for i in CELLS[c].loops]
CPP = [c for c in sorted(CELLS) if "cpp" in CELLS[c].loops]
TRITON = [c for c in sorted(CELLS) if "triton" in CELLS[c].loops]


def _compiler() -> bool:
    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))


def _require_cpp() -> None:
    """The compiled loop must build wherever a compiler exists; skip only where none does."""
    if compiled.load_extension():
        return
    if _compiler() and compiled.extension_info()["reason"] != "disabled by RNNBENCH_FAST_EXT=0":
        pytest.fail(f"compiled loop failed to build: {compiled.extension_info()['reason']}")
    pytest.skip(f"compiled loop unavailable: {compiled.extension_info()['reason']}")


def _triton_here() -> bool:
    """Triton kernels can run in this process: CUDA, or the interpreter switched on before import."""
    from rnnbench.cells import triton_steps

    return triton_steps.available() and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


def problem(cell: str, K: int, num_layers: int, dtype=torch.float64, device: str = "cpu", seed: int = 0,
            hidden: int = H, batch: int = B, length: int = T, scale: float | None = 0.5):
    """Weights (scale 0.5: every nonlinearity matters), zero-padded x, steps, initial state, loss weights."""
    n_state = get_cell(cell).state_size
    gens = [torch.Generator().manual_seed(seed + k) for k in range(K)]
    layers = init_weights(cell, D, hidden, num_layers, gens, scale, 0.7, torch.float64)
    g = torch.Generator().manual_seed(seed + 100)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    steps = torch.tensor(STEPS[K]) if length == T else torch.full((K,), length)
    x = rnd(K, batch, length, D)
    for k, s in enumerate(steps.tolist()):
        x[k, :, s:] = 0
    state = [tuple(rnd(K, batch, hidden) for _ in range(n_state)) for _ in range(num_layers)]
    g_out = rnd(K, batch, length, hidden)
    g_fin = [[rnd(K, batch, hidden) for _ in range(n_state)] for _ in range(num_layers)]
    to = dict(dtype=dtype, device=device)
    return ([{k: v.to(**to) for k, v in w.items()} for w in layers], x.to(**to), steps,
            [tuple(s.to(**to) for s in st) for st in state], g_out.to(**to), [[t.to(**to) for t in gf] for gf in g_fin])


def compute(cell: str, impl: str, layers, x, steps, state, g_out, g_fin) -> dict[str, torch.Tensor]:
    """Outputs, final states and all gradients of sum(out * g_out) + sum(final * g_fin)."""
    w = [{k: v.clone().requires_grad_() for k, v in lw.items()} for lw in layers]
    xg = x.clone().requires_grad_()
    s_in = [tuple(s.clone().requires_grad_() for s in st) for st in state]
    out, finals = run(cell, w, xg, steps, impl=impl, state=s_in)
    loss = (out * g_out).sum() + sum((s * gs).sum() for f, gf in zip(finals, g_fin) for s, gs in zip(f, gf))
    loss.backward()
    got = {"out": out.detach(), "grad_x": xg.grad}
    for l in range(len(layers)):
        got.update({f"final{l}.{i}": s.detach() for i, s in enumerate(finals[l])})
        got.update({f"grad_state{l}.{i}": s.grad for i, s in enumerate(s_in[l])})
        got.update({f"grad_{l}.{k}": v.grad for k, v in w[l].items()})
    return got


def assert_same(a: dict, b: dict, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] is not None and b[k] is not None, k
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def check_against_reference(cell: str, impl: str, K: int, num_layers: int, **kw) -> None:
    """The fast loop == the reference loop; and member k of the stack == member k run alone (K = 1)."""
    p = problem(cell, K, num_layers, **kw)
    fast = compute(cell, impl, *p)
    assert_same(fast, compute(cell, "reference", *p))
    layers, x, steps, state, g_out, g_fin = p
    for k, s in enumerate(steps.tolist()):
        one = lambda t: t[k : k + 1]  # noqa: E731
        alone = compute(cell, impl, [{n: one(v) for n, v in w.items()} for w in layers], one(x)[:, :, :s],
                        steps[k : k + 1], [tuple(map(one, st)) for st in state], one(g_out)[:, :, :s],
                        [list(map(one, gf)) for gf in g_fin])
        for name, v in alone.items():
            mine = fast[name][k : k + 1]
            if name == "out":
                assert torch.count_nonzero(mine[:, :, s:]) == 0  # zeros after the member's end
            if name in ("out", "grad_x"):
                mine = mine[:, :, :s]
            torch.testing.assert_close(mine, v, rtol=1e-12, atol=1e-13, msg=lambda m, n=name: f"member {k} {n}: {m}")


def sequence_lengths(K: int, batch: int = B, length: int = T, longest_first: bool = True, seed: int = 7) -> torch.Tensor:
    """(K, batch) lengths in 1..length, each member's longest = length for member 0, shorter for the others."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (K, batch), generator=g)
    lengths[0, -1] = length
    return lengths.sort(dim=1, descending=True).values if longest_first else lengths


def compute_rows(cell: str, impl: str, layers, x, lengths, state, g_out, g_fin, masked: str = "") -> dict[str, torch.Tensor]:
    """compute() with each sequence's own length (run's lengths). masked: a loss that reads only the
    valid steps and no final state (what a task's loss reads), "rows" over run(lengths=), "members"
    over member-level steps (each member padded to its longest) instead."""
    w = [{k: v.clone().requires_grad_() for k, v in lw.items()} for lw in layers]
    xg = x.clone().requires_grad_()
    s_in = [tuple(s.clone().requires_grad_() for s in st) for st in state]
    valid = (torch.arange(x.shape[2]) < lengths[:, :, None]).unsqueeze(-1).to(x.dtype)
    if masked == "members":
        out, finals = run(cell, w, xg, lengths.max(1).values, impl=impl, state=s_in)
    else:
        out, finals = run(cell, w, xg, impl=impl, state=s_in, lengths=lengths)
    if masked:
        loss = (out * g_out * valid).sum()
    else:
        loss = (out * g_out).sum() + sum((s * gs).sum() for f, gf in zip(finals, g_fin) for s, gs in zip(f, gf))
    loss.backward()
    got = {"out": (out * valid).detach() if masked else out.detach(), "grad_x": xg.grad}
    for l in range(len(layers)):
        if not masked:
            got.update({f"final{l}.{i}": s.detach() for i, s in enumerate(finals[l])})
        got.update({f"grad_state{l}.{i}": s.grad for i, s in enumerate(s_in[l])})
        got.update({f"grad_{l}.{k}": v.grad for k, v in w[l].items()})
    return got


def check_rows_against_reference(cell: str, impl: str, num_layers: int, longest_first: bool = True, **kw) -> None:
    """Each sequence at its own length (run's lengths): the fast loop == the reference; its outputs
    are zero after its end and its final state is the one after its own last step (the sequence run
    alone, unpadded); and at the valid steps, with a loss that reads only those, the outputs and every
    gradient equal member-level padding's (what the loops skip changes nothing a task reads)."""
    K, batch = 3, kw.pop("batch", 4)
    layers, x, _, state, g_out, g_fin = problem(cell, K, num_layers, batch=batch, **kw)
    lengths = sequence_lengths(K, batch, x.shape[2], longest_first)
    x = x * (torch.arange(x.shape[2]) < lengths[:, :, None]).unsqueeze(-1).to(x.dtype)  # zero padding
    p = (layers, x, lengths, state, g_out, g_fin)
    fast = compute_rows(cell, impl, *p)
    assert_same(fast, compute_rows(cell, "reference", *p))
    mine, padded = compute_rows(cell, impl, *p, masked="rows"), compute_rows(cell, "reference", *p, masked="members")
    for name, v in padded.items():
        torch.testing.assert_close(mine[name], v, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n} vs member-level padding: {m}")
    for k, b in ((0, batch - 1), (1, 0), (2, batch // 2)):
        n = int(lengths[k, b])
        one = lambda t: t[k : k + 1, b : b + 1]  # noqa: E731
        alone = compute(cell, "reference", [{m: v[k : k + 1] for m, v in w.items()} for w in layers], one(x)[:, :, :n],
                        None, [tuple(map(one, st)) for st in state], one(g_out)[:, :, :n], [list(map(one, gf)) for gf in g_fin])
        assert torch.count_nonzero(fast["out"][k, b, n:]) == 0  # zeros after the sequence's end
        torch.testing.assert_close(fast["out"][k : k + 1, b : b + 1, :n], alone["out"], rtol=1e-12, atol=1e-13)
        for name in alone:
            if name.startswith("final"):
                torch.testing.assert_close(one(fast[name]), alone[name], rtol=1e-12, atol=1e-13,
                                           msg=lambda m, nm=name: f"sequence ({k}, {b}) {nm}: {m}")


_TRITON_CHECK = """
import sys
sys.path.insert(0, {tests!r})
from test_fast_cells import check_against_reference
check_against_reference({cell!r}, "triton", {K}, {num_layers})
print("ok")
"""


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize(("cell", "impl"), FAST)
def test_fast_loop_equals_reference(cell: str, impl: str, K: int, num_layers: int) -> None:
    if impl == "cpp":
        _require_cpp()
    elif impl == "triton" and not _triton_here():
        # the interpreter is read when the kernels are defined: a fresh process
        pytest.importorskip("triton", reason="triton is not installed (torch's CPU wheels come without it)")
        code = _TRITON_CHECK.format(tests=str(Path(__file__).parent), cell=cell, K=K, num_layers=num_layers)
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "1"},
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
        return
    check_against_reference(cell, impl, K, num_layers)


_TRITON_ROWS_CHECK = """
import sys
sys.path.insert(0, {tests!r})
from test_fast_cells import check_rows_against_reference
check_rows_against_reference({cell!r}, "triton", {num_layers}, {longest_first})
print("ok")
"""


@pytest.mark.parametrize("longest_first", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize(("cell", "impl"), FAST + [pytest.param("lstm", "reference", id="lstm-reference")])
def test_each_sequence_stops_at_its_own_length(cell: str, impl: str, num_layers: int, longest_first: bool) -> None:
    """run(lengths=): the loops skip the steps after each sequence's end (the compiled ones, on rows
    longest first; an unsorted batch is put in that order and back), for every cell and fast loop."""
    if impl == "cpp":
        _require_cpp()
    elif impl == "triton" and not _triton_here():
        pytest.importorskip("triton", reason="triton is not installed (torch's CPU wheels come without it)")
        code = _TRITON_ROWS_CHECK.format(tests=str(Path(__file__).parent), cell=cell, num_layers=num_layers,
                                         longest_first=longest_first)
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "1"},
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
        return
    check_rows_against_reference(cell, impl, num_layers, longest_first)


@pytest.mark.parametrize("cell", CPP)
def test_each_sequence_stops_in_parallel_row_chunks(cell: str) -> None:
    """Sequence lengths at a size where the forward runs 16-row chunks on threads (40 rows: 3 chunks):
    the reference's numbers on 2 threads."""
    _require_cpp()
    hidden = 128 if get_cell(cell).weight_shapes(D, 1)["weight_hh"][0] == 1 else 76
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        check_rows_against_reference(cell, "cpp", 1, batch=40, hidden=hidden)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("cell", CPP)
def test_cpp_float32_close_on_a_long_sequence(cell: str) -> None:
    """float32 (vectorised exp/tanh in the compiled loop) stays within float rounding over 200 steps
    (torch's default init: larger weights make the tanh RNN chaotic, amplifying any rounding)."""
    _require_cpp()
    args = dict(hidden=36, length=200, scale=None)
    got = compute(cell, "cpp", *problem(cell, 2, 1, dtype=torch.float32, **args))
    ref = compute(cell, "reference", *problem(cell, 2, 1, dtype=torch.float32, **args))
    exact = compute(cell, "reference", *problem(cell, 2, 1, dtype=torch.float64, **args))
    assert got.keys() == ref.keys() == exact.keys()
    for k in got:
        # The loop must be as near the float64 numbers as float32's own reference is: each element's
        # rounding differs between the two (vectorised exp, another BLAS summation order on another
        # CPU), so an element-wise tolerance between them fails where values grow (lstm_nfg: c_t grows
        # without a forget gate, its gradients reach 1e3-1e4), while the error against float64 says
        # whether the loop loses accuracy.
        # The floor is float32's rounding of a sum of this size (6,400 terms for a weight gradient):
        # where the float32 reference happens to round luckily, twice its error is below it.
        err, ref_err = ((t.double() - exact[k]).abs().max() for t in (got[k], ref[k]))
        scale = max(1.0, float(exact[k].abs().max()))
        assert err <= max(2 * ref_err, 1e-5 * scale), (k, float(err), float(ref_err), scale)


@pytest.mark.parametrize("cell", CPP)
def test_batch_rows_in_parallel_chunks(cell: str) -> None:
    """A size where the batch runs in chunks of 16 rows on threads (gates*H*H >= 16384; 40 rows: 3 chunks,
    one short): the reference's numbers, and bit for bit the same on 1 and 2 threads."""
    _require_cpp()
    hidden = 128 if get_cell(cell).weight_shapes(D, 1)["weight_hh"][0] == 1 else 76
    p = problem(cell, 2, 1, hidden=hidden, batch=40, length=6)
    ref = compute(cell, "reference", *p)
    old = torch.get_num_threads()
    try:
        got = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got.append(compute(cell, "cpp", *p))
    finally:
        torch.set_num_threads(old)
    assert_same(got[1], ref)
    for k in ref:
        assert torch.equal(got[0][k], got[1][k]), f"{k} differs between 1 and 2 threads"


_NO_BLAS_CHECK = """
import sys
sys.path.insert(0, {tests!r})
from test_fast_cells import CPP, check_against_reference, check_rows_against_reference
from rnnbench.cells import compiled
assert compiled.load_extension() and "-DRNNBENCH_NO_BLAS" in compiled.extension_info()["flags"], compiled.extension_info()
for cell in CPP:
    check_against_reference(cell, "cpp", 3, 2)
    check_rows_against_reference(cell, "cpp", 2)
print("ok")
"""


def test_compiled_loops_without_blas_symbols() -> None:
    """Where libtorch exports no sgemm_/dgemm_ (another BLAS), the loops take ATen's mm on views of the
    same memory: that build (RNNBENCH_FAST_NO_BLAS=1) against the reference, in a fresh process."""
    _require_cpp()
    code = _NO_BLAS_CHECK.format(tests=str(Path(__file__).parent))
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "RNNBENCH_FAST_NO_BLAS": "1"},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_stacked_ops_refuse_bad_input_in_one_line() -> None:
    _require_cpp()
    g = torch.Generator().manual_seed(3)
    xw, h0, whh = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((2, 4, B, 3 * H), (2, B, H), (2, 3 * H, H)))
    op = torch.ops.rnnbench_fast.gru_reset_before_fwd_stacked
    with pytest.raises(RuntimeError, match="one length per model"):
        op(xw, [4], h0, whh)
    with pytest.raises(RuntimeError, match="lengths must lie in 1..T"):
        op(xw, [4, 5], h0, whh)
    with pytest.raises(RuntimeError, match="one contiguous row per model"):
        op(xw, [4, 4], h0[:1], whh)
    with pytest.raises(RuntimeError, match="sorted longest first"):
        op(xw, [4, 2, 3] + [4, 4, 1], h0, whh)  # per sequence (K x B), model 0's rows out of order
    # an error inside one model's loop, on a worker thread, reaches the caller as an exception
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError, match="gru_reset_before_fwd: shapes"):
            op(xw, [4, 4], h0[..., :-1].contiguous(), whh[..., :-1].contiguous())
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rows_linear_reads_rows_where_they_lie(dtype: torch.dtype) -> None:
    """rows_linear over the valid steps of a batch-major view of the loop's own outputs (member-major,
    time-major, with the slot of h0: not dense), by coordinates, against the gathered rows' products:
    outputs and every gradient; x's gradient comes back dense in the loop's layout (no copy before the
    loop's backward), zero on the rows not read. Out-of-range coordinates are refused in one line."""
    _require_cpp()
    g = torch.Generator().manual_seed(5)
    K, T, Bn, D, O = 3, 7, 4, 6, 5
    buf = torch.randn(K, T + 1, Bn, D, generator=g, dtype=torch.float64).to(dtype)
    x = buf[:, 1:].transpose(1, 2).detach().requires_grad_()  # (K, B, T, D) with the loop's strides
    x_view = x  # the op must see the strided view itself
    mask = torch.rand(K, Bn, T, generator=g) < 0.6
    counts = mask.sum((1, 2)).tolist()
    starts = [0, counts[0], counts[0] + counts[1]]
    W = torch.randn(K, O, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    b = torch.randn(K, O, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    got = loops.rows_linear(x_view, starts, counts, W, b, coords=mask.nonzero())
    member = torch.repeat_interleave(torch.arange(K), torch.tensor(counts))
    want = torch.einsum("rd,rod->ro", x[mask], W[member]) + b[member]
    tol = {} if dtype == torch.float32 else {"rtol": 1e-13, "atol": 1e-13}
    torch.testing.assert_close(got, want, **tol)
    dy = torch.randn(got.shape, generator=g, dtype=torch.float64).to(dtype)
    for a, e in zip(torch.autograd.grad(got, (x, W, b), dy), torch.autograd.grad(want, (x, W, b), dy)):
        torch.testing.assert_close(a, e, **tol)
    (dx,) = torch.autograd.grad(loops.rows_linear(x, starts, counts, W, b, coords=mask.nonzero()), x, dy)
    assert dx.transpose(1, 2).is_contiguous()  # the layout of (K, T, B, D): the loop's backward reads it as is
    assert bool((dx[~mask] == 0).all())
    with pytest.raises(RuntimeError, match="row coordinates out of range"):
        loops.rows_linear(x.detach(), starts, counts, W.detach(), b.detach(), coords=mask.nonzero() + torch.tensor([0, 0, T]))


# --- selection and fallback --------------------------------------------------------------------------


def graph_nodes(t: torch.Tensor) -> set[str]:
    """Names of the autograd nodes that produced t."""
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo += [n for n, _ in node.next_functions]
    return names


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_auto_picks_cpp_on_cpu_where_the_cell_has_it(cell: str) -> None:
    if "cpp" in CELLS[cell].loops:
        _require_cpp()
    want = "cpp" if "cpp" in CELLS[cell].loops else "reference"
    assert implementation(cell, "cpu", torch.float64) == want
    assert implementation(cell, "cpu", torch.bfloat16) == "reference"
    layers, x, steps, *_ = problem(cell, 1, 1)
    for impl in ("auto", "reference"):
        nodes = graph_nodes(run(cell, [{k: v.requires_grad_() for k, v in w.items()} for w in layers], x, impl=impl)[0])
        assert ("ManyCppLoopsBackward" in nodes) == (impl == "auto" and want == "cpp")


def test_no_compiler_falls_back_to_reference_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.utils.cpp_extension as cpp_extension

    saved = compiled.extension_info()
    try:
        compiled._ext.update(state=None, reason="")
        monkeypatch.delenv("RNNBENCH_FAST_EXT", raising=False)
        monkeypatch.setattr(compiled, "_load_built", lambda library: False)  # nothing built yet, then no compiler
        monkeypatch.setattr(cpp_extension, "load_inline", lambda **kw: (_ for _ in ()).throw(OSError("no c++ compiler")))
        with pytest.warns(RuntimeWarning, match="no c\\+\\+ compiler"):
            assert implementation("gru_reset_before", "cpu", torch.float64) == "reference"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the warning comes once per process, not per call
            assert implementation("gru_reset_before", "cpu", torch.float64) == "reference"
        with pytest.raises(RnnbenchError, match="unavailable"):
            implementation("gru_reset_before", "cpu", torch.float64, "cpp")
        p = problem("gru_reset_before", 3, 2)
        assert_same(compute("gru_reset_before", "auto", *p), compute("gru_reset_before", "reference", *p), 0, 0)
    finally:
        compiled._ext.clear()
        compiled._ext.update(saved)


def test_extension_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    saved = compiled.extension_info()
    try:
        compiled._ext.update(state=None, reason="")
        monkeypatch.setenv("RNNBENCH_FAST_EXT", "0")
        assert implementation("lstm", "cpu", torch.float32) == "reference"
        assert "RNNBENCH_FAST_EXT" in compiled.extension_info()["reason"]
    finally:
        compiled._ext.clear()
        compiled._ext.update(saved)


def test_explicit_impl_the_machine_cannot_serve_is_one_line() -> None:
    with pytest.raises(RnnbenchError, match="float32/float64") as e:
        implementation("lstm", "cpu", torch.bfloat16, "cpp")
    assert "\n" not in str(e.value)
    if TRITON and os.environ.get("TRITON_INTERPRET") != "1":
        from rnnbench.cells import triton_steps

        message = "needs CUDA tensors" if triton_steps.available() else "needs the triton package"
        with pytest.raises(RnnbenchError, match=message):
            implementation(TRITON[0], "cpu", torch.float32, "triton")


@pytest.mark.skipif(not TRITON, reason="no registered cell has a triton loop")
def test_auto_falls_back_from_a_failing_triton_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under impl="auto", a Triton build or launch error warns once and the reference runs (same numbers)."""
    cell = TRITON[0]

    def broken(*args):
        raise RuntimeError("no ptxas for this GPU")

    monkeypatch.setitem(CELLS[cell].loops, "triton", broken)
    monkeypatch.setattr(loops, "TRITON_FAILURES", [])
    as_on_cuda = lambda cell, device, dtype, impl="auto": "triton" if impl == "auto" else impl  # noqa: E731
    monkeypatch.setattr(loops, "implementation", as_on_cuda)  # as on a CUDA machine with triton
    p = problem(cell, 3, 1)
    with pytest.warns(RuntimeWarning, match="no ptxas"):
        got = compute(cell, "auto", *p)
    assert loops.TRITON_FAILURES
    assert_same(got, compute(cell, "reference", *p), 0, 0)


def test_a_dead_builders_lock_never_blocks_loading() -> None:
    """A worker SIGKILLed while holding torch's build lock leaves the lock file behind: a built
    extension still loads at once, and a lock older than any build is cleared with a warning."""
    import time

    if not compiled.load_extension():
        pytest.skip(f"compiled CPU loops unavailable: {compiled.extension_info()['reason']}")
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(compiled.extension_info()["name"], verbose=False)) / "lock"
    lock.touch()
    try:
        code = "from rnnbench.cells import compiled; assert compiled.load_extension(); print(compiled.extension_info()['cached'])"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr[-2000:]
        compiled._clear_stale_lock(lock.parent)  # fresh: a build may be running, left alone
        assert lock.exists()
        old = time.time() - 2 * compiled.STALE_LOCK_S
        os.utime(lock, (old, old))
        with pytest.warns(RuntimeWarning, match="removed a build lock"):
            compiled._clear_stale_lock(lock.parent)
        assert not lock.exists()
    finally:
        lock.unlink(missing_ok=True)


# --- CUDA ----------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_cuda_auto_equals_reference(cell: str, dtype: torch.dtype) -> None:
    p = problem(cell, 3, 2, dtype=dtype, device="cuda")
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    assert_same(compute(cell, "auto", *p), compute(cell, "reference", *p), **tol)
