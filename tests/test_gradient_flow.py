"""The gradient-flow probe against a hand-written tanh recurrence, and gate statistics per cell."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rnnbench.analysis.gradient_flow import (
    flow_summary,
    gate_statistics,
    gradient_flow,
    log_gradient_flow,
    probe_batch,
    vanishing_distance,
)
from rnnbench.cells import get_cell

GATES = {"lstm": {"input", "forget", "output"}, "lstm_peephole": {"input", "forget", "output"},
         "gru": {"reset", "update"}, "gru_reset_before": {"reset", "update"}}


def test_probe_equals_explicit_jacobian_product_of_a_tanh_recurrence() -> None:
    """∂L_T/∂h_t = w^T Π_{k=t+1..T} diag(1 - h_k²) W_h (Pascanu et al. 2013, eq. 5), written out."""
    torch.manual_seed(0)
    B, T, D, H = 3, 15, 4, 6
    rnn = get_cell("tanh")(D, H).double()
    with torch.no_grad():
        rnn.rnn.weight_hh_l0.mul_(2.0)  # large enough that norms move by orders of magnitude
    head = torch.nn.Linear(H, 1).double()
    x = torch.randn(B, T, D, dtype=torch.float64)
    probe = gradient_flow(rnn, head, lambda y: y[:, -1].sum(), x)

    W_x, W_h = rnn.rnn.weight_ih_l0.detach(), rnn.rnn.weight_hh_l0.detach()
    b = (rnn.rnn.bias_ih_l0 + rnn.rnn.bias_hh_l0).detach()
    w = head.weight.detach()[0]
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
    assert probe.shape == (T,)
    np.testing.assert_allclose(probe, expected, rtol=1e-10)
    assert probe[-1] == pytest.approx(math.sqrt(B) * float(w.norm()))


def test_fused_output_gradient_misses_the_recurrent_path() -> None:
    """Why the probe steps: through one fused call, ∂L_T/∂out_t is zero for t < T."""
    torch.manual_seed(1)
    rnn, head = get_cell("lstm")(3, 5), torch.nn.Linear(5, 2)
    x = torch.randn(2, 8, 3)
    out, _ = rnn(x)
    out.retain_grad()
    head(out)[:, -1].sum().backward()
    assert torch.count_nonzero(out.grad[:, :-1]) == 0
    norms = gradient_flow(rnn, head, lambda y: y[:, -1].sum(), x)
    assert (norms[:-1] > 0).all()


@pytest.mark.parametrize("cell", ["tanh", "lstm", "gru", "lstm_peephole", "gru_reset_before"])
def test_probe_every_cell_two_layers(cell: str) -> None:
    torch.manual_seed(2)
    rnn, head = get_cell(cell)(3, 5, num_layers=2), torch.nn.Linear(5, 1)
    x = torch.randn(2, 12, 3)
    norms = gradient_flow(rnn, head, lambda y: y[:, -1].pow(2).mean(), x)
    assert norms.shape == (12,) and np.isfinite(norms).all() and norms[-1] > 0
    # the same weights in float64 give the same curve: the probe does not depend on precision
    rnn64, head64 = rnn.double(), head.double()
    np.testing.assert_allclose(gradient_flow(rnn64, head64, lambda y: y[:, -1].pow(2).mean(), x.double()), norms, rtol=1e-3)


def test_vanishing_distance_and_summary() -> None:
    norms = 0.5 ** np.arange(20)[::-1]  # norm_t = 0.5^(T - t)
    assert vanishing_distance(norms) == 10  # 0.5^10 = 9.8e-4 < 1e-3 <= 0.5^9
    assert math.isnan(vanishing_distance(np.ones(5)))
    s = flow_summary(norms)
    assert s["steps"] == 20 and s["log10_first_over_last"] == pytest.approx(19 * math.log10(0.5))


@pytest.mark.parametrize("cell", sorted(GATES))
def test_gate_statistics_in_unit_interval(cell: str) -> None:
    torch.manual_seed(3)
    rnn = get_cell(cell)(3, 6, num_layers=2)
    x = torch.randn(4, 10, 3)
    stats = gate_statistics(rnn, x)  # check=True: the re-run equals the layer's own output
    assert set(stats["gate"]) == GATES[cell] and set(stats["layer"]) == {0, 1}
    for col in ("frac_low", "frac_high", "frac_saturated", "mean"):
        assert stats[col].between(0, 1).all()
    assert np.allclose(stats["frac_saturated"], stats["frac_low"] + stats["frac_high"])
    with torch.no_grad():  # large weights saturate the gates
        for p in rnn.parameters():
            p.mul_(20)
    big = gate_statistics(rnn, x * 5)
    assert (big["frac_saturated"] > stats["frac_saturated"]).all()
    mask = torch.zeros(4, 10, dtype=torch.bool)
    mask[:, :3] = True
    assert gate_statistics(rnn, x, mask=mask)["frac_saturated"].between(0, 1).all()


def test_gate_statistics_empty_for_tanh() -> None:
    assert gate_statistics(get_cell("tanh")(3, 4), torch.randn(2, 5, 3)).empty


def test_log_gradient_flow_records_metrics_and_csv(store: str) -> None:
    from mlflow.tracking import MlflowClient

    from rnnbench.config import Config
    from rnnbench.tasks import get_task

    client = MlflowClient(tracking_uri=store)
    run_id = client.create_run(client.create_experiment("gf")).info.run_id
    cfg = Config.from_dict({"model": {"hidden_size": 4}, "task": {"name": "copy", "seq_len": 6, "n_test": 8}})
    task = get_task("copy")(cfg.task, seed=0)
    batch = probe_batch(task, task.datasets()["test"], n=4)
    rnn, head = get_cell("gru")(task.input_size, 5), torch.nn.Linear(5, task.output_size)
    logged = log_gradient_flow(client, run_id, rnn, head, task, batch, "init")
    metrics = client.get_run(run_id).data.metrics
    assert metrics["gradflow_init_steps"] == 26 and "gradflow_init_sat_update" in metrics
    assert {k: v for k, v in metrics.items() if not math.isnan(v)} == {k: v for k, v in logged.items() if not math.isnan(v)}
    paths = sorted(a.path for a in client.list_artifacts(run_id, "gradient_flow"))
    assert paths == ["gradient_flow/init.csv", "gradient_flow/init_gates.csv"]
