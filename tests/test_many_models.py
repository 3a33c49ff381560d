"""Batched training of many models (rnnbench.many_models) against the one-model code paths, on the CPU in float64."""

from __future__ import annotations

import contextlib
import itertools
import math
import os
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from rnnbench.config import Config, load_config
from rnnbench.errors import RnnbenchError

requires_data = pytest.mark.skipif(
    not Path(os.environ.get("RNNBENCH_DATA_DIR") or "/nonexistent").is_dir(), reason="real datasets absent: set RNNBENCH_DATA_DIR"
)

CELLS = ["tanh", "lstm", "gru", "lstm_peephole", "gru_reset_before"]
TIMING = {"seconds_per_epoch", "seconds_to_best", "time_steps_per_second", "setup_seconds", "epoch_seconds", "wall_seconds"}
TINY = [
    "model.hidden_size=5", "train.batch_size=8", "train.progress_bar=false", "train.precision='64'",
    "train.gradient_flow=false", "train.early_stopping_patience=null",
]
SYNTH = ["task.seq_len=4", "task.n_train=16", "task.n_val=8", "task.n_test=8"]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The models here are tiny: on a shared 2-core machine a second OpenMP thread only adds waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One SQLite store for this module (creating one costs seconds), the working directory beside it."""
    tmp = tmp_path_factory.mktemp("many_models")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


def configs(over: list[str], points: list[tuple[int, float]]) -> list[Config]:
    return [load_config(None, TINY + over + [f"train.seed={s}", f"train.lr={lr}"]) for s, lr in points]


@contextlib.contextmanager
def float64_default() -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def manual_run(config: Config, epochs: int) -> dict[str, torch.Tensor]:
    """The one-model path driven by hand: what train() does per step, without Lightning (float64)."""
    from lightning.pytorch import seed_everything
    from torch.utils.data import DataLoader

    from rnnbench.model import SequenceModel
    from rnnbench.tasks import get_task

    t = config.train
    task = get_task(config.task.name)(config.task, seed=t.seed)
    seed_everything(t.seed, workers=True, verbose=False)
    model = SequenceModel(config, task, config.model.hidden_size)
    data = task.datasets()
    gen = torch.Generator().manual_seed(t.seed)
    train = DataLoader(data["train"], batch_size=t.batch_size, shuffle=True, generator=gen, collate_fn=task.collate)
    val = DataLoader(data["val"], batch_size=t.batch_size, collate_fn=task.collate)
    model.double()
    opt = model.configure_optimizers()
    params = [p for g in opt.param_groups for p in g["params"]]
    for _ in range(epochs):
        # len(train) batches without exhausting the iterator, as Lightning does: a RandomSampler asked
        # once more draws another permutation from `gen`, which would shift the next epoch's order.
        for batch in itertools.islice(train, len(train)):
            batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
            with float64_default():
                model._add_weight_noise()  # from the global RNG, as in a train() run
                loss = task.loss(model(batch["x"]), batch)
            loss.backward()
            model._remove_weight_noise()
            if t.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            opt.step()
            opt.zero_grad()
        for _ in val:  # the validation pass: its iterator draws one base seed from the global RNG
            pass
    return model.state_dict()


def saved_state(config: Config, run_id: str) -> dict[str, Any]:
    from rnnbench.many_models import CHECKPOINT_NAME

    return torch.load(Path(config.tracking.checkpoint_dir) / run_id / CHECKPOINT_NAME, weights_only=False)


# --- the K-model recurrence --------------------------------------------------------------------------
def assert_group_matches_each_model(cell: str, device: str = "cpu", rtol: float = 1e-12) -> None:
    """Outputs and parameter gradients of 3 two-layer models (inputs of unequal lengths) run together by
    group_forward equal each model's own forward/backward, in float64."""
    from torch import nn

    from rnnbench.cells import get_cell
    from rnnbench.many_models import group_forward

    torch.manual_seed(0)
    models = []
    for _ in range(3):
        m = nn.Module()
        m.rnn = get_cell(cell)(4, 5, num_layers=2, forget_bias=1.0)
        m.head = nn.Linear(5, 3)
        models.append(m.double().to(device))
    xs = [torch.randn(2, T, 4, dtype=torch.float64, device=device) for T in (6, 4, 6)]

    outs = group_forward(models, cell, xs)
    sum((o**2).sum() for o in outs).backward()
    batched = [[p.grad.clone() for p in m.parameters() if p.requires_grad] for m in models]
    for m, x, out, grads in zip(models, xs, outs, batched):
        m.zero_grad()
        ref = m.head(m.rnn(x)[0])
        (ref**2).sum().backward()
        torch.testing.assert_close(out, ref, rtol=rtol, atol=1e-14)
        for g, p in zip(grads, [p for p in m.parameters() if p.requires_grad]):
            torch.testing.assert_close(g, p.grad, rtol=100 * rtol, atol=1e-14)


@pytest.mark.parametrize("loops", ["compiled", "torch_ops"])
@pytest.mark.parametrize("cell", CELLS)
def test_group_forward_and_gradients_match_each_model(cell: str, loops: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the compiled K-model loops (the CPU's path) and through the stacked torch-op loop (CUDA's)."""
    from rnnbench import many_models

    if loops == "torch_ops":
        monkeypatch.setattr(many_models, "_uses_cpp", lambda cell, x: False)
    elif cell not in many_models._CPP_OPS:
        pytest.skip(f"{cell} has no compiled loop (its stacked torch-op loop is the CPU's path too)")
    elif not many_models._uses_cpp(cell, torch.zeros(1, dtype=torch.float64)):
        pytest.skip("compiled loops unavailable here")
    assert_group_matches_each_model(cell)


_TRITON_GROUP_CHECK = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_many_models import assert_group_matches_each_model
from rnnbench import many_models
for cell in ("lstm_peephole", "gru_reset_before"):
    x = torch.zeros(1, dtype=torch.float64)
    assert many_models._uses_triton(cell, x) and not many_models._uses_cpp(cell, x)
    assert_group_matches_each_model(cell)  # each model's own path: the torch-op loop here
print("ok")
"""


def test_group_forward_through_triton_steps_in_the_interpreter() -> None:
    """CUDA's path for the Chung-form cells (K models' steps as one Triton kernel over all K·B rows), run
    by Triton's CPU interpreter in float64, against each model's own forward and backward."""
    import subprocess
    import sys

    pytest.importorskip("triton", reason="triton is not installed (torch's CPU wheels come without it)")
    env = {**os.environ, "TRITON_INTERPRET": "1", "RNNBENCH_FAST_EXT": "0"}  # a fresh process: read at import
    code = _TRITON_GROUP_CHECK.format(tests=str(Path(__file__).parent))
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cell", ["lstm_peephole", "gru_reset_before"])
def test_group_forward_on_cuda_matches_each_model(cell: str) -> None:
    """On CUDA (Triton-fused steps over all K models where triton is installed) in float64."""
    assert_group_matches_each_model(cell, device="cuda", rtol=1e-10)


# --- training: parameters after N updates and logged metrics -----------------------------------------
@pytest.mark.parametrize("cell, task, recurrence", [
    ("tanh", "copy", "stacked"), ("lstm", "adding", "stacked"), ("gru", "copy", "stacked"),
    ("lstm_peephole", "adding", "stacked"), ("gru_reset_before", "copy", "stacked"), ("lstm", "copy", "per_model"),
])
def test_batch_of_k_matches_k_manual_runs(store: str, cell: str, task: str, recurrence: str) -> None:
    """Per-model lr, clipping and weight noise: parameters after 4 updates equal the one-model path's."""
    from rnnbench.many_models import train_many

    over = [f"model.cell={cell}", f"task.name={task}", *SYNTH, "train.max_epochs=2", "train.weight_noise=0.05", "train.grad_clip=0.3"]
    group = configs(over, [(0, 0.01), (1, 0.003), (2, 0.05)])
    results = train_many(group, recurrence=recurrence)
    assert [r.status for r in results] == ["FINISHED"] * 3
    for config, result in zip(group, results):
        state = saved_state(config, result.run_id)
        assert state["global_step"] == 4
        expected = manual_run(config, epochs=2)
        for name, value in expected.items():
            torch.testing.assert_close(state["model"][name], value, rtol=1e-10, atol=1e-13, msg=f"{cell} {name}")
    # different seeds and learning rates did train differently
    a, b = (saved_state(c, r.run_id)["model"] for c, r in zip(group[:2], results[:2]))
    assert not torch.equal(a["head.weight"], b["head.weight"])


@requires_data
def test_padded_music_batches_match_manual_runs(store: str) -> None:
    """jsb: sequences of different lengths per model, padded to a common T inside the group."""
    from rnnbench.many_models import train_many

    over = ["model.cell=gru_reset_before", "task.name=jsb", "task.max_sequences=5", "train.batch_size=2",
            "train.max_epochs=1", "train.weight_noise=0.02"]
    group = configs(over, [(0, 0.01), (3, 0.002)])
    results = train_many(group)
    for config, result in zip(group, results):
        state = saved_state(config, result.run_id)["model"]
        for name, value in manual_run(config, epochs=1).items():
            torch.testing.assert_close(state[name], value, rtol=1e-10, atol=1e-13)


def test_records_what_train_records(store: str) -> None:
    """Against train() itself: same params, tags (plus batched=K), per-epoch histories and final metrics."""
    from mlflow.tracking import MlflowClient

    from rnnbench.many_models import train_many
    from rnnbench.train import train

    over = ["model.cell=lstm_peephole", "task.name=copy", *SYNTH, "train.max_epochs=5", "train.weight_noise=0.05",
            "train.early_stopping_patience=1", "train.gradient_flow=true"]
    group = configs(over, [(0, 1.0), (1, 0.02)])  # lr 1: validation soon worsens, so early stopping acts
    batched = train_many(group, tags=[{"sweep": "s"}, {"sweep": "s"}])
    single = [train(c, tags={"sweep": "s"}) for c in group]
    client = MlflowClient(store)
    for a, b in zip(batched, single):
        assert a.status == b.status == "FINISHED"
        ra, rb = client.get_run(a.run_id), client.get_run(b.run_id)
        assert ra.data.params == rb.data.params
        assert ra.data.tags["batched"] == "2" and ra.data.tags["sweep"] == "s"
        assert ra.data.tags["recurrence"] in ("cpp-many", "stacked-torch") and rb.data.tags["recurrence"] in ("cpp", "torch", "python")
        for key in ("cell", "task", "seed", "config_hash", "device", "torch_version"):
            assert ra.data.tags[key] == rb.data.tags[key]
        assert set(ra.data.metrics) == set(rb.data.metrics)
        assert any(k.startswith("gradflow_trained_") for k in ra.data.metrics)
        for key, value in rb.data.metrics.items():
            if key not in TIMING:
                assert ra.data.metrics[key] == pytest.approx(value, rel=1e-10, nan_ok=True), key
            history_a = [(m.step, m.value) for m in client.get_metric_history(a.run_id, key)]
            history_b = [(m.step, m.value) for m in client.get_metric_history(b.run_id, key)]
            assert [s for s, _ in history_a] == [s for s, _ in history_b], key
            if key not in TIMING:
                assert [v for _, v in history_a] == pytest.approx([v for _, v in history_b], rel=1e-10, nan_ok=True), key
    assert batched[0].metrics["epochs"] < 5 == batched[1].metrics["epochs"]  # one stopped early, the other went on


# --- failure, resume, grouping -------------------------------------------------------------------------
def test_diverged_model_fails_alone(store: str) -> None:
    from mlflow.tracking import MlflowClient

    from rnnbench.many_models import train_many
    from rnnbench.train import train

    over = ["model.cell=tanh", "task.name=adding", *SYNTH, "train.max_epochs=3", "train.optimizer=sgd", "train.grad_clip=null"]
    group = configs(over, [(0, 1e300), (1, 0.01)])  # 1e300: the first update overflows the next loss
    bad, good = train_many(group)
    assert bad.status == "FAILED" and bad.reason == "training loss became inf at epoch 0, step 1"
    assert train(group[0]).reason == bad.reason  # train()'s words for the same event
    assert good.status == "FINISHED"
    run = MlflowClient(store).get_run(bad.run_id)
    assert run.info.status == "FAILED" and run.data.tags["failure_reason"] == bad.reason
    (alone,) = train_many(group[1:])  # the survivor's numbers are those of training it alone
    for key, value in alone.metrics.items():
        if key not in TIMING:
            assert good.metrics[key] == pytest.approx(value, rel=1e-12), key


def test_killed_group_resumes_exactly(store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    from rnnbench import many_models
    from rnnbench.many_models import train_many

    over = ["model.cell=gru", "task.name=copy", *SYNTH, "train.max_epochs=3", "train.weight_noise=0.05", "tracking.experiment=resume"]
    group = configs(over, [(0, 0.01), (1, 0.02)])
    whole = train_many(group)

    save = many_models._Member.save
    calls = {"n": 0}

    def save_then_die(self: Any) -> None:
        save(self)
        calls["n"] += 1
        if calls["n"] == 2:  # both models wrote epoch 0
            raise KeyboardInterrupt

    monkeypatch.setattr(many_models._Member, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_many(group)
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("resume").experiment_id], "attributes.status = 'KILLED'")
    killed = sorted(runs, key=lambda r: int(r.data.tags["seed"]))
    assert len(killed) == 2
    monkeypatch.setattr(many_models._Member, "save", save)

    resumed = train_many(group, run_ids=[r.info.run_id for r in killed])
    for a, b in zip(resumed, whole):
        assert a.status == "FINISHED" and a.run_id != b.run_id
        for key, value in b.metrics.items():
            if key not in TIMING:
                assert a.metrics[key] == pytest.approx(value, rel=1e-12), key
        assert [m.step for m in client.get_metric_history(a.run_id, "val_ce")] == [0, 1, 2]


def test_group_key() -> None:
    from rnnbench.many_models import group_key, train_many

    a, b = configs(["model.cell=gru"], [(0, 0.1), (5, 0.001)])
    b.tracking.experiment = "other"
    assert group_key(a) == group_key(b)
    c = load_config(None, TINY + ["model.cell=gru", "model.hidden_size=7"])
    assert group_key(c) != group_key(a)
    with pytest.raises(RnnbenchError, match="model.hidden_size"):
        train_many([a, c])


def test_throughput_probe_runs() -> None:
    from rnnbench.many_models import throughput_many

    r = throughput_many("lstm_peephole", 2, seq_len=3, batch_size=2, input_size=3, hidden_size=4, steps=1)
    assert set(r) == {"batched", "sequential", "speedup", "steps_per_round"}
    assert all(v > 0 and math.isfinite(v) for v in r.values()) and r["steps_per_round"] == 2 * 2 * 3
    r = throughput_many("gru", 3, seq_len=8, batch_size=2, input_size=3, hidden_size=4, steps=1, unequal_lengths=True)
    assert r["steps_per_round"] == 2 * (2 + 5 + 8)  # lengths spread over [seq/4, seq]
