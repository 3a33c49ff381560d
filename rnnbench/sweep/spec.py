"""A sweep spec (YAML) and its expansion into points: one validated run `Config` each.

    name: copy                          # tags every run of the sweep; letters, digits, . _ -
    description: ...                    # optional, free text
    base: {model: ..., task: ..., train: ..., tracking: ...}   # a run spec, as `rnnbench train` reads
    grid:                               # config path -> values; the cartesian product, in this order
      model.cell: [tanh, gru, lstm]     # or `all`: every registered cell
      train.seed: [0, 1, 2, 3, 4]
    random:                             # random search, crossed with the grid
      samples: 10
      seed: 0
      params: {train.lr: {loguniform: [6.1442e-06, 2.4788e-03]}}
    solved: {metric: ce, fraction_of_baseline: 0.1}   # optional, read by the report

The random samples are drawn once from `random.seed` and are the same for every grid point, so
"the best learning rate over seeds" is well defined; each point records its sample index as the
tag `sample`. Drawn floats are rounded to 4 significant digits (readable params, same draws).

A point's id is a hash of the sweep name and its config's identity (`Config.config_hash`, which
leaves out what cannot change a number: `rnnbench.config.NOT_IDENTITY`, e.g. the tracking settings
and the progress bar): the same spec gives the same ids, on any machine, in any order.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rnnbench.config import Config, deep_merge, parse_overrides, read_yaml
from rnnbench.errors import RnnbenchError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
SAMPLE_DIGITS = 4  # significant digits kept of a drawn float


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- random search: distributions ------------------------------------------------------------------
def _round(x: float) -> float:
    return float(f"{x:.{SAMPLE_DIGITS}g}")


def _loguniform(args: list[Any], u: float) -> float:
    lo, hi = math.log(args[0]), math.log(args[1])
    return _round(math.exp(lo + u * (hi - lo)))


def _uniform(args: list[Any], u: float) -> float:
    return _round(args[0] + u * (args[1] - args[0]))


def _randint(args: list[Any], u: float) -> int:
    return int(args[0]) + min(int(u * (int(args[1]) - int(args[0]) + 1)), int(args[1]) - int(args[0]))


def _choice(args: list[Any], u: float) -> Any:
    return args[min(int(u * len(args)), len(args) - 1)]


SAMPLERS: dict[str, Callable[[list[Any], float], Any]] = {
    "loguniform": _loguniform,  # [low, high], low > 0: exp(U(ln low, ln high)); Chung: [e^-12, e^-6]
    "uniform": _uniform,  # [low, high]
    "randint": _randint,  # [low, high], both included
    "choice": _choice,  # [v1, v2, ...]
}
"""Distribution name -> draw(args, u) with u ~ U(0, 1). Only `random.Random.random()` is used, which
Python keeps stable across versions, so a seed gives the same samples everywhere."""


class Distribution(_Strict):
    """Exactly one of the keys below, e.g. `{loguniform: [6.1e-6, 2.5e-3]}`."""

    loguniform: list[float] | None = None
    uniform: list[float] | None = None
    randint: list[int] | None = None
    choice: list[Any] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> "Distribution":
        given = [k for k in SAMPLERS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(SAMPLERS)}")
        kind, args = given[0], getattr(self, given[0])
        if kind == "choice":
            if not args:
                raise ValueError("choice needs at least one value")
            return self
        if len(args) != 2 or not args[0] < args[1]:
            raise ValueError(f"{kind} needs [low, high] with low < high")
        if kind == "loguniform" and args[0] <= 0:
            raise ValueError("loguniform needs low > 0")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in SAMPLERS if getattr(self, k) is not None)

    def draw(self, u: float) -> Any:
        return SAMPLERS[self.kind](getattr(self, self.kind), u)


class RandomSearch(_Strict):
    samples: int = Field(..., ge=1, description="number of draws, the same for every grid point")
    seed: int = Field(0, ge=0)
    params: dict[str, Distribution] = Field(..., min_length=1)

    def draws(self) -> list[dict[str, Any]]:
        """The `samples` assignments, in order; param names drawn in sorted order for stability."""
        rng = random.Random(self.seed)
        names = sorted(self.params)
        return [{name: self.params[name].draw(rng.random()) for name in names} for _ in range(self.samples)]


# --- the solved criterion (copy, adding) -----------------------------------------------------------
class SolvedRule(_Strict):
    """A run solves the task when test_<metric> < fraction_of_baseline x test_<metric>_baseline,
    or, with `threshold`, when test_<metric> < threshold. The report reads this block."""

    metric: str = Field(..., description="the task metric, e.g. ce (copy) or mse (adding)")
    fraction_of_baseline: float | None = Field(None, gt=0)
    threshold: float | None = None

    @model_validator(mode="after")
    def _one_rule(self) -> "SolvedRule":
        if (self.fraction_of_baseline is None) == (self.threshold is None):
            raise ValueError("give exactly one of fraction_of_baseline, threshold")
        return self

    def is_solved(self, metrics: dict[str, float]) -> bool | None:
        """Whether a run with these final metrics solved the task; None if a metric is missing."""
        key = "test_" + self.metric.removeprefix("test_")
        value = metrics.get(key)
        if value is None:
            return None
        if self.threshold is not None:
            return value < self.threshold
        baseline = metrics.get(f"{key}_baseline")
        return None if baseline is None else value < self.fraction_of_baseline * baseline  # type: ignore[operator]


# --- the spec --------------------------------------------------------------------------------------
class SweepSpec(_Strict):
    name: str = Field(..., pattern=NAME_PATTERN)
    description: str = ""
    base: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    random: RandomSearch | None = None
    solved: SolvedRule | None = None

    @field_validator("grid", mode="before")
    @classmethod
    def _every_cell(cls, grid: Any) -> Any:
        # `model.cell: all`: every cell of the registry, so a new cell joins such sweeps by itself
        if isinstance(grid, dict) and grid.get("model.cell") == "all":
            from rnnbench.cells import CELLS

            grid = {**grid, "model.cell": sorted(CELLS)}
        return grid

    @field_validator("grid")
    @classmethod
    def _grid_values(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for path, values in grid.items():
            _check_path(path)
            if not values:
                raise ValueError(f"grid {path!r} has no values")
        return grid

    @model_validator(mode="after")
    def _disjoint(self) -> "SweepSpec":
        for path in self.random.params if self.random else ():
            _check_path(path)
            if path in self.grid:
                raise ValueError(f"{path!r} is both in grid and in random.params")
        return self

    def spec_hash(self, overrides: list[str] | None = None) -> str:
        """Id of this spec plus the command-line overrides (tagged on the sweep's runs)."""
        d = {"spec": self.model_dump(mode="json"), "overrides": list(overrides or [])}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


SWEEPABLE = ("model", "task", "train")


def _check_path(path: str) -> None:
    """A dotted config path (train.seed), or a whole section whose values are mappings (task)."""
    parts = path.split(".")
    if any(not p for p in parts) or parts[0] not in (*SWEEPABLE, "tracking"):
        raise ValueError(f"{path!r} is not a config path like train.seed, model.cell or task")
    if parts[0] == "tracking":
        raise ValueError(f"{path!r}: tracking settings are shared by the whole sweep; set them in base")


def spec_from_dict(raw: dict[str, Any], where: str = "spec") -> SweepSpec:
    """Validate a sweep spec; RnnbenchError with one line naming the first bad key."""
    run_keys = sorted({"model", "task", "train", "tracking"} & set(raw)) if isinstance(raw, dict) else []
    if run_keys and "base" not in raw:
        raise RnnbenchError(f"{where} is a run spec (it has {', '.join(run_keys)}): train it with `rnnbench train {where}`,"
                            " or put it under `base:` beside a `grid:` to sweep it")
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as e:
        raise RnnbenchError(f"{where}: {_one_line(e)}") from None


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep spec file."""
    return spec_from_dict(read_yaml(path), where=str(path))


def _one_line(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
    if err["type"] == "extra_forbidden":
        known = {
            (): SweepSpec.model_fields,
            ("random",): RandomSearch.model_fields,
            ("solved",): SolvedRule.model_fields,
        }.get(tuple(str(p) for p in err["loc"][:-1]))
        if known is None and len(err["loc"]) >= 3 and err["loc"][:2] == ("random", "params"):
            known = Distribution.model_fields
        hint = f"; valid keys: {', '.join(known)}" if known else ""
        return f"unknown key {loc!r}{hint}"
    if err["type"] == "missing":
        return f"missing key {loc!r}"
    msg = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    shown = f" (got {value!r})" if isinstance(value, (str, int, float)) and err["type"] != "value_error" else ""
    return f"{loc}: {msg}{shown}" if loc else msg


# --- expansion -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Point:
    """One run of the sweep: its validated config and what the grid/random search chose for it."""

    index: int
    point_id: str
    config: Config
    assignments: dict[str, Any] = field(default_factory=dict)  # config path -> value (grid + random)
    sample: int | None = None  # random-search sample index

    @property
    def label(self) -> str:
        """Short human name, e.g. 'cell=gru seed=0 lr=0.0001234 sample=3'."""
        return point_label(self.assignments, self.sample)


def point_label(assignments: dict[str, Any], sample: int | None = None) -> str:
    parts = [f"{_key(path)}={_short(v)}" for path, v in assignments.items()]
    if sample is not None:
        parts.append(f"sample={sample}")
    return " ".join(parts) or "base"


def _key(path: str) -> str:
    """'train.seed' -> 'seed'; 'task.name' -> 'task'."""
    parts = path.split(".")
    return parts[-2] if parts[-1] == "name" else parts[-1]


def _short(value: Any) -> str:
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (dict, list)) else str(value)


def point_id(sweep: str, config: Config) -> str:
    """Stable id of a point: sweep name + the config's identity hash (rnnbench.config.NOT_IDENTITY left out)."""
    return hashlib.sha256(f"{sweep}\n{config.config_hash()}".encode()).hexdigest()[:16]


def set_path(raw: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `raw` with `value` at the dotted `path` (a mapping value is merged into what is there)."""
    *parents, last = path.split(".")
    update: dict[str, Any] = {last: copy.deepcopy(value)}
    for part in reversed(parents):
        update = {part: update}
    return deep_merge(raw, update)


def base_with_overrides(spec: SweepSpec, overrides: list[str] | None = None) -> dict[str, Any]:
    """The spec's base with `key=value` overrides applied; an override may not name a swept key."""
    update = parse_overrides(overrides or [])
    swept = set(spec.grid) | set(spec.random.params if spec.random else ())
    for item in overrides or []:
        key = item.partition("=")[0]
        if key in swept:
            raise RnnbenchError(f"override {item!r}: {key} is swept by the spec's grid/random; edit the spec instead")
    raw = deep_merge(spec.base, update)
    tracking = raw.get("tracking")
    if tracking is not None and not isinstance(tracking, dict):
        raise RnnbenchError("base.tracking must be a mapping")
    if "experiment" not in (tracking or {}):  # a sweep's runs go to an experiment named after it
        raw = set_path(raw, "tracking.experiment", spec.name)
    return set_path(raw, "train.progress_bar", False)  # many runs: one progress bar, the sweep's


def expand(spec: SweepSpec, overrides: list[str] | None = None) -> list[Point]:
    """Every point of the sweep, validated, in order: the grid's product (first key outermost),
    then the random samples innermost. Points with identical configs are kept once."""
    raw_base = base_with_overrides(spec, overrides)
    try:
        Config.from_dict(raw_base)
    except RnnbenchError as e:
        raise RnnbenchError(f"base: {e}") from None
    paths = list(spec.grid)
    draws: list[dict[str, Any] | None] = list(spec.random.draws()) if spec.random else [None]
    points: list[Point] = []
    seen: set[str] = set()
    for combo in itertools.product(*(spec.grid[p] for p in paths)):
        for sample, draw in enumerate(draws):
            assignments = {**dict(zip(paths, combo)), **(draw or {})}
            index = sample if draw is not None else None
            raw = raw_base
            for path, value in assignments.items():
                raw = set_path(raw, path, value)
            try:
                config = Config.from_dict(raw)
            except RnnbenchError as e:
                raise RnnbenchError(f"grid point {point_label(assignments, index)}: {e}") from None
            pid = point_id(spec.name, config)
            if pid not in seen:
                seen.add(pid)
                points.append(Point(len(points), pid, config, assignments, index))
    return points
