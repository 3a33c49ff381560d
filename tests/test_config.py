"""Config parsing: overrides, unknown keys, wrong types, ranges, presets: each a one-line error."""

from __future__ import annotations

from pathlib import Path

import pytest

from rnnbench.config import Config, load_config, parse_overrides
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
        (["model.cell=lstmm"], "unknown cell 'lstmm'; valid cells: gru, gru_reset_before, lstm, lstm_peephole, tanh"),
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
    from rnnbench.train import resolve_hidden_size

    cfg = Config.from_dict({"model": {"cell": "tanh", "budget": "speech"}, "task": {"name": "copy"}})
    assert resolve_hidden_size(cfg, input_size=20, output_size=1) == 400
    cfg = Config.from_dict({"model": {"cell": "lstm_peephole", "budget": "speech"}, "task": {"name": "copy"}})
    assert resolve_hidden_size(cfg, input_size=20, output_size=1) == 195
