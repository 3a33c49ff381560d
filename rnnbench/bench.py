"""`rnnbench bench`: how fast each recurrent cell runs, bare and inside the harness, on CPU and CUDA.

One process, one run, side by side (repeats interleaved round-robin, medians reported):
  bare       torch.nn.RNN / LSTM / GRU forward + backward: the fused kernels (oneDNN / ATen / cuDNN).
  cell       each non-fused implementation of a cell (rnnbench/cells/_fast.py): the compiled CPU loops
             ("cpp"), the torch-op loops ("python"), on CUDA the torch-op loop captured in a CUDA graph
             ("graphed"; checked as the "python" loop it captures), the loops with Triton-fused steps
             ("triton", and "triton-graphed" in a CUDA graph), and the autograd step loops
             ("reference"); also the `gru` cell's CPU loop, checked against torch.nn.GRU.
  harness    what `rnnbench train` does per batch, without Lightning's loop: SequenceModel.training_step
             (forward, task loss, finiteness check, metric sums), backward, gradient-norm clipping,
             Adam step, zero_grad; the task is a Bernoulli next-frame loss over `--input` keys
             (the polyphonic-music loss) on random piano-roll frames.
  bare-step  the same model trained by the shortest plain-PyTorch loop: cell (its default implementation),
             nn.Linear head, binary_cross_entropy_with_logits, backward, clip_grad_norm_, Adam step. What
             every training step must compute beyond the kernel (output layer, loss, update); the harness
             row against it is the harness's own overhead.
  lightning  the same step inside a Lightning Trainer configured as rnnbench.train does (time between
             consecutive batch starts: data loading, hooks, clipping, optimizer included); minus the
             harness row it is Lightning's per-batch overhead.
  many       K models of one cell trained together (rnnbench/many_models.py: the recurrence its
             choose_recurrence picks, per-model loss, clipping and Adam step) against the same K models
             stepped one after another with their default implementation; at the first hidden size,
             `--many K` models.
  setup      per-run fixed cost: rnnbench.train.train on a tiny copy-task config, twice, reading its
             `setup_seconds` metric (trainer + data + MLflow setup; the first call also creates the
             store and the experiment).

Before any timing, every fast path is compared with its slow reference on the same weights and input
(float32 at the benchmark shape, and float64): max |difference| over outputs, final states, input and
weight gradients; the verdict is the `check` column. Float32 runs under the flags rnnbench.train sets
(torch deterministic algorithms on the CPU, not on CUDA). CUDA timings synchronise around every call.

Output: <--out, default ./rnnbench_bench>/bench_<device>.csv and .md (device named: CPU model, threads, torch version,
GPU), and one MLflow run in experiment `bench` with every median as a metric and the files as artifacts.
Speed targets live in this output, never in unit tests.
"""

from __future__ import annotations

import copy
import csv
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from rnnbench.errors import RnnbenchError

CHUNG_CELLS = ("lstm_peephole", "gru_reset_before")
# Not results/bench: a plain `rnnbench bench` must not overwrite the committed figures of this
# project's machines; maintainers regenerate those with `--out results/bench`.
DEFAULT_OUT = "rnnbench_bench"
HARNESS_CELLS = ("tanh", "lstm", "gru", "lstm_peephole", "gru_reset_before")
BARE = {"tanh": "RNN", "lstm": "LSTM", "gru": "GRU"}  # cell -> torch.nn class of its fused kernel
TOL_F64 = 1e-8  # relative (to max(1, |reference|)) difference allowed in float64
TOL_F32 = 1e-3  # and in float32, where 200 steps of rounding accumulate


@dataclass
class Options:
    devices: list[str]
    seq_len: int = 200
    batch: int = 32
    input_size: int = 88
    hidden: list[int] = field(default_factory=lambda: [36, 46, 100])
    repeats: int = 15
    warmup: int = 2
    out: Path = Path(DEFAULT_OUT)
    tracking_uri: Optional[str] = None
    threads: Optional[int] = None
    lightning: bool = True
    setup: bool = True
    reference: bool = True
    many: int = 32  # K for the batched-training rows; 0: skip them


@dataclass
class Row:
    device: str
    hidden: int
    kind: str  # bare | cell | bare-step | harness | lightning | many | setup
    cell: str
    impl: str
    check: str = ""  # ok | FAIL | "" (nothing to check: a reference itself)
    diff_f32: float = math.nan  # max |fast - reference|, outputs and gradients, float32
    diff_f64: float = math.nan  # the same in float64
    ms: float = math.nan  # median milliseconds per batch (fwd+bwd, or one training step)
    ms_q1: float = math.nan
    ms_q3: float = math.nan
    repeats: int = 0
    steps_per_s: float = math.nan  # batch * seq_len / median seconds
    x_fused_lstm: float = math.nan  # fused-LSTM time / this time (throughput relative to nn.LSTM)
    harness_over_bare: float = math.nan  # harness, bare-step or lightning time / the cell's default kernel time
    harness_over_step: float = math.nan  # harness or lightning time / the bare training step's time
    paired_ms: float = math.nan  # lightning rows: the manual harness step timed back to back around the fit
    speedup: float = math.nan  # many rows: batched throughput / sequential throughput of the same K models
    note: str = ""


# ---- the command ------------------------------------------------------------------------------------
def command(
    device: Annotated[str, typer.Option(help="cpu | cuda | all (all: cuda only where available)")] = "cpu",
    seq_len: Annotated[int, typer.Option(min=1, help="time steps per sequence")] = 200,
    batch: Annotated[int, typer.Option(min=1, help="sequences per batch")] = 32,
    input_size: Annotated[int, typer.Option("--input", min=1, help="input (and output) size")] = 88,
    hidden: Annotated[str, typer.Option(help="comma-separated hidden sizes")] = "36,46,100",
    repeats: Annotated[int, typer.Option(min=1, help="timed repeats per implementation (interleaved)")] = 15,
    warmup: Annotated[int, typer.Option(min=0, help="untimed calls per implementation first")] = 2,
    out: Annotated[Path, typer.Option(help="folder for bench_<device>.csv and .md (the committed figures: --out results/bench)")] = Path(DEFAULT_OUT),
    tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow store (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")] = None,
    threads: Annotated[Optional[int], typer.Option(min=1, help="torch CPU threads (default: torch's choice)")] = None,
    lightning: Annotated[bool, typer.Option(help="also time the step inside a Lightning Trainer")] = True,
    setup: Annotated[bool, typer.Option(help="also measure train()'s fixed cost (setup_seconds)")] = True,
    reference: Annotated[bool, typer.Option(help="also time the slow autograd step loops")] = True,
    many: Annotated[int, typer.Option(min=0, help="K models trained batched vs one after another (0: skip)")] = 32,
) -> None:
    """Time fused kernels, every cell implementation and the harness step side by side; write --out (./rnnbench_bench)."""
    opts = Options(
        devices=_devices(device), seq_len=seq_len, batch=batch, input_size=input_size, hidden=_hidden(hidden),
        repeats=repeats, warmup=warmup, out=out, tracking_uri=tracking_uri, threads=threads,
        lightning=lightning, setup=setup, reference=reference, many=many,
    )
    result = run(opts, echo=typer.echo)
    for dev, path in result["files"].items():
        typer.echo(f"{dev}: {path}.md, {path}.csv")
    typer.echo(f"MLflow run {result['run_id']} (experiment bench) in {result['tracking_uri']}")


def _devices(device: str) -> list[str]:
    import torch

    if device not in ("cpu", "cuda", "all"):
        raise RnnbenchError(f"--device must be cpu, cuda or all, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RnnbenchError("--device cuda but no CUDA device is available")
    if device == "all":
        return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    return [device]


def _hidden(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise RnnbenchError(f"--hidden must be comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise RnnbenchError(f"--hidden must list positive sizes, got {text!r}")
    return sizes


# ---- the run ----------------------------------------------------------------------------------------
def run(opts: Options, echo: Callable[[str], Any] = print) -> dict[str, Any]:
    """Measure every device of `opts`; write the files; log one MLflow run. Returns rows, files, run id."""
    import torch
    from mlflow.tracking import MlflowClient

    from rnnbench.cpu_memory import keep_freed_memory
    from rnnbench.tracking import prepare_store, resolve_tracking_uri

    keep_freed_memory()  # as train() and train_many() do: the timed steps run as training runs them
    uri = resolve_tracking_uri(opts.tracking_uri)
    experiment_id = prepare_store(uri, "bench")  # fails in one line before any work if unreachable
    client = MlflowClient(tracking_uri=uri)
    old_threads = torch.get_num_threads()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    run = client.create_run(experiment_id, run_name=f"bench {'+'.join(opts.devices)}",
                            tags={"torch_version": torch.__version__, "devices": ",".join(opts.devices)})
    run_id = run.info.run_id
    try:
        from mlflow.entities import Metric, Param

        params = {"seq_len": opts.seq_len, "batch": opts.batch, "input_size": opts.input_size,
                  "hidden": ",".join(map(str, opts.hidden)), "repeats": opts.repeats, "warmup": opts.warmup,
                  "threads": torch.get_num_threads(), "cpu_model": _cpu_model(), "torch_version": torch.__version__}
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        rows: dict[str, list[Row]] = {}
        files: dict[str, Path] = {}
        for dev in opts.devices:
            t0 = time.perf_counter()
            rows[dev], info = _bench_device(dev, opts, uri, echo)
            info["bench_seconds"] = time.perf_counter() - t0
            files[dev] = _write(dev, rows[dev], info, opts)
            now = int(time.time() * 1000)
            metrics = [Metric(k, v, now, 0) for k, v in _metrics(rows[dev]).items()]
            for i in range(0, len(metrics), 500):
                client.log_batch(run_id, metrics=metrics[i : i + 500])
            for ext in ("csv", "md"):
                client.log_artifact(run_id, str(files[dev].with_suffix(f".{ext}")))
            client.set_tag(run_id, f"device_{dev}", info["device"])
        client.set_terminated(run_id, "FINISHED")
    except BaseException as e:
        client.set_tag(run_id, "failure_reason", " ".join(f"{type(e).__name__}: {e}".split())[:500])
        client.set_terminated(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        torch.set_num_threads(old_threads)
    return {"rows": rows, "files": files, "run_id": run_id, "tracking_uri": uri}


def _metrics(rows: list[Row]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in rows:
        key = f"{r.device}/h{r.hidden}/{r.kind}/{r.cell}/{r.impl}".replace(":", "_")
        for name in ("ms", "x_fused_lstm", "harness_over_bare", "harness_over_step", "paired_ms", "speedup", "diff_f32", "diff_f64"):
            v = getattr(r, name)
            if isinstance(v, float) and math.isfinite(v):
                out[f"{key}/{name}"] = v
    return out


class _Flags:
    """Run with the global flags rnnbench.train's Trainer sets (deterministic on CPU only); restore after."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __enter__(self) -> None:
        import torch

        self.saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                      torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
                      torch.utils.deterministic.fill_uninitialized_memory)
        torch.use_deterministic_algorithms(self.device == "cpu")
        torch.utils.deterministic.fill_uninitialized_memory = False  # as rnnbench.train

    def __exit__(self, *exc: Any) -> None:
        import torch

        det, warn_only, bench, cublas, fill = self.saved
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.backends.cudnn.benchmark = bench
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas


def _bench_device(dev: str, opts: Options, uri: str, echo: Callable[[str], Any]) -> tuple[list[Row], dict[str, Any]]:
    import torch

    from rnnbench.cells import _fast

    info: dict[str, Any] = {"device": _device_name(dev), "threads": torch.get_num_threads(), "torch": torch.__version__}
    if dev == "cpu":
        _fast.load_extension()
    info["extension"] = _fast.extension_info() if dev == "cpu" else {}
    rows: list[Row] = []
    with _Flags(dev):
        for H in opts.hidden:
            echo(f"[{dev}] hidden {H}: checking fast paths, then timing")
            rows += _bench_hidden(dev, H, opts)
            if opts.lightning:
                rows += _bench_lightning(dev, H, opts, rows)
    if opts.many:
        echo(f"[{dev}] {opts.many} models batched vs one after another, hidden {opts.hidden[0]}")
        rows += _bench_many(dev, opts)
    if opts.setup:
        echo(f"[{dev}] fixed cost per run: rnnbench.train.train on a tiny config, twice")
        rows += _bench_setup(dev, uri)
    _ratios(rows)
    return rows, info


# ---- candidates ---------------------------------------------------------------------------------
@dataclass
class _Cand:
    row: Row
    fn: Callable[[], Any]


def _sync(dev: str) -> None:
    import torch

    if dev == "cuda":
        torch.cuda.synchronize()


def _fwd_bwd(module: Any, x: Any, g: Any) -> Callable[[], Any]:
    def fn() -> None:
        module.zero_grad(set_to_none=True)
        out = module(x)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(g)

    return fn


def _out_only(cell: Any) -> Any:
    """The cell as a module returning only its output tensor (what CUDA graph capture accepts)."""
    from torch import nn

    class OutOnly(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Any) -> Any:
            return self.inner(x)[0]

    return OutOnly(cell)


def _default_impl(cell: str, dev: str, H: int) -> str:
    """The implementation a cell of hidden size H runs by default on `dev` (the row its harness is compared with)."""
    import torch

    from rnnbench.cells import _fast, get_cell

    if cell in CHUNG_CELLS:
        if dev == "cuda":
            return "triton" if _triton_ok() else "python"
        return "cpp" if _fast.extension_info()["state"] else "python"
    if dev == "cpu":  # torch's cells: the compiled loop where rnnbench/cells/fused.py measured it faster
        return get_cell(cell)(1, H)._loop_impl(torch.zeros(1, 1, 1)) or "torch"
    return "torch"


def _bench_hidden(dev: str, H: int, opts: Options) -> list[Row]:
    import torch

    from rnnbench.cells import get_cell

    B, T, D = opts.batch, opts.seq_len, opts.input_size
    gen = torch.Generator().manual_seed(H)
    x = torch.randn(B, T, D, generator=gen).to(dev)
    g = torch.randn(B, T, H, generator=gen).to(dev)
    cands: list[_Cand] = []

    def row(kind: str, cell: str, impl: str, **kw: Any) -> Row:
        return Row(device=dev, hidden=H, kind=kind, cell=cell, impl=impl, **kw)

    for cell, cls_name in BARE.items():  # the fused kernels, straight from torch.nn
        torch.manual_seed(0)
        m = getattr(torch.nn, cls_name)(D, H, batch_first=True).to(dev)
        cands.append(_Cand(row("bare", cell, "torch"), _fwd_bwd(m, x, g)))

    impls = ["cpp", "python"] if dev == "cpu" else ["python", "graphed"] + (["triton", "triton-graphed"] if _triton_ok() else [])
    variants = [(c, i) for c in CHUNG_CELLS for i in impls] + ([(c, "cpp") for c in BARE] if dev == "cpu" else [])
    for cell, impl in variants:
        torch.manual_seed(0)
        m = get_cell(cell)(D, H).to(dev)
        ref_impl = "torch" if cell in BARE else "reference"
        r = row("cell", cell, impl)
        if impl == "cpp" and not _ext_ok():
            r.note = "compiled loop unavailable: " + _ext_reason()
            cands.append(_Cand(r, lambda: None))
            continue
        m.impl = {"graphed": "python", "triton-graphed": "triton"}.get(impl, impl)
        try:
            _check(r, m, ref_impl, x, dev)
            if impl.endswith("graphed"):
                wrapped = torch.cuda.make_graphed_callables(_out_only(m), (x,))
                fn = _fwd_bwd(wrapped, x, g)
            else:
                fn = _fwd_bwd(m, x, g)
        except Exception as e:  # noqa: BLE001 - one broken variant must not stop the bench
            r.check, r.note = "FAIL", " ".join(f"{type(e).__name__}: {e}".split())[:200]
            fn = None
        cands.append(_Cand(r, fn or (lambda: None)))
    if opts.reference:
        for cell in CHUNG_CELLS:
            torch.manual_seed(0)
            m = get_cell(cell)(D, H).to(dev)
            m.impl = "reference"
            cands.append(_Cand(row("cell", cell, "reference"), _fwd_bwd(m, x, g)))

    for cell in HARNESS_CELLS:
        cands.append(_Cand(row("bare-step", cell, _default_impl(cell, dev, H)), _bare_step(cell, H, opts, dev)))
        cands.append(_Cand(row("harness", cell, _default_impl(cell, dev, H)), _harness_step(cell, H, opts, dev)))

    _time(cands, dev, opts)
    return [c.row for c in cands]


def _triton_ok() -> bool:
    from rnnbench.cells import _triton

    return _triton.available()


def _ext_ok() -> bool:
    from rnnbench.cells import _fast

    return bool(_fast.extension_info()["state"])


def _ext_reason() -> str:
    from rnnbench.cells import _fast

    return str(_fast.extension_info()["reason"])


def _time(cands: list[_Cand], dev: str, opts: Options) -> None:
    """Warm up each candidate, then time them round-robin (order rotated each round); medians."""
    live = [c for c in cands if not c.row.note.startswith("compiled loop unavailable") and c.row.check != "FAIL"]
    times: dict[int, list[float]] = {id(c): [] for c in live}
    for c in live:
        for _ in range(opts.warmup):
            c.fn()
        _sync(dev)
    for k in range(opts.repeats):
        order = live[k % len(live) :] + live[: k % len(live)] if live else []
        for c in order:
            _sync(dev)
            t0 = time.perf_counter()
            c.fn()
            _sync(dev)
            times[id(c)].append(time.perf_counter() - t0)
    for c in live:
        _fill(c.row, times[id(c)], opts)


def _fill(r: Row, seconds: list[float], opts: Options) -> None:
    if not seconds:
        return
    ms = sorted(s * 1e3 for s in seconds)
    r.ms, r.repeats = statistics.median(ms), len(ms)
    r.ms_q1, r.ms_q3 = _quantile(ms, 0.25), _quantile(ms, 0.75)
    r.steps_per_s = opts.batch * opts.seq_len / (r.ms / 1e3)


def _quantile(sorted_values: list[float], q: float) -> float:
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


# ---- correctness of the fast paths ------------------------------------------------------------------
def _check(r: Row, module: Any, ref_impl: str, x: Any, dev: str) -> None:
    """Fill r.diff_f32 / r.diff_f64 / r.check: module (its impl) against a copy running `ref_impl`."""
    import torch

    worst_rel = 0.0
    for dtype, attr, tol in ((torch.float32, "diff_f32", TOL_F32), (torch.float64, "diff_f64", TOL_F64)):
        fast = copy.deepcopy(module).to(dtype)
        ref = copy.deepcopy(module).to(dtype)
        ref.impl = ref_impl
        xs = x.to(dtype)
        gen = torch.Generator().manual_seed(1)
        g = torch.randn(*x.shape[:2], module.hidden_size, generator=gen, dtype=dtype).to(dev)
        a, b = _outputs_and_grads(fast, xs, g), _outputs_and_grads(ref, xs, g)
        diff = max(float((u - v).abs().max()) for u, v in zip(a, b))
        rel = max(float((u - v).abs().max()) / max(1.0, float(v.abs().max())) for u, v in zip(a, b))
        setattr(r, attr, diff)
        worst_rel = max(worst_rel, rel / tol)
    r.check = "ok" if worst_rel <= 1.0 else "FAIL"


def _outputs_and_grads(module: Any, x: Any, g: Any) -> list[Any]:
    x = x.clone().requires_grad_()
    out, state = module(x)
    states = list(state) if isinstance(state, tuple) else [state]
    loss = (out * g).sum() + sum((s * s).sum() for s in states)
    loss.backward()
    grads = [x.grad] + [p.grad for p in module.parameters() if p.requires_grad]
    return [out.detach(), *(s.detach() for s in states), *grads]


# ---- the harness step -------------------------------------------------------------------------------
def _bench_task(size: int) -> Any:
    """A task like the polyphonic-music ones: next-frame Bernoulli NLL over `size` keys."""
    import torch

    from rnnbench.tasks.base import Task
    from rnnbench.tasks.polyphonic import bernoulli_step_nll

    class BenchTask(Task):
        name = "bench"
        primary_metric = "nll"

        def __init__(self) -> None:
            self.input_size = self.output_size = size
            self.options = None
            self.seed = 0

        def loss(self, out: torch.Tensor, batch: dict) -> torch.Tensor:
            return bernoulli_step_nll(out, batch["y"], batch["mask"]).sum() / batch["mask"].sum()

        def metric_sums(self, out: torch.Tensor, batch: dict) -> dict:
            nll = bernoulli_step_nll(out, batch["y"], batch["mask"]).sum()
            return {"nll": (nll, batch["mask"].sum().to(nll.dtype))}

        def loss_and_sums(self, out: torch.Tensor, batch: dict) -> tuple:  # as the music tasks: one NLL pass
            nll = bernoulli_step_nll(out, batch["y"], batch["mask"]).sum()
            n = batch["mask"].sum()
            return nll / n, {"nll": (nll.detach(), n.to(nll.dtype))}

    return BenchTask()


def _bench_batch(opts: Options, dev: str, seed: int = 0) -> dict[str, Any]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    B, T, D = opts.batch, opts.seq_len, opts.input_size
    roll = (torch.rand(B, T + 1, D, generator=gen) < 0.1).float()  # ~9 of 88 keys down per frame
    return {"x": roll[:, :-1].to(dev), "y": roll[:, 1:].to(dev), "mask": torch.ones(B, T, dtype=torch.bool, device=dev),
            "lengths": torch.full((B,), T, device=dev)}


def _model(cell: str, H: int, opts: Options, dev: str) -> Any:
    import torch

    from rnnbench.config import Config
    from rnnbench.model import SequenceModel

    config = Config.from_dict({"model": {"cell": cell, "hidden_size": H}, "task": {"name": "copy"}})
    torch.manual_seed(0)
    return SequenceModel(config, _bench_task(opts.input_size), H).to(dev), config


def _harness_step(cell: str, H: int, opts: Options, dev: str) -> Callable[[], Any]:
    """One training step as Lightning's automatic optimisation runs it for rnnbench.train, minus the loop."""
    import torch

    model, config = _model(cell, H, opts, dev)
    model.train()
    opt = model.configure_optimizers()
    params = [p for p in model.parameters() if p.requires_grad]
    batch = _bench_batch(opts, dev)
    clip = config.train.grad_clip

    def fn() -> None:
        loss = model.training_step(batch, 0)
        loss.backward()
        model.on_after_backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return fn


def _bare_step(cell: str, H: int, opts: Options, dev: str) -> Callable[[], Any]:
    """The same model and batch trained by the shortest plain-PyTorch loop (no harness): the floor that
    the output layer, loss and Adam update put under any training step."""
    import torch
    import torch.nn.functional as F

    from rnnbench.cells import get_cell

    torch.manual_seed(0)
    rnn = get_cell(cell)(opts.input_size, H).to(dev)
    head = torch.nn.Linear(H, opts.input_size).to(dev)
    params = [p for p in [*rnn.parameters(), *head.parameters()] if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3, **({"fused": True} if dev == "cuda" else {}))
    batch = _bench_batch(opts, dev)
    x, y = batch["x"], batch["y"]

    def fn() -> None:
        loss = F.binary_cross_entropy_with_logits(head(rnn(x)[0]), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return fn


def _bench_lightning(dev: str, H: int, opts: Options, rows: list[Row]) -> list[Row]:
    """Each harness cell inside a Lightning Trainer set up as rnnbench.train sets it up (no MLflow)."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader

    from rnnbench.train import _quiet_lightning

    _quiet_lightning()
    warnings.filterwarnings("ignore", ".*no `val_dataloader`.*")
    n = opts.warmup + opts.repeats  # batches; the gaps between their starts (and the end) are timed
    batches = [_bench_batch(opts, "cpu", seed=i) for i in range(n)]

    class Starts(Callback):
        def __init__(self) -> None:
            self.t: list[float] = []

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            _sync(dev)
            self.t.append(time.perf_counter())

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            _sync(dev)
            self.t.append(time.perf_counter())

    out: list[Row] = []
    for cell in HARNESS_CELLS:
        model, config = _model(cell, H, opts, "cpu")
        starts = Starts()
        loader = DataLoader(batches, batch_size=None, shuffle=False)  # each item is already a batch
        trainer = L.Trainer(
            accelerator="gpu" if dev == "cuda" else "cpu", devices=1, max_epochs=1, max_steps=n,
            gradient_clip_val=config.train.grad_clip, gradient_clip_algorithm="norm", precision="32-true",
            deterministic=dev == "cpu", callbacks=[starts], logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
            default_root_dir=tempfile.gettempdir(),
        )
        r = Row(device=dev, hidden=H, kind="lightning", cell=cell, impl=_default_impl(cell, dev, H))
        # The manual step, timed back to back just before and just after the fit (Lightning's batches
        # run back to back too; the interleaved harness row sees colder caches): the overhead's baseline.
        manual = _harness_step(cell, H, opts, dev)
        paired = _back_to_back(manual, dev, opts)
        try:
            trainer.fit(model, loader)
            gaps = [b - a for a, b in zip(starts.t, starts.t[1:])][opts.warmup :]
            _fill(r, gaps, opts)
        except Exception as e:  # noqa: BLE001
            r.note = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        paired += _back_to_back(manual, dev, opts)
        r.paired_ms = statistics.median(paired) * 1e3
        out.append(r)
    return out


def _back_to_back(fn: Callable[[], Any], dev: str, opts: Options) -> list[float]:
    for _ in range(opts.warmup):
        fn()
    times = []
    for _ in range(opts.repeats):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return times


# ---- many models at once ------------------------------------------------------------------------------
def _bench_many(dev: str, opts: Options) -> list[Row]:
    """K models per cell: one batched training step of all K against K sequential steps (throughput_many),
    with equal batch lengths and with lengths spread over [seq/4, seq] (as music batches differ)."""
    from rnnbench.many_models import throughput_many

    H, K = opts.hidden[0], opts.many
    repeats = max(3, opts.repeats // 3)
    out = []
    for cell in HARNESS_CELLS:
        for suffix, unequal in (("", False), ("-unequal", True)):
            try:
                res = throughput_many(cell, K, seq_len=opts.seq_len, batch_size=opts.batch, input_size=opts.input_size,
                                      hidden_size=H, steps=repeats, device=dev, unequal_lengths=unequal)
            except Exception as e:  # noqa: BLE001 - one row says why, the others still run
                out.append(Row(device=dev, hidden=H, kind="many", cell=cell, impl="batched" + suffix,
                               note=" ".join(f"{type(e).__name__}: {e}".split())[:200]))
                continue
            for impl in ("batched", "sequential"):
                r = Row(device=dev, hidden=H, kind="many", cell=cell, impl=impl + suffix,
                        ms=res["steps_per_round"] / res[impl] * 1e3, steps_per_s=res[impl], repeats=repeats)
                if impl == "batched":
                    r.speedup = res["speedup"]
                    r.note = "best of interleaved rounds; one round = one training step of each of the K models"
                out.append(r)
    return out


# ---- fixed cost per run -------------------------------------------------------------------------------
def _bench_setup(dev: str, uri: str) -> list[Row]:
    from rnnbench.config import Config
    from rnnbench.train import train

    rows = []
    ckpt = tempfile.mkdtemp(prefix="rnnbench_bench_")
    try:
        for i, label in enumerate(("first", "second")):
            config = Config.from_dict({
                "model": {"cell": "lstm", "hidden_size": 8},
                "task": {"name": "copy", "seq_len": 5, "n_train": 32, "n_val": 16, "n_test": 16},
                "train": {"max_epochs": 1, "batch_size": 16, "progress_bar": False, "device": dev, "seed": i},
                "tracking": {"experiment": "bench_setup", "tracking_uri": uri, "checkpoint_dir": ckpt},
            })
            t0 = time.perf_counter()
            with _Flags(dev):  # train()'s Trainer changes global flags; put them back
                result = train(config, tags={"purpose": "bench fixed-cost probe"})
            wall = time.perf_counter() - t0
            r = Row(device=dev, hidden=8, kind="setup", cell="lstm", impl=label, repeats=1)
            if result.status == "FINISHED":
                r.ms = result.metrics["setup_seconds"] * 1e3
                r.note = f"setup_seconds={result.metrics['setup_seconds']:.3f}; whole train() call {wall:.2f} s; run {result.run_id}"
            else:
                r.note = f"train() {result.status}: {result.reason}"
            rows.append(r)
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)
    return rows


# ---- ratios, files ----------------------------------------------------------------------------------
def _ratios(rows: list[Row]) -> None:
    def find(dev: str, H: int, kind: str, cell: str, impl: str) -> Optional[Row]:
        return next((r for r in rows if (r.device, r.hidden, r.kind, r.cell, r.impl) == (dev, H, kind, cell, impl)), None)

    for r in rows:
        if r.kind in ("bare", "cell"):
            lstm = find(r.device, r.hidden, "bare", "lstm", "torch")
        elif r.kind in ("harness", "lightning", "bare-step"):
            lstm = find(r.device, r.hidden, r.kind, "lstm", "torch")
            impl = _default_impl(r.cell, r.device, r.hidden)
            base = find(r.device, r.hidden, "bare", r.cell, "torch") if impl == "torch" else find(r.device, r.hidden, "cell", r.cell, impl)
            if base and math.isfinite(base.ms) and math.isfinite(r.ms):
                r.harness_over_bare = r.ms / base.ms
            step = find(r.device, r.hidden, "bare-step", r.cell, impl)
            if r.kind != "bare-step" and step and math.isfinite(step.ms) and math.isfinite(r.ms):
                r.harness_over_step = r.ms / step.ms
        else:
            continue
        if lstm and math.isfinite(lstm.ms) and math.isfinite(r.ms):
            r.x_fused_lstm = lstm.ms / r.ms


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device_name(dev: str) -> str:
    import torch

    if dev == "cuda":
        p = torch.cuda.get_device_properties(0)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})"
    cores = os.cpu_count()
    return (f"{_cpu_model()} ({cores} logical cores visible, torch threads {torch.get_num_threads()}, "
            f"oneDNN {'on' if torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled else 'off'}, "
            f"MKL {'on' if torch.backends.mkl.is_available() else 'off'})")


def _fmt(v: float, digits: int = 2) -> str:
    if not isinstance(v, float):
        return str(v)
    if not math.isfinite(v):
        return "—"
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
        return f"{v:.1e}"
    return f"{v:.{digits}f}"


def _write(dev: str, rows: list[Row], info: dict[str, Any], opts: Options) -> Path:
    opts.out.mkdir(parents=True, exist_ok=True)
    base = opts.out / f"bench_{dev}"
    names = [f.name for f in fields(Row)]
    with base.with_suffix(".csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=names)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in asdict(r).items()})
    ext = info.get("extension", {})
    if ext.get("state"):
        how = "loaded from torch's extension cache" if ext.get("cached") else "compiled"
        ext_line = f"{how} in {ext['seconds']:.2f} s (`{' '.join(ext.get('flags', []))}`)"
    elif ext.get("state") is False:
        ext_line = f"unavailable ({ext.get('reason')})"
    else:
        ext_line = "not used on this device"
    lines = [
        f"# rnnbench bench: {dev}",
        "",
        f"- device: {info['device']}",
        f"- torch {info['torch']}, Python {platform.python_version()}, {platform.system()} {platform.machine()}",
        f"- compiled CPU loops (rnnbench/cells/csrc/fast_rnn.cpp): {ext_line}",
        f"- shape: seq {opts.seq_len}, batch {opts.batch}, input {opts.input_size}, hidden {', '.join(map(str, opts.hidden))};"
        f" float32; forward + backward",
        f"- {opts.repeats} timed repeats per row after {opts.warmup} warm-up calls, all rows of a hidden size interleaved"
        " round-robin in one process; median and interquartile range",
        f"- date {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; bench took {info.get('bench_seconds', math.nan):.0f} s;"
        f" command: `{_command_line(opts)}`",
        "",
        "Columns: **ms** per batch (median; q1–q3); **steps/s** = batch·seq / median time; **× LSTM** = fused nn.LSTM"
        " time / this row's time at the same hidden size (throughput relative to the fused LSTM; harness and"
        " lightning rows relative to the harness / lightning LSTM); **harness/bare** = the step's time / the"
        " cell's default kernel alone; **harness/step** = the step's time / the bare training step's (plain"
        " PyTorch: cell, head, loss, backward, clip, Adam); **check** = the fast path against its slow reference on the same weights"
        f" (max |diff| of outputs, states, input and weight gradients; ok when within {TOL_F32:g} in float32 and"
        f" {TOL_F64:g} in float64, relative to max(1, |reference|)).",
        "",
        "| hidden | kind | cell | impl | check | max diff f32 | max diff f64 | ms | q1–q3 | steps/s | × LSTM | harness/bare | harness/step | note |",
        "|---:|---|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r.kind in ("setup", "many"):
            continue
        lines.append(
            f"| {r.hidden} | {r.kind} | {r.cell} | {r.impl} | {r.check} | {_fmt(r.diff_f32)} | {_fmt(r.diff_f64)} |"
            f" {_fmt(r.ms)} | {_fmt(r.ms_q1)}–{_fmt(r.ms_q3)} | {_fmt(r.steps_per_s, 0)} | {_fmt(r.x_fused_lstm)} |"
            f" {_fmt(r.harness_over_bare)} | {_fmt(r.harness_over_step)} | {r.note} |"
        )
    lightning = [r for r in rows if r.kind == "lightning" and math.isfinite(r.ms)]
    if lightning:
        lines += ["", "## Lightning's per-batch overhead", "",
                  "The same training step, each timed back to back (not interleaved): by hand (SequenceModel.training_step,"
                  " backward, clip, Adam step; median of the runs just before and just after the fit) and inside"
                  " a Lightning Trainer set up as rnnbench.train sets it up (time between consecutive batch starts:"
                  " DataLoader, hooks and all).", "",
                  "| hidden | cell | manual step ms | Lightning batch ms | overhead ms | overhead % |",
                  "|---:|---|---:|---:|---:|---:|"]
        for r in lightning:
            over = r.ms - r.paired_ms
            lines.append(f"| {r.hidden} | {r.cell} | {_fmt(r.paired_ms)} | {_fmt(r.ms)} | {_fmt(over)} |"
                         f" {_fmt(100 * over / r.paired_ms, 0)} |")
    many = [r for r in rows if r.kind == "many"]
    if many:
        lines += ["", f"## {opts.many} models trained together (rnnbench/many_models.py) vs one after another", "",
                  "One round = one training step of each of the K models (forward, Bernoulli NLL, backward, per-model"
                  " gradient clipping, Adam step); batched: all K through the recurrence training uses"
                  f" (many_models.choose_recurrence: {_recurrences(dev)}); sequential: each model's own default"
                  " implementation in turn. Best of interleaved rounds. Batch lengths: all the bench's seq length, or"
                  " spread evenly over [seq/4, seq] across the K models (as K models' music batches differ).", "",
                  "| hidden | cell | batch lengths | batched ms/round | sequential ms/round | batched steps/s | speedup | note |",
                  "|---:|---|---|---:|---:|---:|---:|---|"]
        for r in many:
            if not r.impl.startswith("batched"):
                continue
            suffix = r.impl[len("batched"):]
            seq = next((x for x in many if x.cell == r.cell and x.impl == "sequential" + suffix), None)
            lines.append(f"| {r.hidden} | {r.cell} | {'unequal' if suffix else 'equal'} | {_fmt(r.ms)} |"
                         f" {_fmt(seq.ms if seq else math.nan)} | {_fmt(r.steps_per_s, 0)} | {_fmt(r.speedup)} |"
                         f" {r.note if not math.isfinite(r.ms) else ''} |")
    setup = [r for r in rows if r.kind == "setup"]
    if setup:
        lines += ["", "## Fixed cost per run (rnnbench.train.train on a tiny copy config, `setup_seconds`)", ""]
        for r in setup:
            lines.append(f"- {r.impl} call: {_fmt(r.ms / 1e3, 3)} s setup ({r.note})")
    targets = _targets(rows, dev, opts.many)
    if targets:
        lines += ["", "## Targets", ""] + targets
    path = base.with_suffix(".md")
    path.write_text("\n".join(lines) + "\n")
    return base


def _recurrences(dev: str) -> str:
    from rnnbench.many_models import choose_recurrence

    return ", ".join(f"{c} {choose_recurrence(c, dev)}" for c in HARNESS_CELLS)


def _command_line(opts: Options) -> str:
    parts = ["rnnbench bench", f"--device {'all' if len(opts.devices) > 1 else opts.devices[0]}",
             f"--seq-len {opts.seq_len}", f"--batch {opts.batch}", f"--input {opts.input_size}",
             f"--hidden {','.join(map(str, opts.hidden))}", f"--repeats {opts.repeats}", f"--warmup {opts.warmup}"]
    if opts.threads:
        parts.append(f"--threads {opts.threads}")
    parts += [f"--no-{flag}" for flag in ("lightning", "setup", "reference") if not getattr(opts, flag)]
    parts.append(f"--many {opts.many}")
    return " ".join(parts)


def _targets(rows: list[Row], dev: str, many_k: int = 0) -> list[str]:
    goal = 0.5 if dev == "cpu" else 0.3
    shown = {_default_impl(c, dev, 1) for c in CHUNG_CELLS} | ({"graphed", "triton", "triton-graphed"} if dev == "cuda" else set())
    out = []
    for r in rows:
        if r.kind == "cell" and r.cell in CHUNG_CELLS and r.impl in shown and math.isfinite(r.x_fused_lstm):
            verdict = "meets" if r.x_fused_lstm >= goal else "below"
            out.append(f"- {r.cell} ({r.impl}), hidden {r.hidden}: {r.x_fused_lstm:.2f}x: {verdict} the >= {goal}x target")
    # The harness target (issue 6): the training step >= 0.9x the throughput of the bare fused kernel
    # (torch.nn.RNN/LSTM/GRU forward+backward) at the same shape. Where the cell runs its compiled loop
    # instead (the CPU), the step is also set against that loop alone: the cost of head, loss and update.
    for r in rows:
        if r.kind != "harness" or not math.isfinite(r.ms):
            continue
        floor = next((x for x in rows if (x.kind, x.cell, x.hidden, x.impl) == ("bare-step", r.cell, r.hidden, r.impl)), None)
        context = []
        if math.isfinite(r.harness_over_bare) and (r.impl != "torch" or r.cell in CHUNG_CELLS):
            context.append(f"{1 / r.harness_over_bare:.2f}x its own kernel ({r.impl}) alone")
        if floor and math.isfinite(floor.harness_over_bare) and math.isfinite(r.harness_over_step):
            context.append(f"a bare PyTorch training step of the same model: {1 / floor.harness_over_bare:.2f}x of that"
                           f" kernel, and the harness step {1 / r.harness_over_step:.2f}x that bare step")
        fused = next((x for x in rows if (x.kind, x.cell, x.hidden) == ("bare", r.cell, r.hidden)), None)
        if fused and math.isfinite(fused.ms):
            ratio = fused.ms / r.ms
            verdict = "meets" if ratio >= 0.9 else "below"
            out.append(f"- harness step {r.cell} ({r.impl}), hidden {r.hidden}: {ratio:.2f}x the throughput of the bare"
                       f" fused torch.nn kernel: {verdict} the >= 0.9x target ({'; '.join(context)})")
        elif context:  # the Chung-form cells: no fused kernel exists; their own kernel is the bar
            ratio = 1 / r.harness_over_bare
            verdict = "meets" if ratio >= 0.9 else "below"
            out.append(f"- harness step {r.cell} ({r.impl}), hidden {r.hidden}: no fused kernel exists; {'; '.join(context)}:"
                       f" {verdict} 0.9x of its own kernel")
    for r in rows:
        if r.kind == "many" and math.isfinite(r.speedup):
            verdict = "meets" if (r.speedup >= 10 if dev == "cuda" else r.speedup > 1) else "below"
            lengths = ", unequal batch lengths" if r.impl.endswith("-unequal") else ""
            out.append(f"- {many_k} models batched, {r.cell}, hidden {r.hidden}{lengths}: {r.speedup:.2f}x the sequential"
                       f" throughput: {verdict} the {'>= 10x' if dev == 'cuda' else '> 1x'} target")
    return out
