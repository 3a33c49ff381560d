"""Optimizers, gradient clipping and weight noise for a population of K models on stacked tensors.

Every parameter is one (K, ...) tensor whose row k belongs to member k, and every per-member
hyperparameter is a (K,) tensor. Each function below does a fixed number of vectorized operations
per parameter tensor (or in total), whatever K: there is no Python loop over members, and row k of
every result depends only on row k of the inputs, so a member's numbers do not depend on its
population.

* `StackedOptimizer`: Adam, RMSprop and SGD with exactly torch.optim's arithmetic per member
  (checked against torch.optim per member in float64 by tests/test_optim.py), plus the RMS floor of
  Chung et al.'s code as an RMSprop option.
* `clip_grad_norms_`: torch.nn.utils.clip_grad_norm_ per member.
* `weight_noise` / `WeightNoise`: Gaussian noise from a counter-based generator keyed on (member
  key, member step, parameter index, element index), so the same numbers come out whatever K, the
  batch-mates or the device.

The per-step calls (step(), clip_grad_norms_, WeightNoise) are free of host synchronisation (no
.item(), no branch on a tensor's value), so a whole population step can be captured in a CUDA graph;
hyperparameters changed between steps go through `StackedOptimizer.set_hyper`, which writes in
place for that reason (it, select() and load_state_dict() may synchronise: call them outside).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from rnnbench.errors import RnnbenchError

# --- StackedOptimizer ------------------------------------------------------------------------------

# The per-member hyperparameters of each kind and their defaults (torch.optim's; None: required).
# rms_floor is Chung et al.'s stabiliser (see StackedOptimizer); 0 keeps torch's sqrt(v) + eps.
HYPER_DEFAULTS: dict[str, dict[str, float | None]] = {
    "adam": {"lr": None, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8},
    "rmsprop": {"lr": None, "weight_decay": 0.0, "momentum": 0.0, "alpha": 0.99, "eps": 1e-8, "rms_floor": 0.0},
    "sgd": {"lr": None, "weight_decay": 0.0, "momentum": 0.0},
}
# The per-parameter state tensors of each kind, shaped like the parameter (torch.optim's names).
STATE_NAMES: dict[str, tuple[str, ...]] = {
    "adam": ("exp_avg", "exp_avg_sq"),
    "rmsprop": ("square_avg", "momentum_buffer"),
    "sgd": ("momentum_buffer",),
}


def _rows(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (K,) tensor as (K, 1, 1, ...) to broadcast against the (K, ...) tensor `like`."""
    return values.view((values.shape[0],) + (1,) * (like.dim() - 1))


class StackedOptimizer:
    """torch.optim's Adam, RMSprop or SGD for K members at once, each with its own hyperparameters.

    `params`: leaf tensors of shape (K, ...), row k is member k's. `hyper`: name -> (K,) tensor (or a
    number, the same for every member); the names of each kind and their defaults are
    HYPER_DEFAULTS (lr is required). Held in float64 on the parameters' device whatever the
    parameters' dtype: torch.optim keeps them as Python floats (doubles) too.

    Per member, exactly torch.optim's update (same operations in the same order):
    * adam: torch.optim.Adam (amsgrad=False): weight decay is L2 added to the gradient (not AdamW);
      bias corrections from the member's own step count.
    * rmsprop: torch.optim.RMSprop (centered=False): v = alpha v + (1 - alpha) g^2,
      buf = momentum buf + g / (sqrt(v) + eps), p -= lr buf. With momentum 0 this is torch's
      p -= lr g / (sqrt(v) + eps) (the buffer is then just that quotient).
      rms_floor > 0 replaces the denominator by max(sqrt(v), rms_floor) (no eps): the stabiliser of
      Chung et al. (2014)'s released code, which floors the RMS at 1e-2 so that parameters with tiny
      gradients do not get huge steps. Members with rms_floor 0 keep torch's form.
    * sgd: torch.optim.SGD (dampening 0, nesterov False): buf = momentum buf + g, p -= lr buf; the
      first step's buf is g, as torch's (buffers start at zero).
    A parameter whose .grad is None is skipped, as torch.optim does; the step counts `steps` (K,)
    advance for every member at each step(). (torch counts Adam's steps per tensor, so the two differ
    only for a tensor that missed a gradient earlier: the population always has every gradient.)
    """

    def __init__(self, kind: str, params: Sequence[torch.Tensor], hyper: Mapping[str, torch.Tensor | float]) -> None:
        if kind not in HYPER_DEFAULTS:
            raise ValueError(f"optimizer kind {kind!r} is not one of {sorted(HYPER_DEFAULTS)}")
        params = list(params)
        if not params:
            raise ValueError("StackedOptimizer needs at least one parameter tensor")
        self.kind = kind
        self.params = params
        self.members = params[0].shape[0]
        self._check_params(params)
        unknown = sorted(set(hyper) - set(HYPER_DEFAULTS[kind]))
        if unknown:
            raise ValueError(f"{kind} has no hyperparameter {', '.join(unknown)}; it has {', '.join(HYPER_DEFAULTS[kind])}")
        device = params[0].device
        self.hyper: dict[str, torch.Tensor] = {}
        for name, default in HYPER_DEFAULTS[kind].items():
            value = hyper.get(name, default)
            if value is None:
                raise ValueError(f"{kind} needs the hyperparameter {name}")
            self.hyper[name] = self._member_values(name, value, device)
        self.steps = torch.zeros(self.members, dtype=torch.int64, device=device)
        self._refresh_switches()
        self._scratch_tensors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.state: list[dict[str, torch.Tensor]] = [
            {name: torch.zeros_like(p, memory_format=torch.contiguous_format) for name in STATE_NAMES[kind]} for p in params
        ]

    # -- construction helpers --
    def _check_params(self, params: list[torch.Tensor]) -> None:
        for p in params:
            if p.dim() < 1 or p.shape[0] != self.members:
                raise ValueError(f"every parameter must be (K={self.members}, ...); got {tuple(p.shape)}")
            if p.dtype != params[0].dtype or p.device != params[0].device:
                raise ValueError("all parameters of a StackedOptimizer must share one dtype and device")

    def _member_values(self, name: str, value: torch.Tensor | float, device: torch.device) -> torch.Tensor:
        values = torch.as_tensor(value, dtype=torch.float64).to(device)
        if values.dim() == 0:
            values = values.expand(self.members)
        if values.shape != (self.members,):
            raise ValueError(f"hyperparameter {name} must be one number or a ({self.members},) tensor; got {tuple(values.shape)}")
        return values.clone()

    def _refresh_switches(self) -> None:
        # Which optional operations step() runs, decided here on the host (never inside step(), which
        # must not synchronise): weight decay when any member decays, the RMS floor when any floors.
        self._decays = bool((self.hyper["weight_decay"] != 0).any())
        self._floors = bool((self.hyper["rms_floor"] > 0).any()) if "rms_floor" in self.hyper else False

    def set_hyper(self, name: str, value: torch.Tensor | float) -> None:
        """Change one hyperparameter of every member (e.g. a decayed learning rate), in place: a
        captured CUDA graph reads the same memory. (Turning weight decay or the RMS floor on for the
        first member adds operations to step(): capture again after that.)"""
        if name not in self.hyper:
            raise ValueError(f"{self.kind} has no hyperparameter {name}")
        self.hyper[name].copy_(self._member_values(name, value, self.hyper[name].device))
        self._refresh_switches()

    # -- the update --
    @torch.no_grad()
    def step(self) -> None:
        """One update of every member from the parameters' .grad (a few foreach ops per tensor)."""
        self.steps.add_(1)
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not live:
            return
        params = [self.params[i] for i in live]
        grads = [self.params[i].grad for i in live]
        state = {name: [self.state[i][name] for i in live] for name in STATE_NAMES[self.kind]}
        dtype = params[0].dtype

        def rows(values: torch.Tensor) -> list[torch.Tensor]:  # (K,) -> one broadcastable view per tensor
            values = values.to(dtype)
            return [_rows(values, p) for p in params]

        h = self.hyper
        # Temporaries go into two persistent scratch tensors per parameter: on the CPU a fresh
        # (K, ...) tensor is a fresh mmap whose pages fault in at every step, which costs more than
        # the arithmetic at K = 32.
        scratch = [self._scratch(i) for i in live]
        first, second = [s[0] for s in scratch], [s[1] for s in scratch]
        # L2 weight decay: g + p wd, torch's grad.add(param, alpha=wd), without touching p.grad;
        # skipped, as torch does, when no member decays.
        if self._decays:
            torch._foreach_copy_(first, grads)
            torch._foreach_addcmul_(first, params, rows(h["weight_decay"]))
            grads = first

        if self.kind == "adam":
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            torch._foreach_lerp_(exp_avg, grads, rows(1 - h["beta1"]))
            # exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2): addcmul's (value * g) * g
            torch._foreach_mul_(exp_avg_sq, rows(h["beta2"]))
            torch._foreach_copy_(second, grads)
            torch._foreach_mul_(second, rows(1 - h["beta2"]))
            torch._foreach_addcmul_(exp_avg_sq, second, grads)
            # bias corrections per member, in float64 as torch's Python floats
            step = self.steps.to(torch.float64)
            step_size = h["lr"] / (1 - h["beta1"] ** step)
            correction2_sqrt = (1 - h["beta2"] ** step).sqrt()
            denom = second  # sqrt(exp_avg_sq) / correction2_sqrt + eps
            torch._foreach_copy_(denom, exp_avg_sq)
            torch._foreach_sqrt_(denom)
            torch._foreach_div_(denom, rows(correction2_sqrt))
            torch._foreach_add_(denom, rows(h["eps"]))
            # param.addcdiv_(exp_avg, denom, value=-step_size): p + (exp_avg / denom) (-step_size)
            torch._foreach_copy_(first, exp_avg)  # the decayed gradient is no longer needed
            torch._foreach_div_(first, denom)
            torch._foreach_addcmul_(params, first, rows(-step_size))
        elif self.kind == "rmsprop":
            square_avg, buf = state["square_avg"], state["momentum_buffer"]
            torch._foreach_mul_(square_avg, rows(h["alpha"]))
            torch._foreach_copy_(second, grads)
            torch._foreach_mul_(second, rows(1 - h["alpha"]))
            torch._foreach_addcmul_(square_avg, second, grads)
            denom = second
            torch._foreach_copy_(denom, square_avg)
            torch._foreach_sqrt_(denom)
            if self._floors:  # torch's members: sqrt(v) + eps, max(., 0) a no-op; Chung's: max(sqrt(v), floor)
                eps = torch.where(h["rms_floor"] > 0, torch.zeros_like(h["eps"]), h["eps"])
                torch._foreach_add_(denom, rows(eps))
                torch._foreach_maximum_(denom, rows(h["rms_floor"]))
            else:
                torch._foreach_add_(denom, rows(h["eps"]))
            torch._foreach_mul_(buf, rows(h["momentum"]))
            torch._foreach_addcdiv_(buf, grads, denom)
            torch._foreach_addcmul_(params, buf, rows(-h["lr"]))  # param.add_(buf, alpha=-lr)
        else:  # sgd
            buf = state["momentum_buffer"]
            torch._foreach_mul_(buf, rows(h["momentum"]))
            torch._foreach_add_(buf, grads)
            torch._foreach_addcmul_(params, buf, rows(-h["lr"]))  # param.add_(buf, alpha=-lr)

    def _scratch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two tensors shaped like parameter i, made once (again after select() or to())."""
        p = self.params[i]
        found = self._scratch_tensors.get(i)
        if found is None or found[0].shape != p.shape or found[0].dtype != p.dtype or found[0].device != p.device:
            found = (torch.empty_like(p, memory_format=torch.contiguous_format), torch.empty_like(p, memory_format=torch.contiguous_format))
            self._scratch_tensors[i] = found
        return found

    # -- checkpoints and membership --
    def state_dict(self) -> dict:
        """Tensors, strings and numbers only (torch.load(weights_only=True) reads it back)."""
        return {
            "kind": self.kind,
            "members": self.members,
            "steps": self.steps.clone(),
            "hyper": {name: t.clone() for name, t in self.hyper.items()},
            "state": [{name: t.clone() for name, t in s.items()} for s in self.state],
        }

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Restore what state_dict() returned, in place (tensors keep their memory for CUDA graphs)."""
        problem = self._state_problem(state_dict)
        if problem:
            raise RnnbenchError(f"optimizer state does not fit this population: {problem}")
        self.steps.copy_(state_dict["steps"])
        for name, t in self.hyper.items():
            t.copy_(state_dict["hyper"][name])
        for mine, saved in zip(self.state, state_dict["state"], strict=True):
            for name, t in mine.items():
                t.copy_(saved[name])
        self._refresh_switches()

    def _state_problem(self, state_dict: Mapping) -> str | None:
        if state_dict.get("kind") != self.kind:
            return f"it is {state_dict.get('kind')!r}, this optimizer is {self.kind!r}"
        if state_dict.get("members") != self.members:
            return f"it has {state_dict.get('members')} members, this population {self.members}"
        if set(state_dict.get("hyper", {})) != set(self.hyper):
            return f"hyperparameters {sorted(state_dict.get('hyper', {}))}, expected {sorted(self.hyper)}"
        saved = state_dict.get("state", [])
        if len(saved) != len(self.state):
            return f"{len(saved)} parameter tensors, expected {len(self.state)}"
        for i, (mine, theirs) in enumerate(zip(self.state, saved)):
            for name, t in mine.items():
                if name not in theirs or tuple(theirs[name].shape) != tuple(t.shape):
                    return f"parameter {i} {name}: shape {tuple(theirs[name].shape) if name in theirs else 'missing'}, expected {tuple(t.shape)}"
        return None

    def member_state(self, row: int) -> dict:
        """Row `row`'s share of state_dict() (one member's checkpoint)."""
        return {"kind": self.kind, "steps": self.steps[row].clone(),
                "hyper": {name: t[row].clone() for name, t in self.hyper.items()},
                "state": [{name: t[row].clone() for name, t in s.items()} for s in self.state]}

    def load_member_state(self, row: int, saved: Mapping) -> None:
        """Put a member_state() into row `row` (a resumed member in a new population)."""
        if saved.get("kind") != self.kind or len(saved.get("state", [])) != len(self.state):
            raise RnnbenchError(f"optimizer state of a {saved.get('kind')!r} member does not fit this {self.kind!r} population")
        self.steps[row] = saved["steps"]
        for name, t in self.hyper.items():
            t[row] = saved["hyper"][name]
        for mine, theirs in zip(self.state, saved["state"]):
            for name, t in mine.items():
                t[row].copy_(theirs[name])
        self._refresh_switches()

    def select(self, index: torch.Tensor, params: Sequence[torch.Tensor] | None = None) -> None:
        """Keep only the members `index` (a LongTensor of rows, in the new order) of all state and
        hyperparameters, e.g. to drop finished members. `params`: the caller's re-sliced parameter
        tensors, when they are new tensors (default: self.params, already re-sliced in place)."""
        index = index.to(device=self.steps.device, dtype=torch.int64)
        self.params = list(self.params if params is None else params)
        self.members = int(index.numel())
        self._check_params(self.params)
        self.steps = self.steps.index_select(0, index)
        self.hyper = {name: t.index_select(0, index) for name, t in self.hyper.items()}
        self.state = [{name: t.index_select(0, index) for name, t in s.items()} for s in self.state]
        self._refresh_switches()
        self._scratch_tensors.clear()
        for p, s in zip(self.params, self.state, strict=True):
            for name, t in s.items():
                if t.shape != p.shape:
                    raise ValueError(f"after select, {name} is {tuple(t.shape)} but its parameter {tuple(p.shape)}")

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> StackedOptimizer:
        """Move the state (and the step counts and hyperparameters) after the caller moved the
        parameters; `dtype` casts the per-parameter state (hyperparameters stay float64)."""
        self.steps = self.steps.to(device)
        self.hyper = {name: t.to(device) for name, t in self.hyper.items()}
        self.state = [{name: t.to(device=device, dtype=dtype) for name, t in s.items()} for s in self.state]
        self._scratch_tensors.clear()
        return self

    def zero_grad(self) -> None:
        """Drop the gradients (set_to_none, torch.optim's default)."""
        for p in self.params:
            p.grad = None


# --- clipping --------------------------------------------------------------------------------------


@torch.no_grad()
def clip_grad_norms_(params: Sequence[torch.Tensor], max_norm: torch.Tensor) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ per member: returns the (K,) total 2-norms before clipping.

    Member k's norm is over row k of every parameter's .grad (None: skipped); its gradients are
    scaled by min(1, max_norm[k] / (norm[k] + 1e-6)), torch's coefficient. max_norm[k] = inf turns
    clipping off for that member (a factor of exactly 1). A member whose norm is inf or nan gets a
    scale of 0 or nan on its own rows only, as torch's would: the other members are untouched, and
    the caller sees the non-finite norm and retires that member."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(params[0].shape[0], dtype=params[0].dtype, device=params[0].device)
    members = grads[0].shape[0]
    # torch: the norm of each tensor, then the norm of those norms
    per_tensor = torch.stack([torch.linalg.vector_norm(g.reshape(members, -1), 2, dim=1) for g in grads], dim=1)
    norms = torch.linalg.vector_norm(per_tensor, 2, dim=1)
    max_norm = max_norm.to(device=norms.device, dtype=norms.dtype)
    scale = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
    torch._foreach_mul_(grads, [_rows(scale.to(g.dtype), g) for g in grads])
    return norms


# --- weight noise ----------------------------------------------------------------------------------
#
# A counter-based generator: every number is a hash of its coordinates (member key, member step,
# parameter index, element index), so no generator state is carried and no member's numbers depend
# on how many others are drawn with it. The hash is splitmix64's finaliser (Steele, Lea & Flood 2014,
# "Fast splittable pseudorandom number generators"; the mixer behind java.util.SplittableRandom),
# in int64 torch ops: multiplication wraps modulo 2^64 as on unsigned integers, and the right
# shifts are made logical with a mask. Two 32-bit halves of one hash give one Box-Muller pair.
# torch's own generators are not counter-based on the CPU (mt19937), and numpy's Philox would need
# a loop over members on the host, so the few lines below are hand-written; tests/test_optim.py
# checks them against a pure-Python splitmix64.

_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment (2^64 / golden ratio)
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _signed(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (bit-for-bit the unsigned 64-bit version)."""
    return _mix64_(x.clone(), torch.empty_like(x))


def _mix64_(x: torch.Tensor, spare: torch.Tensor) -> torch.Tensor:
    # In place on x with one spare tensor of its shape: on the CPU, fresh (K, elements) temporaries
    # page-fault in at every call and cost more than the arithmetic.
    for bits, multiplier in ((30, _MIX1), (27, _MIX2), (31, None)):
        torch.bitwise_right_shift(x, bits, out=spare)
        spare.bitwise_and_((1 << (64 - bits)) - 1)  # logical shift: drop the copies of the sign bit
        x.bitwise_xor_(spare)
        if multiplier is not None:
            x.mul_(_signed(multiplier))
    return x


def _absorb(state: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Hash one more coordinate into a stream seed."""
    return mix64(state ^ mix64(value + _signed(_GAMMA)))


class WeightNoise:
    """Gaussian noise for K members' parameters from a counter-based generator.

    `shapes`: one member's parameter shapes (without the leading K). Calling it with keys (K,)
    int64 (e.g. the members' seeds), steps (K,) int64 (their optimizer steps) and stds (K,) gives
    one (K, *shape) tensor per parameter, row k drawn from N(0, stds[k]^2) as a function of (keys[k],
    steps[k], parameter index, element index) only: the same numbers whatever K, the other members
    or the device (computed in float64, then cast to `dtype`; CPU and CUDA may differ in the last
    float64 bit of log/cos). A std of 0 gives exact zeros. About 25 vectorized ops per call over all
    parameters together, whatever K and the number of parameters.
    """

    def __init__(self, shapes: Sequence[Sequence[int]], dtype: torch.dtype, device: torch.device | str) -> None:
        self.shapes = [tuple(int(n) for n in shape) for shape in shapes]
        self.dtype = dtype
        self.device = torch.device(device)
        self.sizes = [math.prod(shape) for shape in self.shapes]
        pairs = [(n + 1) // 2 for n in self.sizes]  # one Box-Muller pair gives elements 2j and 2j + 1
        # for every pair of every parameter: its parameter's index and its counter within that parameter
        self._parameter_of_pair = torch.repeat_interleave(torch.arange(len(pairs)), torch.tensor(pairs, dtype=torch.int64)).to(self.device)
        pair_in_parameter = torch.cat([torch.arange(n, dtype=torch.int64) for n in pairs])
        self._pair_offset = ((pair_in_parameter + 1) * _signed(_GAMMA)).to(self.device)
        self._parameter_index = torch.arange(len(pairs), dtype=torch.int64, device=self.device)

    def standard_normal(self, keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """(K, 2 * pairs) float64 N(0, 1) numbers of every parameter, concatenated (pairs padded)."""
        keys = keys.to(device=self.device, dtype=torch.int64)
        steps = steps.to(device=self.device, dtype=torch.int64)
        seeds = _absorb(mix64(keys), steps)  # (K,)
        streams = _absorb(seeds[:, None], self._parameter_index[None, :])  # (K, parameters)
        # splitmix64: output j of the stream seeded s is mix64(s + (j + 1) * gamma)
        bits = streams[:, self._parameter_of_pair]
        bits.add_(self._pair_offset)
        spare = torch.empty_like(bits)
        _mix64_(bits, spare)
        high = torch.bitwise_right_shift(bits, 32, out=spare).bitwise_and_(0xFFFFFFFF)
        low = bits.bitwise_and_(0xFFFFFFFF)
        # Box-Muller: radius sqrt(-2 log u1) with u1 = (high + 1) / 2^32 in (0, 1] (never log 0),
        # angle 2 pi low / 2^32; elements 2j and 2j + 1 are radius cos(angle) and radius sin(angle)
        radius = high.to(torch.float64).add_(1).mul_(2.0**-32).log_().mul_(-2).sqrt_()
        angle = low.to(torch.float64).mul_(2 * math.pi * 2.0**-32)
        normal = torch.empty(bits.shape + (2,), dtype=torch.float64, device=self.device)
        torch.cos(angle, out=normal[..., 0]).mul_(radius)
        torch.sin(angle, out=normal[..., 1]).mul_(radius)
        return normal.view(bits.shape[0], -1)

    def __call__(self, keys: torch.Tensor, steps: torch.Tensor, stds: torch.Tensor) -> list[torch.Tensor]:
        normal = self.standard_normal(keys, steps)
        scaled = normal.mul_(stds.to(device=self.device, dtype=torch.float64)[:, None]).to(self.dtype)
        members = scaled.shape[0]
        chunks = scaled.split([2 * ((n + 1) // 2) for n in self.sizes], dim=1)
        return [chunk[:, :n].reshape((members,) + shape) for chunk, n, shape in zip(chunks, self.sizes, self.shapes)]


def weight_noise(
    keys: torch.Tensor,
    steps: torch.Tensor,
    shapes: Sequence[Sequence[int]],
    stds: torch.Tensor,
    dtype: torch.dtype,
    device: torch.device | str,
) -> list[torch.Tensor]:
    """One call of WeightNoise(shapes, dtype, device)(keys, steps, stds); keep a WeightNoise to reuse
    its index tensors across steps."""
    return WeightNoise(shapes, dtype, device)(keys, steps, stds)
