"""Config parsing: overrides, unknown keys, wrong types, ranges, presets: each a one-line error."""

from __future__ import annotations

from pathlib import Path

import pytest

from rnnbench.config import Config, load_config, parse_overrides
from rnnbench.cells import CELLS
from rnnbench.errors import RnnbenchError


def test_overrides_are_typed_and_nested() -> None:
    assert parse_overrides(["train.lr=1e-3", "model.cell=gru", "train.grad_clip=null", "task.seq_len=5"]) == {
        "train": {"lr": "1e-3", "grad_clip": None},
        "model": {"cell": "gru"},
        "task": {"seq_len": 5},
    }
    cfg = load_config(None, ["train.lr=1e-3", "model.cell=gru", "task.name=adding", "task.seq_len=7"])
    assert cfg.train.lr == 1e-3 and cfg.model.cell == "gru" and cfg.task.seq_len == 7


def test_spec_file_and_override_order(tmp_path: Path) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text("model: {cell: tanh, hidden_size: 8}\ntask: {name: copy, seq_len: 3}\ntrain: {lr: 0.5}\n")
    cfg = load_config(spec, ["train.lr=0.25"])
    assert (cfg.model.cell, cfg.model.hidden_size, cfg.task.seq_len, cfg.train.lr) == ("tanh", 8, 3, 0.25)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.cell=lstmm"], "unknown cell 'lstmm'; valid cells: " + ", ".join(sorted(CELLS))),
        (["task.name=nope"], "unknown task 'nope'; valid tasks:"),
        (["model.hiden_size=3"], "unknown config key 'model.hiden_size'; did you mean 'hidden_size'?"),
        (["task.seq_lenn=3"], "unknown config key 'task.seq_lenn'; did you mean 'seq_len'?"),
        (["train.lr=-1"], "config train.lr: Input should be greater than 0 (got -1)"),
        (["train.batch_size=abc"], "config train.batch_size: Input should be a valid integer"),
        (["train.optimizer=lbfgs"], "config train.optimizer: Input should be 'adam', 'rmsprop' or 'sgd'"),
        (["task.seq_len=0"], "config task.seq_len: Input should be greater than or equal to 1"),
        (["oops"], "override 'oops' is not key=value"),
        (["model.hidden_size=null"], "set model.hidden_size or model.budget"),
    ],
)
def test_bad_input_is_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(RnnbenchError) as e:
        load_config(None, overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_and_broken_spec(tmp_path: Path) -> None:
    with pytest.raises(RnnbenchError, match="spec file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(RnnbenchError, match="not valid YAML"):
        load_config(bad)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("name: s\nbase: {task: {name: copy}}\ngrid: {train.seed: [0, 1]}\n")
    with pytest.raises(RnnbenchError, match=r"is a sweep spec \(it has base, grid\): run it with `rnnbench sweep"):
        load_config(sweep)
    from rnnbench.sweep.spec import load_spec

    run = tmp_path / "run.yaml"
    run.write_text("model: {cell: gru}\ntask: {name: copy}\n")
    with pytest.raises(RnnbenchError, match=r"is a run spec \(it has model, task\): train it with `rnnbench train"):
        load_spec(run)


def test_a_value_no_member_of_a_union_accepts_names_every_member() -> None:
    with pytest.raises(RnnbenchError, match=r"config model.budget: Input should be a valid integer.*; or Input should be 'music' or 'speech' \(got 'huge'\)"):
        Config.from_dict({"model": {"budget": "huge"}})


def test_hash_ignores_tracking_and_sees_everything_else() -> None:
    a = Config.from_dict({"task": {"name": "copy"}, "tracking": {"experiment": "x"}})
    b = Config.from_dict({"task": {"name": "copy"}, "tracking": {"experiment": "y"}})
    c = Config.from_dict({"task": {"name": "copy", "seq_len": 101}})
    assert a.config_hash() == b.config_hash() != c.config_hash()
    assert a.flat()["task.name"] == "copy" and "train.lr" in a.flat()


def test_budget_presets_choose_hidden_size() -> None:
    from rnnbench.budget import hidden_size_of as resolve_hidden_size

    cfg = Config.from_dict({"model": {"cell": "tanh", "budget": "speech"}, "task": {"name": "copy"}})
    assert resolve_hidden_size(cfg, input_size=20, output_size=1) == 400
    cfg = Config.from_dict({"model": {"cell": "lstm_peephole", "budget": "speech"}, "task": {"name": "copy"}})
    assert resolve_hidden_size(cfg, input_size=20, output_size=1) == 195


# --- a run's identity (config_hash, point ids, the report's repeats) -------------------------------
IDENTITY = {
    "model.budget", "model.budget_convention", "model.cell", "model.forget_bias", "model.hidden_size", "model.init",
    "model.init_scale", "model.num_layers", "model.bidirectional",
    "task.name", "task.seq_len", "task.n_train", "task.n_val", "task.n_test",  # copy, adding
    "task.layout", "task.first_frame", "task.max_sequences", "task.source",  # music
    "task.frame_in", "task.frame_out", "task.n_components", "task.max_samples", "task.max_seconds",  # speech
    "task.max_recordings", "task.split", "task.test_speaker", "task.val_speaker",
    "task.path", "task.target", "task.split_seed",  # the user's sequences
    "task.frame",  # spoken digits
    "train.seed", "train.optimizer", "train.lr", "train.momentum", "train.rmsprop_alpha", "train.rmsprop_floor", "train.readout", "train.stop_below_baseline", "train.weight_decay",
    "train.batch_size", "train.max_epochs", "train.max_steps", "train.limit_train_batches", "train.limit_eval_batches",
    "train.grad_clip", "train.weight_noise", "train.early_stopping_patience",
    "train.device", "train.precision",  # CPU vs CUDA kernels, float32 vs float64: different numbers
    "train.gradient_flow",  # changes what a run records
}
NOT_IN_IDENTITY = {"train.progress_bar", "train.threads", "tracking.experiment", "tracking.run_name", "tracking.tracking_uri",
                   "tracking.checkpoint_dir"}


def test_every_config_field_has_an_identity_decision() -> None:
    """A new field of Config or of any task's Options fails here until someone decides whether it can
    change a run's numbers: add it to IDENTITY above, or to rnnbench.config.NOT_IDENTITY (and here)."""
    from rnnbench.config import NOT_IDENTITY, config_fields, identity_keys

    fields = config_fields()
    undecided = fields - IDENTITY - NOT_IN_IDENTITY
    assert not undecided, f"new config field(s) {sorted(undecided)}: decide whether they enter a run's identity"
    assert not (IDENTITY | NOT_IN_IDENTITY) - fields, "a pinned key is no longer a config field"
    assert set(NOT_IDENTITY) == NOT_IN_IDENTITY
    assert identity_keys() == IDENTITY


def _old_hash(config: Config) -> str:
    """config_hash as it was before NOT_IDENTITY (every key but the tracking section)."""
    import hashlib
    import json

    d = {k: v for k, v in config.to_dict().items() if k != "tracking"}
    # fields added since: threads (not identity); rmsprop_floor, readout, stop_below_baseline and bidirectional
    # (left out at their defaults)
    d["train"] = {k: v for k, v in d["train"].items() if k not in ("threads", "rmsprop_floor", "readout", "stop_below_baseline")}
    d["model"] = {k: v for k, v in d["model"].items() if k != "bidirectional"}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def test_display_and_tracking_settings_leave_the_hash_and_old_sweep_hashes_stay() -> None:
    base = {"task": {"name": "copy", "seq_len": 7}, "train": {"lr": 0.01, "seed": 3}}
    sweep_like = Config.from_dict({**base, "train": {**base["train"], "progress_bar": False}})
    by_hand = Config.from_dict({**base, "train": {**base["train"], "progress_bar": True},
                                "tracking": {"experiment": "mine", "run_name": "r", "checkpoint_dir": "/elsewhere",
                                             "tracking_uri": "sqlite:///x.db"}})
    assert by_hand.config_hash() == sweep_like.config_hash()
    # sweeps always ran with progress_bar=false: their hashes (and so their point ids) are unchanged
    assert sweep_like.config_hash() == _old_hash(sweep_like)
    assert by_hand.config_hash() != _old_hash(by_hand)  # the old hash counted a train run twice
    for changed in ({"device": "cpu"}, {"precision": "64"}, {"gradient_flow": False}, {"seed": 4}, {"rmsprop_floor": 0.01}):
        other = Config.from_dict({**base, "train": {**base["train"], **changed}})
        assert other.config_hash() != sweep_like.config_hash(), changed
    assert Config.from_dict({**base, "model": {"bidirectional": True}}).config_hash() != sweep_like.config_hash()


def test_identity_from_logged_params_matches_the_hash() -> None:
    from rnnbench.config import identity_from_params

    cfg = Config.from_dict({"model": {"cell": "gru", "budget": 2000}, "task": {"name": "jsb", "max_sequences": 3},
                            "train": {"progress_bar": True, "grad_clip": None}})
    params = {k: str(v) for k, v in cfg.flat().items()}
    params.update({"task.input_size": "88", "n_params_total": "123"})  # describe() facts and counts are ignored
    assert identity_from_params(params) == cfg.config_hash()
    assert identity_from_params({**params, "train.progress_bar": "False"}) == cfg.config_hash()
    assert identity_from_params({**params, "train.lr": "0.5"}) != cfg.config_hash()
    assert identity_from_params({}) is None
    # params that no longer validate still give one identity per config
    odd = {**params, "task.layout": "a layout of another version"}
    assert identity_from_params(odd) == identity_from_params(dict(odd)) != cfg.config_hash()
    assert identity_from_params(odd) != identity_from_params({**odd, "train.seed": "1"})


def test_committed_results_keep_their_hashes() -> None:
    """Every run exported in results/runs.csv: its identity, rebuilt from its params, is its logged
    config_hash, so the point ids of those sweeps are still valid."""
    import pandas as pd

    from rnnbench.config import identity_from_params

    path = Path(__file__).resolve().parents[1] / "results" / "runs.csv"
    runs = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert len(runs) > 0
    for _, row in runs.iterrows():
        params = {k: (v if v != "" else "None") for k, v in row.items() if "." in k}
        assert identity_from_params(params) == row["config_hash"], row["run_id"]
