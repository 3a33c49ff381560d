"""A population: K >= 1 models of one cell, task and size, trained as one LightningModule.

Member k differs from the others in its seed (initialisation, data order, weight noise) and in its
per-member hyperparameters (learning rate, momentum, weight decay, clipping threshold, noise std,
patience, max epochs). Everything it owns is a row of a stacked tensor: parameters (K, ...), optimizer
state (K, ...), hyperparameters (K,), step counters (K,), metric sums (K,). One training step is the
same handful of vectorized operations whatever K (rnnbench/training/optim.py); the recurrences run
through the cells' loops over the stacked weights (rnnbench/cells).

Member k's numbers do not depend on its population: its initial weights come from its own generator,
its batches from its own DataLoader (shuffled by its own generator), its weight noise from a counter
keyed on (its seed, its step), and padding its batch to a longer batch-mate's changes nothing (the
recurrence is causal, padded inputs are zero and the losses mask padded steps). tests/test_population.py
checks it for every cell.

Members leave when they are done (early stopping, max epochs, divergence, or a `Pruner` that ranks
them): their rows are dropped from every stacked tensor (`keep`), so they cost nothing afterwards; each
member's best-validation weights are kept in `best` (rows of the whole population) for the final scores.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import nn

from rnnbench import cells
from rnnbench.config import Config
from rnnbench.tasks.base import Batch, Task, batch_pieces, broadcast_batch, stack_batches
from rnnbench.training.graphs import StepGraphs, bucket
from rnnbench.training.optim import StackedOptimizer, clip_grad_norms_, weight_noise


EVAL_STATE_ELEMENTS = 2**26  # a member's states per evaluation piece at most (B x T x width: 256 MB in float32)
PACK_BELOW = 0.9  # `_packed_scores` packs a batch whose valid rows are below this fraction of its padded ones


@dataclass
class Member:
    """What the host keeps for one member: its config, run, progress and per-epoch record."""

    index: int  # position in the population as built (rows of `best`)
    config: Config
    run_id: str
    loader_generator: torch.Generator  # shuffles this member's training data
    status: str = "training"  # training | stopped | failed
    reason: str | None = None  # why it failed
    epoch: int = 0  # epochs completed (validated)
    history: list[dict[str, float]] = field(default_factory=list)
    best_score: float = math.inf
    best_epoch: int = -1
    wait: int = 0  # epochs since the last strict improvement
    stopped_by: str = ""  # early_stopping | max_epochs | max_steps | pruned
    train_seconds: float = 0.0
    time_steps: int = 0  # recurrent time steps trained
    wall_offset: float = 0.0  # wall seconds of earlier sessions (a resumed run)

    SAVED = ("status", "epoch", "history", "best_score", "best_epoch", "wait", "stopped_by", "train_seconds",
             "time_steps", "wall_offset")  # what a checkpoint keeps, beside the data order's generator

    @property
    def patience(self) -> int | None:
        return self.config.train.early_stopping_patience

    def state(self) -> dict[str, Any]:
        """The bookkeeping a checkpoint keeps (plain data: loaded with weights_only=True)."""
        return {k: getattr(self, k) for k in self.SAVED} | {"loader_generator": self.loader_generator.get_state()}

    def load_state(self, state: dict[str, Any]) -> None:
        for k in self.SAVED:
            setattr(self, k, state[k])
        self.loader_generator.set_state(state["loader_generator"])


def hyperparameters(configs: list[Config]) -> dict[str, torch.Tensor]:
    """The optimizer's per-member hyperparameters, (K,) tensors from each member's config (the names
    of its kind; torch.optim's defaults for the ones a config has no key for)."""
    from rnnbench.training.optim import HYPER_DEFAULTS

    keys = {"lr": "lr", "weight_decay": "weight_decay", "momentum": "momentum", "alpha": "rmsprop_alpha",
            "rms_floor": "rmsprop_floor"}
    names = HYPER_DEFAULTS[configs[0].train.optimizer]
    return {name: torch.tensor([float(getattr(c.train, keys[name])) for c in configs], dtype=torch.float64)
            for name in names if name in keys}


class MemberData:
    """The members' data: each member's own shuffled training loader; evaluation loaders shared by the
    members whose data are the same (the music and speech corpora do not depend on the seed; the
    synthetic tasks draw their data from it)."""

    def __init__(self, task_cls: type[Task], configs: list[Config], generators: list[torch.Generator]) -> None:
        from torch.utils.data import DataLoader

        # One task (and one read of its data, one computation of its references) per distinct dataset;
        # members that share their data share their task.
        tasks: dict[Any, Task] = {}
        datasets: dict[Any, dict[str, Any]] = {}
        self.data_key: list[Any] = []
        for c in configs:
            key = c.train.seed if task_cls.seeded_data else None
            if key not in tasks:
                tasks[key] = task_cls(c.task, seed=c.train.seed)
                datasets[key] = tasks[key].datasets()
            self.data_key.append(key)
        self.tasks: list[Task] = [tasks[key] for key in self.data_key]
        self.datasets = datasets
        t = configs[0].train
        kw: dict[str, Any] = dict(batch_size=t.batch_size, collate_fn=self.tasks[0].collate)
        self.train = [DataLoader(datasets[key]["train"], shuffle=True, generator=g, drop_last=False, **kw)
                      for key, g in zip(self.data_key, generators)]
        self.eval = {split: {key: DataLoader(d[source], **kw) for key, d in datasets.items()}
                     for split, source in (("val", "val"), ("test", "test"), ("final_val", "val"), ("final_train", "train"))}

    def dataset(self, k: int, split: str) -> Any:
        return self.datasets[self.data_key[k]][split]


class TrainBatches:
    """One step's batches of the training members, stacked (K, B, T, ...): member k's own next batch."""

    def __init__(self, module: Population) -> None:
        self.module = module

    def __len__(self) -> int:
        return len(self.module.data.train[0])

    def __iter__(self) -> Iterator[Batch]:
        loaders = [self.module.data.train[i] for i in self.module.ids]
        for batches in zip(*loaders):
            if self.module.graphs is not None:  # one CUDA graph per padded length
                yield stack_batches(list(batches), bucket(max(b["x"].shape[1] for b in batches)))
            else:
                yield stack_batches(list(batches))


class EvalBatches:
    """One evaluation split for the members in training (or being scored), stacked like TrainBatches:
    a batch shared by all of them is broadcast, not copied."""

    def __init__(self, module: Population, split: str) -> None:
        self.module, self.split = module, split

    def __len__(self) -> int:
        return len(next(iter(self.module.data.eval[self.split].values())))

    def __iter__(self) -> Iterator[Batch]:
        keys = [self.module.data.data_key[i] for i in self.module.ids]
        distinct = list(dict.fromkeys(keys))
        loaders = [self.module.data.eval[self.split][k] for k in distinct]
        for batches in zip(*loaders):
            if len(distinct) == 1:
                yield broadcast_batch(batches[0], len(keys))
            else:
                by_key = dict(zip(distinct, batches))
                yield stack_batches([by_key[k] for k in keys])


class Population(L.LightningModule):
    """K members of one cell, task and size: stacked weights, one manual optimization step for all.

    Rows of every stacked tensor are the members still training, in the order of `ids` (their indices
    in `members`). Lightning runs the loops; the callbacks of rnnbench/training/loop.py decide per
    member (early stopping, pruning), checkpoint and record.
    """

    def __init__(self, configs: list[Config], members: list[Member], task_cls: type[Task], data: MemberData,
                 input_size: int, hidden_size: int, output_size: int, impl: str = "auto") -> None:
        super().__init__()
        self.automatic_optimization = False
        self.configs, self.members, self.data = configs, members, data
        self.task = data.tasks[0]  # losses and metrics: the same functions for every member
        m = configs[0].model
        self.cell = cells.get_cell(m.cell)
        self.impl = impl
        self.sizes = (input_size, hidden_size, output_size)
        K = len(configs)
        generators = [torch.Generator().manual_seed(c.train.seed) for c in configs]
        scale = m.init_scale if m.init == "uniform" else None
        # Drawn in this order from each member's generator: the layers, the backward layers (when
        # bidirectional), the output layer; a unidirectional member's numbers are those of before.
        directions = 2 if m.bidirectional else 1
        upper = directions * hidden_size
        layers = cells.init_weights(m.cell, input_size, hidden_size, m.num_layers, generators, scale, m.forget_bias,
                                    torch.float32, upper)
        backward = (cells.init_weights(m.cell, input_size, hidden_size, m.num_layers, generators, scale, m.forget_bias,
                                       torch.float32, upper) if m.bidirectional else [])
        self.last_step = self.task.bidirectional_outputs == "last_step"
        head_scale = m.init_scale if m.init == "uniform" else 1.0 / math.sqrt(hidden_size)
        head_w = torch.stack([torch.empty(output_size, upper).uniform_(-head_scale, head_scale, generator=g)
                              for g in generators])
        head_b = (torch.zeros(K, output_size) if m.init == "uniform" else
                  torch.stack([torch.empty(output_size).uniform_(-head_scale, head_scale, generator=g) for g in generators]))
        frozen = set(self.cell.frozen)  # kept with the weights (members leave, best rows, checkpoints), never trained
        self.layers = nn.ModuleList(nn.ParameterDict({n: nn.Parameter(w, requires_grad=n not in frozen) for n, w in layer.items()})
                                    for layer in layers)
        self.backward_layers = nn.ModuleList(nn.ParameterDict({n: nn.Parameter(w, requires_grad=n not in frozen)
                                                               for n, w in layer.items()}) for layer in backward)
        self.head_weight, self.head_bias = nn.Parameter(head_w), nn.Parameter(head_b)
        self.ids: list[int] = list(range(K))
        t = [c.train for c in configs]
        self.register_buffer("clip", torch.tensor([math.inf if x.grad_clip is None else x.grad_clip for x in t], dtype=torch.float64))
        self.register_buffer("noise_std", torch.tensor([x.weight_noise for x in t], dtype=torch.float64))
        self.register_buffer("noise_key", torch.tensor([x.seed for x in t], dtype=torch.int64))
        self.register_buffer("steps", torch.zeros(K, dtype=torch.int64))  # optimizer steps of each member
        self.register_buffer("bad_step", torch.full((K,), -1, dtype=torch.int64))  # first non-finite loss
        self.register_buffer("bad_loss", torch.zeros(K, dtype=torch.float64))
        self.register_buffer("train_steps", torch.zeros(K, dtype=torch.int64))  # recurrent time steps
        self.best: list[torch.Tensor] = []  # best-validation weights, a row per member of `members`
        self.optimizer: StackedOptimizer | None = None
        self.sums: dict[str, list[torch.Tensor]] = {}  # "<split>_<metric>" -> [sum (K,), count (K,)]
        self.scoring: str | None = None  # the split being scored after training, else None
        self.noisy = bool((self.noise_std > 0).any())  # any member with weight noise
        self.graphs: Any = None  # StepGraphs on CUDA (rnnbench/training/graphs.py)

    def on_device(self, batch: Batch) -> Batch:
        """A batch on the population's device, its floats in the population's dtype: what Lightning's
        transfer and precision do for the steps it drives, for the callers that step without it (the
        bench, the cost estimate, the ridge readout, the gradient-flow probe)."""
        dtype = self.head_weight.dtype
        return {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device)) if torch.is_tensor(v) else v
                for k, v in batch.items()}

    # --- the weights --------------------------------------------------------------------------------
    def weights(self) -> list[nn.Parameter]:
        """Every stacked parameter, frozen ones too, in one fixed order (the checkpoints', the best rows')."""
        return [p for stack in (self.layers, self.backward_layers) for layer in stack for p in layer.values()] + [
            self.head_weight, self.head_bias]

    def trained_weights(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates (all but the cell's `frozen`), in `weights`' order."""
        return [p for p in self.weights() if p.requires_grad]

    def recurrent_weights(self) -> list[nn.Parameter]:
        """The trained recurrent weights (weight noise goes on these)."""
        return [p for stack in (self.layers, self.backward_layers) for layer in stack for p in layer.values() if p.requires_grad]

    def forward(self, x: torch.Tensor, steps: torch.Tensor | None = None, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """x (K, B, T, D) -> head outputs (K, B, T, O); steps (K,): each member's own length; lengths
        (K, B): each sequence's own (a bidirectional model reverses each within it; default: steps)."""
        h = self.states(x, steps, lengths)
        K, B, T, H = h.shape
        out = torch.baddbmm(self.head_bias.unsqueeze(1), h.reshape(K, B * T, H), self.head_weight.transpose(1, 2))
        return out.view(K, B, T, -1)

    def states(self, x: torch.Tensor, steps: torch.Tensor | None = None, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """What the head reads: the top layer's outputs (K, B, T, H), or (K, B, T, 2H) bidirectional."""
        layers = [dict(layer.items()) for layer in self.layers]
        if self.backward_layers:
            K, B, T = x.shape[:3]
            if lengths is None:
                lengths = (torch.full((K,), T, device=x.device) if steps is None else steps.to(x.device)).view(K, 1).expand(K, B)
            backward = [dict(layer.items()) for layer in self.backward_layers]
            h = cells.run_bidirectional(self.cell.name, layers, backward, x, lengths, steps, self.impl, self.last_step)
        else:
            # Each sequence's own length (not under a CUDA graph, which reads no length: steps None):
            # the loops skip the steps after a short sequence's end, which no task's loss reads.
            h, _ = cells.run(self.cell.name, layers, x, steps, impl=self.impl, lengths=None if steps is None else lengths)
        return h

    def last_step_states(self, batch: Batch) -> torch.Tensor | None:
        """h at each member's last step (K, B, H), run without keeping the T steps' states, where the
        task reads only that step (bidirectional_outputs "last_step", one length per member) of a
        one-layer unidirectional model whose states would not fit in one evaluation piece (an
        echo-state network's 20,000 units). Else None. One piece of 100 rows instead of pieces of 8:
        a step of the reservoir's sparse product costs about the same for 8 rows as for 100."""
        if not self.reads_last_step_only(batch):
            return None
        layers = [dict(layer.items()) for layer in self.layers]
        return cells.final_states(self.cell.name, layers, batch["x"], batch.get("steps"), impl=self.impl)[-1][0]

    def reads_last_step_only(self, batch: Batch) -> bool:
        """Whether `last_step_states` serves this batch (then `pieces` leaves it whole)."""
        _, B, T = batch["x"].shape[:3]
        return not (self.backward_layers or len(self.layers) != 1 or not self.last_step or batch.get("lengths") is not None
                    or B * T * self.sizes[1] <= EVAL_STATE_ELEMENTS)

    def at_last_step(self, out: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Outputs (..., K, B, O) at each member's last step as the (..., K, B, T, O) outputs a task
        reads: zeros at every other step, which a "last_step" task never reads."""
        K, B, T = batch["x"].shape[:3]
        steps = batch.get("steps")
        last = (torch.full((K,), T) if steps is None else steps).to(out.device) - 1
        full = out.new_zeros(*out.shape[:-2], B, T, out.shape[-1])
        full[..., torch.arange(K, device=out.device), :, last, :] = out.movedim(-3, 0)  # indexed: (K, ..., B, O)
        return full

    def configure_optimizers(self) -> None:
        # The one optimizer is rnnbench's stacked one (built by the loop before fit): Lightning's manual
        # optimization needs none of its own.
        return None

    def setup_optimizer(self) -> None:
        hyper = {k: v.to(self.device) for k, v in hyperparameters([self.configs[i] for i in self.ids]).items()}
        self.optimizer = StackedOptimizer(self.configs[0].train.optimizer, self.trained_weights(), hyper)

    # --- training -----------------------------------------------------------------------------------
    def training_step(self, batch: Batch, batch_idx: int) -> None:
        if self.graphs is not None:
            self.graphs.step(batch)
        else:
            self.train_step(batch)

    def train_step(self, batch: Batch, graphed: bool = False) -> None:
        """One update of every member in training on its own batch (rows of `batch`): the step that
        `rnnbench train`, a sweep and `rnnbench bench` all run. graphed: the form a CUDA graph can
        hold (rnnbench/training/graphs.py): the recurrence over the whole padded length (no member
        length read on the host) and the gradients left in place for the next replay to overwrite."""
        assert self.optimizer is not None
        if graphed:
            for p in self.weights():
                p.grad = None
        noise = self._add_weight_noise()
        packed = None if graphed else self._packed_scores(batch)
        if packed is not None:
            loss, sums = packed
        else:
            out = self(batch["x"], None if graphed else batch.get("steps"), batch.get("lengths"))
            loss, sums = self.task.loss_and_sums(out, batch)
        # No host sync per step: the first step at which a member's loss is not finite is noted on the
        # device and read at the epoch's end (a diverged member's rows only ever touch its own rows).
        finite = torch.isfinite(loss.detach())
        first = (~finite) & (self.bad_step < 0)
        self.bad_step.copy_(torch.where(first, self.steps, self.bad_step))
        self.bad_loss.copy_(torch.where(first, loss.detach().double(), self.bad_loss))
        # Member k's loss reaches only member k's weights. A plain backward: manual_backward adds only
        # Lightning's precision hooks, none of which apply to 32-/64-true, and would tie the step to
        # a Trainer (the bench and the cost estimate run it without one).
        loss.sum().backward()
        if noise:  # Graves 2011: the gradient at the noisy weights, the update to the clean ones
            with torch.no_grad():
                torch._foreach_sub_(self.recurrent_weights(), noise)
        clip_grad_norms_(self.trained_weights(), self.clip)
        self.optimizer.step()
        if not graphed:
            for p in self.weights():
                p.grad = None
        self.steps += 1
        self._add_sums("train", sums)
        self.train_steps += self.task.time_steps(batch).to(self.train_steps.device)

    def _add_weight_noise(self) -> list[torch.Tensor] | None:
        if not self.noisy:  # decided on the host when the members change, never read from the device here
            return None
        ws = self.recurrent_weights()
        if not ws:  # a cell that trains no recurrent weight (esn): nothing to perturb
            return None
        noise = weight_noise(self.noise_key, self.steps, [tuple(w.shape[1:]) for w in ws], self.noise_std,
                             ws[0].dtype, ws[0].device)
        with torch.no_grad():
            torch._foreach_add_(ws, noise)
        return noise

    # --- evaluation -----------------------------------------------------------------------------------
    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        for piece in self.pieces(batch):
            h = self.last_step_states(piece)
            if h is not None:  # the task reads one step of states too large to keep: that step only
                out = torch.baddbmm(self.head_bias.unsqueeze(1), h, self.head_weight.transpose(1, 2))  # (K, B, O)
                self._add_sums(self.scoring or "val", self.task.metric_sums(self.at_last_step(out, piece), piece))
                continue
            packed = self._packed_scores(piece)
            if packed is not None:
                self._add_sums(self.scoring or "val", packed[1])
                continue
            out = self(piece["x"], piece.get("steps"), piece.get("lengths"))
            self._add_sums(self.scoring or "val", self.task.metric_sums(out, piece))

    def pieces(self, batch: Batch) -> Iterator[Batch]:
        """An evaluation batch whole, or in pieces of rows whose states (B x T x width per member) stay
        within EVAL_STATE_ELEMENTS: an echo-state network's 20,000 units over 400 steps hold 3 GB per
        member for a batch of 100. The metric sums add up over the pieces. The pieces depend on the
        batch's shape only, not on K: a member's scores do not depend on its population."""
        _, B, T = batch["x"].shape[:3]
        width = self.sizes[1] * (2 if self.backward_layers else 1)
        rows = max(1, EVAL_STATE_ELEMENTS // max(1, T * width))
        if B <= rows or self.reads_last_step_only(batch):  # the latter keeps one step of states
            yield batch
        else:
            yield from batch_pieces(batch, rows)

    def _packed_scores(self, batch: Batch) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]] | None:
        """The task's loss and metric sums with the output layer run on the rows they read only, where the
        task can score packed rows and `cells.rows_linear` serves this device, else None. On a music
        population's batch most of the padded (K, B, T) outputs are padding: members' batches differ in
        length. The same numbers as the padded head and loss, to rounding."""
        rows = self.task.packed_rows(batch)
        if rows is None or not cells.rows_linear_available(self.head_weight.device, self.head_weight.dtype):
            return None
        counts = rows.sum((1, 2))
        n = counts.tolist()
        if sum(n) > PACK_BELOW * rows.numel():  # hardly any padding: gathering the rows would cost more
            return None
        h = self.states(batch["x"], batch.get("steps"), batch.get("lengths"))
        starts = [0, *itertools.accumulate(n)][:-1]
        # The rows read where they lie (h is a batch-major view of the loop's time-major outputs): no
        # gather of h, nor a scatter of its gradient into a zeroed copy.
        out = cells.rows_linear(h, starts, n, self.head_weight, self.head_bias, coords=rows.nonzero())
        return self.task.packed_loss_and_sums(out, batch, counts)

    def _add_sums(self, split: str, sums: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        for name, (s, n) in sums.items():
            acc = self.sums.setdefault(f"{split}_{name}", [torch.zeros_like(s, dtype=torch.float64),
                                                           torch.zeros_like(s, dtype=torch.float64)])
            acc[0] += s.detach().double()
            acc[1] += n.detach().double()

    def split_values(self, split: str) -> list[dict[str, float]]:
        """Per member in training (row order): sum / count of each metric of `split`, then the task's
        references; the split's sums start again from zero."""
        rows: list[dict[str, float]] = [{} for _ in self.ids]
        for key in [k for k in self.sums if k.startswith(split + "_")]:
            # the training sums are zeroed in place (a captured step adds into these very tensors);
            # evaluation sums (made under Lightning's inference mode) are dropped
            s, n = self.sums[key] if split == "train" else self.sums.pop(key)
            for r, v in zip(rows, torch.where(n > 0, s / n, torch.full_like(s, math.nan)).tolist()):
                r[key] = v
            if split == "train":
                s.zero_(), n.zero_()
        task_split = {"final_train": "train", "final_val": "val"}.get(split, split)
        for r, i in zip(rows, self.ids):
            for name, value in self.data.tasks[i].baselines(task_split).items():
                r[f"{split}_{name}"] = value
        return rows

    # --- members leaving ------------------------------------------------------------------------------
    def keep_best(self, improved: list[bool]) -> None:
        """Copy the rows of the members that improved into `best`."""
        rows = [r for r, ok in enumerate(improved) if ok]
        if not rows:
            return
        idx = torch.tensor(rows, device=self.device)
        dest = torch.tensor([self.ids[r] for r in rows], device=self.device)
        with torch.no_grad():
            for b, p in zip(self.best, self.weights()):
                b.index_copy_(0, dest, p.detach().index_select(0, idx))

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (members) in every stacked tensor: the others leave the compute."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        with torch.no_grad():
            for p in self.weights():
                p.data = p.data.index_select(0, idx)
                p.grad = None
            for name, buf in list(self.named_buffers()):
                setattr(self, name, buf.index_select(0, idx))
        for acc in self.sums.values():
            acc[0], acc[1] = acc[0].index_select(0, idx), acc[1].index_select(0, idx)
        if self.optimizer is not None:
            self.optimizer.select(idx)
        self.ids = [self.ids[r] for r in rows]
        self.noisy = bool((self.noise_std > 0).any())
        if self.graphs is not None:
            self.graphs.reset()  # new tensors: the captured steps point at the old ones

    def use_best(self, members: list[int]) -> None:
        """Make the population those members, with their best-validation weights (for scoring)."""
        idx = torch.tensor(members, dtype=torch.long, device=self.device)
        with torch.no_grad():
            for b, p in zip(self.best, self.weights()):
                p.data = b.index_select(0, idx).clone()
        self.ids = list(members)
        self.optimizer = None

    def member_weights(self, row: int) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor, torch.Tensor]:
        """One member's weights as a population of one: (layers, head weight, head bias)."""
        layers = [{n: p.detach()[row : row + 1] for n, p in layer.items()} for layer in self.layers]
        return layers, self.head_weight.detach()[row : row + 1], self.head_bias.detach()[row : row + 1]


def build(configs: list[Config], device: torch.device, dtype: torch.dtype, impl: str = "auto",
          run_ids: list[str] | None = None, task_cls: type[Task] | None = None) -> Population:
    """A population ready to train: configs resolved to one hidden size, members' weights drawn from
    their seeds, on `device` in `dtype`, with its optimizer (no run, no MLflow: the loop adds those).

    task_cls: the task class (default: the one registered as configs[0].task.name); `rnnbench bench`
    passes a subclass of a music task that draws random piano rolls instead of reading a corpus."""
    from rnnbench.budget import hidden_size_of
    from rnnbench.tasks import get_task

    task_cls = task_cls or get_task(configs[0].task.name)
    first = task_cls(configs[0].task, seed=configs[0].train.seed)
    hidden = hidden_size_of(configs[0], first.input_size, first.output_size)
    resolved = []
    for c in configs:
        c = c.model_copy(deep=True)
        c.model.hidden_size = hidden
        resolved.append(c)
    run_ids = run_ids or [""] * len(configs)
    members = [Member(k, c, r, torch.Generator().manual_seed(c.train.seed)) for k, (c, r) in enumerate(zip(resolved, run_ids))]
    data = MemberData(task_cls, resolved, [m.loader_generator for m in members])
    pop = Population(resolved, members, task_cls, data, first.input_size, hidden, first.output_size, impl=impl)
    pop.to(device=device, dtype=dtype)
    pop.best = [p.detach().clone() for p in pop.weights()]
    pop.setup_optimizer()
    if device.type == "cuda" and os.environ.get("RNNBENCH_CUDA_GRAPHS", "1") != "0":
        pop.graphs = StepGraphs(pop)
    return pop
