"""`rnnbench bench`: how fast the real code runs, row by row, side by side in one process.

Rows at each hidden size (cells and implementations from the registry, rnnbench/cells):
  fused       torch.nn.RNN / LSTM / GRU forward + backward: the fused kernels; nn.LSTM is the normaliser
              (column "x LSTM" = its time / the row's time).
  loop        every registered cell, every implementation it can run here (reference, and each of its
              `loops` this device serves: cpp on the CPU, triton on CUDA): `cells.run` forward + backward, K = 1.
  step        the training step itself: `Population.train_step` of a population of one, built by
              `rnnbench.training.population.build` as `rnnbench train` builds it.
  ragged      the step on one batch of sequences of unequal lengths (spread over [seq/4, seq], as in
              music), each stopping at its own length, and `ragged-padded`: the same batch run to its
              longest (as without "lengths"); "speedup" = padded time / ragged time, what stopping saves.
  trainer     the same step inside the Lightning Trainer of rnnbench/training/loop.py (`make_trainer`):
              the time between consecutive batch starts (data loading, stacking, hooks included).
  population  one `train_step` of K = --population members on their own batches (lengths spread over
              [seq/4, seq], as music batches differ) against the K populations of one stepped one after
              another on the same batches; "speedup" = throughput ratio.
  setup       rnnbench.train.train on a tiny copy config, twice: its `setup_seconds`.

The step's data: random 0/1 piano rolls of --input keys under the JSB task's own collate and Bernoulli
NLL (a subclass of the task whose rolls are random, passed to `build`; no corpus needed). Before any
timing every fast loop is compared with the reference loop on the same weights and input (outputs,
final states, input and weight gradients) in float32 and float64, and the K-member step with the K
single steps (weights after one step): the `check` column. Rows of one hidden size are timed
round-robin (warm-up first, order rotated each round), medians and IQR; the trainer rows run Lightning's
loop back to back. Output: <--out>/bench_<device>.md and .csv, one MLflow run in experiment `bench`.
Speed targets live in this output, never in unit tests.
"""

from __future__ import annotations

import contextlib
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
from typing import Annotated, Any, Callable, Iterator, Optional

import typer

from rnnbench.errors import RnnbenchError

# Not results/bench: a plain `rnnbench bench` must not overwrite the committed figures; maintainers
# regenerate those with `--out results/bench`.
DEFAULT_OUT = "rnnbench_bench"
FUSED = {"tanh": "RNN", "lstm": "LSTM", "gru": "GRU"}  # cell -> the torch.nn class computing the same function
TOL = {"float32": 1e-3, "float64": 1e-8}  # max |diff| / max(1, |reference|) allowed


@dataclass
class Options:
    devices: list[str]
    seq_len: int = 200
    batch: int = 32
    input_size: int = 88
    hidden: list[int] = field(default_factory=lambda: [36, 46, 100])
    repeats: int = 15
    warmup: int = 2
    population: int = 32  # K of the population rows; 0: none
    out: Path = Path(DEFAULT_OUT)
    tracking_uri: Optional[str] = None
    threads: Optional[int] = None
    trainer: bool = True
    setup: bool = True
    reference: bool = True
    cells: list[str] = field(default_factory=list)  # the registry's names to time; empty: every registered cell


@dataclass
class Row:
    device: str
    hidden: int
    kind: str  # fused | loop | step | ragged | ragged-padded | trainer | population | sequential | setup
    cell: str
    impl: str
    check: str = ""  # ok | FAIL | "" (nothing to check)
    diff_f32: float = math.nan  # max |fast - reference| in float32
    diff_f64: float = math.nan  # and in float64
    ms: float = math.nan  # median milliseconds per call
    ms_q1: float = math.nan
    ms_q3: float = math.nan
    repeats: int = 0
    steps_per_s: float = math.nan  # recurrent time steps (batch x length, all members) per second
    x_lstm: float = math.nan  # fused nn.LSTM time / this row's time (single-model rows)
    over_loop: float = math.nan  # step / trainer: this time / the cell's loop row of the same impl
    over_step: float = math.nan  # trainer: this time / the step row's
    speedup: float = math.nan  # population: sequential time / population time; ragged: padded / ragged
    note: str = ""


def command(
    device: Annotated[str, typer.Option(help="cpu | cuda | all (all: cuda only where available)")] = "cpu",
    seq_len: Annotated[int, typer.Option(min=4, help="time steps per sequence")] = 200,
    batch: Annotated[int, typer.Option(min=1, help="sequences per batch")] = 32,
    input_size: Annotated[int, typer.Option("--input", min=1, help="keys of the random piano rolls (input and output size)")] = 88,
    hidden: Annotated[str, typer.Option(help="comma-separated hidden sizes")] = "36,46,100",
    repeats: Annotated[int, typer.Option(min=1, help="timed repeats per row (interleaved)")] = 15,
    warmup: Annotated[int, typer.Option(min=0, help="untimed calls per row first")] = 2,
    population: Annotated[int, typer.Option(min=0, help="K of the population rows (0: skip them)")] = 32,
    out: Annotated[Path, typer.Option(help="folder for bench_<device>.csv and .md (the committed figures: --out results/bench)")] = Path(DEFAULT_OUT),
    tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow store (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")] = None,
    threads: Annotated[Optional[int], typer.Option(min=1, help="torch CPU threads (default: torch's choice)")] = None,
    trainer: Annotated[bool, typer.Option(help="also time the step inside Lightning's Trainer")] = True,
    setup: Annotated[bool, typer.Option(help="also measure train()'s fixed cost (setup_seconds)")] = True,
    reference: Annotated[bool, typer.Option(help="also time the reference loops (slow)")] = True,
    cells: Annotated[str, typer.Option(help="comma-separated registered cells to time (default: all of them)")] = "",
) -> None:
    """Time fused kernels, every cell's loops, the training step and populations side by side; write --out."""
    opts = Options(devices=_devices(device), seq_len=seq_len, batch=batch, input_size=input_size, hidden=_hidden(hidden),
                   repeats=repeats, warmup=warmup, population=population, out=out, tracking_uri=tracking_uri,
                   threads=threads, trainer=trainer, setup=setup, reference=reference, cells=_cells(cells))
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
    return (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]) if device == "all" else [device]


def _hidden(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise RnnbenchError(f"--hidden must be comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise RnnbenchError(f"--hidden must list positive sizes, got {text!r}")
    return sizes


def _cells(text: str) -> list[str]:
    from rnnbench.cells import CELLS

    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in CELLS]
    if unknown:
        raise RnnbenchError(f"--cells: unknown cell(s) {', '.join(unknown)}; registered: {', '.join(CELLS)}")
    return names


def _cell_names(opts: Options) -> list[str]:
    from rnnbench.cells import CELLS

    return opts.cells or list(CELLS)


# ---- the run ----------------------------------------------------------------------------------------
def run(opts: Options, echo: Callable[[str], Any] = print) -> dict[str, Any]:
    """Measure every device of `opts`, write the files, log one MLflow run. Returns rows, files, run id."""
    import torch
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from rnnbench.cpu_memory import keep_freed_memory
    from rnnbench.tracking import prepare_store, resolve_tracking_uri
    from rnnbench.training.threads import flush_subnormals

    keep_freed_memory()  # as train_population does: the timed steps run as training runs them
    flush_subnormals()
    uri = resolve_tracking_uri(opts.tracking_uri)
    experiment_id = prepare_store(uri, "bench")  # fails in one line before any work if unreachable
    client = MlflowClient(tracking_uri=uri)
    old_threads = torch.get_num_threads()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    run_id = client.create_run(experiment_id, run_name=f"bench {'+'.join(opts.devices)}",
                               tags={"torch_version": torch.__version__, "devices": ",".join(opts.devices)}).info.run_id
    try:
        params = {"seq_len": opts.seq_len, "batch": opts.batch, "input_size": opts.input_size, "population": opts.population,
                  "hidden": ",".join(map(str, opts.hidden)), "repeats": opts.repeats, "warmup": opts.warmup,
                  "threads": torch.get_num_threads(), "cpu_model": _cpu_model(), "torch_version": torch.__version__,
                  "cells": ",".join(_cell_names(opts))}
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        rows: dict[str, list[Row]] = {}
        files: dict[str, Path] = {}
        for dev in opts.devices:
            t0 = time.perf_counter()
            rows[dev], info = _bench_device(dev, opts, uri, echo)
            info["seconds"] = time.perf_counter() - t0
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


@contextlib.contextmanager
def _flags(device: str) -> Iterator[None]:
    """Run under the global flags training sets (deterministic algorithms on the CPU, no NaN fill of
    new memory: rnnbench/training/loop.py); put the process's own back afterwards."""
    import torch

    det, warn_only, fill = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                            torch.utils.deterministic.fill_uninitialized_memory)
    cudnn_benchmark, cublas = torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    torch.use_deterministic_algorithms(device == "cpu")
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory, torch.backends.cudnn.benchmark = fill, cudnn_benchmark
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas


def _bench_device(dev: str, opts: Options, uri: str, echo: Callable[[str], Any]) -> tuple[list[Row], dict[str, Any]]:
    import torch

    from rnnbench.cells import compiled

    CELLS = _cell_names(opts)
    if dev == "cpu":
        compiled.load_extension()
    info: dict[str, Any] = {"device": _device_name(dev), "torch": torch.__version__, "extension": compiled.extension_info() if dev == "cpu" else {},
                            "skipped": [s for cell in CELLS for s in _impls(cell, dev)[1]]}
    rows: list[Row] = []
    with _flags(dev):
        for H in opts.hidden:
            echo(f"[{dev}] hidden {H}: checking the fast loops, then fused, loop and step rows round-robin")
            cands = _fused(dev, H, opts) + [c for cell in CELLS for c in _loops(cell, dev, H, opts)]
            cands += [_step(cell, dev, H, opts) for cell in CELLS]
            cands += [c for cell in CELLS for c in _ragged(cell, dev, H, opts)]
            _time(cands, dev, opts)
            rows += [r for r, _, _ in cands]
            if opts.trainer:
                echo(f"[{dev}] hidden {H}: the step inside Lightning's Trainer")
                rows += [_trainer_row(cell, dev, H, opts) for cell in CELLS]
            if opts.population:
                echo(f"[{dev}] hidden {H}: {opts.population} members in one step vs one after another")
                rows += _populations(dev, H, opts)
    if opts.setup:
        echo(f"[{dev}] fixed cost per run: rnnbench.train.train on a tiny config, twice")
        rows += _setup_rows(dev, uri)
    _ratios(rows)
    return rows, info


# ---- timing -----------------------------------------------------------------------------------------
# A candidate: its row, the call to time (None: not timed, the row says why) and the time steps per call.
Cand = tuple[Row, Optional[Callable[[], Any]], int]


def _sync(dev: str) -> None:
    if dev == "cuda":
        import torch

        torch.cuda.synchronize()


def _time(cands: list[Cand], dev: str, opts: Options, repeats: Optional[int] = None) -> None:
    """Warm up each candidate, then time them round-robin (order rotated each round); medians."""
    live = [c for c in cands if c[1] is not None]
    for _, fn, _ in live:
        for _ in range(opts.warmup):
            fn()  # type: ignore[misc]
    _sync(dev)
    times: list[list[float]] = [[] for _ in live]
    for k in range(repeats or opts.repeats):
        for j in [(k + i) % len(live) for i in range(len(live))]:
            _sync(dev)
            t0 = time.perf_counter()
            live[j][1]()  # type: ignore[misc]
            _sync(dev)
            times[j].append(time.perf_counter() - t0)
    for (row, _, work), seconds in zip(live, times):
        _fill(row, seconds, work)


def _fill(row: Row, seconds: list[float], work: int) -> None:
    ms = sorted(s * 1e3 for s in seconds)
    q = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [ms[0]] * 3
    row.ms, row.ms_q1, row.ms_q3, row.repeats = statistics.median(ms), q[0], q[2], len(ms)
    row.steps_per_s = work / (row.ms / 1e3)


def _failed(row: Row, e: BaseException) -> Cand:
    row.check, row.note = "FAIL", " ".join(f"{type(e).__name__}: {e}".split())[:200]
    return row, None, 0


# ---- fused kernels and the cells' loops -------------------------------------------------------------
def _fused(dev: str, H: int, opts: Options) -> list[Cand]:
    import torch

    gen = torch.Generator().manual_seed(H)
    x = torch.randn(opts.batch, opts.seq_len, opts.input_size, generator=gen).to(dev)
    g = torch.randn(opts.batch, opts.seq_len, H, generator=gen).to(dev)
    out = []
    for cell, cls in FUSED.items():
        torch.manual_seed(0)
        m = getattr(torch.nn, cls)(opts.input_size, H, batch_first=True).to(dev)

        def fn(m: Any = m) -> None:
            m.zero_grad(set_to_none=True)
            m(x)[0].backward(g)

        out.append((Row(dev, H, "fused", cell, f"torch.nn.{cls}"), fn, opts.batch * opts.seq_len))
    return out


def _impls(cell: str, dev: str) -> tuple[list[str], list[str]]:
    """The cell's implementations this device runs (reference and each of its loops that loads here),
    and 'cell impl (why)' for each of its loops that does not."""
    import torch

    from rnnbench.cells import get_cell, implementation

    usable, skipped = ["reference"], []
    for impl in get_cell(cell).loops:
        try:
            usable.append(implementation(cell, torch.device(dev), torch.float32, impl))
        except RnnbenchError as e:
            skipped.append(f"{cell} {impl} ({e})")
    return usable, skipped


def _loop_inputs(cell: str, dev: str, H: int, opts: Options, dtype: Any) -> tuple[list[dict[str, Any]], Any, Any]:
    import torch

    from rnnbench.cells import init_weights

    gen = torch.Generator().manual_seed(H)
    layers = init_weights(cell, opts.input_size, H, 1, [torch.Generator().manual_seed(0)], None, 1.0, dtype)
    layers = [{n: w.to(dev).requires_grad_() for n, w in layer.items()} for layer in layers]
    x = torch.randn(1, opts.batch, opts.seq_len, opts.input_size, generator=gen, dtype=dtype).to(dev)
    g = torch.randn(1, opts.batch, opts.seq_len, H, generator=gen, dtype=dtype).to(dev)
    return layers, x, g


def _loop_check(cell: str, impl: str, dev: str, H: int, opts: Options) -> dict[str, float]:
    """{dtype: max |impl - reference|} over outputs, final states, input and weight gradients (K = 1);
    and 'worst': the largest of those relative to its tolerance."""
    import torch

    from rnnbench.cells import run

    diffs: dict[str, float] = {"worst": 0.0}
    for dtype in (torch.float32, torch.float64):
        got = []
        for which in (impl, "reference"):
            layers, x, g = _loop_inputs(cell, dev, H, opts, dtype)
            x.requires_grad_()
            out, finals = run(cell, layers, x, impl=which)
            ((out * g).sum() + sum((s * s).sum() for s in finals[0])).backward()
            got.append([out.detach(), *(s.detach() for s in finals[0]), x.grad, *(w.grad for w in layers[0].values())])
        name = str(dtype).removeprefix("torch.")
        diffs[name] = max(float((a - b).abs().max()) for a, b in zip(*got))
        rel = max(float((a - b).abs().max()) / max(1.0, float(b.abs().max())) for a, b in zip(*got))
        diffs["worst"] = max(diffs["worst"], rel / TOL[name])
    return diffs


def _loops(cell: str, dev: str, H: int, opts: Options) -> list[Cand]:
    """One row per implementation of `cell` on `dev`: fast loops checked against the reference first."""
    import torch

    from rnnbench.cells import run

    out = []
    for impl in _impls(cell, dev)[0]:
        if impl == "reference" and not opts.reference:
            continue
        row = Row(dev, H, "loop", cell, impl)
        try:
            if impl != "reference":
                d = _loop_check(cell, impl, dev, H, opts)
                row.diff_f32, row.diff_f64, row.check = d["float32"], d["float64"], "ok" if d["worst"] <= 1 else "FAIL"
            layers, x, g = _loop_inputs(cell, dev, H, opts, torch.float32)
        except Exception as e:  # noqa: BLE001 - one broken implementation must not stop the bench
            out.append(_failed(row, e))
            continue

        def fn(layers: Any = layers, x: Any = x, g: Any = g, impl: str = impl) -> None:
            for w in layers[0].values():
                w.grad = None
            run(cell, layers, x, impl=impl)[0].backward(g)

        out.append((row, fn, opts.batch * opts.seq_len))
    return out


# ---- the training step --------------------------------------------------------------------------------
def _random_roll_task(keys: int, seq_len: int, sequences: int) -> Any:
    """The JSB task class (its collate, Bernoulli NLL and metric sums) on random piano rolls of `keys` keys."""
    import numpy as np

    from rnnbench.tasks.polyphonic import JSBTask

    class RandomRolls(JSBTask):
        def __init__(self, options: Any, seed: int) -> None:
            super().__init__(options, seed)
            self.input_size = self.output_size = keys

        def rolls(self) -> dict[str, list[Any]]:
            rng = np.random.default_rng(self.seed)  # about 9 of 88 keys down per frame, as in JSB
            return {s: [(rng.random((seq_len, keys)) < 0.1).astype(np.uint8) for _ in range(sequences)]
                    for s in ("train", "val", "test")}

    return RandomRolls


def _build(cell: str, dev: str, H: int, opts: Options, seeds: list[int], dtype: Any = None, sequences: Optional[int] = None) -> Any:
    """A population of len(seeds) members built as rnnbench/training builds one (Adam, clipping: the defaults)."""
    import torch

    from rnnbench.config import Config
    from rnnbench.training.population import build

    configs = [Config.from_dict({
        "model": {"cell": cell, "hidden_size": H}, "task": {"name": "jsb"},
        "train": {"seed": s, "batch_size": opts.batch, "device": dev, "progress_bar": False, "gradient_flow": False},
    }) for s in seeds]
    task_cls = _random_roll_task(opts.input_size, opts.seq_len, sequences or opts.batch)
    return build(configs, torch.device(dev), dtype or torch.float32, task_cls=task_cls)


def _member_batch(pop: Any, k: int, length: int, seed: int) -> dict[str, Any]:
    """Member k's batch (B sequences of `length` frames) from its task's own collate."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    rolls = [(torch.rand(length, pop.sizes[0], generator=gen) < 0.1).to(torch.uint8) for _ in range(pop.configs[0].train.batch_size)]
    return pop.data.tasks[k].collate(rolls)


def _step(cell: str, dev: str, H: int, opts: Options) -> Cand:
    import torch

    from rnnbench.cells import implementation

    row = Row(dev, H, "step", cell, implementation(cell, dev, torch.float32))
    try:
        pop = _build(cell, dev, H, opts, [0])
        batch = pop.on_device(pop.task.stack_batches([_member_batch(pop, 0, opts.seq_len, 0)]))
    except Exception as e:  # noqa: BLE001
        return _failed(row, e)
    return row, lambda: pop.train_step(batch), opts.batch * opts.seq_len


def _spread(n: int, longest: int) -> list[int]:
    """n lengths evenly spread over [longest / 4, longest], longest first (music batches' spread)."""
    return [round(longest - (longest - longest / 4) * i / max(n - 1, 1)) for i in range(n)]


def _ragged(cell: str, dev: str, H: int, opts: Options) -> list[Cand]:
    """The step on a batch of unequal lengths, each sequence stopping at its own, and the same batch
    run to its longest (the batch without "lengths": the recurrence pads each to it)."""
    import torch

    from rnnbench.cells import implementation

    impl = implementation(cell, dev, torch.float32)
    rows = [Row(dev, H, "ragged", cell, impl), Row(dev, H, "ragged-padded", cell, impl)]
    try:
        pop = _build(cell, dev, H, opts, [0])
        gen = torch.Generator().manual_seed(0)
        rolls = [(torch.rand(n, pop.sizes[0], generator=gen) < 0.1).to(torch.uint8) for n in _spread(opts.batch, opts.seq_len)]
        batch = pop.on_device(pop.task.stack_batches([pop.data.tasks[0].collate(rolls)]))
    except Exception as e:  # noqa: BLE001
        return [_failed(r, e) for r in rows]
    padded = {k: v for k, v in batch.items() if k != "lengths"}
    work = int(batch["mask"].sum())
    return [(rows[0], lambda: pop.train_step(batch), work), (rows[1], lambda: pop.train_step(padded), work)]


def _trainer_row(cell: str, dev: str, H: int, opts: Options) -> Row:
    """The step in Lightning's Trainer as rnnbench/training/loop.py makes it: the gaps between batch starts."""
    import torch
    from lightning.pytorch.callbacks import Callback

    from rnnbench.cells import implementation
    from rnnbench.training.loop import make_trainer
    from rnnbench.training.population import TrainBatches

    row = Row(dev, H, "trainer", cell, implementation(cell, dev, torch.float32))
    n = opts.warmup + opts.repeats + 1  # batches; `repeats` gaps between starts after the warm-up ones

    class Starts(Callback):
        def __init__(self) -> None:
            self.t: list[float] = []

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            _sync(dev)
            self.t.append(time.perf_counter())

    starts = Starts()
    try:
        pop = _build(cell, dev, H, opts, [0], sequences=n * opts.batch)
        with warnings.catch_warnings():  # no validation here: only the training batches are timed
            warnings.filterwarnings("ignore", ".*no `val_dataloader`.*")
            make_trainer(pop, [starts], max_epochs=1, max_steps=n).fit(pop, TrainBatches(pop))
        _fill(row, [b - a for a, b in zip(starts.t, starts.t[1:])][opts.warmup :], opts.batch * opts.seq_len)
    except Exception as e:  # noqa: BLE001
        _failed(row, e)
    return row


# ---- populations ------------------------------------------------------------------------------------
def _populations(dev: str, H: int, opts: Options) -> list[Row]:
    """Per cell: one step of K members on their own batches vs K populations of one on the same batches,
    interleaved; before timing, member k's weights after one step compared with its single's."""
    import torch

    from rnnbench.cells import implementation

    K, T = opts.population, opts.seq_len
    lengths = [round(T / 4 + (T - T / 4) * k / max(K - 1, 1)) for k in range(K)]
    work = opts.batch * sum(lengths)
    rows: list[Row] = []
    for cell in _cell_names(opts):
        impl = implementation(cell, dev, torch.float32)
        pair = Row(dev, H, "population", cell, impl, note=f"K={K}, lengths {min(lengths)}-{max(lengths)}")
        seq = Row(dev, H, "sequential", cell, impl, note=f"{K} populations of one, one after another")
        try:
            diffs = {name: _member_diff(cell, dev, H, opts, lengths, dtype) for name, dtype in
                     (("float32", torch.float32), ("float64", torch.float64))}
            pair.diff_f32, pair.diff_f64 = diffs["float32"], diffs["float64"]
            pair.check = "ok" if all(d <= TOL[n] for n, d in diffs.items()) else "FAIL"
            pop, singles, stacked, alone = _population_and_singles(cell, dev, H, opts, lengths, torch.float32)

            def one_by_one(singles: Any = singles, alone: Any = alone) -> None:
                for p, b in zip(singles, alone):
                    p.train_step(b)

            _time([(pair, lambda pop=pop, b=stacked: pop.train_step(b), work), (seq, one_by_one, work)], dev, opts,
                  repeats=max(3, opts.repeats // 3))
            pair.speedup = seq.ms / pair.ms
        except Exception as e:  # noqa: BLE001
            _failed(pair, e)
        rows += [pair, seq]
    return rows


def _population_and_singles(cell: str, dev: str, H: int, opts: Options, lengths: list[int], dtype: Any) -> tuple[Any, list[Any], Any, list[Any]]:
    """A population of K (seeds 0..K-1), its K populations of one, member k's batch stacked for both."""
    pop = _build(cell, dev, H, opts, list(range(len(lengths))), dtype)
    singles = [_build(cell, dev, H, opts, [k], dtype) for k in range(len(lengths))]
    batches = [_member_batch(pop, k, n, seed=k) for k, n in enumerate(lengths)]
    return pop, singles, pop.on_device(pop.task.stack_batches(batches)), [p.on_device(p.task.stack_batches([b])) for p, b in zip(singles, batches)]


def _member_diff(cell: str, dev: str, H: int, opts: Options, lengths: list[int], dtype: Any) -> float:
    """max |member k's weights after one step in the population - its own single's|, relative to max(1, |w|)."""
    pop, singles, stacked, alone = _population_and_singles(cell, dev, H, opts, lengths, dtype)
    pop.train_step(stacked)
    for p, b in zip(singles, alone):
        p.train_step(b)
    worst = 0.0
    for k, p in enumerate(singles):
        for a, w in zip(pop.weights(), p.weights()):
            w = w.detach()
            worst = max(worst, float((a.detach()[k] - w[0]).abs().max()) / max(1.0, float(w.abs().max())))
    return worst


# ---- fixed cost per run -------------------------------------------------------------------------------
def _setup_rows(dev: str, uri: str) -> list[Row]:
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
            with _flags(dev):  # train()'s Trainer changes global flags; put them back
                result = train(config, tags={"purpose": "bench fixed-cost probe"})
            row = Row(dev, 8, "setup", "lstm", label, repeats=1)
            if result.status == "FINISHED":
                row.ms = result.metrics["setup_seconds"] * 1e3
                row.note = f"whole train() call {time.perf_counter() - t0:.2f} s; run {result.run_id}"
            else:
                row.note = f"train() {result.status}: {result.reason}"
            rows.append(row)
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)
    return rows


# ---- ratios and files -------------------------------------------------------------------------------
def _ratios(rows: list[Row]) -> None:
    by = {(r.hidden, r.kind, r.cell, r.impl): r for r in rows if math.isfinite(r.ms)}
    for r in rows:
        lstm = by.get((r.hidden, "fused", "lstm", "torch.nn.LSTM"))
        if r.kind in ("fused", "loop", "step", "trainer") and lstm and math.isfinite(r.ms):
            r.x_lstm = lstm.ms / r.ms
        if r.kind in ("step", "trainer") and (loop := by.get((r.hidden, "loop", r.cell, r.impl))):
            r.over_loop = r.ms / loop.ms
        if r.kind == "trainer" and (step := by.get((r.hidden, "step", r.cell, r.impl))):
            r.over_step = r.ms / step.ms
        if r.kind == "ragged" and (padded := by.get((r.hidden, "ragged-padded", r.cell, r.impl))) and math.isfinite(r.ms):
            r.speedup = padded.ms / r.ms


def _metrics(rows: list[Row]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in rows:
        key = f"{r.device}/h{r.hidden}/{r.kind}/{r.cell}/{r.impl}".replace(":", "_")
        for name in ("ms", "x_lstm", "over_loop", "over_step", "speedup", "diff_f32", "diff_f64"):
            if math.isfinite(v := getattr(r, name)):
                out[f"{key}/{name}"] = v
    return out


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
    return (f"{_cpu_model()} ({os.cpu_count()} logical cores visible, torch threads {torch.get_num_threads()}, "
            f"oneDNN {'on' if torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled else 'off'})")


def _fmt(v: Any, digits: int = 2) -> str:
    if not isinstance(v, float):
        return str(v)
    if not math.isfinite(v):
        return "—"
    return f"{v:.1e}" if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6) else f"{v:.{digits}f}"


def _write(dev: str, rows: list[Row], info: dict[str, Any], opts: Options) -> Path:
    opts.out.mkdir(parents=True, exist_ok=True)
    base = opts.out / f"bench_{dev}"
    csv_tmp = base.with_suffix(".csv.tmp")
    with csv_tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=[f.name for f in fields(Row)])
        w.writeheader()
        w.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in asdict(r).items()} for r in rows)
    ext = info["extension"]
    ext_line = ("not used on this device" if not ext else
                f"{'loaded from cache' if ext.get('cached') else 'compiled'} in {ext.get('seconds', math.nan):.2f} s"
                if ext.get("state") else f"unavailable ({ext.get('reason')})")
    lines = [
        f"# rnnbench bench: {dev}", "",
        f"- device: {info['device']}",
        f"- torch {info['torch']}, Python {platform.python_version()}, {platform.system()} {platform.machine()}",
        f"- compiled CPU loops: {ext_line}; not timed here: {', '.join(info['skipped']) or 'none'}",
        f"- shape: seq {opts.seq_len}, batch {opts.batch}, input {opts.input_size} (random piano rolls), hidden"
        f" {', '.join(map(str, opts.hidden))}; float32; population rows K = {opts.population}",
        f"- {opts.repeats} timed repeats per row after {opts.warmup} warm-up calls (population rows"
        f" {max(3, opts.repeats // 3)}), the rows of one hidden size interleaved round-robin; median and IQR",
        f"- date {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; bench took {info.get('seconds', math.nan):.0f} s;"
        f" command: `{_command_line(opts)}`", "",
        "**ms** per call (median; q1–q3): loop rows forward + backward, step and trainer rows one training step,"
        " population rows one step of all K members; **steps/s** = recurrent time steps (all members) per second;"
        " **x LSTM** = fused nn.LSTM time / this row's; **/loop** = this time / the cell's loop row of the same"
        " implementation; **/step** = trainer time / step time; **check**: loop rows against the reference loop,"
        " population rows member k against its own population of one (max |diff| relative to max(1, |ref|) within"
        f" {TOL['float32']:g} in float32, {TOL['float64']:g} in float64).", "",
        "| hidden | kind | cell | impl | check | diff f32 | diff f64 | ms | q1–q3 | steps/s | x LSTM | /loop | /step | note |",
        "|---:|---|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r.kind not in ("setup", "population", "sequential", "ragged", "ragged-padded"):
            lines.append(f"| {r.hidden} | {r.kind} | {r.cell} | {r.impl} | {r.check} | {_fmt(r.diff_f32)} | {_fmt(r.diff_f64)} |"
                         f" {_fmt(r.ms)} | {_fmt(r.ms_q1)}–{_fmt(r.ms_q3)} | {_fmt(r.steps_per_s, 0)} | {_fmt(r.x_lstm)} |"
                         f" {_fmt(r.over_loop)} | {_fmt(r.over_step)} | {r.note} |")
    pops = [r for r in rows if r.kind == "population"]
    if pops:
        lines += ["", f"## {opts.population} members in one step vs {opts.population} populations of one", "",
                  "| hidden | cell | impl | check | diff f32 | diff f64 | population ms | sequential ms | speedup | note |",
                  "|---:|---|---|---|---:|---:|---:|---:|---:|---|"]
        for r in pops:
            s = next(x for x in rows if (x.kind, x.hidden, x.cell) == ("sequential", r.hidden, r.cell))
            lines.append(f"| {r.hidden} | {r.cell} | {r.impl} | {r.check} | {_fmt(r.diff_f32)} | {_fmt(r.diff_f64)} |"
                         f" {_fmt(r.ms)} | {_fmt(s.ms)} | {_fmt(r.speedup)} | {r.note} |")
        if dev == "cpu":
            met = [r for r in pops if math.isfinite(r.speedup) and r.speedup >= 1.2]
            lines += ["", f"Target (issue 13, CPU): K = 32 at >= 1.2x the throughput of 32 runs one after another:"
                      f" met by {len(met)} of {len(pops)} rows" + (f" (K here is {opts.population})" if opts.population != 32 else "") + "."]
    ragged = [r for r in rows if r.kind == "ragged"]
    if ragged:
        lines += ["", "## Sequences of unequal length: each stopping at its own vs all run to the longest", "",
                  f"One step of a population of one on {opts.batch} sequences of {_spread(opts.batch, opts.seq_len)[-1]}"
                  f" to {opts.seq_len} steps (**steps/s** counts valid steps only); **speedup** = padded / ragged time.", "",
                  "| hidden | cell | impl | ragged ms | q1–q3 | padded ms | q1–q3 | steps/s | speedup | note |",
                  "|---:|---|---|---:|---|---:|---|---:|---:|---|"]
        for r in ragged:
            p = next(x for x in rows if (x.kind, x.hidden, x.cell, x.impl) == ("ragged-padded", r.hidden, r.cell, r.impl))
            lines.append(f"| {r.hidden} | {r.cell} | {r.impl} | {_fmt(r.ms)} | {_fmt(r.ms_q1)}–{_fmt(r.ms_q3)} | {_fmt(p.ms)} |"
                         f" {_fmt(p.ms_q1)}–{_fmt(p.ms_q3)} | {_fmt(r.steps_per_s, 0)} | {_fmt(r.speedup)} | {r.note or p.note} |")
    setup = [r for r in rows if r.kind == "setup"]
    if setup:
        lines += ["", "## Fixed cost per run (rnnbench.train.train on a tiny copy config, `setup_seconds`)", ""]
        lines += [f"- {r.impl} call: {_fmt(r.ms / 1e3, 3)} s ({r.note})" for r in setup]
    md_tmp = base.with_suffix(".md.tmp")
    md_tmp.write_text("\n".join(lines) + "\n")
    os.replace(csv_tmp, base.with_suffix(".csv"))
    os.replace(md_tmp, base.with_suffix(".md"))
    return base


def _command_line(opts: Options) -> str:
    """The command that reproduces this bench (every option spelled out)."""
    flags = {"seq_len": "seq-len", "batch": "batch", "input_size": "input", "repeats": "repeats", "warmup": "warmup",
             "population": "population", "threads": "threads"}
    parts = [f"--device {'all' if len(opts.devices) > 1 else opts.devices[0]}", f"--hidden {','.join(map(str, opts.hidden))}"]
    parts += [f"--{flag} {getattr(opts, name)}" for name, flag in flags.items() if getattr(opts, name) is not None]
    parts += [f"--cells {','.join(opts.cells)}"] if opts.cells else []
    return " ".join(["rnnbench bench", *parts] + [f"--no-{f}" for f in ("trainer", "setup", "reference") if not getattr(opts, f)])
