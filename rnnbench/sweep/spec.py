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
    halving:                            # optional: successive halving over the random samples
      rungs: [10, 30, 90, 270]          # epochs at which the samples still training are ranked
      reduction: 3                      # each rung keeps the best 1/reduction (rounded up)
      search_seed: 0                    # the seed every sample trains at during the search
      seeds: [0, 1, 2, 3, 4]            # then these seeds at the chosen sample
    solved: {metric: ce, fraction_of_baseline: 0.1}   # optional, read by the report

With `halving`, a grid point is tuned in two stages. Search: its random samples train together (one
population, train.seed = search_seed) and at each rung the samples still training are ranked with
those already done by their best validation score so far; all but the best 1/reduction of them stop
(tag stopped_by=pruned). The chosen sample is the one with the best validation score among those
never pruned (so its search run is a complete run, equal to training it alone). Final: the grid point
trains at the chosen sample with every seed of `seeds` (the search run is the search seed's, when it
is one of them). Points carry the tag `stage` (search, final). Every cell gets the same samples and
the same rungs: equal tuning budgets.

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


# --- successive halving ----------------------------------------------------------------------------
class Halving(_Strict):
    """Successive halving over the random samples, then seeds at the chosen one (module docstring)."""

    rungs: list[int] = Field(..., min_length=1, description="epochs at which the samples are ranked, increasing")
    reduction: int = Field(3, ge=2, description="keep the best 1/reduction at each rung (rounded up)")
    search_seed: int = Field(0, ge=0)
    seeds: list[int] = Field(..., min_length=1, description="seeds trained at the chosen sample")

    @field_validator("rungs")
    @classmethod
    def _increasing(cls, rungs: list[int]) -> list[int]:
        if rungs[0] < 1 or any(b <= a for a, b in zip(rungs, rungs[1:])):
            raise ValueError("rungs must be increasing epochs >= 1")
        return rungs


# --- the spec --------------------------------------------------------------------------------------
class SweepSpec(_Strict):
    name: str = Field(..., pattern=NAME_PATTERN)
    description: str = ""
    base: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    random: RandomSearch | None = None
    halving: Halving | None = None
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
        if self.halving is not None:
            if self.random is None:
                raise ValueError("halving needs random: the samples it chooses between")
            if "train.seed" in self.grid:
                raise ValueError("with halving the seeds are halving.search_seed and halving.seeds, not grid train.seed")
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


def restrict(spec: SweepSpec, only: list[str]) -> SweepSpec:
    """The spec with grid keys cut to the given values (`task.name=jsb`, repeatable): one chunk of a
    sweep. Its points keep their ids (an id is the sweep name and the config), so chunks add up."""
    import yaml

    wanted: dict[str, list[Any]] = {}
    for item in only:
        key, sep, text = item.partition("=")
        if not sep or key not in spec.grid:
            raise RnnbenchError(f"--only {item!r}: give KEY=VALUE with KEY one of the grid's keys: {', '.join(spec.grid)}")
        value = yaml.safe_load(text)
        if value not in spec.grid[key]:
            raise RnnbenchError(f"--only {item!r}: {key} takes {', '.join(map(str, spec.grid[key]))} in this spec")
        wanted.setdefault(key, []).append(value)
    grid = {k: [v for v in values if k not in wanted or v in wanted[k]] for k, values in spec.grid.items()}
    return spec.model_copy(update={"grid": grid})


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
            ("halving",): Halving.model_fields,
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
    stage: str | None = None  # with halving: "search" or "final"

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
    swept = set(spec.grid) | set(spec.random.params if spec.random else ()) | ({"train.seed"} if spec.halving else set())
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
    then the random samples innermost. Points with identical configs are kept once. With halving,
    these are the search stage's points (each sample at the search seed); `final_points` gives the rest."""
    draws: list[dict[str, Any] | None] = list(spec.random.draws()) if spec.random else [None]
    if spec.halving is None:
        return _points(spec, overrides, [(s if d is not None else None, d, None) for s, d in enumerate(draws)])
    seed = {"train.seed": spec.halving.search_seed}
    return _points(spec, overrides, [(s, {**d, **seed}, "search") for s, d in enumerate(draws) if d is not None])


def grid_key(spec: SweepSpec, point: Point) -> str:
    """The grid point a point belongs to (its grid assignments, as JSON): what halving tunes over."""
    return json.dumps([point.assignments.get(p) for p in spec.grid], default=str)


def final_points(spec: SweepSpec, chosen: dict[str, int], overrides: list[str] | None = None) -> list[Point]:
    """With halving: the final stage, each grid point (by `grid_key`) in `chosen` at its chosen sample
    with every seed of halving.seeds."""
    assert spec.halving is not None and spec.random is not None
    draws = spec.random.draws()
    wanted = [(s, {**d, "train.seed": seed}, "final") for s, d in enumerate(draws) for seed in spec.halving.seeds]
    return [p for p in _points(spec, overrides, wanted) if chosen.get(grid_key(spec, p)) == p.sample]


def _points(spec: SweepSpec, overrides: list[str] | None,
            inner: list[tuple[int | None, dict[str, Any] | None, str | None]]) -> list[Point]:
    """The grid's product crossed with `inner` (sample index, assignments, stage), validated."""
    raw_base = base_with_overrides(spec, overrides)
    try:
        Config.from_dict(raw_base)
    except RnnbenchError as e:
        raise RnnbenchError(f"base: {e}") from None
    paths = list(spec.grid)
    points: list[Point] = []
    seen: set[str] = set()
    for combo in itertools.product(*(spec.grid[p] for p in paths)):
        for index, draw, stage in inner:
            assignments = {**dict(zip(paths, combo)), **(draw or {})}
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
                points.append(Point(len(points), pid, config, assignments, index, stage))
    return points
