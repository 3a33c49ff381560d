"""Gradient flow through time and gate saturation, for any registered cell, on one member's weights.

The probe (Pascanu, Mikolov & Bengio 2013; the plot of Arjovsky et al. 2016, Fig. 4) measures
‖∂L_T/∂h_t‖ for t = 1 … T, where L_T is the loss at the last step only. The cell's reference `step`
runs one step at a time (rnnbench.cells.run_steps), all layers at each step, and the gradient is
taken against those per-step h tensors. That is the point: through a fused or compiled loop run
over the whole sequence, the gradient with respect to its output at step t < T is only the direct
path out_t -> loss, which is zero for a last-step loss, because the recurrent path h_t -> h_{t+1}
lives inside the loop. Only per-step state tensors expose it.

Norms are Frobenius norms over layers, batch and units of ∂L_T/∂h_t (the total derivative with
respect to each layer's h_t). Summary: the smallest distance d = T - t at which the norm is below
1e-3 of its value at t = T ("vanishing distance"; NaN when it never falls that far within the sequence).

Gate statistics (Karpathy, Johnson & Fei-Fei 2015): the fraction of gate activations below 0.1
(left-saturated) or above 0.9 (right-saturated), per gate the cell names (`Cell.gates`), from the
same step-by-step run, checked against the cell's `run` (its fast loop where it has one).

Weights: one member, as the cell API stacks them: a list per layer of {name: (1, ...)} tensors.
`probe` computes; the caller (the run recorder) writes its metrics and CSV texts.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch

from rnnbench.cells import Weights, get_cell, run, run_steps

VANISH_RATIO = 1e-3
LOW, HIGH = 0.1, 0.9


Head = Callable[[torch.Tensor], torch.Tensor]  # h (1, B, T, H) -> outputs (1, B, T, O)


def _like(layers: list[Weights], x: torch.Tensor) -> torch.Tensor:
    w = next(iter(layers[0].values()))
    return x.to(device=w.device, dtype=w.dtype)


def gradient_flow(cell: str, layers: list[Weights], head: Head, loss_fn: Callable[[torch.Tensor], torch.Tensor],
                  x: torch.Tensor) -> np.ndarray:
    """‖∂L_T/∂h_t‖ for t = 1 … T (index t - 1), the loss taken at the last step only; x (B, T, D).

    `loss_fn` receives the head's output for all T steps, (1, B, T, O), and returns a scalar; only
    step T carries gradient (earlier steps are computed without a graph), so whatever the loss sums
    over, the gradient is that of its last-step term (Pascanu et al. 2013, eq. 5:
    ∂L_T/∂h_t = ∂L_T/∂h_T Π_{k=t+1..T} ∂h_k/∂h_{k-1}).
    """
    x = _like(layers, x).detach().unsqueeze(0).requires_grad_(True)  # the states need a graph
    with torch.enable_grad():
        trace = run_steps(cell, layers, x)
        with torch.no_grad():
            early = head(trace.out[:, :, :-1])
        last = head(trace.hs[-1][-1].unsqueeze(2))  # from the state tensor h_T itself, so ∂L/∂h_T is seen
        loss = loss_fn(torch.cat([early, last], dim=2))
        flat = [h for row in trace.hs for h in row]
        grads = torch.autograd.grad(loss, flat, allow_unused=True)
    n_layers = len(layers)
    sq = [0.0 if g is None else float(g.double().pow(2).sum()) for g in grads]
    return np.sqrt([sum(sq[t * n_layers : (t + 1) * n_layers]) for t in range(len(trace.hs))])


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

GATE_COLUMNS = ["layer", "gate", "frac_low", "frac_high", "frac_saturated", "mean"]


@torch.no_grad()
def gate_statistics(cell: str, layers: list[Weights], x: torch.Tensor, mask: torch.Tensor | None = None,
                    check: bool = True) -> pd.DataFrame:
    """Per layer and gate: fraction of activations < 0.1, > 0.9, either (saturated), and the mean.

    x (B, T, D); `mask` (B, T) bool restricts the counts to valid steps. With `check`, the step-by-step
    run must reproduce the cell's `run` output (AssertionError otherwise). Empty for ungated cells.
    """
    cls = get_cell(cell)
    if not cls.gates:
        return pd.DataFrame(columns=GATE_COLUMNS)
    x = _like(layers, x).unsqueeze(0)
    trace = run_steps(cls, layers, x)
    if check:
        out, _ = run(cls, layers, x)
        if not torch.allclose(out, trace.out, atol=1e-3 if x.dtype == torch.float32 else 1e-8, rtol=1e-3):
            raise AssertionError(f"step-by-step run of {cls.name} differs from its run(): a loop and its step disagree")
    keep = None if mask is None else mask.to(x.device).bool()
    rows = []
    for (k, g), v in sorted(trace.gates.items()):
        v = v[0]  # (B, T, H) of the one member
        vals = (v[keep] if keep is not None else v.reshape(-1, v.shape[-1])).reshape(-1).double()
        low = float((vals < LOW).double().mean())
        high = float((vals > HIGH).double().mean())
        rows.append(dict(layer=k, gate=g, frac_low=low, frac_high=high, frac_saturated=low + high, mean=float(vals.mean())))
    return pd.DataFrame(rows, columns=GATE_COLUMNS)


# --- what the trainer calls ---------------------------------------------------------------------------


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


def probe(cell: str, layers: list[Weights], head: Head, loss_fn: Callable[[torch.Tensor, dict[str, Any]], torch.Tensor],
          batch: dict[str, Any], tag: str) -> tuple[dict[str, float], dict[str, str]]:
    """Probe one member (`layers` stacked with K = 1, `head`) on `batch` with a last-step loss.

    The batch (one member's, (B, T, ...)) is cropped to its shortest sequence and moved to the
    weights' device; `loss_fn(y, batch)` gets the head's output y (1, B, T, O) and that batch, and
    returns a scalar. Returns (metrics, artifacts) for the caller to record:
    metrics gradflow_<tag>_{steps, norm_last, norm_first, log10_first_over_last, vanish_distance} and,
    for gated cells, gradflow_<tag>_sat_<gate> (saturated fraction over all layers); artifacts
    {"gradient_flow/<tag>.csv": (t, distance, grad_norm, relative), "gradient_flow/<tag>_gates.csv": ...}
    as CSV texts (the gates file only for gated cells).
    """
    device = next(iter(layers[0].values())).device
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in crop_to_common_length(batch).items()}
    norms = gradient_flow(cell, layers, head, lambda y: loss_fn(y, batch), batch["x"])
    summary = {f"gradflow_{tag}_{k}": v for k, v in flow_summary(norms).items()}
    T = len(norms)
    curve = pd.DataFrame({
        "t": np.arange(1, T + 1), "distance": np.arange(T - 1, -1, -1), "grad_norm": norms,
        "relative": norms / norms[-1] if norms[-1] > 0 else np.full(T, np.nan),
    })
    try:
        gates = gate_statistics(cell, layers, batch["x"], batch.get("mask"))
    except AssertionError as e:  # the probe must not fail a training run: no gate numbers, and say why
        warnings.warn(str(e), stacklevel=2)
        gates = pd.DataFrame(columns=GATE_COLUMNS)
    for gate, part in gates.groupby("gate", sort=True):
        summary[f"gradflow_{tag}_sat_{gate}"] = float(part["frac_saturated"].mean())
    artifacts = {f"gradient_flow/{tag}.csv": _csv(curve)}
    if not gates.empty:
        artifacts[f"gradient_flow/{tag}_gates.csv"] = _csv(gates)
    return dict(sorted(summary.items())), artifacts


def _csv(frame: pd.DataFrame) -> str:
    buf = io.StringIO()
    frame.to_csv(buf, index=False, float_format="%.8g", lineterminator="\n")
    return buf.getvalue()
