"""Train many models of one cell, task and size together in one process ("Speed", item 2).

Configs that differ only in `train.seed`, `train.lr` and `tracking` (equal `group_key`) form a group
of K models trained side by side. Each model keeps everything a separate `train()` run would give it:

* its initialisation (seed_everything(seed), then SequenceModel built the same way),
* its data and shuffled order (its own task instance and DataLoader, generator seeded with its seed),
* its learning rate and optimizer (each model's own `configure_optimizers()`),
* its gradient clipping (clip_grad_norm_ over its own parameters) and weight noise (drawn from a
  generator that replays the global RNG stream its separate run would use),
* its early stopping (Lightning's rule: mode min, `patience` epochs without a strict improvement;
  a non-finite validation score stops it), best-validation state and final scoring with that state.

What is shared is the hardware, used once for all K models per step:

* CPU (every cell): every model keeps its own input projection and output layer at its own sequence
  length, and each layer's K recurrences run in one call of the compiled loops
  (rnnbench/cells/csrc/fast_rnn.cpp, ops *_many), the models in parallel over the CPU threads, each
  with the hand-written backward of its one-model loop;
* elsewhere (CUDA; the CPU without a compiler): the K models as one batch, padded to the longest input: the
  input projections and output layers one batched matmul each (torch.baddbmm over a (K, ...) stack of
  the weights, stacked once per forward), the time loop one batched matmul per step, with the gate
  arithmetic of the Chung-form cells fused into Triton kernels on CUDA (rnnbench/cells/_triton.py).
  The loss of model k only reads its own, unpadded, time steps.

The cell forms and their equations: ../shared/docs/cells.md. Each model's parameters stay separate
leaf tensors, so autograd hands each model its own gradients and standard torch optimizers update
them. A model that diverges is marked FAILED and dropped; a model that stops early keeps its best
state and leaves the batch while the others go on. Where a fused kernel per model is faster than
the stacked loop (`choose_recurrence`: CUDA's cuDNN cells), the models run their own forwards one
after another inside the same loop ('per_model').

On the CPU in float64 a group reproduces K separate runs to rounding (tests/test_many_models.py).
Each model is recorded in its own MLflow run with the params, tags and metrics of `train()`, plus
the tag `batched=K`. Logged metric values go through float32 as Lightning's do. Timing metrics are
the group's: epoch_seconds, wall_seconds, seconds_per_epoch, setup_seconds are shared, and a
model's time_steps_per_second counts its own steps over the group's time (the group as a whole
processed K times as many).

Resuming: every epoch each model writes `<checkpoint_dir>/<run_id>/batched_last.pt`;
`train_many(configs, run_ids=[...])` continues those runs exactly where they were.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from rnnbench import checkpoints
from rnnbench.config import Config
from rnnbench.cpu_memory import keep_freed_memory
from rnnbench.errors import RnnbenchError
from rnnbench.train import RunResult, resolve_hidden_size

GROUP_FREE = ("train.seed", "train.lr")  # and every tracking.* key
CHECKPOINT_NAME = "batched_last.pt"
BATCHED_CELLS = ("tanh", "lstm", "gru", "lstm_peephole", "gru_reset_before")


def group_key(config: Config) -> tuple[tuple[str, str], ...]:
    """Configs with equal keys can train together: all settings equal but train.seed, train.lr, tracking."""
    flat = config.flat()
    return tuple(
        sorted((k, json.dumps(v, sort_keys=True)) for k, v in flat.items() if k not in GROUP_FREE and not k.startswith("tracking."))
    )


# --- K models' recurrences as one --------------------------------------------------------------------
def _stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack(list(tensors))


def _project_time_major(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x (K, T, B, D), w (K, G, D), b (K, G) -> (T, K, B, G): W x_t + b for every model and step at once."""
    K, T, B, D = x.shape
    xw = torch.baddbmm(b.unsqueeze(1), x.reshape(K, T * B, D), w.transpose(1, 2))
    return xw.view(K, T, B, -1).transpose(0, 1).contiguous()


def _project(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """x (K, T, B, D), w (K, G, D), b (K, G) -> T tensors (K, B, G): W x_t + b for every t at once."""
    return _project_time_major(x, w, b).unbind(0)  # unbind: one backward copy, not T


def _layer_params(rnn: nn.Module, cell: str, layer: int) -> dict[str, torch.Tensor]:
    """One model's weights of one layer under the names the step functions below use."""
    if cell in ("tanh", "lstm", "gru"):  # rnnbench/cells/fused.py: torch's names
        r = rnn.rnn
        return {name: getattr(r, f"{name}_l{layer}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
    if cell in ("lstm_peephole", "gru_reset_before"):  # rnnbench/cells/<cell>.py: layers[l].<name>
        params = dict(rnn.layers[layer].named_parameters(recurse=False))
        need = ("weight_ih", "weight_hh", "bias") + (("w_ci", "w_cf", "w_co") if cell == "lstm_peephole" else ())
        missing = [n for n in need if n not in params]
        if missing:
            raise RnnbenchError(f"many_models: {cell} layer has no parameter(s) {', '.join(missing)}; update _layer_params")
        return params
    raise RnnbenchError(f"cell {cell!r} has no batched form; batched cells: {', '.join(BATCHED_CELLS)}")


def _tanh_layer(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    # h_t = tanh(W_x x_t + W_h h_{t-1} + b); b = bias_ih + bias_hh (the latter frozen at zero)
    xw = _project(x, p["weight_ih"], p["bias_ih"] + p["bias_hh"])
    w_hh = p["weight_hh"].transpose(1, 2)
    h = x.new_zeros(x.shape[0], x.shape[2], w_hh.shape[1])
    outs = []
    for xt in xw:
        h = torch.tanh(torch.baddbmm(xt, h, w_hh))
        outs.append(h)
    return torch.stack(outs, 1)


def _lstm_layer(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    # torch.nn.LSTM, gate order i, f, g, o; rows reordered to i, f, o, g so one sigmoid covers three gates
    H = p["weight_hh"].shape[2]
    order = torch.cat([torch.arange(0, 2 * H), torch.arange(3 * H, 4 * H), torch.arange(2 * H, 3 * H)]).to(x.device)
    xw = _project(x, p["weight_ih"][:, order], (p["bias_ih"] + p["bias_hh"])[:, order])
    w_hh = p["weight_hh"][:, order].transpose(1, 2)
    h = c = x.new_zeros(x.shape[0], x.shape[2], H)
    outs = []
    for xt in xw:
        a = torch.baddbmm(xt, h, w_hh)
        i, f, o = torch.sigmoid(a[..., : 3 * H]).chunk(3, -1)
        c = torch.addcmul(f * c, i, torch.tanh(a[..., 3 * H :]))
        h = o * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs, 1)


def _gru_layer(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    # torch.nn.GRU (reset after): n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn)); h = (1 - z) n + z h
    H = p["weight_hh"].shape[2]
    xw = _project(x, p["weight_ih"], p["bias_ih"])
    w_hh, b_hh = p["weight_hh"].transpose(1, 2), p["bias_hh"].unsqueeze(1)
    h = x.new_zeros(x.shape[0], x.shape[2], H)
    outs = []
    for xt in xw:
        hw = torch.baddbmm(b_hh, h, w_hh)
        r, z = torch.sigmoid(xt[..., : 2 * H] + hw[..., : 2 * H]).chunk(2, -1)
        n = torch.tanh(torch.addcmul(xt[..., 2 * H :], r, hw[..., 2 * H :]))
        h = torch.lerp(n, h, z)
        outs.append(h)
    return torch.stack(outs, 1)


def _lstm_peephole_layer(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    # Graves 2013: i, f see c_{t-1}; o sees c_t; diagonal peepholes (K, 1, H)
    H = p["weight_hh"].shape[2]
    xw = _project(x, p["weight_ih"], p["bias"])
    w_hh = p["weight_hh"].transpose(1, 2)
    w_ci, w_cf, w_co = (p[n].unsqueeze(1) for n in ("w_ci", "w_cf", "w_co"))
    h = c = x.new_zeros(x.shape[0], x.shape[2], H)
    outs = []
    for xt in xw:
        a_i, a_f, a_g, a_o = torch.baddbmm(xt, h, w_hh).chunk(4, -1)
        i = torch.sigmoid(torch.addcmul(a_i, w_ci, c))
        f = torch.sigmoid(torch.addcmul(a_f, w_cf, c))
        c = torch.addcmul(f * c, i, torch.tanh(a_g))
        o = torch.sigmoid(torch.addcmul(a_o, w_co, c))
        h = o * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs, 1)


def _gru_reset_before_layer(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    # Chung et al. 2014: h~ = tanh(W_xh x + W_hh (r ⊙ h) + b_h); h = (1 - z) h + z h~
    H = p["weight_hh"].shape[2]
    w_ih, b = p["weight_ih"], p["bias"]
    xw_rz = _project(x, w_ih[:, : 2 * H], b[:, : 2 * H])
    xw_h = _project(x, w_ih[:, 2 * H :], b[:, 2 * H :])
    u_rz, u_h = p["weight_hh"][:, : 2 * H].transpose(1, 2), p["weight_hh"][:, 2 * H :].transpose(1, 2)
    h = x.new_zeros(x.shape[0], x.shape[2], H)
    outs = []
    for xt_rz, xt_h in zip(xw_rz, xw_h):
        r, z = torch.sigmoid(torch.baddbmm(xt_rz, h, u_rz)).chunk(2, -1)
        h_tilde = torch.tanh(torch.baddbmm(xt_h, r * h, u_h))
        h = torch.lerp(h, h_tilde, z)
        outs.append(h)
    return torch.stack(outs, 1)


# --- CPU: the K models' recurrences in parallel (rnnbench/cells/csrc/fast_rnn.cpp, ops *_many) ----------
# Every model keeps its own input projection and output layer (its own length: no padding), and the K
# recurrences of a layer run in one compiled call, the models in parallel over the CPU threads, each
# with the hand-written backward of its one-model loop.
_CPP_OPS = {"tanh": "tanh_rnn", "lstm": "lstm", "lstm_peephole": "peephole_lstm", "gru": "gru_reset_after",
            "gru_reset_before": "gru_reset_before"}


def _uses_cpp(cell: str, x: torch.Tensor) -> bool:
    """The compiled loops run where the cell has one and they load (CPU, float32/float64)."""
    from rnnbench.cells import _fast

    return cell in _CPP_OPS and _fast.resolve("auto", x) == "cpp"


def _parallel_forward(models: Sequence[nn.Module], cell: str, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each model's outputs (B, T_k, O) on its own input (B, T_k, D), the recurrences through _ManyCpp."""
    import torch.nn.functional as F

    from rnnbench.cells._fast import _ManyCpp

    K = len(models)
    hs = [x.transpose(0, 1) for x in xs]  # time major (T_k, B, D), as the compiled loops want
    for layer in range(models[0].rnn.num_layers):
        ps = [_layer_params(m.rnn, cell, layer) for m in models]
        H = ps[0]["weight_hh"].shape[1]
        h0 = [h.new_zeros(h.shape[1], H) for h in hs]
        whh = [p["weight_hh"] for p in ps]
        if cell in ("tanh", "lstm"):  # torch.nn.RNN / nn.LSTM: b_ih + b_hh (the latter frozen at zero)
            xw = [F.linear(h, p["weight_ih"], p["bias_ih"] + p["bias_hh"]) for h, p in zip(hs, ps)]
            states = [*h0, *h0] if cell == "lstm" else h0
            outs = _ManyCpp.apply(_CPP_OPS[cell], K, *xw, *states, *whh)
        elif cell == "lstm_peephole":
            xw = [F.linear(h, p["weight_ih"], p["bias"]) for h, p in zip(hs, ps)]
            peep = [p[n] for n in ("w_ci", "w_cf", "w_co") for p in ps]
            outs = _ManyCpp.apply("peephole_lstm", K, *xw, *h0, *h0, *whh, *peep)
        elif cell == "gru":
            gi = [F.linear(h, p["weight_ih"], p["bias_ih"]) for h, p in zip(hs, ps)]
            outs = _ManyCpp.apply("gru_reset_after", K, *gi, *h0, *whh, *[p["bias_hh"] for p in ps])
        else:  # gru_reset_before
            xw = [F.linear(h, p["weight_ih"], p["bias"]) for h, p in zip(hs, ps)]
            outs = _ManyCpp.apply("gru_reset_before", K, *xw, *h0, *whh)
        hs = list(outs[:: len(outs) // K])  # each model's hs (T_k, B, H); the final states are not needed
    return [m.head(h.transpose(0, 1)) for m, h in zip(models, hs)]


# --- the Chung-form layers with Triton-fused steps on CUDA (rnnbench/cells/_triton.py) -----------------
# Per step: the batched product of all K models and one (peephole LSTM) or two (reset-before GRU) gate
# kernels over all K·B rows, instead of ~10 torch ops. A Triton failure (no compiler for this GPU, ...)
# warns once and the torch-op loops above take over, as for a single model (_fast._run_triton).
def _lstm_peephole_layer_triton(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    from rnnbench.cells._fast import _run_triton
    from rnnbench.cells._triton import PeepholeTriton

    H = p["weight_hh"].shape[2]
    h0 = _zeros_state(x, H)
    out = _run_triton(PeepholeTriton, "auto", _project_time_major(x, p["weight_ih"], p["bias"]), h0, h0,
                      p["weight_hh"], p["w_ci"], p["w_cf"], p["w_co"])
    return _lstm_peephole_layer(x, p) if out is None else out[0].transpose(0, 1)


def _gru_reset_before_layer_triton(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    from rnnbench.cells._fast import _run_triton
    from rnnbench.cells._triton import GRUBeforeTriton

    H = p["weight_hh"].shape[2]
    out = _run_triton(GRUBeforeTriton, "auto", _project_time_major(x, p["weight_ih"], p["bias"]), _zeros_state(x, H),
                      p["weight_hh"])
    return _gru_reset_before_layer(x, p) if out is None else out[0].transpose(0, 1)


_LAYERS_TRITON: dict[str, Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]] = {
    "lstm_peephole": _lstm_peephole_layer_triton,
    "gru_reset_before": _gru_reset_before_layer_triton,
}


def _zeros_state(x: torch.Tensor, H: int) -> torch.Tensor:
    return x.new_zeros(x.shape[0], x.shape[2], H)  # x (K, T, B, D) -> (K, B, H)


def _uses_triton(cell: str, x: torch.Tensor) -> bool:
    """CUDA (or Triton's CPU interpreter, for tests), triton installed and not failed before."""
    import os

    from rnnbench.cells import _fast, _triton

    if cell not in _LAYERS_TRITON or not _triton.available() or _fast._triton_failed:
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


_LAYERS: dict[str, Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]] = {
    "tanh": _tanh_layer,
    "lstm": _lstm_layer,
    "gru": _gru_layer,
    "lstm_peephole": _lstm_peephole_layer,
    "gru_reset_before": _gru_reset_before_layer,
}


def stacked_forward(models: Sequence[nn.Module], cell: str, x: torch.Tensor) -> torch.Tensor:
    """Head outputs (K, B, T, O) of K models (each with `.rnn` of `cell` and a Linear `.head`) on x (K, B, T, D).

    The same function as each model's own forward (`head(rnn(x_k)[0])`), all K at once: the weights are
    stacked once per call, the time loop runs once with one batched matmul per step and layer (or the
    Triton-fused steps on CUDA).
    """
    if cell not in _LAYERS:
        raise RnnbenchError(f"cell {cell!r} has no batched form; batched cells: {', '.join(BATCHED_CELLS)}")
    K, B, T, _ = x.shape
    h = x.transpose(1, 2)  # (K, T, B, D): time-major per model
    layers = _LAYERS_TRITON if _uses_triton(cell, x) else _LAYERS
    for layer in range(models[0].rnn.num_layers):
        per_model = [_layer_params(m.rnn, cell, layer) for m in models]
        stacked = {name: _stack([p[name] for p in per_model]) for name in per_model[0]}
        h = layers[cell](h, stacked)  # (K, T, B, H)
    w, b = _stack([m.head.weight for m in models]), _stack([m.head.bias for m in models])
    out = torch.baddbmm(b.unsqueeze(1), h.reshape(K, T * B, h.shape[-1]), w.transpose(1, 2))
    return out.view(K, T, B, -1).transpose(1, 2)


def pad_stack(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """K inputs (B, T_k, D) -> (K, B, max T_k, D), zeros after each one's end."""
    T = max(x.shape[1] for x in xs)
    if all(x.shape[1] == T for x in xs):
        return torch.stack(list(xs))
    out = xs[0].new_zeros(len(xs), xs[0].shape[0], T, xs[0].shape[2])
    for k, x in enumerate(xs):
        out[k, :, : x.shape[1]] = x
    return out


def group_forward(
    models: Sequence[nn.Module], cell: str, xs: Sequence[torch.Tensor], recurrence: str = "stacked"
) -> list[torch.Tensor]:
    """Each model's outputs (B, T_k, O) on its own input (B, T_k, D).

    recurrence 'stacked': the K recurrences together: on the CPU the compiled K-model loops
    (`_parallel_forward`, each model at its own length), elsewhere as one batch padded to the longest
    input (`stacked_forward`); 'per_model': each model's own forward one after another (its fused
    kernel where the cell has one).
    """
    if recurrence == "per_model":
        return [m.head(m.rnn(x)[0]) for m, x in zip(models, xs)]
    if _uses_cpp(cell, xs[0]):
        return _parallel_forward(models, cell, xs)
    out = stacked_forward(models, cell, pad_stack(xs)).unbind(0)  # unbind: one backward op, not K
    return [o if o.shape[1] == x.shape[1] else o[:, : x.shape[1]] for o, x in zip(out, xs)]


def _group_recurrence(cell: str, device: torch.device, dtype: torch.dtype) -> str:
    """The run tag `recurrence` of a batched model: how its group's time loops run."""
    x = torch.zeros(1, 1, 1, device=device, dtype=dtype)
    if _uses_cpp(cell, x):
        return "cpp-many"
    if choose_recurrence(cell, device) == "per_model":
        return "per-model-torch"
    return "stacked-triton" if _uses_triton(cell, x) else "stacked-torch"


def choose_recurrence(cell: str, device: torch.device | str) -> str:
    """'stacked' or 'per_model' for `cell` on `device`, from measurements (results/bench/bench_*.md).

    CPU: always 'stacked'; where the compiled loops load, the K models' loops run in parallel over the
    threads (1.0-1.2x the throughput of K sequential runs with 32 models, 2 cores, each sequential run
    itself on the compiled loops). CUDA: cells without
    a fused kernel (lstm_peephole, gru_reset_before) stack; for fused ones K cuDNN calls beat an eager
    stacked loop on an H100 up to K = 64 (../shared/docs/speed-probes.md).
    """
    from rnnbench.cells import get_cell

    if torch.device(device).type != "cuda" or not get_cell(cell).fused:
        return "stacked"
    return "per_model"


# --- one model of a group ------------------------------------------------------------------------------
@dataclass
class _Member:
    """One model of a group with everything its separate run would own."""

    index: int
    config: Config
    task: Any
    model: Any  # SequenceModel
    optimizer: torch.optim.Optimizer
    client: Any
    run_id: str
    hidden: int
    loaders: dict[str, Any]
    train_gen: torch.Generator  # the train DataLoader's shuffling generator
    cpu_rng: torch.Generator  # replays the global CPU RNG stream of a separate run
    noise_rng: torch.Generator  # weight noise: cpu_rng on the CPU, the device's stream on CUDA
    probe: dict[str, torch.Tensor] | None  # the gradient-flow probe batch (train.gradient_flow)
    status: str = "active"  # active | steps_done (max_steps hit) | stopped (done training) | failed | finished
    epoch: int = 0  # epochs completed (validated)
    global_step: int = 0
    train_time_steps: int = 0
    train_seconds: float = 0.0
    wall_offset: float = 0.0  # wall seconds of earlier sessions (resumed runs)
    es_best: float = math.inf
    es_wait: int = 0
    ckpt_best: float | None = None  # ModelCheckpoint's best score
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    sums: dict[str, list[Any]] = field(default_factory=dict)  # name -> [sum, count] (float64 tensors)
    noise: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    reason: str | None = None
    final: dict[str, float] = field(default_factory=dict)
    logged: set[int] = field(default_factory=set)  # epochs of `history` that MLflow holds

    @property
    def monitor(self) -> str:
        return f"val_{self.task.primary_metric}"

    @property
    def ckpt_path(self) -> Path:
        return Path(self.config.tracking.checkpoint_dir) / self.run_id / CHECKPOINT_NAME

    # weight noise exactly as SequenceModel._add_weight_noise, from this model's own RNG stream
    def add_weight_noise(self) -> None:
        std = self.config.train.weight_noise
        if std <= 0:
            return
        with torch.no_grad():
            for p in self.model.rnn.parameters():
                if p.requires_grad:
                    noise = torch.randn(p.shape, generator=self.noise_rng, dtype=p.dtype, device=p.device) * std
                    p.add_(noise)
                    self.noise.append((p, noise))

    def remove_weight_noise(self) -> None:
        with torch.no_grad():
            for p, noise in self.noise:
                p.sub_(noise)
        self.noise.clear()

    def accumulate(self, split: str, out: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        """As SequenceModel._accumulate: the metric sums of `out` on `batch`, added to the split's."""
        self.add_sums(split, self.task.metric_sums(out, batch))

    def add_sums(self, split: str, sums: dict[str, tuple[torch.Tensor, Any]]) -> None:
        for name, (s, n) in sums.items():
            acc = self.sums.setdefault(f"{split}_{name}", [0.0, 0.0])
            acc[0] = acc[0] + s.detach().double()
            acc[1] = acc[1] + torch.as_tensor(n).double()

    def split_values(self, split: str) -> dict[str, float]:
        """As SequenceModel._log_split: sum / count per metric, then the task's baselines."""
        values = {}
        for key in [k for k in self.sums if k.startswith(split + "_")]:
            s, n = (float(v) for v in self.sums.pop(key))
            values[key] = _as_logged(s / n) if n > 0 else math.nan
        task_split = {"final_train": "train", "final_val": "val"}.get(split, split)
        for name, value in self.task.baselines(task_split).items():
            values[f"{split}_{name}"] = _as_logged(value)
        return values

    def log_unlogged(self) -> None:
        """Write to MLflow every epoch of `history` it lacks (each epoch is checkpointed first)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for epoch, values in enumerate(self.history):
            if epoch not in self.logged:
                self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, epoch) for k, v in values.items()])
                self.logged.add(epoch)

    def best_epoch(self) -> int:
        scores = [h.get(self.monitor, float("inf")) for h in self.history]
        return min(range(len(scores)), key=scores.__getitem__) if scores else -1

    # checkpoint of everything needed to continue exactly (written at each epoch's end)
    def save(self) -> None:
        self.ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "best_state": self.best_state,
            "rng": {
                "train_gen": self.train_gen.get_state(),
                "cpu_rng": self.cpu_rng.get_state(),
                "noise_rng": self.noise_rng.get_state(),
            },
            **{
                k: getattr(self, k)
                for k in ("status", "epoch", "global_step", "train_time_steps", "train_seconds", "es_best", "es_wait", "ckpt_best", "history", "epoch_seconds")
            },
        }
        state["wall_offset"] = self.history[-1]["wall_seconds"] if self.history else self.wall_offset
        checkpoints.save(state, self.ckpt_path)  # atomic: a kill leaves the previous epoch's file whole

    def load(self) -> None:
        # weights_only: tensors and plain data only (everything save() writes), never code from the file
        state = checkpoints.load(self.ckpt_path, map_location=next(self.model.parameters()).device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.best_state = state["best_state"]
        self.train_gen.set_state(state["rng"]["train_gen"].cpu())
        self.cpu_rng.set_state(state["rng"]["cpu_rng"].cpu())
        if self.noise_rng is not self.cpu_rng:
            self.noise_rng.set_state(state["rng"]["noise_rng"].cpu())
        for k in ("status", "epoch", "global_step", "train_time_steps", "train_seconds", "es_best", "es_wait", "ckpt_best", "history", "epoch_seconds", "wall_offset"):
            setattr(self, k, state[k])


def _as_logged(value: float) -> float:
    """A value as train() records it: LightningModule.log stores Python floats as float32 tensors
    (in 64-bit runs too), and early stopping and checkpointing compare those."""
    return float(torch.tensor(value, dtype=torch.float32))


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Lightning's 64-true runs each step with float64 as the default dtype; so do we."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _to(batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Move a batch to the device; floating tensors to the run's precision (Lightning's convert_input)."""
    return {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)) for k, v in batch.items()}


def _fail_run(client: Any, run_id: str, reason: str, ckpt_folder: Path | None = None) -> str:
    from mlflow.entities import RunTag

    if ckpt_folder is not None:  # nothing resumes a FAILED run (a sweep starts its point afresh)
        checkpoints.remove_folder(ckpt_folder)
    reason = " ".join(reason.split())[:500]
    client.log_batch(run_id, tags=[RunTag("failure_reason", reason)])
    client.set_terminated(run_id, "FAILED")
    return reason


# --- the group trainer ---------------------------------------------------------------------------------
class _Group:
    """K members trained in lockstep: one batch of each per step, one validation of each per epoch."""

    def __init__(
        self, members: list[_Member], cell: str, device: torch.device, dtype: torch.dtype, progress: bool, recurrence: str
    ) -> None:
        self.members, self.cell, self.device, self.dtype = members, cell, device, dtype
        self.recurrence = recurrence
        self.progress = progress
        self.t_fit = time.perf_counter()

    def active(self) -> list[_Member]:
        return [m for m in self.members if m.status == "active"]

    def fit(self) -> None:
        """Train every active member until it stops (max_epochs/max_steps/early stopping) or fails."""
        from tqdm import tqdm

        first = self.members[0].config.train
        n_batches = self._n_batches("train", first.limit_train_batches)
        epochs_left = max((first.max_epochs - m.epoch for m in self.active()), default=0)
        bar = tqdm(total=epochs_left * n_batches, disable=not self.progress, unit="step", desc=f"{len(self.members)}×{self.cell}")
        try:
            while self.active():
                self._epoch(n_batches, bar)
        finally:
            bar.close()

    def _n_batches(self, split: str, limit: int | None) -> int:
        n = len(self.members[0].loaders[split])
        return n if limit is None else min(n, limit)

    def _epoch(self, n_batches: int, bar: Any) -> None:
        """One epoch of every active member (each its own epoch number), then their validation."""
        t0 = time.perf_counter()
        members = self.active()
        iters = {m.index: iter(m.loaders["train"]) for m in members}
        steps = dict.fromkeys(iters, 0)
        for _ in range(n_batches):
            running = [m for m in members if m.status == "active"]
            if not running:
                break
            batches = [_to(next(iters[m.index]), self.device, self.dtype) for m in running]
            b0 = time.perf_counter()
            self._train_step(running, batches)
            seconds = time.perf_counter() - b0
            for m in running:
                if m.status == "failed":
                    _fail_run(m.client, m.run_id, m.reason or "", m.ckpt_path.parent)
                    continue
                m.train_seconds += seconds
                steps[m.index] += 1
                if m.config.train.max_steps != -1 and m.global_step >= m.config.train.max_steps:
                    m.status = "steps_done"  # as Lightning: a partial epoch is not validated
            bar.update(1)
            bar.set_postfix(models=f"{len(self.active())}/{len(self.members)}")
        # Validated: those that ran the whole epoch (also when max_steps falls on its last batch).
        validated = [m for m in members if m.status in ("active", "steps_done") and steps[m.index] == n_batches]
        self._validate(validated)
        seconds = time.perf_counter() - t0
        for m in validated:
            self._end_epoch(m, seconds)
        for m in members:
            if m.status == "steps_done":  # stopped inside the epoch: no validation, no epoch record
                m.status = "stopped"
                m.save()

    def _train_step(self, running: list[_Member], batches: list[dict[str, torch.Tensor]]) -> None:
        """One optimizer step of each running member: noisy forward together, per-model loss/clip/update."""
        with _default_dtype(self.dtype):
            for m in running:
                m.add_weight_noise()
            outs = group_forward([m.model for m in running], self.cell, [b["x"] for b in batches], self.recurrence)
            pairs = [m.task.loss_and_sums(out, b) for m, out, b in zip(running, outs, batches)]
            losses = [loss for loss, _ in pairs]
            finite = torch.isfinite(torch.stack([l.detach() for l in losses]))
            ok = [bool(v) for v in finite.tolist()]
            total: torch.Tensor | None = None
            for m, (loss, sums), b, good in zip(running, pairs, batches, ok):
                if not good:
                    m.remove_weight_noise()
                    m.status = "failed"
                    m.reason = f"training loss became {loss.item()} at epoch {m.epoch}, step {m.global_step}"
                    continue
                m.add_sums("train", sums)
                m.train_time_steps += m.task.time_steps(b)
                total = loss if total is None else total + loss
        if total is None:
            return
        total.backward()
        for m, good in zip(running, ok):
            if not good:
                continue
            m.remove_weight_noise()
            clip = m.config.train.grad_clip
            params = [p for g in m.optimizer.param_groups for p in g["params"]]
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            m.optimizer.step()
            m.optimizer.zero_grad()
            m.global_step += 1

    @torch.no_grad()
    def evaluate(self, members: list[_Member], split: str, loader_key: str) -> None:
        """Accumulate `split` metric sums of each member over its `loader_key` loader, all members at once."""
        if not members:
            return
        limit = members[0].config.train.limit_eval_batches
        iters = [itertools.islice(iter(m.loaders[loader_key]), limit) for m in members]
        with _default_dtype(self.dtype):
            for raw in zip(*iters, strict=True):
                batches = [_to(b, self.device, self.dtype) for b in raw]
                outs = group_forward([m.model for m in members], self.cell, [b["x"] for b in batches], self.recurrence)
                for m, out, b in zip(members, outs, batches):
                    m.accumulate(split, out, b)

    def _validate(self, members: list[_Member]) -> None:
        self.evaluate(members, "val", "val")

    def _end_epoch(self, m: _Member, seconds: float) -> None:
        """Record the epoch, take ModelCheckpoint's and EarlyStopping's decisions, checkpoint, then log it
        (as EpochRecorder: a kill between the two loses nothing, the resume writes what MLflow lacks)."""
        values = {**m.split_values("train"), **m.split_values("val")}
        values.update(epoch_seconds=seconds, wall_seconds=m.wall_offset + time.perf_counter() - self.t_fit,
                      updates=float(m.global_step))
        m.history.append(values)
        m.epoch_seconds.append(seconds)

        current = values[m.monitor]
        score = math.inf if math.isnan(current) else current  # ModelCheckpoint treats NaN as the worst
        if m.ckpt_best is None or score < m.ckpt_best:
            m.ckpt_best = score
            m.best_state = {k: v.detach().clone() for k, v in m.model.state_dict().items()}
        patience = m.config.train.early_stopping_patience
        if patience is not None:
            if not math.isfinite(current):
                m.status = "stopped"
            elif current < m.es_best:
                m.es_best, m.es_wait = current, 0
            else:
                m.es_wait += 1
                if m.es_wait >= patience:
                    m.status = "stopped"
        m.epoch += 1
        if m.status == "steps_done" or (m.status == "active" and m.epoch >= m.config.train.max_epochs):
            m.status = "stopped"
        m.save()
        m.log_unlogged()

    def finish(self, setup_seconds: float) -> None:
        """Score every stopped member with its best-validation state (test, final_val, final_train)."""
        done = [m for m in self.members if m.status == "stopped"]
        for m in done:
            if m.best_state is not None:
                m.model.load_state_dict(m.best_state)
        for split, key in (("test", "test"), ("final_val", "val"), ("final_train", "final_train")):
            self.evaluate(done, split, key)
            for m in done:
                m.final.update(m.split_values(split))
        if done and done[0].probe is not None:
            from rnnbench.train import _gradient_flow

            for m in done:  # as train(): the probe again, with the best-validation weights
                _gradient_flow(m.client, m.run_id, m.model, m.task, m.probe, "trained")
        for m in done:
            best = m.best_epoch()
            spe = sum(m.epoch_seconds) / len(m.epoch_seconds) if m.epoch_seconds else math.nan
            m.final.update(
                epochs=float(len(m.history)),
                best_epoch=float(best),
                best_val=float(m.ckpt_best) if m.ckpt_best is not None else math.nan,
                seconds_per_epoch=spe,
                seconds_to_best=m.history[best]["wall_seconds"] if 0 <= best < len(m.history) else math.nan,
                time_steps_per_second=m.train_time_steps / max(m.train_seconds, 1e-9),
                setup_seconds=setup_seconds,
                n_params_recurrent=float(m.model.counts["recurrent"]),
                n_params_total=float(m.model.counts["total"]),
                hidden_size=float(m.hidden),
            )


def _build_member(
    index: int,
    config: Config,
    *,
    client: Any,
    run_id: str | None,
    experiment_id: str,
    tags: dict[str, str],
    device: torch.device,
    dtype: torch.dtype,
    batched: int,
) -> _Member:
    """Everything `train()` builds for one run, in the same order (so the same random numbers)."""
    from lightning.pytorch import seed_everything
    from mlflow.entities import Param, RunTag
    from torch.utils.data import DataLoader

    from rnnbench.analysis.gradient_flow import probe_batch
    from rnnbench.model import SequenceModel
    from rnnbench.tasks import get_task
    from rnnbench.tracking import git_commit
    from rnnbench.train import _gradient_flow

    t = config.train
    task = get_task(config.task.name)(config.task, seed=t.seed)
    hidden = resolve_hidden_size(config, task.input_size, task.output_size)
    config = config.model_copy(deep=True)
    config.model.hidden_size = hidden
    resuming = run_id is not None
    if run_id is None:
        run_tags = {
            "git_commit": git_commit(),
            "torch_version": torch.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "cell": config.model.cell,
            "task": config.task.name,
            "seed": str(t.seed),
            "config_hash": config.config_hash(),
            "batched": str(batched),
            **tags,
        }
        run_id = client.create_run(experiment_id, tags=run_tags, run_name=config.tracking.run_name).info.run_id
    else:
        client.update_run(run_id, status="RUNNING")

    seed_everything(t.seed, workers=True, verbose=False)
    model = SequenceModel(config, task, hidden)
    has_params = resuming and bool(client.get_run(run_id).data.params)
    if not has_params:
        params = {**config.flat(), **{f"task.{k}": v for k, v in task.describe().items()}}
        # a group runs its K recurrences in parallel over the process's threads (not train.threads' rule)
        params.update(n_params_recurrent=model.counts["recurrent"], n_params_total=model.counts["total"],
                      threads_used=torch.get_num_threads())
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()],
                         tags=[RunTag("recurrence", _group_recurrence(config.model.cell, device, dtype))])
        client.log_text(run_id, yaml.safe_dump(config.to_dict(), sort_keys=False), "config.yaml")
    data = task.datasets()
    probe = probe_batch(task, data["test"]) if t.gradient_flow else None
    if probe is not None and not has_params:
        _gradient_flow(client, run_id, model, task, probe, "init")
    # The global RNG as a separate run would see it from here on: weight noise and the validation
    # loader's base-seed draw come from it, in this order, epoch after epoch.
    cpu_rng = torch.Generator().set_state(torch.get_rng_state())
    if device.type == "cuda":
        noise_rng = torch.Generator(device=device).set_state(torch.cuda.get_rng_state(device))
    else:
        noise_rng = cpu_rng
    model = model.to(device=device, dtype=dtype)  # Lightning's 64-true: module.double(), before the optimizer
    optimizer = model.configure_optimizers()
    train_gen = torch.Generator().manual_seed(t.seed)
    kw: dict[str, Any] = dict(batch_size=t.batch_size, collate_fn=task.collate)
    loaders = {
        "train": DataLoader(data["train"], shuffle=True, generator=train_gen, drop_last=False, **kw),
        "val": DataLoader(data["val"], generator=cpu_rng, **kw),  # generator: the base-seed draw only
        "test": DataLoader(data["test"], **kw),
        "final_train": DataLoader(data["train"], **kw),
    }
    member = _Member(index, config, task, model, optimizer, client, run_id, hidden, loaders, train_gen, cpu_rng, noise_rng, probe)
    if resuming:
        member.logged = {m.step for m in client.get_metric_history(run_id, "epoch_seconds")}
    if resuming and member.ckpt_path.is_file():
        try:
            member.load()
        except checkpoints.CheckpointError as e:  # recorded in the run, then one line for the caller
            _fail_run(client, run_id, f"cannot resume run {run_id}: {e}", member.ckpt_path.parent)
            raise RnnbenchError(f"cannot resume run {run_id}: {e}") from None
        member.status = "active" if member.status in ("active", "steps_done") else "stopped"
        member.log_unlogged()  # epochs checkpointed by the interrupted process but not yet logged
    return member


def train_many(
    configs: list[Config],
    *,
    run_ids: list[str | None] | None = None,
    experiment_id: str | None = None,
    tags: list[dict[str, str]] | None = None,
    recurrence: str = "auto",
) -> list[RunResult]:
    """Train K configs of one group (equal `group_key`) together; one MLflow run each, as `train()` records.

    run_ids[k] continues run k from its `batched_last.pt` (or starts it afresh in that run); tags[k]
    are added to run k's tags. recurrence: 'stacked', 'per_model' or 'auto' (`choose_recurrence`).
    Returns one RunResult per config, in order. A diverged model ends FAILED while the others go
    on; an error of the whole group fails every unfinished run.
    """
    from mlflow.tracking import MlflowClient

    from rnnbench.train import _quiet_lightning
    from rnnbench.tracking import prepare_store, resolve_tracking_uri

    if not configs:
        return []
    K = len(configs)
    run_ids = list(run_ids) if run_ids is not None else [None] * K
    tags = list(tags) if tags is not None else [{} for _ in range(K)]
    if len(run_ids) != K or len(tags) != K:
        raise RnnbenchError(f"train_many: {K} configs but {len(run_ids)} run_ids and {len(tags)} tag sets")
    key = group_key(configs[0])
    for c in configs[1:]:
        if group_key(c) != key:
            differ = sorted(set(group_key(c)) ^ set(key))
            raise RnnbenchError(f"train_many: configs differ beyond train.seed/train.lr/tracking (in {differ[0][0]!r})")
    cell = configs[0].model.cell
    if cell not in _LAYERS:
        raise RnnbenchError(f"cell {cell!r} has no batched form; batched cells: {', '.join(BATCHED_CELLS)}")
    _quiet_lightning()
    keep_freed_memory()

    t_setup = time.perf_counter()
    t = configs[0].train
    if t.device == "cuda" and not torch.cuda.is_available():
        raise RnnbenchError("train.device=cuda but no CUDA device is available")
    use_cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    dtype = torch.float64 if t.precision == "64" else torch.float32
    if recurrence == "auto":
        recurrence = choose_recurrence(cell, device)
    if recurrence not in ("stacked", "per_model"):
        raise RnnbenchError(f"train_many: recurrence must be 'auto', 'stacked' or 'per_model', not {recurrence!r}")

    clients: dict[str, Any] = {}
    experiments: dict[tuple[str, str], str] = {}
    members: list[_Member] = []
    started: list[tuple[Any, str]] = []  # runs created or reopened so far: closed on an error
    group: _Group | None = None
    try:
        for k, config in enumerate(configs):
            uri = resolve_tracking_uri(config.tracking.tracking_uri)
            client = clients.setdefault(uri, MlflowClient(tracking_uri=uri))
            exp = experiment_id or experiments.setdefault((uri, config.tracking.experiment), prepare_store(uri, config.tracking.experiment))
            m = _build_member(k, config, client=client, run_id=run_ids[k], experiment_id=exp, tags=tags[k], device=device, dtype=dtype, batched=K)
            members.append(m)
            started.append((client, m.run_id))
        setup_seconds = time.perf_counter() - t_setup
        group = _Group(members, cell, device, dtype, any(c.train.progress_bar for c in configs), recurrence)
        group.fit()
        group.finish(setup_seconds)
    except KeyboardInterrupt:
        for m in members:
            if m.status not in ("failed", "finished"):
                m.client.set_terminated(m.run_id, "KILLED")
        raise
    except Exception as e:  # noqa: BLE001 - recorded in every unfinished run, as train() does
        reason = str(e) if isinstance(e, RnnbenchError) else f"{type(e).__name__}: {e}".strip()
        failed = {m.run_id: m.reason for m in members if m.status == "failed"}
        folders = {m.run_id: m.ckpt_path.parent for m in members}
        results = [
            RunResult(run_id, "FAILED", reason=failed[run_id] if run_id in failed
                      else _fail_run(client, run_id, reason, folders.get(run_id)))
            for client, run_id in started
        ]
        if isinstance(e, RnnbenchError) or len(started) < K:
            raise
        return results

    from mlflow.entities import Metric

    results = []
    for m in members:
        if m.status == "failed":  # recorded when it diverged
            results.append(RunResult(m.run_id, "FAILED", reason=" ".join((m.reason or "").split())[:500]))
            continue
        now = int(time.time() * 1000)
        m.client.log_batch(m.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in m.final.items()])
        m.client.set_terminated(m.run_id, "FINISHED")
        m.status = "finished"
        results.append(RunResult(m.run_id, "FINISHED", dict(m.final)))
    return results


# --- throughput probe ------------------------------------------------------------------------------------
def throughput_many(
    cell: str,
    K: int,
    *,
    seq_len: int = 200,
    batch_size: int = 32,
    input_size: int = 88,
    hidden_size: int = 36,
    steps: int = 3,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    recurrence: str = "auto",
    unequal_lengths: bool = False,
) -> dict[str, float]:
    """Training time steps per second of K models batched vs the same K models stepped one after another.

    unequal_lengths: model k's batches are T_k long, T_k spread evenly over [seq_len / 4, seq_len] (as
    K models' music batches differ), instead of all seq_len; steps/s count the real steps.

    A training step is forward, Bernoulli NLL on random 0/1 targets, backward, per-model clipping and
    an Adam step; the batched side runs `recurrence` ('auto': `choose_recurrence`, what train_many
    picks), the sequential side each model's own cell implementation (fused where it exists).
    Returns {'batched', 'sequential'} in time steps/s (best of `steps` interleaved rounds after one
    warm-up), 'speedup', and 'steps_per_round' (batch × the K lengths).
    """
    from rnnbench.cells import get_cell

    device = torch.device(device)
    bce = nn.functional.binary_cross_entropy_with_logits
    gen = torch.Generator().manual_seed(0)
    models = []
    for _ in range(K):
        m = nn.Module()
        m.rnn = get_cell(cell)(input_size, hidden_size)
        m.head = nn.Linear(hidden_size, input_size)
        models.append(m.to(device=device, dtype=dtype))
    opts = [torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-3) for m in models]
    lengths = [max(1, seq_len // 4 + (seq_len - seq_len // 4) * k // max(1, K - 1)) for k in range(K)] if unequal_lengths else [seq_len] * K
    xs = [torch.randn(batch_size, T, input_size, generator=gen).to(device, dtype) for T in lengths]
    ys = [(torch.rand(batch_size, T, input_size, generator=gen) < 0.1).to(device, dtype) for T in lengths]

    def update(k: int) -> None:
        torch.nn.utils.clip_grad_norm_([p for p in models[k].parameters() if p.requires_grad], 1.0)
        opts[k].step()
        opts[k].zero_grad()

    def sequential() -> None:
        for k, m in enumerate(models):
            bce(m.head(m.rnn(xs[k])[0]), ys[k]).backward()
            update(k)

    if recurrence == "auto":
        recurrence = choose_recurrence(cell, device)

    def batched() -> None:
        outs = group_forward(models, cell, xs, recurrence)
        sum(bce(o, y) for o, y in zip(outs, ys)).backward()  # type: ignore[union-attr]
        for k in range(K):
            update(k)

    def seconds(fn: Callable[[], None]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    sequential()  # warm-up
    batched()
    best = {"sequential": math.inf, "batched": math.inf}
    for _ in range(steps):  # interleaved, best of `steps`: robust to other load on the machine
        for name, fn in (("sequential", sequential), ("batched", batched)):
            best[name] = min(best[name], seconds(fn))
    seq, bat = (batch_size * sum(lengths) / best[name] for name in ("sequential", "batched"))
    return {"batched": bat, "sequential": seq, "speedup": bat / seq, "steps_per_round": float(batch_size * sum(lengths))}
