"""Typed run configuration: YAML spec + `key=value` overrides -> one validated `Config`.

pydantic does the checking (unknown keys, wrong types, out-of-range values) so each mistake comes
back as one line naming the key. The task block is validated by the chosen task's own options
class, so `task.seq_len` is known to `copy` and unknown to `jsb`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, model_validator

from rnnbench.errors import RnnbenchError

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    cell: str = "lstm"
    hidden_size: int | None = Field(32, ge=1, description="units per layer (a budget, when set, overrides it)")
    budget: Annotated[int, Field(ge=1)] | Literal["music", "speech"] | None = Field(
        None, description="parameter budget, or a Chung 2014 preset (rnnbench.budget.PRESETS); picks hidden_size"
    )
    budget_convention: Literal["recurrent", "total"] = "recurrent"  # recurrent: Chung Table 1
    num_layers: int = Field(1, ge=1)
    bidirectional: bool = Field(False, description="a second stack of layers reads each sequence backwards; "
                                "only for tasks whose outputs may see the whole input")
    forget_bias: float = 1.0  # LSTMs only (Jozefowicz et al. 2015)
    init: Literal["default", "uniform"] = "default"  # uniform: U(-init_scale, init_scale), Chung's code
    init_scale: float = Field(0.1, gt=0)

    @model_validator(mode="after")
    def _size_given(self) -> "ModelConfig":
        if self.hidden_size is None and self.budget is None:
            raise ValueError("set model.hidden_size or model.budget")
        return self


class TrainConfig(_Strict):
    seed: int = Field(0, ge=0)
    optimizer: Literal["adam", "rmsprop", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    rmsprop_alpha: float = Field(0.99, gt=0, lt=1)  # the squared-gradient averaging constant
    rmsprop_floor: float = Field(
        0.0, ge=0, description="RMSProp's denominator max(sqrt(v), floor) (Chung et al.'s code: 1e-2); 0: torch's sqrt(v) + eps")
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(32, ge=1)
    max_epochs: int = Field(100, ge=1)
    max_steps: int = Field(-1, ge=-1, description="-1: no limit")
    limit_train_batches: int | None = Field(None, ge=1)
    limit_eval_batches: int | None = Field(None, ge=1)
    grad_clip: float | None = Field(1.0, gt=0, description="rescale the gradient norm to this; null: off")
    weight_noise: float = Field(0.0, ge=0, description="std of Gaussian noise on the recurrent weights")
    early_stopping_patience: int | None = Field(10, ge=1, description="epochs; null: off")
    stop_below_baseline: float | None = Field(
        None, gt=0, lt=1, description="stop a run once val_<metric> < this x the task's val_<metric>_baseline "
        "(e.g. 0.01: ten times below copy's and adding's 'solved' level of 0.1); null: off")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["32", "64"] = "32"
    progress_bar: bool = True
    # How many torch CPU threads train() uses; auto: rnnbench.training.threads.auto_threads (by the model's size).
    # It cannot change a number (the compiled loops' results do not depend on it), so it is not part
    # of a run's identity.
    threads: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    gradient_flow: bool = Field(True, description="probe ‖∂L_T/∂h_t‖ and gate saturation at init and after training")
    readout: Literal["optimizer", "ridge"] = Field(
        "optimizer", description="how a cell that trains no recurrent weight (esn) trains its output layer: by the "
        "optimizer, or by ridge regression on its states (rnnbench/training/ridge.py; the optimizer keys are then unused)")


class TrackingConfig(_Strict):
    experiment: str = "rnnbench"
    run_name: str | None = None
    tracking_uri: str | None = None  # else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here
    checkpoint_dir: str = "rnnbench_runs"


class Config(_Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: SerializeAsAny[Any] = None  # a TaskOptions subclass, chosen by task.name
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Config":
        """Validate a nested dict; raises RnnbenchError with one line naming the first bad key."""
        from rnnbench.cells import CELLS
        from rnnbench.tasks import get_task

        if not isinstance(raw, dict):
            raise RnnbenchError("config must be a mapping of sections (model, task, train, tracking)")
        raw = dict(raw)
        task_raw = raw.get("task") or {"name": "copy"}
        if isinstance(task_raw, str):
            task_raw = {"name": task_raw}
        if not isinstance(task_raw, dict):
            raise RnnbenchError("task: must be a mapping, e.g. task: {name: copy, seq_len: 100}")
        task_raw = {"name": "copy", **task_raw}
        options_cls = get_task(str(task_raw["name"])).Options
        try:
            raw["task"] = options_cls.model_validate(task_raw)
            config = cls.model_validate(raw)
        except ValidationError as e:
            raise RnnbenchError(_one_line(e, prefix="task" if not isinstance(raw["task"], BaseModel) else "")) from None
        if config.model.cell not in CELLS:
            raise RnnbenchError(f"unknown cell {config.model.cell!r}; valid cells: {', '.join(sorted(CELLS))}")
        if config.train.readout == "ridge":
            if CELLS[config.model.cell].count_params(1, 1) != 0:
                raise RnnbenchError(f"config train.readout=ridge: {config.model.cell} trains its recurrent weights; a ridge "
                                    "readout is for a cell that trains none (esn)")
            if get_task(config.task.name).ridge_readout is None:
                raise RnnbenchError(f"config train.readout=ridge: task {config.task.name} has no least-squares readout; "
                                    "use train.readout=optimizer")
        if config.train.weight_noise > 0 and CELLS[config.model.cell].count_params(1, 1) == 0:
            raise RnnbenchError(f"config train.weight_noise: {config.model.cell} trains no recurrent weights, so there is "
                                "nothing to add weight noise to; set train.weight_noise=0")
        _check_budget(config)
        return config

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def flat(self) -> dict[str, Any]:
        """{'model.cell': 'lstm', 'train.lr': 0.001, ...}: the form logged as MLflow params."""
        return flatten(self.to_dict())

    def identity(self) -> dict[str, Any]:
        """What determines this run's numbers: the config with NOT_IDENTITY applied (see there)."""
        return identity_dict(self.to_dict())

    def config_hash(self) -> str:
        """Stable id of what determines a run's numbers: the hash of `identity()`.

        Two configs that differ only in NOT_IDENTITY keys (progress bar, tracking) get one hash, so
        a `train` run and the sweep point of the same config and seed are one run for the report.
        """
        return identity_hash(self.identity())


NOT_IDENTITY: dict[str, str] = {
    # flat config key -> why it cannot change a number; every other field of Config and of every
    # task's Options is part of a run's identity (tests/test_config.py pins both lists).
    "train.progress_bar": "display only",
    "train.threads": "CPU threads: the compiled loops are bit-identical for any count (torch's threaded kernels may differ in float rounding, as between sweep worker counts)",
    "tracking.experiment": "where the run is recorded",
    "tracking.run_name": "a label",
    "tracking.tracking_uri": "where the run is recorded",
    "tracking.checkpoint_dir": "where checkpoints go; a resume reads back the same state wherever it is",
}
"""The keys left out of a run's identity (`Config.config_hash`, sweep point ids, the report's repeats).

Kept in on purpose: `train.device` and `train.precision` (CPU and CUDA kernels, float32 and float64,
give different numbers), `train.gradient_flow` (it changes what a run records: a sweep that asks
for the probes must not skip points recorded without them), every model, task and train option."""

IDENTITY_PINNED: dict[str, Any] = {"train.progress_bar": False}
"""Left-out keys the hash sees at a fixed value instead of not at all, so that no existing id
changes: sweeps always forced `progress_bar=false`, so pinning it there keeps every sweep's point
ids and config hashes as they were (a plain `train` run, default true, now gets the same hash as
the sweep point). The tracking section was never hashed and stays out."""


ADDED_DEFAULTS: dict[str, Any] = {"train.rmsprop_floor": 0.0, "model.bidirectional": False, "train.readout": "optimizer",
                                  "train.stop_below_baseline": None}
"""Keys added after runs were recorded, left out of the identity while at this default (the value
every earlier run had), so that existing config hashes and sweep point ids stay valid."""


def identity_dict(config: dict[str, Any]) -> dict[str, Any]:
    """A nested config dict (`Config.to_dict()` form) reduced to its identity: NOT_IDENTITY keys
    dropped, or set to their IDENTITY_PINNED value; ADDED_DEFAULTS keys dropped at their default;
    a section left empty is dropped."""
    out = {section: dict(values) if isinstance(values, dict) else values for section, values in config.items()}
    for key, default in ADDED_DEFAULTS.items():
        section, _, name = key.partition(".")
        values = out.get(section)
        if isinstance(values, dict) and name in values and values[name] == default:
            values.pop(name)
    for key in NOT_IDENTITY:
        section, _, name = key.partition(".")
        values = out.get(section)
        if not isinstance(values, dict):
            continue
        if key in IDENTITY_PINNED:
            values[name] = IDENTITY_PINNED[key]
        else:
            values.pop(name, None)
        if not values:
            del out[section]
    return out


def identity_hash(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def config_fields() -> set[str]:
    """Every flat config key: the fields of Config's sections and of every registered task's Options."""
    from rnnbench.tasks import TASKS

    keys = {f"{section}.{name}" for section in ("model", "train", "tracking")
            for name in Config.model_fields[section].annotation.model_fields}
    keys |= {f"task.{name}" for task in TASKS.values() for name in task.Options.model_fields}
    return keys


def identity_keys() -> set[str]:
    """The flat config keys that are part of a run's identity (all but NOT_IDENTITY)."""
    return config_fields() - set(NOT_IDENTITY)


def identity_from_params(params: dict[str, str]) -> str | None:
    """The identity hash of a run from its logged MLflow params (strings), for runs already in a store.

    The config is rebuilt from the params that are config fields and hashed as `Config.config_hash`
    does, so a run logged before NOT_IDENTITY existed (its `config_hash` tag then included
    `train.progress_bar`) gets today's identity. Where the params no longer validate (a run of an
    older schema, or a task param that `Task.describe` logged under an option's name), the hash of
    the identity params as logged; None where the run has no config params at all.
    """
    from rnnbench.tasks import TASKS

    task = params.get("task.name")
    if task is None or "model.cell" not in params:
        return None
    known = identity_keys()
    logged = {k: v for k, v in params.items() if k in known}
    raw: dict[str, Any] = {}
    options = TASKS[task].Options.model_fields if task in TASKS else {}
    for key, text in logged.items():
        section, _, name = key.partition(".")
        if section == "task" and name not in options:
            continue  # another task's option name, or a describe() fact
        if text == "None" and key in ADDED_DEFAULTS:
            continue  # a run logged before the key existed (an export's empty column): its default
        raw.setdefault(section, {})[name] = None if text == "None" else text
    try:
        return Config.from_dict(raw).config_hash()
    except (RnnbenchError, ValidationError, TypeError, ValueError):
        return "params:" + identity_hash({k: logged[k] for k in sorted(logged)})


def _check_budget(config: Config) -> None:
    """A budget below the smallest model of this cell on this task, or a bidirectional model on a task
    that predicts the next step, is refused now, not after the store and the run exist (the task's
    input and output sizes come from its options, without reading data)."""
    from rnnbench.budget import PRESETS, hidden_size_for_budget
    from rnnbench.tasks import get_task

    m = config.model
    if m.budget is None and not m.bidirectional:
        return
    task = get_task(config.task.name)(config.task, seed=config.train.seed)
    if m.bidirectional and task.bidirectional_outputs is None:
        raise RnnbenchError(f"config model.bidirectional: task {task.name} predicts each step from the steps before it, "
                            "so a bidirectional model would read the future; use it on a task whose outputs may see "
                            "the whole input (copy, adding, fsdd_digits, sequences with labels)")
    if m.budget is None:
        return
    budget = PRESETS[m.budget] if isinstance(m.budget, str) else m.budget
    try:
        hidden_size_for_budget(m.cell, task.input_size, budget, convention=m.budget_convention,
                               output_size=task.output_size, num_layers=m.num_layers, bidirectional=m.bidirectional)
    except RnnbenchError as e:
        raise RnnbenchError(f"config model.budget: {e}") from None


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _union_member(part: Any) -> bool:
    """A loc element pydantic adds for one member of a union (`int`, `literal['music','speech']`, ...)."""
    return str(part) in ("int", "float", "str", "bool", "none") or str(part).startswith(("literal[", "function-", "constrained-"))


def _one_line(e: ValidationError, prefix: str = "") -> str:
    errors = e.errors()
    err = errors[0]
    if err["loc"] and _union_member(err["loc"][-1]):  # a value no member of a union accepts: say all of them
        base = tuple(err["loc"][:-1])
        msgs = [x["msg"] for x in errors if tuple(x["loc"][:-1]) == base and x["loc"] and _union_member(x["loc"][-1])]
        err = {**err, "loc": base, "msg": "; or ".join(msgs)}
    loc = ".".join(str(p) for p in ((prefix,) if prefix else ()) + tuple(err["loc"]))
    if err["type"] == "extra_forbidden":
        return f"unknown config key {loc!r}" + _suggest(e, err)
    if err["type"] == "missing":
        return f"missing config key {loc!r}"
    value = err.get("input")
    shown = f" (got {value!r})" if not isinstance(value, (dict, BaseModel)) else ""
    return f"config {loc}: {err['msg']}{shown}" if loc else f"config: {err['msg']}"


def _suggest(e: ValidationError, err: dict) -> str:
    """'; did you mean ...' from the keys of the section the unknown key was found in."""
    from rnnbench.tasks import TASKS

    roots = {m.__name__: m for m in (Config, *(t.Options for t in TASKS.values()))}
    section: Any = roots.get(e.title)
    for part in err["loc"][:-1]:  # walk down to the section holding the unknown key
        field = section.model_fields.get(str(part)) if section is not None else None
        section = field.annotation if field is not None and isinstance(field.annotation, type) else None
    known = list(section.model_fields) if section is not None and issubclass(section, BaseModel) else []
    close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
    return f"; did you mean {close[0]!r}?" if close else (f"; valid keys: {', '.join(known)}" if known else "")


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """['train.lr=1e-3', 'model.cell=gru'] -> nested dict. Values are read as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise RnnbenchError(f"override {item!r} is not key=value (e.g. train.lr=0.001)")
        key, _, text = item.partition("=")
        if not key or any(not part for part in key.split(".")):
            raise RnnbenchError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(text) if text != "" else None
        except yaml.YAMLError:
            value = text
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RnnbenchError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return nested


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A spec file as a dict; one-line errors for a missing file or bad YAML."""
    p = Path(path)
    if not p.is_file():
        hint = (" (a key=value override where the spec goes: the first argument is a YAML spec, e.g. "
                "experiments/run_jsb.yaml, and the overrides follow it)") if "=" in str(path) else ""
        raise RnnbenchError(f"spec file not found: {path}{hint}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RnnbenchError(f"{path} is not a YAML text file (not UTF-8 at byte {e.start})") from None
    except OSError as e:
        raise RnnbenchError(f"cannot read spec file {path} ({e.strerror or e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RnnbenchError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RnnbenchError(f"{path}: top level must be a mapping")
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a run spec (model/task/train/tracking) and apply overrides."""
    raw = read_yaml(path) if path is not None else {}
    sweep_keys = sorted({"base", "grid", "random"} & set(raw))
    if sweep_keys:
        raise RnnbenchError(f"{path} is a sweep spec (it has {', '.join(sweep_keys)}): run it with `rnnbench sweep {path}`;"
                            " `rnnbench train` takes a run spec such as experiments/run_jsb.yaml")
    raw = deep_merge(raw, parse_overrides(overrides or []))
    return Config.from_dict(raw)
