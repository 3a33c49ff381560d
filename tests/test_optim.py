"""The population's optimizers, clipping and weight noise (rnnbench.training.optim) against torch, per member.

Each member of a stacked (K, ...) update must get exactly what torch.optim / clip_grad_norm_ would give
it alone (float64, to rounding), and its weight noise must not depend on K or its batch-mates.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from rnnbench import checkpoints
from rnnbench.errors import RnnbenchError
from rnnbench.training.optim import StackedOptimizer, WeightNoise, clip_grad_norms_, mix64, weight_noise

SHAPES = [(3, 5), (5,), (2, 3, 4)]  # one member's parameter shapes: a matrix, a bias, a 3-d tensor
K = 4
STEPS = 20
TOL = dict(rtol=1e-11, atol=1e-13)

# per-member hyperparameters: every member differs (one has no momentum, one no weight decay)
HYPER = {
    "adam": {"lr": [1e-3, 3e-3, 1e-2, 5e-4], "weight_decay": [0.0, 1e-2, 1e-3, 0.1], "beta1": [0.9, 0.8, 0.0, 0.95],
             "beta2": [0.999, 0.99, 0.9, 0.98], "eps": [1e-8, 1e-6, 1e-4, 1e-8]},
    "rmsprop": {"lr": [1e-3, 3e-3, 1e-2, 5e-4], "weight_decay": [0.0, 1e-2, 1e-3, 0.1], "momentum": [0.9, 0.0, 0.5, 0.99],
                "alpha": [0.95, 0.99, 0.9, 0.5], "eps": [1e-8, 1e-6, 1e-4, 1e-8]},
    "sgd": {"lr": [1e-2, 3e-2, 1e-1, 5e-3], "weight_decay": [0.0, 1e-2, 1e-3, 0.1], "momentum": [0.9, 0.0, 0.5, 0.99]},
}


def torch_optimizer(kind: str, params: list[torch.Tensor], h: dict[str, float]) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(params, lr=h["lr"], betas=(h["beta1"], h["beta2"]), eps=h["eps"], weight_decay=h["weight_decay"])
    if kind == "rmsprop":
        return torch.optim.RMSprop(params, lr=h["lr"], alpha=h["alpha"], eps=h["eps"], momentum=h["momentum"], weight_decay=h["weight_decay"])
    return torch.optim.SGD(params, lr=h["lr"], momentum=h["momentum"], weight_decay=h["weight_decay"])


def stacked_params(members: int, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn((members,) + s, generator=g, dtype=torch.float64)) for s in SHAPES]


def random_grads(members: int, step: int) -> list[torch.Tensor]:
    """Gradients for every member at one step; member k's rows depend on (k, step) only."""
    out = []
    for i, s in enumerate(SHAPES):
        rows = [torch.randn(s, generator=torch.Generator().manual_seed(10_000 * k + 100 * step + i), dtype=torch.float64) for k in range(members)]
        out.append(torch.stack(rows) * (1 + step % 3))
    return out


def set_grads(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads):
        p.grad = g.clone()


def member_hyper(kind: str, k: int) -> dict[str, float]:
    return {name: values[k] for name, values in HYPER[kind].items()}


def stacked_hyper(kind: str, rows: list[int] | None = None) -> dict[str, torch.Tensor]:
    rows = list(range(K)) if rows is None else rows
    return {name: torch.tensor([values[k] for k in rows], dtype=torch.float64) for name, values in HYPER[kind].items()}


@pytest.mark.parametrize("kind", ["adam", "rmsprop", "sgd"])
def test_every_member_steps_as_torch_optim_alone(kind: str) -> None:
    params = stacked_params(K)
    alone = [[torch.nn.Parameter(p.detach()[k].clone()) for p in params] for k in range(K)]
    reference = [torch_optimizer(kind, alone[k], member_hyper(kind, k)) for k in range(K)]
    optimizer = StackedOptimizer(kind, params, stacked_hyper(kind))
    for step in range(STEPS):
        grads = random_grads(K, step)
        set_grads(params, grads)
        optimizer.step()
        for k in range(K):
            set_grads(alone[k], [g[k] for g in grads])
            reference[k].step()
    for k in range(K):
        for p, q in zip(params, alone[k]):
            torch.testing.assert_close(p.detach()[k], q.detach(), **TOL)
    assert optimizer.steps.tolist() == [STEPS] * K


def test_rmsprop_floor_is_chungs_denominator_and_leaves_other_members_torchs() -> None:
    """rms_floor > 0: p -= lr buf with buf = m buf + g / max(sqrt(v), floor) (no eps); 0: torch's form."""
    floors = [1e-2, 0.0, 0.5, 0.0]
    hyper = stacked_hyper("rmsprop") | {"rms_floor": torch.tensor(floors, dtype=torch.float64)}
    params = stacked_params(K)
    start = [p.detach().clone() for p in params]
    optimizer = StackedOptimizer("rmsprop", params, hyper)
    alone = [[torch.nn.Parameter(p[k].clone()) for p in start] for k in range(K)]
    reference = {k: torch_optimizer("rmsprop", alone[k], member_hyper("rmsprop", k)) for k in range(K) if floors[k] == 0}
    # Chung's update written out per member, one readable line per equation
    chung = {k: {"p": [p[k].clone() for p in start], "v": [torch.zeros(s, dtype=torch.float64) for s in SHAPES],
                 "buf": [torch.zeros(s, dtype=torch.float64) for s in SHAPES]} for k in range(K) if floors[k] > 0}
    for step in range(STEPS):
        grads = random_grads(K, step)
        set_grads(params, grads)
        optimizer.step()
        for k, opt in reference.items():
            set_grads(alone[k], [g[k] for g in grads])
            opt.step()
        for k, s in chung.items():
            h = member_hyper("rmsprop", k)
            for i, g in enumerate(grads):
                g = g[k] + h["weight_decay"] * s["p"][i]
                s["v"][i] = h["alpha"] * s["v"][i] + (1 - h["alpha"]) * g * g
                s["buf"][i] = h["momentum"] * s["buf"][i] + g / torch.clamp(s["v"][i].sqrt(), min=floors[k])
                s["p"][i] = s["p"][i] - h["lr"] * s["buf"][i]
    for k in range(K):
        expected = chung[k]["p"] if k in chung else [q.detach() for q in alone[k]]
        for p, q in zip(params, expected):
            torch.testing.assert_close(p.detach()[k], q, **TOL)


def test_a_tensor_without_gradient_is_skipped() -> None:
    params = stacked_params(K)
    optimizer = StackedOptimizer("adam", params, stacked_hyper("adam"))
    before = [p.detach().clone() for p in params]
    grads = random_grads(K, 0)
    params[0].grad, params[1].grad, params[2].grad = grads[0], None, grads[2]
    optimizer.step()
    assert torch.equal(params[1].detach(), before[1])
    assert not torch.equal(params[0].detach(), before[0])
    assert torch.count_nonzero(optimizer.state[1]["exp_avg"]) == 0


def test_bad_hyperparameters_are_named() -> None:
    params = stacked_params(K)
    with pytest.raises(ValueError, match="needs the hyperparameter lr"):
        StackedOptimizer("adam", params, {})
    with pytest.raises(ValueError, match="has no hyperparameter momentum"):
        StackedOptimizer("adam", params, {"lr": 1e-3, "momentum": 0.9})
    with pytest.raises(ValueError, match=r"\(4,\) tensor"):
        StackedOptimizer("sgd", params, {"lr": torch.ones(3)})
    with pytest.raises(ValueError, match="kind 'adamw'"):
        StackedOptimizer("adamw", params, {"lr": 1e-3})


@pytest.mark.parametrize("kind", ["adam", "rmsprop", "sgd"])
def test_select_then_steps_equal_a_population_that_never_had_the_dropped_members(kind: str) -> None:
    keep = [3, 0, 2]  # drop member 1, and reorder the rest
    params = stacked_params(K)
    small = [torch.nn.Parameter(p.detach()[keep].clone()) for p in params]
    optimizer = StackedOptimizer(kind, params, stacked_hyper(kind))
    never = StackedOptimizer(kind, small, stacked_hyper(kind, keep))
    # unequal step counts (as after a resume that joined members), so Adam's bias corrections show
    # whether select() kept each member's own count
    optimizer.steps.copy_(torch.tensor([5, 0, 2, 9]))
    never.steps.copy_(torch.tensor([9, 5, 2]))
    for step in range(STEPS):
        grads = random_grads(K, step)
        if step == 7:
            index = torch.tensor(keep)
            params = [torch.nn.Parameter(p.detach()[index].clone()) for p in params]
            optimizer.select(index, params)
        set_grads(params, [g[keep] for g in grads] if step >= 7 else grads)
        optimizer.step()
        set_grads(small, [g[keep] for g in grads])
        never.step()
    for p, q in zip(params, small):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)
    assert optimizer.members == 3 and optimizer.steps.tolist() == [STEPS + 9, STEPS + 5, STEPS + 2]


@pytest.mark.parametrize("kind", ["adam", "rmsprop", "sgd"])
def test_state_dict_round_trip_through_a_safe_checkpoint_continues_identically(kind: str, tmp_path) -> None:
    params = stacked_params(K)
    optimizer = StackedOptimizer(kind, params, stacked_hyper(kind))
    for step in range(5):
        set_grads(params, random_grads(K, step))
        optimizer.step()
    checkpoints.save({"params": [p.detach() for p in params], "optimizer": optimizer.state_dict()}, tmp_path / "last.ckpt")
    saved = checkpoints.load(tmp_path / "last.ckpt")  # weights_only=True
    resumed_params = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    resumed = StackedOptimizer(kind, resumed_params, {"lr": 1.0})  # every hyperparameter comes from the state
    resumed.load_state_dict(saved["optimizer"])
    for step in range(5, 12):
        grads = random_grads(K, step)
        set_grads(params, grads)
        optimizer.step()
        set_grads(resumed_params, grads)
        resumed.step()
    for p, q in zip(params, resumed_params):
        assert torch.equal(p.detach(), q.detach())
    assert torch.equal(optimizer.steps, resumed.steps)


def test_state_of_another_population_is_refused_in_one_line() -> None:
    optimizer = StackedOptimizer("adam", stacked_params(K), stacked_hyper("adam"))
    other = StackedOptimizer("adam", stacked_params(3), {"lr": 1e-3})
    with pytest.raises(RnnbenchError, match="3 members, this population 4"):
        optimizer.load_state_dict(other.state_dict())
    with pytest.raises(RnnbenchError, match="it is 'sgd'"):
        optimizer.load_state_dict(StackedOptimizer("sgd", stacked_params(K), {"lr": 1.0}).state_dict())


def test_clipping_is_torchs_clip_grad_norm_per_member() -> None:
    members = 5
    params = stacked_params(members)
    grads = random_grads(members, 1)
    grads[0][3] *= 1e3  # member 3 is clipped hard
    grads[1][4] = float("inf")  # member 4 diverged: it must not touch the others
    max_norm = torch.tensor([1.0, math.inf, 100.0, 0.5, 1.0], dtype=torch.float64)
    set_grads(params, grads)
    norms = clip_grad_norms_(params, max_norm)
    for k in range(4):
        alone = [torch.nn.Parameter(p.detach()[k].clone()) for p in params]
        set_grads(alone, [g[k] for g in grads])
        expected = torch.nn.utils.clip_grad_norm_(alone, max_norm[k].item())
        torch.testing.assert_close(norms[k], expected, **TOL)
        for p, q in zip(params, alone):
            torch.testing.assert_close(p.grad[k], q.grad, **TOL)
    assert torch.isinf(norms[4])
    assert torch.equal(params[0].grad[1], grads[0][1])  # max_norm inf: untouched, bit for bit
    assert norms[0] > 1 and norms[2] < 100  # member 0 was clipped, member 2 was not


# --- weight noise --------------------------------------------------------------------------------

NOISE_SHAPES = [(7, 3), (5,), (2, 3, 3), (1,)]  # odd sizes: the last Box-Muller pair is half used
MASK = (1 << 64) - 1


def splitmix64_finaliser(x: int) -> int:
    """The reference, on Python's unbounded integers reduced modulo 2^64."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def test_the_int64_hash_is_splitmix64_bit_for_bit() -> None:
    values = [0, 1, 2, 12345, 2**62 + 7, 2**63 - 1, 2**63, 2**64 - 1, 0x9E3779B97F4A7C15]
    as_int64 = torch.tensor([v - 2**64 if v >= 2**63 else v for v in values], dtype=torch.int64)
    got = [v & MASK for v in mix64(as_int64).tolist()]
    assert got == [splitmix64_finaliser(v) for v in values]


def test_a_members_noise_does_not_depend_on_its_population() -> None:
    alone = weight_noise(torch.tensor([42]), torch.tensor([17]), NOISE_SHAPES, torch.tensor([0.3]), torch.float64, "cpu")
    keys, steps, stds = torch.tensor([5, 6, 7, 42, 8]), torch.tensor([1, 17, 3, 17, 0]), torch.tensor([1.0, 0.1, 2.0, 0.3, 0.0])
    together = weight_noise(keys, steps, NOISE_SHAPES, stds, torch.float64, "cpu")
    for a, t, shape in zip(alone, together, NOISE_SHAPES):
        assert a.shape == (1,) + shape and t.shape == (5,) + shape
        assert torch.equal(a[0], t[3])
    assert all(torch.count_nonzero(t[4]) == 0 for t in together)  # std 0: exact zeros
    # float32: the float64 numbers cast, so the same member agrees across dtypes too
    single = weight_noise(keys, steps, NOISE_SHAPES, stds, torch.float32, "cpu")
    assert all(torch.equal(s, t.float()) for s, t in zip(single, together))


def test_noise_is_standard_normal() -> None:
    noise = WeightNoise([(100_000,)], torch.float64, "cpu")
    sample = noise(torch.tensor([3, 4]), torch.tensor([0, 0]), torch.tensor([1.0, 2.0]))[0]
    first = sample[0].numpy()
    assert stats.kstest(first, "norm").pvalue > 1e-3
    assert stats.kstest(sample[1].numpy() / 2.0, "norm").pvalue > 1e-3
    assert abs(first.mean()) < 0.02 and abs(first.std() - 1) < 0.02
    # the two numbers of one Box-Muller pair (elements 2j, 2j + 1) are independent too
    assert abs(np.corrcoef(first[0::2], first[1::2])[0, 1]) < 0.02


def test_steps_keys_and_parameters_give_independent_streams() -> None:
    shapes = [(50_000,), (50_000,)]
    base = weight_noise(torch.tensor([1]), torch.tensor([10]), shapes, torch.tensor([1.0]), torch.float64, "cpu")
    next_step = weight_noise(torch.tensor([1]), torch.tensor([11]), shapes, torch.tensor([1.0]), torch.float64, "cpu")
    next_key = weight_noise(torch.tensor([2]), torch.tensor([10]), shapes, torch.tensor([1.0]), torch.float64, "cpu")
    streams = {"base": base[0][0], "step": next_step[0][0], "key": next_key[0][0], "parameter": base[1][0]}
    flat = torch.stack(list(streams.values())).numpy()
    correlation = np.corrcoef(flat)
    off_diagonal = correlation[~np.eye(len(streams), dtype=bool)]
    assert np.abs(off_diagonal).max() < 0.03  # ~7 standard errors at n = 50,000
    # and not shifted copies of one another (a counter collision would make them so)
    for name, other in streams.items():
        if name != "base":
            assert not np.isin(other.numpy()[:100], streams["base"].numpy()).any()
