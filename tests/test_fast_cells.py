"""The fast time loops (rnnbench/cells/_fast.py) against the readable step-by-step references, in float64.

lstm_peephole and gru_reset_before: every fast implementation ("cpp": the compiled loop, "python": the
same algorithm in torch ops) against the cell's own `forward_reference` (the autograd step loop).
tanh, lstm, gru: their CPU loops against torch.nn.RNN / nn.LSTM / nn.GRU themselves. Compared: outputs, final states, and the gradients of a
random linear function of them with respect to the input, the initial state and every weight; 1 and 2
layers; a sequence fed in chunks with the state handed on. No timings here: speed lives in `rnnbench bench`.
"""

from __future__ import annotations

import os
import shutil
import warnings

import pytest
import torch

from rnnbench.cells import _fast, get_cell

B, T, D, H = 3, 9, 4, 5
LSTMS = ("lstm_peephole", "lstm")


def _compiler() -> bool:
    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))


def _require_cpp() -> None:
    """The compiled loop must build wherever a compiler exists; skip only where none does."""
    if _fast.load_extension():
        return
    if _compiler() and _fast.extension_info()["reason"] != "disabled by RNNBENCH_FAST_EXT=0":
        pytest.fail(f"compiled loop failed to build: {_fast.extension_info()['reason']}")
    pytest.skip(f"compiled loop unavailable: {_fast.extension_info()['reason']}")


def make(cell: str, num_layers: int, dtype=torch.float64, device: str = "cpu", seed: int = 0):
    torch.manual_seed(seed)
    layer = get_cell(cell)(D, H, num_layers=num_layers, forget_bias=0.7).to(device=device, dtype=dtype)
    layer.init_uniform_(0.5)  # large enough that every nonlinearity matters
    return layer


def flat(state) -> list[torch.Tensor]:
    return list(state) if isinstance(state, tuple) else [state]


def random_problem(cell: str, num_layers: int, dtype=torch.float64, device: str = "cpu", steps: int = T):
    g = torch.Generator().manual_seed(1)
    n_state = 2 if cell in LSTMS else 1

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device)

    x = rnd(B, steps, D)
    state = tuple(rnd(num_layers, B, H) for _ in range(n_state))
    g_out = rnd(B, steps, H)
    g_state = [rnd(num_layers, B, H) for _ in range(n_state)]
    return x, (state if n_state == 2 else state[0]), g_out, g_state


def run(layer, x, state, g_out, g_state):
    """Outputs, final states and all gradients of sum(out * g_out) + sum(final * g_state)."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    state_in = [s.clone().requires_grad_() for s in flat(state)]
    out, final = layer(x, tuple(state_in) if len(state_in) == 2 else state_in[0])
    loss = (out * g_out).sum() + sum((s * g).sum() for s, g in zip(flat(final), g_state))
    loss.backward()
    named = {k: p.grad for k, p in layer.named_parameters() if p.requires_grad}
    return {"out": out.detach(), **{f"final{i}": s.detach() for i, s in enumerate(flat(final))}, "grad_x": x.grad,
            **{f"grad_state{i}": s.grad for i, s in enumerate(state_in)}, **{f"grad_{k}": v for k, v in named.items()}}


def assert_same(a: dict, b: dict, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] is not None and b[k] is not None, k
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def impl_param(impl: str):
    return pytest.param(impl, id=impl)


IMPLS = [impl_param("cpp"), impl_param("python")]


def _set_impl(layer, impl: str) -> None:
    if impl == "cpp":
        _require_cpp()
    layer.impl = impl


# --- Chung-form cells: fast == forward_reference ----------------------------------------------------


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cell", ["lstm_peephole", "gru_reset_before"])
def test_fast_equals_reference(cell: str, impl: str, num_layers: int) -> None:
    layer = make(cell, num_layers)
    problem = random_problem(cell, num_layers)
    layer.impl = "reference"
    ref = run(layer, *problem)
    _set_impl(layer, impl)
    fast = run(layer, *problem)
    assert_same(fast, ref)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cell", ["lstm_peephole", "gru_reset_before"])
def test_default_state_is_zeros(cell: str, impl: str) -> None:
    layer = make(cell, 2)
    _set_impl(layer, impl)
    x = torch.randn(B, T, D, dtype=torch.float64)
    out, final = layer(x)
    layer.impl = "reference"
    ref_out, ref_final = layer(x)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    for a, b in zip(flat(final), flat(ref_final), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _ref_impl(cell: str) -> str:
    return "torch" if cell in TORCH_CELLS else "reference"


TORCH_CELLS = ("tanh", "lstm", "gru")
CASES = [pytest.param(c, i, id=f"{c}-{i}") for c in ("lstm_peephole", "gru_reset_before", "gru") for i in ("cpp", "python")] + [
    pytest.param(c, "cpp", id=f"{c}-cpp") for c in ("tanh", "lstm")]  # torch's layout: compiled loop only


@pytest.mark.parametrize(("cell", "impl"), CASES)
def test_chunked_state_equals_reference_whole(cell: str, impl: str) -> None:
    """Chunks of 4, 1 and 4 steps with the state handed on: the reference's numbers for the whole sequence,
    gradients included (they flow back through the handed-on states)."""
    layer = make(cell, 2)
    x, state, g_out, g_state = random_problem(cell, 2)
    layer.impl = _ref_impl(cell)
    ref = run(layer, x, state, g_out, g_state)

    _set_impl(layer, impl)
    layer.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_()
    s_in = [s.clone().requires_grad_() for s in flat(state)]
    s = tuple(s_in) if len(s_in) == 2 else s_in[0]
    outs = []
    for lo, hi in ((0, 4), (4, 5), (5, T)):
        out, s = layer(xg[:, lo:hi], s)
        outs.append(out)
    out = torch.cat(outs, dim=1)
    loss = (out * g_out).sum() + sum((f * g).sum() for f, g in zip(flat(s), g_state))
    loss.backward()
    got = {"out": out.detach(), **{f"final{i}": f.detach() for i, f in enumerate(flat(s))}, "grad_x": xg.grad,
           **{f"grad_state{i}": t.grad for i, t in enumerate(s_in)},
           **{f"grad_{k}": p.grad for k, p in layer.named_parameters() if p.requires_grad}}
    assert_same(got, ref)


@pytest.mark.parametrize("cell", ["lstm_peephole", "gru_reset_before", "tanh", "lstm", "gru"])
def test_cpp_float32_close_on_a_long_sequence(cell: str) -> None:
    """float32 (vectorised exp/tanh in the compiled loop) stays within float rounding over 200 steps."""
    _require_cpp()
    torch.manual_seed(0)
    layer = get_cell(cell)(D, 36, num_layers=1)
    x = torch.randn(B, 200, D)
    g = torch.randn(B, 200, 36)
    results = []
    for impl in ("cpp", _ref_impl(cell)):
        layer.impl = impl
        layer.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        out, _ = layer(xg)
        (out * g).sum().backward()
        results.append([out.detach(), xg.grad] + [p.grad for p in layer.parameters() if p.requires_grad])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


_NO_BLAS_CHECK = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_fast_cells import make, random_problem, run, assert_same
from rnnbench.cells import _fast
assert _fast.load_extension() and "-DRNNBENCH_NO_BLAS" in _fast.extension_info()["flags"], _fast.extension_info()
for cell, ref_impl in (("lstm_peephole", "reference"), ("gru_reset_before", "reference"), ("tanh", "torch"),
                       ("lstm", "torch"), ("gru", "torch")):
    layer = make(cell, 2)
    problem = random_problem(cell, 2)
    layer.impl = ref_impl
    ref = run(layer, *problem)
    layer.impl = "cpp"
    assert_same(run(layer, *problem), ref)
print("ok")
"""


def test_compiled_loops_without_blas_symbols() -> None:
    """Where libtorch exports no sgemm_/dgemm_ (another BLAS), the loops take ATen's mm on views of the
    same memory: that build (RNNBENCH_FAST_NO_BLAS=1) against the references, in a fresh process."""
    import subprocess
    import sys
    from pathlib import Path

    _require_cpp()
    env = {**os.environ, "RNNBENCH_FAST_NO_BLAS": "1"}
    code = _NO_BLAS_CHECK.format(tests=str(Path(__file__).parent))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


# --- K models at once (_ManyCpp, used by rnnbench/many_models.py) == K one-model calls -------------------
MANY = {"peephole_lstm": _fast._PeepholeCpp, "gru_reset_before": _fast._GRUBeforeCpp, "gru_reset_after": _fast._GRUAfterCpp,
        "lstm": _fast._LSTMCpp, "tanh_rnn": _fast._TanhCpp}


def _one_model_problem(op: str, steps: int, dtype: torch.dtype, g: torch.Generator):
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    lstm = op in ("peephole_lstm", "lstm")
    gates = {"peephole_lstm": 4, "lstm": 4, "tanh_rnn": 1}.get(op, 3)
    args = [rnd(steps, B, gates * H), rnd(B, H)] + ([rnd(B, H)] if lstm else [])
    args += [rnd(gates * H, H, scale=0.5)]
    args += [rnd(H) for _ in range(3)] if op == "peephole_lstm" else []
    args += [rnd(gates * H)] if op == "gru_reset_after" else []
    grads = [rnd(steps, B, H), rnd(B, H)] + ([rnd(B, H)] if lstm else [])
    return args, grads


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("op", list(MANY))
def test_many_models_equal_one_model_calls(op: str, dtype: torch.dtype, threads: int) -> None:
    """Outputs and every gradient of K models of different lengths through one _ManyCpp call == each
    model through the one-model Function (the same loop on the same tensors, whichever thread runs it)."""
    _require_cpp()
    g = torch.Generator().manual_seed(2)
    problems = [_one_model_problem(op, steps, dtype, g) for steps in (T, 3, 7, 1, 5)]  # more models than threads
    K, n_in = len(problems), len(problems[0][0])
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        inputs = [[a.clone().requires_grad_() for a in args] for args, _ in problems]
        outs = _fast._ManyCpp.apply(op, K, *(inputs[k][i] for i in range(n_in) for k in range(K)))
        per = len(outs) // K
        torch.autograd.backward(outs, [gr for _, grads in problems for gr in grads])
        for k, (args, grads) in enumerate(problems):
            one_in = [a.clone().requires_grad_() for a in args]
            one_out = MANY[op].apply(*one_in)
            torch.autograd.backward(one_out, grads)
            got = [o.detach() for o in outs[k * per : (k + 1) * per]] + [a.grad for a in inputs[k]]
            want = [o.detach() for o in one_out] + [a.grad for a in one_in]
            for i, (a, b) in enumerate(zip(got, want, strict=True)):
                assert torch.equal(a, b), f"{op} model {k}: tensor {i} differs"
    finally:
        torch.set_num_threads(old)


def test_many_models_refuse_bad_input_in_one_line() -> None:
    _require_cpp()
    g = torch.Generator().manual_seed(3)
    (xw, h0, whh), _ = _one_model_problem("gru_reset_before", 4, torch.float64, g)
    with pytest.raises(RuntimeError, match="one tensor per model"):
        torch.ops.rnnbench_fast.gru_reset_before_fwd_many([xw, xw], [h0], [whh, whh])
    # an error inside one model's loop, on a worker thread, reaches the caller as an exception
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError, match="gru_reset_before_fwd: shapes"):
            torch.ops.rnnbench_fast.gru_reset_before_fwd_many([xw, xw[..., :-1].contiguous()], [h0, h0], [whh, whh])
    finally:
        torch.set_num_threads(old)


# --- the `gru` cell's CPU loop == torch.nn.GRU ---------------------------------------------------------


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize(("cell", "impl"), [c for c in CASES if c.values[0] in TORCH_CELLS])
def test_cpu_loop_equals_torch_kernel(cell: str, impl: str, num_layers: int) -> None:
    layer = make(cell, num_layers)
    problem = random_problem(cell, num_layers)
    layer.impl = "torch"
    ref = run(layer, *problem)
    _set_impl(layer, impl)
    fast = run(layer, *problem)
    assert_same(fast, ref)
    if cell == "gru":
        assert "grad_rnn.bias_hh_l0" in fast  # b_hn sits inside the reset product: trained, and checked


@pytest.mark.parametrize("cell", ["tanh", "lstm", "gru", "lstm_peephole", "gru_reset_before"])
def test_batch_rows_in_parallel_chunks(cell: str) -> None:
    """A size where the batch runs in chunks of 16 rows on threads (gates*H*H >= 16384; 40 rows: 3 chunks,
    one short): the reference's numbers, and bit for bit the same on 1 and 2 threads."""
    _require_cpp()
    torch.manual_seed(0)
    hidden = 128 if cell == "tanh" else 76
    layer = get_cell(cell)(D, hidden, num_layers=1, forget_bias=0.7).double()
    layer.init_uniform_(0.1)
    g = torch.Generator().manual_seed(1)
    n_state = 2 if cell in LSTMS else 1
    x, g_out = torch.randn(40, 6, D, generator=g, dtype=torch.float64), torch.randn(40, 6, hidden, generator=g, dtype=torch.float64)
    state = tuple(torch.randn(1, 40, hidden, generator=g, dtype=torch.float64) for _ in range(n_state))
    g_state = [torch.randn(1, 40, hidden, generator=g, dtype=torch.float64) for _ in range(n_state)]
    problem = (x, state if n_state == 2 else state[0], g_out, g_state)
    layer.impl = _ref_impl(cell)
    ref = run(layer, *problem)
    layer.impl = "cpp"
    old = torch.get_num_threads()
    try:
        got = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got.append(run(layer, *problem))
    finally:
        torch.set_num_threads(old)
    assert_same(got[1], ref)
    for k in ref:
        assert torch.equal(got[0][k], got[1][k]), f"{k} differs between 1 and 2 threads"


@pytest.mark.parametrize("cell", TORCH_CELLS)
def test_default_on_cpu_is_the_compiled_loop_with_torch_layout(cell: str) -> None:
    _require_cpp()
    layer = get_cell(cell)(D, H, num_layers=2)
    assert layer._loop_impl(torch.zeros(B, T, D)) == "cpp"
    assert layer._loop_impl(torch.zeros(B, T, D, dtype=torch.float16)) is None  # torch's kernel otherwise
    ref = {"tanh": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell](D, H, 2, batch_first=True)
    assert list(layer.state_dict()) == [f"rnn.{k}" for k in ref.state_dict()]
    assert all(layer.state_dict()[f"rnn.{k}"].shape == v.shape for k, v in ref.state_dict().items())


def test_lstm_keeps_onednn_from_hidden_64_and_rejects_loops_it_lacks() -> None:
    _require_cpp()
    assert get_cell("lstm")(D, 64)._loop_impl(torch.zeros(B, T, D)) is None  # oneDNN measured faster there
    layer = get_cell("lstm")(D, 64)
    layer.impl = "cpp"
    assert layer._loop_impl(torch.zeros(B, T, D)) == "cpp"
    layer.impl = "python"
    with pytest.raises(ValueError, match="lstm: impl must be one of auto, torch, cpp"):
        layer(torch.zeros(B, T, D))


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


@pytest.mark.parametrize("impl", ["reference", "python", "cpp"])
def test_impl_selects_the_loop(impl: str) -> None:
    layer = make("lstm_peephole", 1)
    _set_impl(layer, impl)
    out, _ = layer(torch.randn(B, T, D, dtype=torch.float64))
    names = graph_nodes(out)
    fast = {n for n in names if n.startswith("_Peephole")}
    if impl == "reference":
        assert not fast and sum("Sigmoid" in n for n in names) >= 1
    else:
        assert fast == {f"_Peephole{'Cpp' if impl == 'cpp' else 'Py'}Backward"}


def test_unknown_impl_is_rejected() -> None:
    with pytest.raises(ValueError, match="impl must be one of"):
        _fast.resolve("fortran", torch.zeros(1))


def test_no_compiler_falls_back_to_python_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.utils.cpp_extension as cpp_extension

    saved = dict(_fast._ext)
    try:
        _fast._ext.update(state=None, reason="")
        monkeypatch.delenv("RNNBENCH_FAST_EXT", raising=False)
        monkeypatch.setattr(_fast, "_load_built", lambda library: False)  # nothing built yet, then no compiler
        monkeypatch.setattr(cpp_extension, "load_inline", lambda **kw: (_ for _ in ()).throw(OSError("no c++ compiler")))
        with pytest.warns(RuntimeWarning, match="no c\\+\\+ compiler"):
            assert _fast.resolve("auto", torch.zeros(2, 2)) == "python"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the warning comes once per process, not per call
            assert _fast.resolve("auto", torch.zeros(2, 2)) == "python"
        with pytest.raises(RuntimeError, match="unavailable"):
            _fast.resolve("cpp", torch.zeros(2, 2))
        # a cell still computes the right numbers on the fallback
        layer = make("gru_reset_before", 2)
        problem = random_problem("gru_reset_before", 2)
        fast = run(layer, *problem)
        layer.impl = "reference"
        assert_same(fast, run(layer, *problem))
    finally:
        _fast._ext.clear()
        _fast._ext.update(saved)


def test_extension_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    saved = dict(_fast._ext)
    try:
        _fast._ext.update(state=None, reason="")
        monkeypatch.setenv("RNNBENCH_FAST_EXT", "0")
        assert _fast.resolve("auto", torch.zeros(2, 2)) == "python"
        assert "RNNBENCH_FAST_EXT" in _fast.extension_info()["reason"]
    finally:
        _fast._ext.clear()
        _fast._ext.update(saved)


def test_cpp_rejects_other_dtypes() -> None:
    with pytest.raises(ValueError, match="float32/float64"):
        _fast.resolve("cpp", torch.zeros(2, 2, dtype=torch.bfloat16))


# --- CUDA: the torch-op loop and its CUDA graph ------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("cell", ["lstm_peephole", "gru_reset_before"])
def test_cuda_default_loop_equals_reference(cell: str, num_layers: int) -> None:
    layer = make(cell, num_layers, device="cuda")
    problem = random_problem(cell, num_layers, device="cuda")
    from rnnbench.cells import _triton

    assert _fast.resolve("auto", problem[0]) == ("triton" if _triton.available() else "python")
    layer.impl = "reference"
    ref = run(layer, *problem)
    layer.impl = "auto"
    assert_same(run(layer, *problem), ref, rtol=1e-9, atol=1e-11)


@pytest.mark.gpu
@cuda
def test_cuda_gru_keeps_cudnn() -> None:
    layer = get_cell("gru")(D, H).cuda()
    assert layer._loop_impl(torch.zeros(B, T, D, device="cuda")) is None


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("cell", ["lstm_peephole", "gru_reset_before"])
def test_cuda_graph_of_the_python_loop(cell: str) -> None:
    from rnnbench.bench import _out_only

    torch.manual_seed(0)
    layer = get_cell(cell)(D, H).cuda()
    x = torch.randn(B, T, D, device="cuda")
    g = torch.randn(B, T, H, device="cuda")
    graphed = torch.cuda.make_graphed_callables(_out_only(layer), (x,))
    results = []
    for fn in (graphed, lambda v: layer.forward_reference(v)[0]):
        layer.zero_grad(set_to_none=True)
        out = fn(x)
        out.backward(g)
        torch.cuda.synchronize()
        results.append([out.detach().clone()] + [p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# --- the Triton-fused steps: on the CPU through Triton's interpreter, on CUDA for real -------------------
_TRITON_CHECK = """
import torch, sys
sys.path.insert(0, {tests!r})
from test_fast_cells import make, random_problem, run, assert_same
for cell in ("lstm_peephole", "gru_reset_before"):
    for num_layers in (1, 2):
        layer = make(cell, num_layers)
        problem = random_problem(cell, num_layers)
        layer.impl = "reference"
        ref = run(layer, *problem)
        layer.impl = "triton"
        assert_same(run(layer, *problem), ref)
print("ok")
"""


def test_triton_steps_equal_reference_in_the_interpreter() -> None:
    """The Triton kernels' arithmetic, run by Triton's CPU interpreter in float64, against the step loop."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton", reason="triton is not installed (torch's CPU wheels come without it)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # read when the kernels are defined: a fresh process
    code = _TRITON_CHECK.format(tests=str(Path(__file__).parent))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_triton_needs_cuda_or_the_interpreter() -> None:
    from rnnbench.cells import _triton

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 lets CPU tensors through on purpose")
    message = "needs CUDA tensors" if _triton.available() else "needs the triton package"
    with pytest.raises(ValueError, match=message):
        _fast.resolve("triton", torch.zeros(2, 2))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cell", ["lstm_peephole", "gru_reset_before"])
def test_cuda_triton_loop_equals_reference(cell: str, dtype: torch.dtype) -> None:
    pytest.importorskip("triton")
    layer = make(cell, 2, dtype=dtype, device="cuda")
    problem = random_problem(cell, 2, dtype=dtype, device="cuda")
    layer.impl = "reference"
    ref = run(layer, *problem)
    layer.impl = "triton"
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    assert_same(run(layer, *problem), ref, **tol)


def test_auto_falls_back_from_a_failing_triton_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under impl="auto", a Triton build or launch error warns once and the torch-op loop runs (same numbers)."""
    from rnnbench.cells import _triton

    class Broken(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):  # type: ignore[override]
            raise RuntimeError("no ptxas for this GPU")

    monkeypatch.setattr(_triton, "PeepholeTriton", Broken, raising=False)
    monkeypatch.setattr(_fast, "_triton_failed", [])
    monkeypatch.setattr(_fast, "resolve", lambda impl, x: "triton")  # as on a CUDA machine with triton
    layer = make("lstm_peephole", 1)
    problem = random_problem("lstm_peephole", 1)
    with pytest.warns(RuntimeWarning, match="no ptxas"):
        got = run(layer, *problem)
    assert _fast._triton_failed
    layer.impl = "reference"
    assert_same(got, run(layer, *problem))


def test_a_dead_builders_lock_never_blocks_loading(tmp_path) -> None:
    """A worker SIGKILLed while holding torch's build lock leaves the lock file behind: a built
    extension still loads at once, and a lock older than any build is cleared with a warning."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    if not _fast.load_extension():
        pytest.skip(f"compiled CPU loops unavailable: {_fast.extension_info()['reason']}")
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(_fast.extension_info()["name"], verbose=False)) / "lock"
    lock.touch()
    try:
        code = "from rnnbench.cells import _fast; assert _fast.load_extension(); print(_fast.extension_info()['cached'])"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr[-2000:]
        _fast._clear_stale_lock(lock.parent)  # fresh: a build may be running, left alone
        assert lock.exists()
        old = time.time() - 2 * _fast.STALE_LOCK_S
        os.utime(lock, (old, old))
        with pytest.warns(RuntimeWarning, match="removed a build lock"):
            _fast._clear_stale_lock(lock.parent)
        assert not lock.exists()
    finally:
        lock.unlink(missing_ok=True)
