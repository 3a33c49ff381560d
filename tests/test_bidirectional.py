"""Bidirectional stacks (model.bidirectional): against torch's own bidirectional RNNs, per sequence
within its length, through the population trainer, and refused where the outputs must not see the
future."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rnnbench import cells
from rnnbench.budget import param_counts
from rnnbench.config import load_config
from rnnbench.errors import RnnbenchError
from rnnbench.training import loop
from rnnbench.training.population import build

TORCH = {"tanh": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}


def draw(cell: str, D: int, H: int, layers: int, K: int = 1, seed: int = 0) -> tuple[list[cells.Weights], list[cells.Weights]]:
    gens = [torch.Generator().manual_seed(seed + k) for k in range(K)]
    fwd = cells.init_weights(cell, D, H, layers, gens, 0.5, 1.0, torch.float64, 2 * H)
    bwd = cells.init_weights(cell, D, H, layers, gens, 0.5, 1.0, torch.float64, 2 * H)
    return fwd, bwd


@pytest.mark.parametrize("cell", sorted(TORCH))
def test_two_bidirectional_layers_give_torchs_numbers(cell: str) -> None:
    """Equal lengths, per-step outputs: exactly what torch.nn.{RNN,LSTM,GRU}(bidirectional=True) gives
    with our weights (one bias each: torch's bias_hh set to zero, or to the GRU's own bias_hh)."""
    D, H, B, T = 3, 5, 4, 7
    fwd, bwd = draw(cell, D, H, 2)
    net = TORCH[cell](D, H, num_layers=2, bidirectional=True, batch_first=True).double()
    with torch.no_grad():
        for l in range(2):
            for suffix, w in (("", fwd[l]), ("_reverse", bwd[l])):
                getattr(net, f"weight_ih_l{l}{suffix}").copy_(w["weight_ih"][0])
                getattr(net, f"weight_hh_l{l}{suffix}").copy_(w["weight_hh"][0])
                getattr(net, f"bias_ih_l{l}{suffix}").copy_(w["bias"][0])
                getattr(net, f"bias_hh_l{l}{suffix}").copy_(w["bias_hh"][0] if "bias_hh" in w else torch.zeros(w["bias"].shape[-1]))
    x = torch.randn(1, B, T, D, dtype=torch.float64)
    lengths = torch.full((1, B), T)
    for impl in ("reference", "auto"):
        ours = cells.run_bidirectional(cell, fwd, bwd, x, lengths, impl=impl)
        torch.testing.assert_close(ours[0], net(x[0])[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("last_step", [False, True])
def test_each_sequence_is_reversed_within_its_own_length(last_step: bool) -> None:
    """Unequal lengths, two members: every valid step equals the sequence run alone and unpadded
    (forward over x[:L], backward over x[:L] flipped), in value and gradient; padding reaches nothing.
    last_step: the backward half at step t is its state after t + 1 reversed steps, so at L - 1 it
    has read the whole sequence."""
    D, H, K, B, T = 2, 4, 2, 3, 6
    fwd, bwd = draw("lstm", D, H, 2, K)
    ws = [p.requires_grad_() for stack in (fwd, bwd) for layer in stack for p in layer.values()]
    lengths = torch.tensor([[6, 3, 1], [4, 5, 2]])
    steps = lengths.max(1).values
    x = torch.randn(K, B, T, D, dtype=torch.float64)
    x = torch.where(torch.arange(T).view(1, 1, T, 1) < lengths.view(K, B, 1, 1), x, torch.zeros(()))
    out = cells.run_bidirectional("lstm", fwd, bwd, x, lengths, steps, impl="reference", last_step=last_step)
    valid = torch.arange(T).view(1, 1, T) < lengths.view(K, B, 1)
    probe = torch.randn_like(out)
    grads = torch.autograd.grad((out * probe * valid.unsqueeze(-1)).sum(), ws)
    total = [torch.zeros_like(g) for g in grads]
    for k in range(K):
        for b in range(B):
            L = int(lengths[k, b])
            one = lambda stack: [{n: w[k : k + 1] for n, w in layer.items()} for layer in stack]  # noqa: E731
            h = x[k : k + 1, b : b + 1, :L]
            for l in range(2):
                f, _ = cells.run("lstm", [one(fwd)[l]], h, impl="reference")
                r, _ = cells.run("lstm", [one(bwd)[l]], h.flip(2), impl="reference")
                h = torch.cat([f, r if (last_step and l == 1) else r.flip(2)], -1)
            torch.testing.assert_close(out[k, b, :L], h[0, 0], rtol=1e-12, atol=1e-12)
            g = torch.autograd.grad((h[0, 0] * probe[k, b, :L]).sum(), ws, allow_unused=True)
            total = [t + (gi if gi is not None else 0) for t, gi in zip(total, g)]
    for a, b_ in zip(grads, total):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-12)


def test_parameter_counts_and_budget_count_both_directions() -> None:
    D, H, O = 3, 5, 2
    net = torch.nn.LSTM(D, H, num_layers=2, bidirectional=True)
    torch_count = sum(p.numel() for p in net.parameters()) - 2 * 2 * 4 * H  # torch has two biases per gate
    counts = param_counts("lstm", D, H, O, num_layers=2, bidirectional=True)
    assert counts["recurrent"] == torch_count
    assert counts["total"] == torch_count + 2 * H * O + O
    a = load_config(None, ["task.name=copy", "model.cell=gru", "model.budget=20000", "model.bidirectional=true"])
    b = load_config(None, ["task.name=copy", "model.cell=gru", "model.budget=20000"])
    pa, pb = build([a], torch.device("cpu"), torch.float64), build([b], torch.device("cpu"), torch.float64)
    assert pa.sizes[1] < pb.sizes[1]  # the same budget buys fewer units per direction
    n = lambda pop: sum(p[0].numel() for p in pop.recurrent_weights())  # noqa: E731
    assert abs(n(pa) - 20000) < abs(n(pa) - 2 * 20000) and abs(n(pb) - 20000) < 500
    assert n(pa) == param_counts("gru", pa.sizes[0], pa.sizes[1], pa.sizes[2], bidirectional=True)["recurrent"]


def test_a_bidirectional_member_does_not_depend_on_its_population(tmp_path: Path) -> None:
    """copy (per-step outputs) trained with the real loop: a member of 3 gives its numbers alone."""
    base = ["task.name=copy", "task.seq_len=4", "task.n_train=24", "task.n_val=12", "task.n_test=12",
            "model.cell=gru_reset_before", "model.hidden_size=4", "model.num_layers=2", "model.bidirectional=true",
            "train.batch_size=6", "train.max_epochs=2", "train.progress_bar=false", "train.gradient_flow=false",
            "train.early_stopping_patience=null", "train.precision='64'", f"tracking.checkpoint_dir={tmp_path}"]
    configs = [load_config(None, base + [f"train.seed={s}", f"train.lr={lr}"]) for s, lr in ((0, 0.01), (1, 0.003), (2, 0.02))]

    def fit(cs: list) -> list[dict[str, float]]:
        pop = build(cs, torch.device("cpu"), torch.float64, run_ids=[f"r{c.train.seed}" for c in cs])
        loop._fit(pop, {}, None)
        return [dict(m.history[-1]) for m in pop.members]

    three, one = fit(configs), fit([configs[1]])
    for key in ("train_ce", "val_ce"):
        assert three[1][key] == pytest.approx(one[0][key], rel=1e-10)
    assert three[0]["val_ce"] != three[1]["val_ce"]


@pytest.mark.parametrize("task", ["jsb", "fsdd"])
def test_a_bidirectional_model_on_a_next_step_task_is_refused(task: str) -> None:
    with pytest.raises(RnnbenchError, match="bidirectional model would read the future"):
        load_config(None, [f"task.name={task}", "model.bidirectional=true"])


def test_the_users_sequences_allow_it_for_labels_only(tmp_path: Path) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 9, size=30)
    data = rng.normal(size=(int(lengths.sum()), 2))
    path = tmp_path / "seqs.npz"
    np.savez(path, data=data, lengths=lengths, labels=rng.integers(0, 3, size=30))
    over = ["task.name=sequences", f"task.path={path}", "model.bidirectional=true"]
    assert load_config(None, over + ["task.target=label"]).model.bidirectional
    with pytest.raises(RnnbenchError, match="would read the future"):
        load_config(None, over + ["task.target=real"])


def test_the_cli_refuses_it_in_one_line(tmp_path: Path) -> None:
    spec = tmp_path / "run.yaml"
    spec.write_text("model: {cell: lstm, hidden_size: 4}\ntask: {name: jsb}\n")
    r = subprocess.run([sys.executable, "-m", "rnnbench.cli", "train", str(spec), "model.bidirectional=true"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "model.bidirectional" in r.stderr
    assert not (tmp_path / "mlflow.db").exists()  # refused before any store is made
