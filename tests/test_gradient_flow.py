"""The gradient-flow probe against a hand-written tanh recurrence, and gate statistics, for every registered cell."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest
import torch

from rnnbench.analysis.gradient_flow import (
    flow_summary,
    gate_statistics,
    gradient_flow,
    probe,
    probe_batch,
    vanishing_distance,
)
from rnnbench.cells import CELLS, get_cell, init_weights, run

ALL = sorted(CELLS)
GATED = [c for c in ALL if CELLS[c].gates]


def member(cell: str, D: int, H: int, num_layers: int = 1, seed: int = 0, scale: float | None = None,
           dtype: torch.dtype = torch.float32) -> list[dict[str, torch.Tensor]]:
    """One member's weights, stacked with K = 1."""
    return init_weights(cell, D, H, num_layers, [torch.Generator().manual_seed(seed)], scale, 0.0, dtype)


def linear_head(H: int, O: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(O, H, generator=g, dtype=dtype) / math.sqrt(H)
    b = torch.randn(O, generator=g, dtype=dtype)
    return (lambda h: h @ W.T + b), W, b


def test_probe_equals_explicit_jacobian_product_of_a_tanh_recurrence() -> None:
    """∂L_T/∂h_t = w^T Π_{k=t+1..T} diag(1 - h_k²) W_h (Pascanu et al. 2013, eq. 5), written out."""
    B, T, D, H = 3, 15, 4, 6
    layers = member("tanh", D, H, dtype=torch.float64)
    layers[0]["weight_hh"].mul_(2.0)  # large enough that norms move by orders of magnitude
    head, W, _ = linear_head(H, 1, torch.float64)
    x = torch.randn(B, T, D, dtype=torch.float64)
    norms = gradient_flow("tanh", layers, head, lambda y: y[0, :, -1].sum(), x)

    W_x, W_h, b = (layers[0][k][0] for k in ("weight_ih", "weight_hh", "bias"))
    w = W[0]
    expected = np.zeros(T)
    for i in range(B):
        h, hs = torch.zeros(H, dtype=torch.float64), []
        for t in range(T):
            h = torch.tanh(W_x @ x[i, t] + W_h @ h + b)
            hs.append(h)
        for t in range(T):  # t is 0-based: h_{t+1} in the 1-based notation
            J = torch.eye(H, dtype=torch.float64)
            for k in range(t + 1, T):  # ∂h_T/∂h_t = J_T ... J_{t+1}, J_k = diag(1 - h_k²) W_h
                J = torch.diag(1 - hs[k] ** 2) @ W_h @ J
            expected[t] += float((w @ J).pow(2).sum())
    expected = np.sqrt(expected)  # Frobenius norm over the batch
    assert norms.shape == (T,)
    np.testing.assert_allclose(norms, expected, rtol=1e-10)
    assert norms[-1] == pytest.approx(math.sqrt(B) * float(w.norm()))


@pytest.mark.parametrize("cell", ALL)
def test_whole_sequence_output_gradient_misses_the_recurrent_path(cell: str) -> None:
    """Why the probe steps: through one call of `run`, ∂L_T/∂out_t is zero for t < T; the probe sees it."""
    layers, (head, _, _) = member(cell, 3, 5, seed=1), linear_head(5, 2)
    x = torch.randn(1, 2, 8, 3)
    out, _ = run(cell, [{k: v.clone().requires_grad_() for k, v in w.items()} for w in layers], x)
    out.retain_grad()
    head(out)[:, :, -1].sum().backward()
    assert torch.count_nonzero(out.grad[:, :, :-1]) == 0
    norms = gradient_flow(cell, layers, head, lambda y: y[:, :, -1].sum(), x[0])
    assert (norms[:-1] > 0).all()


@pytest.mark.parametrize("cell", ALL)
def test_probe_every_cell_two_layers(cell: str) -> None:
    layers, (head, W, b) = member(cell, 3, 5, num_layers=2, seed=2), linear_head(5, 1)
    x = torch.randn(2, 12, 3)
    norms = gradient_flow(cell, layers, head, lambda y: y[:, :, -1].pow(2).mean(), x)
    assert norms.shape == (12,) and np.isfinite(norms).all() and norms[-1] > 0
    # the same weights in float64 give the same curve: the probe does not depend on precision
    layers64 = [{k: v.double() for k, v in w.items()} for w in layers]
    W64, b64 = W.double(), b.double()
    norms64 = gradient_flow(cell, layers64, lambda h: h @ W64.T + b64, lambda y: y[:, :, -1].pow(2).mean(), x.double())
    np.testing.assert_allclose(norms64, norms, rtol=1e-3)


def test_vanishing_distance_and_summary() -> None:
    norms = 0.5 ** np.arange(20)[::-1]  # norm_t = 0.5^(T - t)
    assert vanishing_distance(norms) == 10  # 0.5^10 = 9.8e-4 < 1e-3 <= 0.5^9
    assert math.isnan(vanishing_distance(np.ones(5)))
    s = flow_summary(norms)
    assert s["steps"] == 20 and s["log10_first_over_last"] == pytest.approx(19 * math.log10(0.5))


@pytest.mark.parametrize("cell", GATED)
def test_gate_statistics_in_unit_interval(cell: str) -> None:
    layers = member(cell, 3, 6, num_layers=2, seed=3)
    x = torch.randn(4, 10, 3, generator=torch.Generator().manual_seed(0))  # not the global RNG: test order must not matter
    stats = gate_statistics(cell, layers, x)  # check=True: the step-by-step run equals run()
    assert set(stats["gate"]) == set(CELLS[cell].gates) and set(stats["layer"]) == {0, 1}
    for col in ("frac_low", "frac_high", "frac_saturated", "mean"):
        assert stats[col].between(0, 1).all()
    assert np.allclose(stats["frac_saturated"], stats["frac_low"] + stats["frac_high"])
    big = [{k: v * 20 for k, v in w.items()} for w in layers]  # large weights saturate the gates
    assert (gate_statistics(cell, big, x * 5)["frac_saturated"] > stats["frac_saturated"]).all()
    mask = torch.zeros(4, 10, dtype=torch.bool)
    mask[:, :3] = True
    assert gate_statistics(cell, layers, x, mask=mask)["frac_saturated"].between(0, 1).all()


@pytest.mark.parametrize("cell", [c for c in ALL if not CELLS[c].gates])
def test_gate_statistics_empty_for_ungated_cells(cell: str) -> None:
    assert gate_statistics(cell, member(cell, 3, 4), torch.randn(2, 5, 3)).empty


@pytest.mark.parametrize("cell", ALL)
def test_probe_returns_metrics_and_csv_texts(cell: str) -> None:
    from rnnbench.config import Config
    from rnnbench.tasks import get_task

    cfg = Config.from_dict({"model": {"hidden_size": 4}, "task": {"name": "copy", "seq_len": 6, "n_test": 8}})
    task = get_task("copy")(cfg.task, seed=0)
    batch = probe_batch(task, task.datasets()["test"], n=4)
    layers, (head, _, _) = member(cell, task.input_size, 5), linear_head(5, task.output_size)
    seen = []

    def loss_fn(y: torch.Tensor, b: dict) -> torch.Tensor:
        seen.append(b)
        return y[:, :, -1].pow(2).sum()

    metrics, artifacts = probe(cell, layers, head, loss_fn, batch, "init")
    T = batch["x"].shape[1]
    names = {f"gradflow_init_{k}" for k in ("steps", "norm_last", "norm_first", "log10_first_over_last", "vanish_distance")}
    names |= {f"gradflow_init_sat_{g}" for g in CELLS[cell].gates}
    assert set(metrics) == names and metrics["gradflow_init_steps"] == T and seen and seen[0]["x"].shape[1] == T
    assert set(artifacts) == {"gradient_flow/init.csv"} | ({"gradient_flow/init_gates.csv"} if CELLS[cell].gates else set())
    curve = pd.read_csv(io.StringIO(artifacts["gradient_flow/init.csv"]))
    assert list(curve.columns) == ["t", "distance", "grad_norm", "relative"] and len(curve) == T
    assert curve["grad_norm"].iloc[-1] == pytest.approx(metrics["gradflow_init_norm_last"], rel=1e-6)
    if CELLS[cell].gates:
        gates = pd.read_csv(io.StringIO(artifacts["gradient_flow/init_gates.csv"]))
        assert set(gates["gate"]) == set(CELLS[cell].gates)
