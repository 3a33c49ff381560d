"""The echo-state network: its reservoir as Jaeger / Lukoševičius draw it, frozen through training,
and its two parameter counts (trained and total)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rnnbench import cells
from rnnbench.budget import hidden_size_for_budget, param_counts
from rnnbench.cells.esn import EchoState
from rnnbench.config import load_config
from rnnbench.errors import RnnbenchError
from rnnbench.training import loop
from rnnbench.training.population import build


def reservoir(H: int, D: int = 3, seeds: tuple[int, ...] = (0, 1)) -> cells.Weights:
    [w] = cells.init_weights("esn", D, H, 1, [torch.Generator().manual_seed(s) for s in seeds], None, 0.0, torch.float64)
    return w


@pytest.mark.parametrize("H", [200, 700])  # all eigenvalues; ARPACK's largest (above DENSE_EIGVALS)
def test_the_reservoir_is_sparse_and_has_the_chosen_spectral_radius(H: int) -> None:
    w = reservoir(H)
    C = EchoState.connections
    assert w["weight_hh"].shape == w["index_hh"].shape == (2, H, C)
    for k in range(2):
        W = EchoState.dense(w["weight_hh"][k], w["index_hh"][k])
        assert float(torch.linalg.eigvals(W).abs().max()) == pytest.approx(EchoState.spectral_radius, rel=1e-8)
        assert ((W != 0).sum(1) == C).all()  # C distinct inputs per unit
        assert w["weight_ih"][k].abs().max() <= EchoState.input_scale and w["bias"][k].abs().max() <= EchoState.input_scale
    assert not torch.equal(w["weight_hh"][0], w["weight_hh"][1])  # each member its own, from its seed
    again = reservoir(H, seeds=(1,))
    assert torch.equal(again["weight_hh"][0], w["weight_hh"][1]) and torch.equal(again["index_hh"][0], w["index_hh"][1])


def test_a_step_is_the_leaky_integrator() -> None:
    w = reservoir(16)
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    h = torch.randn(2, 4, 16, dtype=torch.float64)
    xw = EchoState.project(w, x.unsqueeze(0))[0]
    (new,), gates = EchoState.step(w, xw, (h,))
    a = EchoState.leak_rate
    W = EchoState.dense(w["weight_hh"], w["index_hh"])
    by_hand = (1 - a) * h + a * torch.tanh(x @ w["weight_ih"].transpose(1, 2) + w["bias"][:, None] + h @ W.transpose(1, 2))
    torch.testing.assert_close(new, by_hand, rtol=1e-12, atol=1e-12)
    assert gates == {}


def test_states_without_autograd_are_those_with_it_bit_for_bit() -> None:
    """The reservoir's loop without autograd (a ridge readout's states) steps in place on the sparse
    product's unit-major tensor; with autograd (the gradient-flow probe) out of place. The same numbers
    bit for bit, in float32 as in float64, over a sequence long enough to carry the layout on; and the
    unit-major projection gives the base projection's numbers."""
    for dtype in (torch.float32, torch.float64):
        w = {n: t.to(dtype) for n, t in reservoir(300).items()}
        x = torch.randn(25, 2, 5, 3, dtype=dtype)
        xw = EchoState.project(w, x)
        torch.testing.assert_close(xw, cells.Cell.project.__func__(EchoState, w, x))  # type: ignore[attr-defined]
        h0 = torch.zeros(2, 5, 300, dtype=dtype, requires_grad=True)
        with torch.no_grad():
            quiet, (last,) = cells.run("esn", [w], x.permute(1, 2, 0, 3), impl="reference")
        traced, (traced_last,) = cells.run("esn", [w], x.permute(1, 2, 0, 3), impl="reference", state=[(h0,)])
        assert traced.requires_grad and not quiet.requires_grad
        assert torch.equal(quiet, traced.detach()) and torch.equal(last[0], traced_last[0].detach())


def test_the_block_matrix_built_once_follows_its_weights() -> None:
    """The reservoirs' CSR matrix is built once and reused by later steps, never for other weights:
    not after the values change in place, nor for another reservoir, nor in another dtype."""
    h = torch.randn(2, 4, 16, dtype=torch.float64)

    def by_hand(w: cells.Weights) -> torch.Tensor:
        return h @ EchoState.dense(w["weight_hh"], w["index_hh"]).transpose(1, 2)

    w = reservoir(16)
    first = EchoState.block_matrix(w, 2, 16, torch.float64)
    assert EchoState.block_matrix(w, 2, 16, torch.float64) is first  # reused
    torch.testing.assert_close(EchoState.recurrent(w, h), by_hand(w), rtol=1e-12, atol=1e-12)
    w["weight_hh"].mul_(0.5)  # in place: rebuilt
    torch.testing.assert_close(EchoState.recurrent(w, h), by_hand(w), rtol=1e-12, atol=1e-12)
    other = reservoir(16, seeds=(2, 3))
    torch.testing.assert_close(EchoState.recurrent(other, h), by_hand(other), rtol=1e-12, atol=1e-12)
    assert EchoState.block_matrix(other, 2, 16, torch.float32).dtype == torch.float32


def test_counts_trained_and_total_and_the_budget_counts_the_readout() -> None:
    D, H, O = 2, 50, 1
    counts = param_counts("esn", D, H, O)
    C = EchoState.connections
    assert counts == {"recurrent": 0, "total": H * O + O, "frozen": H * D + H + H * C}
    assert hidden_size_for_budget("esn", D, 2001, convention="total", output_size=O) == 2000
    with pytest.raises(RnnbenchError, match="trains no recurrent weights"):
        hidden_size_for_budget("esn", D, 2000, convention="recurrent")
    assert "frozen" not in param_counts("lstm", D, H, O)


def test_training_changes_the_readout_only(tmp_path: Path) -> None:
    config = load_config(None, ["task.name=adding", "task.seq_len=6", "task.n_train=40", "task.n_val=20", "task.n_test=20",
                                "model.cell=esn", "model.hidden_size=30", "train.batch_size=10", "train.max_epochs=2",
                                "train.precision='64'", "train.progress_bar=false", "train.gradient_flow=false",
                                "train.early_stopping_patience=null", f"tracking.checkpoint_dir={tmp_path}"])
    pop = build([config], torch.device("cpu"), torch.float64, run_ids=["esn"])
    before = [p.detach().clone() for p in pop.weights()]
    loop._fit(pop, {}, None)
    names = [n for layer in pop.layers for n in layer] + ["head_weight", "head_bias"]
    for name, b, p in zip(names, before, pop.best):  # the members have left the compute: their best rows
        if name in EchoState.frozen:
            assert torch.equal(b, p), name
        else:
            assert not torch.equal(b, p), name
    assert len(pop.trained_weights()) == 2 and not any(p.requires_grad for p in pop.layers[0].values())


def test_weight_noise_on_a_frozen_reservoir_is_refused() -> None:
    with pytest.raises(RnnbenchError, match="trains no recurrent weights") as e:
        load_config(None, ["task.name=adding", "model.cell=esn", "model.hidden_size=20", "train.weight_noise=0.01"])
    assert "\n" not in str(e.value)


def test_the_report_shows_the_reservoir_apart_from_the_trained_counts(tmp_path: Path, store: str) -> None:
    """A real esn run beside an lstm run: the summary shows '(+N frozen)' for the esn only, and the method
    says budgets count trained parameters."""
    from rnnbench.analysis.report import build_report
    from rnnbench.config import Config
    from rnnbench.train import train

    for cell in ("esn", "lstm"):
        result = train(Config.from_dict({
            "model": {"cell": cell, "hidden_size": 12},
            "task": {"name": "adding", "seq_len": 5, "n_train": 64, "n_val": 32, "n_test": 32},
            "train": {"max_epochs": 2, "batch_size": 16, "progress_bar": False, "device": "cpu", "gradient_flow": False},
            "tracking": {"tracking_uri": store, "checkpoint_dir": str(tmp_path / "ckpt")},
        }))
        assert result.status == "FINISHED", result.reason
    report = build_report(tmp_path / "r", tracking_uri=store, spec_dir=tmp_path / "none", figures=False)
    text = report.read_text()
    frozen = 12 * 2 + 12 + 12 * 10  # the reservoir: W_in (H x D), b (H), W's H x C non-zeros
    esn_row = next(line for line in text.splitlines() if line.startswith("| esn |"))
    lstm_row = next(line for line in text.splitlines() if line.startswith("| lstm |"))
    assert f"| 0 / 13 (+{frozen} frozen) |" in esn_row and "frozen" not in lstm_row
    assert "count trained parameters only" in text


@pytest.mark.parametrize("cell", ["esn", "lstm"])
def test_final_states_are_runs_without_the_outputs(cell: str) -> None:
    """cells.final_states: run's final state per layer, members of unequal lengths included, where the
    reference loop keeps none of its steps (the compiled loops run as in `run`)."""
    D, H = 3, 16
    [w] = cells.init_weights(cell, D, H, 1, [torch.Generator().manual_seed(s) for s in (0, 1)], None, 0.0, torch.float64)
    x = torch.randn(2, 4, 9, D, dtype=torch.float64)
    steps = torch.tensor([9, 6])
    for impl in ("reference", "auto"):
        _, finals = cells.run(cell, [w], x, steps, impl=impl)
        quiet = cells.final_states(cell, [w], x, steps, impl=impl)
        assert all(torch.equal(a, b) for a, b in zip(finals[0], quiet[0]))
