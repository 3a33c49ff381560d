"""One LightningModule for any cell and any task: cell -> Linear head at every step -> task loss.

Metrics of a split are exact: each step returns (sum, count) pairs that are added up over the
whole split and divided once at the end, so batching and padding never change a reported number.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from rnnbench import checkpoints
from rnnbench.budget import param_counts
from rnnbench.cells import get_cell
from rnnbench.config import Config
from rnnbench.tasks.base import Batch, Task


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


class SequenceModel(L.LightningModule):
    def __init__(self, config: Config, task: Task, hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.task = task
        m = config.model
        self.rnn = get_cell(m.cell)(task.input_size, hidden_size, num_layers=m.num_layers, forget_bias=m.forget_bias)
        self.head = nn.Linear(hidden_size, task.output_size)
        if m.init == "uniform":
            self.rnn.init_uniform_(m.init_scale)
            nn.init.uniform_(self.head.weight, -m.init_scale, m.init_scale)
            nn.init.zeros_(self.head.bias)
        self.counts = param_counts(m.cell, task.input_size, hidden_size, task.output_size, m.num_layers)
        self.eval_prefix = "val"
        self._sums: dict[str, list[torch.Tensor]] = defaultdict(lambda: [torch.zeros(()), torch.zeros(())])
        self._noise: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._finite_host: torch.Tensor | None = None
        self._pending_check: tuple[Any, torch.Tensor, int, int] | None = None
        self.train_time_steps = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out)

    # --- training -------------------------------------------------------------------------------
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        self.check_finite()
        self._add_weight_noise()
        out = self(batch["x"])
        loss, sums = self.task.loss_and_sums(out, batch)
        if loss.is_cuda:
            self._defer_finite_check(loss)
        elif not torch.isfinite(loss):
            self._remove_weight_noise()
            raise DivergedError(f"training loss became {loss.item()} at epoch {self.current_epoch}, step {self.global_step}")
        self._add_sums("train", sums)
        self.train_time_steps += self.task.time_steps(batch)
        return loss

    def _defer_finite_check(self, loss: torch.Tensor) -> None:
        # On CUDA, reading the loss now would make the host wait for the device every step, so the
        # next step's launches could not overlap this step's kernels. Copy the flag to pinned memory
        # without blocking and read it at the next step or before validation, when it has long
        # arrived: the run still ends FAILED with the same reason, one update later. The CPU checks
        # at once (nothing to overlap there).
        if self._finite_host is None:
            self._finite_host = torch.empty((), dtype=torch.bool, pin_memory=True)
        self._finite_host.copy_(torch.isfinite(loss.detach()), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending_check = (event, loss.detach(), self.current_epoch, self.global_step)

    def check_finite(self) -> None:
        """Raise DivergedError if the last deferred (CUDA) training loss was NaN or infinite."""
        if self._pending_check is None:
            return
        event, loss, epoch, step = self._pending_check
        self._pending_check = None
        event.synchronize()
        if not bool(self._finite_host):
            raise DivergedError(f"training loss became {loss.item()} at epoch {epoch}, step {step}")

    def on_validation_start(self) -> None:
        self.check_finite()  # the epoch's last training step

    def on_train_end(self) -> None:
        self.check_finite()  # max_steps can end training without a validation

    def on_after_backward(self) -> None:
        # Graves 2011 weight noise: the gradient is taken at the noisy weights, the update applied
        # to the clean ones. Lightning clips and steps after this hook.
        self._remove_weight_noise()

    def _add_weight_noise(self) -> None:
        std = self.config.train.weight_noise
        if std <= 0:
            return
        with torch.no_grad():
            for p in self.rnn.parameters():
                if p.requires_grad:
                    noise = torch.randn_like(p) * std
                    p.add_(noise)
                    self._noise.append((p, noise))

    def _remove_weight_noise(self) -> None:
        with torch.no_grad():
            for p, noise in self._noise:
                p.sub_(noise)
        self._noise.clear()

    # --- evaluation (validation during fit; any split afterwards via eval_prefix) ----------------
    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._accumulate(self.eval_prefix, self(batch["x"]), batch)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.state.fn == TrainerFn.FITTING:
            # Lightning validates before on_train_epoch_end: log this epoch's train metrics here
            # so both reach the epoch's record together.
            self._log_split("train")
        self._log_split(self.eval_prefix)

    def _accumulate(self, split: str, out: torch.Tensor, batch: Batch) -> None:
        self._add_sums(split, self.task.metric_sums(out, batch))

    def _add_sums(self, split: str, sums: dict[str, tuple[torch.Tensor, Any]]) -> None:
        for name, (s, n) in sums.items():
            acc = self._sums[f"{split}_{name}"]
            # kept on the model's device: one transfer per epoch in _log_split, not one per batch
            acc[0] = acc[0] + s.detach().double()
            acc[1] = acc[1] + torch.as_tensor(n).double()

    def _log_split(self, split: str) -> None:
        values = {}
        for key in [k for k in self._sums if k.startswith(split + "_")]:
            s, n = self._sums.pop(key)
            values[key] = (s / n).item() if n > 0 else math.nan
        task_split = {"final_train": "train", "final_val": "val"}.get(split, split)
        for name, value in self.task.baselines(task_split).items():
            values[f"{split}_{name}"] = value
        for key, value in values.items():
            self.log(key, value, on_step=False, on_epoch=True, prog_bar=key.endswith(self.task.primary_metric))

    # --- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        t = self.config.train
        params = [p for p in self.parameters() if p.requires_grad]
        # On CUDA, Adam and SGD take torch's fused kernels (one launch for all parameters instead of a
        # dozen per step); the CPU keeps the default implementation, whose numbers the tests pin.
        fused = {"fused": True} if params and params[0].is_cuda else {}
        if t.optimizer == "adam":
            return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay, **fused)
        if t.optimizer == "rmsprop":
            return torch.optim.RMSprop(params, lr=t.lr, alpha=t.rmsprop_alpha, momentum=t.momentum, weight_decay=t.weight_decay)
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, **fused)


class RandomState(Callback):
    """Checkpoints the random streams a run draws from, so a resumed run continues with the numbers the
    uninterrupted run would have drawn: the global CPU (and CUDA) generators (weight noise, the
    evaluation loaders' base seeds) and the training loader's shuffling generator. Lightning stores
    this in every checkpoint and restores it before the resumed epoch begins."""

    def __init__(self, loader_generator: torch.Generator) -> None:
        self.loader_generator = loader_generator

    def state_dict(self) -> dict[str, Any]:
        state = {"cpu": torch.get_rng_state(), "loader": self.loader_generator.get_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["cpu"])
        self.loader_generator.set_state(state_dict["loader"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint files through rnnbench.checkpoints: every write atomic in its own folder
    (temp file, fsync, os.replace), every read weights_only=True whatever the caller or the
    environment asks (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD; strategies that restore without passing
    weights_only), and a bad file a one-line CheckpointError naming it."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("SafeCheckpointIO takes no storage_options")
        checkpoints.save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        return checkpoints.load(path, map_location=map_location if map_location is not None else "cpu")


class EpochRecorder(Callback):
    """One MLflow write per epoch, step = epoch (per-step logging slows the MLflow UI), plus timings.

    The per-epoch record is part of every checkpoint (this callback's state_dict) and an epoch is
    written to MLflow only after the checkpoint that holds it: Lightning saves last.ckpt at the end
    of the training epoch (ModelCheckpoint runs last), so the record of epoch e goes to MLflow at the
    start of epoch e + 1 or when fit ends. A kill between the two loses nothing: the resumed run
    writes, from its checkpoint's record, every epoch MLflow lacks, and never one MLflow has."""

    def __init__(self, client: Any, run_id: str, monitor: str) -> None:
        self.client, self.run_id = client, run_id
        self._monitored = (monitor,)
        self.epochs = 0
        self.train_seconds = 0.0  # time inside training batches only
        self.epoch_seconds: list[float] = []
        self.history: list[dict[str, float]] = []
        self._logged: set[int] = set()  # epochs MLflow holds
        self._restored: dict[str, Any] | None = None
        self._t0 = self._b0 = 0.0
        self._fit_t0 = time.perf_counter()

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self.history], "epoch_seconds": list(self.epoch_seconds)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Taken over in on_fit_start only: validate(ckpt_path=best) restores callbacks too, and the
        # record in best.ckpt (up to the best epoch) must not replace the whole run's.
        self._restored = state_dict

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # After Lightning restored the checkpoint (before on_fit_start for single-device strategies).
        if self._restored is not None:
            self.history = [dict(h) for h in self._restored["history"]]
            self.epoch_seconds = list(self._restored["epoch_seconds"])
            self.epochs = len(self.history)
            if self.history:  # wall-clock continues from where the interrupted run stopped
                self._fit_t0 = time.perf_counter() - self.history[-1].get("wall_seconds", 0.0)
        self._restored = None
        # Write what the checkpoint holds and MLflow lacks.
        self._logged = {m.step for m in self.client.get_metric_history(self.run_id, "epoch_seconds")}
        self._log_unlogged()

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._log_unlogged()  # the previous epoch: its checkpoint is on disk now
        self._t0 = time.perf_counter()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._log_unlogged()  # the last epoch, after its checkpoint

    def _log_unlogged(self) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for epoch, values in enumerate(self.history):
            if epoch not in self._logged:
                self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, epoch) for k, v in values.items()])
                self._logged.add(epoch)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._b0 = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.train_seconds += time.perf_counter() - self._b0

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        # An epoch re-run after a resume replaces its earlier record instead of doubling it.
        del self.history[trainer.current_epoch:], self.epoch_seconds[trainer.current_epoch:]
        seconds = time.perf_counter() - self._t0
        self.epoch_seconds.append(seconds)
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train_", "val_"))}
        # updates: optimizer steps so far, the x-axis of Chung et al.'s learning curves (Figs. 2-3)
        values.update(epoch_seconds=seconds, wall_seconds=time.perf_counter() - self._fit_t0, updates=float(trainer.global_step))
        self.history.append(values)
        self.epochs = len(self.history)

    def restore(self, client: Any, run_id: str) -> None:
        """Reload the per-epoch record of an interrupted run from MLflow: for checkpoints written before
        the record was part of them (a newer checkpoint's record replaces this one)."""
        by_epoch: dict[int, dict[str, float]] = {}
        for key in ("epoch_seconds", "wall_seconds", *self._monitored):
            for m in client.get_metric_history(run_id, key):
                by_epoch.setdefault(m.step, {})[key] = m.value
        self.history = [by_epoch[e] for e in sorted(by_epoch)]
        self.epoch_seconds = [h.get("epoch_seconds", float("nan")) for h in self.history]
        self.epochs = len(self.history)
        if self.history:  # wall-clock continues from where the interrupted run stopped
            self._fit_t0 = time.perf_counter() - self.history[-1].get("wall_seconds", 0.0)

    def best_epoch(self, monitor: str) -> int:
        scores = [h.get(monitor, float("inf")) for h in self.history]
        return min(range(len(scores)), key=scores.__getitem__) if scores else -1

    def seconds_per_epoch(self) -> float:
        return sum(self.epoch_seconds) / len(self.epoch_seconds) if self.epoch_seconds else float("nan")

    def seconds_to(self, epoch: int) -> float:
        return self.history[epoch]["wall_seconds"] if 0 <= epoch < len(self.history) else float("nan")
