"""A readout fitted by ridge regression on the reservoir's states (train.readout=ridge), for a cell
that trains no recurrent weight (the echo-state network, rnnbench/cells/esn.py).

Lukoševičius 2012, "A Practical Guide to Applying Echo State Networks", section 4.1: with X the
states the task's loss reads (a constant 1 appended for the bias) and Y their targets,

    W_out = (X^T X + lambda I)^-1 X^T Y            (primal: one (H+1) x (H+1) Gram matrix)
          = X^T (X X^T + lambda I)^-1 Y            (dual: one n x n kernel, when H+1 > DUAL_ABOVE)

accumulated over the training split in one pass in float64, solved once per member by an
eigendecomposition so that every lambda in LAMBDAS costs one product. lambda is chosen per member on
the validation split's primary metric, computed by the task's own metric sums, and so is a softmax
task's logit scale (SCALES): the regression targets one-hot classes, whose least-squares output is
not yet a log-probability. That choice is the ESN's tuning budget, recorded as the run's metrics
ridge_lambda and readout_scale. The members' one record is "epoch 0" (validation of the chosen
readout); the loop then scores them like every member (test, final_val, final_train).

What the task reads and regresses on comes from the task (Task.ridge_readout, readout_targets): adding
regresses the sum at the last step, copy each step's one-hot symbol.
"""

from __future__ import annotations

import math
import time
import torch

from rnnbench.errors import RnnbenchError
from rnnbench.tasks.base import Batch
from rnnbench.training.population import EvalBatches, Population

LAMBDAS = tuple(10.0**e for e in range(-8, 3))  # 1e-8 .. 1e2, the ridge penalties tried
SCALES = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)  # softmax readouts: logits = scale x output
DUAL_ABOVE = 4096  # features (H + 1) above which the dual form is solved
DUAL_MAX_ROWS = 10_000  # the dual form keeps every training row (float64): this many at most


def _features(h: torch.Tensor) -> torch.Tensor:
    """States (..., H) with the constant 1 of the bias appended: (..., H + 1)."""
    return torch.cat([h, torch.ones(*h.shape[:-1], 1, dtype=h.dtype, device=h.device)], dim=-1)


@torch.no_grad()
def fit(pop: Population) -> tuple[dict[int, dict[str, float]], dict[int, dict[str, float]], float, list[int]]:
    """Fit the head of every member in training. Returns, per member index: its record of validation
    (the metrics of the chosen readout), its choice {ridge_lambda, readout_scale}; the seconds it took;
    and the recurrent time steps each member's training pass read (rows of pop.ids)."""
    t0 = time.perf_counter()
    task, K = pop.task, len(pop.ids)
    link = task.ridge_readout
    if link is None:
        raise RnnbenchError(f"train.readout=ridge: task {task.name} has no least-squares readout")
    n_feat = pop.head_weight.shape[-1] + 1
    O = pop.head_weight.shape[1]
    dual = n_feat > DUAL_ABOVE
    gram = torch.zeros(K, n_feat, n_feat, dtype=torch.float64, device=pop.device) if not dual else None
    cross = torch.zeros(K, n_feat, O, dtype=torch.float64, device=pop.device) if not dual else None
    rows_x: list[list[torch.Tensor]] = [[] for _ in range(K)]
    rows_y: list[list[torch.Tensor]] = [[] for _ in range(K)]
    time_steps = torch.zeros(K, dtype=torch.int64)
    for batch in (piece for raw in EvalBatches(pop, "final_train") for piece in pop.pieces(pop.on_device(raw))):
        last = pop.last_step_states(batch)  # (K, B, H) where the task reads the last step only, else None
        h = pop.states(batch["x"], batch.get("steps"), batch.get("lengths")) if last is None else None
        rows, y = task.readout_targets(batch)
        time_steps += task.time_steps(batch).cpu()
        for k in range(K):  # once per batch, host side: members read different rows
            # the last step is each sequence's one row read: h[k][rows[k]] is last[k], in the same order
            x_k, y_k = _features(h[k][rows[k]] if last is None else last[k]), y[k][rows[k]]
            if dual:
                rows_x[k].append(x_k.double())
                rows_y[k].append(y_k.double())
                if sum(len(r) for r in rows_x[k]) > DUAL_MAX_ROWS:
                    raise RnnbenchError(f"train.readout=ridge: {n_feat - 1} units and more than {DUAL_MAX_ROWS} training "
                                        "rows: too large for either form of the regression here")
            else:
                # in the run's precision (a float32 product of one batch's rows), summed in float64
                gram[k] += (x_k.T @ x_k).double()
                cross[k] += (x_k.T @ y_k).double()
    # Every penalty's weights, (K, L, H + 1, O), from one eigendecomposition per member.
    lam = torch.tensor(LAMBDAS, dtype=torch.float64, device=pop.device)
    weights = []
    for k in range(K):
        if dual:
            X, Y = torch.cat(rows_x[k]), torch.cat(rows_y[k])
            evals, Q = torch.linalg.eigh(X @ X.T)
            Z = Q.T @ Y
            weights.append(torch.stack([X.T @ (Q @ (Z / (evals + l)[:, None])) for l in lam]))
        else:
            evals, Q = torch.linalg.eigh(gram[k])
            Z = Q.T @ cross[k]
            weights.append(torch.stack([Q @ (Z / (evals + l)[:, None]) for l in lam]))
    W = torch.stack(weights).to(pop.head_weight.dtype)  # (K, L, H + 1, O)
    scales = SCALES if link == "softmax" else (1.0,)
    sums: dict[tuple[int, int], dict[str, list[torch.Tensor]]] = {}
    for batch in (piece for raw in EvalBatches(pop, "val") for piece in pop.pieces(pop.on_device(raw))):
        last = pop.last_step_states(batch)
        if last is None:
            h = pop.states(batch["x"], batch.get("steps"), batch.get("lengths"))
            bias = W[:, :, -1].transpose(0, 1)[:, :, None, None, :]  # (L, K, 1, 1, O)
            out = torch.einsum("kbth,klho->lkbto", h, W[:, :, :-1]) + bias  # every penalty's outputs
        else:
            bias = W[:, :, -1].transpose(0, 1)[:, :, None, :]  # (L, K, 1, O)
            out = pop.at_last_step(torch.einsum("kbh,klho->lkbo", last, W[:, :, :-1]) + bias, batch)
        for j in range(len(LAMBDAS)):
            for s, scale in enumerate(scales):
                for name, (total, count) in task.metric_sums(out[j] * scale, batch).items():
                    acc = sums.setdefault((j, s), {}).setdefault(name, [torch.zeros(K, dtype=torch.float64),
                                                                          torch.zeros(K, dtype=torch.float64)])
                    acc[0] += total.double().cpu()
                    acc[1] += count.double().cpu()
    primary = task.primary_metric
    records: dict[int, dict[str, float]] = {}
    choices: dict[int, dict[str, float]] = {}
    for row, i in enumerate(pop.ids):
        def score(key: tuple[int, int], row: int = row) -> float:
            total, count = sums[key][primary]
            v = float(total[row] / count[row]) if count[row] > 0 else math.nan
            return v if math.isfinite(v) else math.inf

        j, s = min(sums, key=score)  # the first of equal scores: the smallest penalty, then scale
        chosen = W[row, j] * scales[s]
        pop.head_weight[row].copy_(chosen[:-1].T)
        pop.head_bias[row].copy_(chosen[-1])
        records[i] = {f"val_{name}": float(t[row] / c[row]) for name, (t, c) in sums[(j, s)].items()}
        records[i].update({f"val_{name}": v for name, v in pop.data.tasks[i].baselines("val").items()})
        choices[i] = {"ridge_lambda": LAMBDAS[j], "readout_scale": scales[s]}
    return records, choices, time.perf_counter() - t0, time_steps.tolist()


def finish_members(pop: Population, records: dict[int, dict[str, float]], seconds: float, time_steps: list[int]) -> None:
    """The members' one record (epoch 0), their best weights the fitted ones, their status stopped."""
    for row, i in enumerate(pop.ids):
        m = pop.members[i]
        record = {**records[i], "epoch_seconds": seconds, "wall_seconds": seconds, "updates": 0.0,
                  "epoch_core_seconds": seconds * torch.get_num_threads() / len(pop.ids)}
        m.history = [record]
        m.best_score = record.get(f"val_{pop.task.primary_metric}", math.nan)
        m.best_epoch, m.epoch, m.wait = 0, 1, 0
        m.status, m.stopped_by = "stopped", "ridge"
        m.train_seconds, m.time_steps = seconds, int(time_steps[row])
    pop.keep_best([True] * len(pop.ids))
