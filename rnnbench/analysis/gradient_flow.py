"""Gradient flow through time and gate saturation, for any RecurrentLayer.

The probe (Pascanu, Mikolov & Bengio 2013; the plot of Arjovsky et al. 2016, Fig. 4) measures
‖∂L_T/∂h_t‖ for t = 1 … T, where L_T is the loss at the last step only. The layer is run one step
at a time, handing each step's state to the next (the RecurrentLayer contract guarantees this equals
the full call), and the gradient is taken against those per-step state tensors. That is the point:
with a fused kernel (nn.RNN/LSTM/GRU) run over the whole sequence, the gradient with respect to its
output sequence at step t < T is only the direct path out_t -> loss, which is zero for a last-step
loss, because the recurrent path h_t -> h_{t+1} lives inside the kernel. Only per-step state
tensors expose it.

Norms are Frobenius norms over layers, batch and units of ∂L_T/∂h_t, h_t being the h part of the
state (all layers; for a stack, only the top layer feeds the loss at t = T). Summary: the smallest
distance d = T - t at which the norm is below 1e-3 of its value at t = T ("vanishing distance";
NaN when it never falls that far within the sequence).

Gate statistics (Karpathy, Johnson & Fei-Fei 2015): the fraction of gate activations below 0.1
(left-saturated) or above 0.9 (right-saturated), per gate, computed by re-running each cell's
equations from its weights (checked against the layer's own output). Weight layouts read from
rnnbench/cells:
  * lstm (fused, torch.nn.LSTM in `rnn.rnn`): weight_ih_l{k} (4H, D), weight_hh_l{k} (4H, H),
    bias_ih_l{k} + bias_hh_l{k} (4H; bias_hh frozen at 0), gate order i, f, g, o; gates i, f, o.
  * gru (fused, torch.nn.GRU in `rnn.rnn`, reset after): weight_ih_l{k} (3H, D), weight_hh_l{k}
    (3H, H), bias_ih_l{k}, bias_hh_l{k} (3H each, b_hn inside the reset product), order r, z, n;
    gates r, z.
  * lstm_peephole (`rnn.layers[k]`): weight_ih (4H, D), weight_hh (4H, H), bias (4H), order
    i, f, g, o; peepholes w_ci, w_cf (on c_{t-1}), w_co (on c_t); gates i, f, o.
  * gru_reset_before (`rnn.layers[k]`): weight_ih (3H, D), weight_hh (3H, H), bias (3H), order
    r, z, h~; gates r, z.
  * tanh: no gates.
"""

from __future__ import annotations

import io
import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

VANISH_RATIO = 1e-3
LOW, HIGH = 0.1, 0.9


def gradient_flow(
    model_rnn: nn.Module,
    head: nn.Module,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
) -> np.ndarray:
    """‖∂L_T/∂h_t‖ for t = 1 … T (index t - 1), the loss taken at the last step only.

    `loss_fn` receives the head's output for all T steps, (B, T, O); only step T carries gradient
    (earlier steps are computed without a graph), so whatever the loss sums over, the gradient is
    that of its last-step term. Steps run one at a time with the state passed along (Pascanu et
    al. 2013, eq. 5: ∂L_T/∂h_t = ∂L_T/∂h_T Π_{k=t+1..T} ∂h_k/∂h_{k-1}).
    """
    param = next(model_rnn.parameters())
    x = x.to(device=param.device, dtype=param.dtype).detach().requires_grad_(True)  # states need a graph
    T = x.shape[1]
    with torch.enable_grad():
        state: Any = None
        hs: list[torch.Tensor] = []
        outs: list[torch.Tensor] = []
        for t in range(T):
            out, state = model_rnn(x[:, t : t + 1], state)
            hs.append(state[0] if isinstance(state, tuple) else state)  # h of (h, c)
            outs.append(out.detach())
        with torch.no_grad():
            early = [head(o) for o in outs[:-1]]
        last = head(hs[-1][-1]).unsqueeze(1)  # from the state tensor h_T itself, so ∂L/∂h_T is seen
        loss = loss_fn(torch.cat([*early, last], dim=1))
        grads = torch.autograd.grad(loss, hs, allow_unused=True)
    return np.array([0.0 if g is None else float(g.double().norm()) for g in grads])


def vanishing_distance(norms: np.ndarray, ratio: float = VANISH_RATIO) -> float:
    """Smallest d = T - t with norm_t < ratio · norm_T; NaN if it never gets there (or norm_T is 0)."""
    norms = np.asarray(norms, dtype=float)
    last = norms[-1]
    if not last > 0:
        return math.nan
    below = np.nonzero(norms[::-1] < ratio * last)[0]  # index in reversed order = distance
    return float(below[0]) if len(below) else math.nan


def flow_summary(norms: np.ndarray) -> dict[str, float]:
    """Summary numbers of one probe: steps, ‖∂L/∂h_T‖, ‖∂L/∂h_1‖, log10 ratio, vanishing distance."""
    norms = np.asarray(norms, dtype=float)
    first, last = float(norms[0]), float(norms[-1])
    ratio = math.log10(first / last) if first > 0 and last > 0 else math.nan
    return {
        "steps": float(len(norms)),
        "norm_last": last,
        "norm_first": first,
        "log10_first_over_last": ratio,
        "vanish_distance": vanishing_distance(norms),
    }


# --- gates -----------------------------------------------------------------------------------------


def _fused_weights(rnn: nn.Module, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    m = rnn.rnn
    return (getattr(m, f"weight_ih_l{k}"), getattr(m, f"weight_hh_l{k}"), getattr(m, f"bias_ih_l{k}"),
            getattr(m, f"bias_hh_l{k}"))


def _run_gates(rnn: nn.Module, x: torch.Tensor) -> tuple[dict[tuple[int, str], torch.Tensor], torch.Tensor]:
    """Re-run the cell's equations from its weights: ({(layer, gate): (B, T, H)}, top-layer h (B, T, H))."""
    name = getattr(rnn, "name", "")
    B, T, _ = x.shape
    H = rnn.hidden_size
    gates: dict[tuple[int, str], list[torch.Tensor]] = {}
    inp = x
    for k in range(rnn.num_layers):
        h = x.new_zeros(B, H)
        c = x.new_zeros(B, H)
        outs = []
        for t in range(T):
            xt = inp[:, t]
            if name == "lstm":
                w_ih, w_hh, b_ih, b_hh = _fused_weights(rnn, k)
                a_i, a_f, a_g, a_o = (xt @ w_ih.T + b_ih + h @ w_hh.T + b_hh).chunk(4, dim=1)
                i, f, o = torch.sigmoid(a_i), torch.sigmoid(a_f), torch.sigmoid(a_o)
                c = f * c + i * torch.tanh(a_g)
                h = o * torch.tanh(c)
                step = {"input": i, "forget": f, "output": o}
            elif name == "lstm_peephole":
                L = rnn.layers[k]
                a_i, a_f, a_g, a_o = (xt @ L.weight_ih.T + L.bias + h @ L.weight_hh.T).chunk(4, dim=1)
                i = torch.sigmoid(a_i + L.w_ci * c)
                f = torch.sigmoid(a_f + L.w_cf * c)
                c = f * c + i * torch.tanh(a_g)
                o = torch.sigmoid(a_o + L.w_co * c)
                h = o * torch.tanh(c)
                step = {"input": i, "forget": f, "output": o}
            elif name == "gru":
                w_ih, w_hh, b_ih, b_hh = _fused_weights(rnn, k)
                xi_r, xi_z, xi_n = (xt @ w_ih.T + b_ih).chunk(3, dim=1)
                hh_r, hh_z, hh_n = (h @ w_hh.T + b_hh).chunk(3, dim=1)
                r, z = torch.sigmoid(xi_r + hh_r), torch.sigmoid(xi_z + hh_z)
                n = torch.tanh(xi_n + r * hh_n)
                h = (1 - z) * n + z * h
                step = {"reset": r, "update": z}
            elif name == "gru_reset_before":
                L = rnn.layers[k]
                a = xt @ L.weight_ih.T + L.bias
                r, z = torch.sigmoid(a[:, : 2 * H] + h @ L.weight_hh[: 2 * H].T).chunk(2, dim=1)
                h_tilde = torch.tanh(a[:, 2 * H :] + (r * h) @ L.weight_hh[2 * H :].T)
                h = (1 - z) * h + z * h_tilde
                step = {"reset": r, "update": z}
            else:
                raise ValueError(f"no gate equations for cell {name!r} (gated cells: lstm, lstm_peephole, gru, gru_reset_before)")
            for g, v in step.items():
                gates.setdefault((k, g), []).append(v)
            outs.append(h)
        inp = torch.stack(outs, dim=1)
    return {key: torch.stack(v, dim=1) for key, v in gates.items()}, inp


GATED_CELLS = ("lstm", "lstm_peephole", "gru", "gru_reset_before")
GATE_COLUMNS = ["layer", "gate", "frac_low", "frac_high", "frac_saturated", "mean"]


@torch.no_grad()
def gate_statistics(rnn: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None,
                    check: bool = True) -> pd.DataFrame:
    """Per layer and gate: fraction of activations < 0.1, > 0.9, either (saturated), and the mean.

    Re-runs the equations from the layer's weights (layouts in the module docstring); with `check`,
    asserts that the re-run reproduces the layer's own output, so a changed layout cannot go
    unnoticed. `mask` (B, T) bool restricts the counts to valid steps. Empty for ungated cells.
    """
    if getattr(rnn, "name", "") not in GATED_CELLS:
        return pd.DataFrame(columns=GATE_COLUMNS)
    param = next(rnn.parameters())
    x = x.to(device=param.device, dtype=param.dtype)
    gates, h = _run_gates(rnn, x)
    if check:
        out, _ = rnn(x)
        if not torch.allclose(out, h, atol=1e-3 if x.dtype == torch.float32 else 1e-8, rtol=1e-3):
            raise AssertionError(f"re-run of {rnn.name} equations differs from the layer's output: weight layout changed?")
    keep = None if mask is None else mask.to(param.device).bool()
    rows = []
    for (k, g), v in sorted(gates.items()):
        vals = v[keep] if keep is not None else v.reshape(-1, v.shape[-1])
        vals = vals.reshape(-1).double()
        low = float((vals < LOW).double().mean())
        high = float((vals > HIGH).double().mean())
        rows.append(dict(layer=k, gate=g, frac_low=low, frac_high=high, frac_saturated=low + high, mean=float(vals.mean())))
    return pd.DataFrame(rows, columns=GATE_COLUMNS)


# --- what train.py calls ---------------------------------------------------------------------------


def probe_batch(task: Any, dataset: Any, n: int = 16) -> dict[str, torch.Tensor]:
    """A fixed probe batch (no randomness): `n` items of `dataset` collated by the task.

    Fixed-length tasks (copy, adding): the first n items. Variable-length tasks (a `mask` in the
    batch: music, speech): the n longest items (ties by index), since the probe crops the batch to
    its shortest sequence.
    """
    first = task.collate([dataset[i] for i in range(min(n, len(dataset)))])
    if "mask" not in first:
        return first
    lengths = [int(task.collate([dataset[i]])["mask"].sum()) for i in range(len(dataset))]
    longest = sorted(range(len(dataset)), key=lambda i: (-lengths[i], i))[:n]
    return task.collate([dataset[i] for i in sorted(longest)])


def crop_to_common_length(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """With a `mask`, cut every (B, T, ...) tensor to the shortest sequence, so step T is real for all."""
    if "mask" not in batch:
        return batch
    T_full = batch["x"].shape[1]
    T = int(batch["mask"].sum(1).min())
    if T == T_full:
        return batch
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v) and v.dim() >= 2 and v.shape[1] == T_full:
            out[k] = v[:, :T]
        elif k == "lengths":
            out[k] = torch.full_like(v, T)
        else:
            out[k] = v
    return out


def log_gradient_flow(client: Any, run_id: str, rnn: nn.Module, head: nn.Module, task: Any,
                      batch: dict[str, torch.Tensor], tag: str) -> dict[str, float]:
    """Probe `rnn`+`head` on `batch` with the task's own loss at the last step; log to the MLflow run.

    Metrics (step 0): gradflow_<tag>_{steps, norm_last, norm_first, log10_first_over_last,
    vanish_distance} and, for gated cells, gradflow_<tag>_sat_<gate> (saturated fraction over all
    layers). Artifacts: gradient_flow/<tag>.csv (t, distance, grad_norm, relative) and
    gradient_flow/<tag>_gates.csv. Returns the logged metrics.
    """
    from mlflow.entities import Metric

    param = next(rnn.parameters())
    batch = {k: (v.to(param.device) if torch.is_tensor(v) else v) for k, v in crop_to_common_length(batch).items()}
    norms = gradient_flow(rnn, head, lambda y: task.loss(y, batch), batch["x"])
    summary = {f"gradflow_{tag}_{k}": v for k, v in flow_summary(norms).items()}
    T = len(norms)
    curve = pd.DataFrame({
        "t": np.arange(1, T + 1), "distance": np.arange(T - 1, -1, -1), "grad_norm": norms,
        "relative": norms / norms[-1] if norms[-1] > 0 else np.full(T, np.nan),
    })
    try:
        gates = gate_statistics(rnn, batch["x"], batch.get("mask"))
    except AssertionError as e:  # the probe must not fail a training run: no gate numbers, and say why
        warnings.warn(str(e), stacklevel=2)
        gates = pd.DataFrame(columns=GATE_COLUMNS)
    for gate, part in gates.groupby("gate", sort=True):
        summary[f"gradflow_{tag}_sat_{gate}"] = float(part["frac_saturated"].mean())
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in sorted(summary.items())])
    client.log_text(run_id, _csv(curve), f"gradient_flow/{tag}.csv")
    if not gates.empty:
        client.log_text(run_id, _csv(gates), f"gradient_flow/{tag}_gates.csv")
    return summary


def _csv(frame: pd.DataFrame) -> str:
    buf = io.StringIO()
    frame.to_csv(buf, index=False, float_format="%.8g", lineterminator="\n")
    return buf.getvalue()
