"""Training an ensemble with the modular loss: the loop, per-epoch diagnostics, checkpoints and resume.

``train(TrainConfig(...), "runs/x")`` writes a run directory (see :mod:`edgens.rundir`); ``resume("runs/x")``
continues an interrupted run and reaches the same weights as an uninterrupted one: every epoch's data order is a
function of (seed, epoch) alone, and the checkpoint holds the model, optimiser and schedule state.
"""

from __future__ import annotations

import dataclasses

import logging
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from edgens import __version__
from edgens.checkpoint import save_checkpoint
from edgens.config import TrainConfig
from edgens.data import Dataset, load_dataset
from edgens.diagnostics import (DOMINANCE_RATIO, collusion_diagnostics, collusion_probe, epoch_diagnostics,
                                is_colluding, is_dominated)
from edgens.errors import ConfigError, TrainingDivergedError
from edgens.interrupts import raise_if_interrupted
from edgens.losses import modular_loss, subset_masks
from edgens.presets import preset_spec
from edgens.rundir import RunDir
from edgens.stacks import MemberStack, StackSpec, build_stack

log = logging.getLogger(__name__)

LR_CONVENTION = "per-member: the modular loss is multiplied by the member count M before backpropagation"
SYNC_EVERY = 50  # batches between host syncs for the progress display (each .item() stalls a GPU)
_T = TypeVar("_T")


@dataclass
class Callbacks:
    """Hooks for progress display (the CLI draws bars with them; the library itself never prints)."""

    epoch_start: Callable[[int, int], None] = lambda epoch, n_batches: None
    batch_end: Callable[[int, float | None], None] = lambda batch, loss: None
    epoch_end: Callable[[dict], None] = lambda record: None


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU.

    Raises:
        ConfigError: CUDA asked for but not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested, but torch {torch.__version__} sees no CUDA GPU; "
                          f"use --device cpu or auto")
    return torch.device(name)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of one epoch's data order: a function of (seed, epoch) only, so resume repeats it exactly."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def fault_generator(seed: int, epoch: int) -> np.random.Generator:
    """The generator of one epoch's random-subset masks: a function of (seed, epoch), another stream than the data
    order's."""
    return np.random.default_rng([seed, epoch, 27])


def bootstrap_counts(n_members: int, n_examples: int, seed: int) -> np.ndarray:
    """Bagging: how often each member's bootstrap sample holds each example, shape (M, N), uint8.

    Member j's sample is N draws with replacement; its NLL term weights example i by the count.
    """
    rng = np.random.default_rng([seed, 0xBA66])
    counts = np.zeros((n_members, n_examples), dtype=np.uint8)
    for j in range(n_members):
        counts[j] = np.bincount(rng.integers(0, n_examples, n_examples), minlength=n_examples).clip(max=255)
    return counts


def library_versions() -> dict:
    """Versions recorded in config.json."""
    return {"edgens": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "cuda": torch.version.cuda, "platform": platform.platform()}


@torch.no_grad()
def predict_members(model: MemberStack, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Members' natural parameters (M, N, K) for ``x`` in eval mode, batch by batch."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)], dim=1)
    model.train(was_training)
    return out


class Trainer:
    """One training run: holds the data on the device, the stack, the optimiser and the run directory.

    Hooks for member-parallel training (:class:`edgens.distributed.trainer.DistributedTrainer` overrides them):
    :meth:`build_model` (this process's members), :meth:`predict` and :meth:`model_state` (the whole ensemble, on
    the process that writes the run directory), :meth:`load_model_state`, :meth:`share` and :attr:`is_main`.
    """

    is_main = True
    """Whether this process writes the run directory (rank 0 of a distributed run)."""

    def __init__(self, config: TrainConfig, run: RunDir, dataset: Dataset, spec: StackSpec,
                 device: torch.device, callbacks: Callbacks | None = None) -> None:
        self.config, self.run, self.dataset, self.spec, self.device = config, run, dataset, spec, device
        self.callbacks = callbacks or Callbacks()
        self.lr = config.resolved_lr()
        torch.manual_seed(config.seed)
        self.model = self.build_model().to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=config.momentum,
                                         nesterov=config.nesterov, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, config.milestone_epochs(),
                                                              config.lr_gamma)
        target_dtype = torch.long if config.family == "categorical" else torch.float32
        self.data = {
            split: (torch.from_numpy(dataset.normalize(x)).to(device), torch.as_tensor(y, dtype=target_dtype,
                                                                                       device=device))
            for split, x, y in (("train", dataset.train_x, dataset.train_y), ("val", dataset.val_x, dataset.val_y))}
        self.prefixes = config.resolved_prefixes(spec.n_members)  # the anytime term's (empty without it)
        self.weights = None
        if config.method == "bagging":
            counts = bootstrap_counts(spec.n_members, len(dataset.train_x), config.seed)
            self.weights = torch.from_numpy(counts).to(device)
        self.epoch = 0
        self.best_epoch, self.best_score = 0, math.inf
        self.epochs_without_improvement = 0
        self.history: list[dict] = []
        self.dominance_warned = False
        self.collusion_warned = False
        self.probe = collusion_probe(len(dataset.train_x), config.seed).to(device)  # training examples it watches

    # --- hooks (one process here; see edgens.distributed) ----------------------------------------------------
    def build_model(self) -> MemberStack:
        """This process's members, freshly initialised (called right after seeding torch with the run's seed)."""
        return build_stack(self.spec)

    def predict(self, x: torch.Tensor) -> torch.Tensor | None:
        """All members' natural parameters (M, N, K) for ``x`` in eval mode; None on processes other than the main."""
        return predict_members(self.model, x, self.config.eval_batch_size)

    def model_state(self) -> dict | None:
        """The whole ensemble's model state dict (None on processes other than the main)."""
        return self.model.state_dict()

    def load_model_state(self, state: dict) -> None:
        """Load a whole-ensemble model state dict (as written in checkpoints)."""
        self.model.load_state_dict(state)

    def share(self, value: _T) -> _T:
        """The main process's ``value`` (any picklable object) on every process (here: ``value`` itself)."""
        return value

    # --- state ----------------------------------------------------------------------------------------------
    def state(self) -> dict | None:
        """Everything needed to resume."""
        return {"epoch": self.epoch, "model": self.model_state(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "best_epoch": self.best_epoch,
                "best_score": self.best_score, "epochs_without_improvement": self.epochs_without_improvement,
                "history": self.history, "dominance_warned": self.dominance_warned,
                "collusion_warned": self.collusion_warned, "spec": self.spec.to_dict()}

    def load_state(self, state: dict) -> None:
        """Restore from :meth:`state`."""
        self.load_model_state(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.best_epoch, self.best_score = state["epoch"], state["best_epoch"], state["best_score"]
        self.epochs_without_improvement = state["epochs_without_improvement"]
        self.history, self.dominance_warned = state["history"], state["dominance_warned"]
        self.collusion_warned = state.get("collusion_warned", False)  # checkpoints before it have none

    # --- one epoch ------------------------------------------------------------------------------------------
    def loss(self, eta: torch.Tensor, y: torch.Tensor, index: torch.Tensor,
             masks: torch.Tensor | None = None):  # -> (ModularLoss, Tensor)
        """The modular loss of a batch and the ensemble's natural parameters ``eta_bar`` (B, K), detached.

        ``index``: the batch's rows in the training set (for bagging weights); ``masks``: the random-subset term's
        (R, M) masks for this batch (:meth:`fault_masks`), with ``fault_weight``.
        """
        weights = None if self.weights is None else self.weights[:, index].float()
        parts = modular_loss(eta, y, self.config.lam, self.config.family, validate=False, member_weights=weights,
                             anytime_weight=self.config.anytime_weight, prefixes=self.prefixes,
                             fault_weight=self.config.fault_weight, fault_masks=masks)
        return parts, eta.detach().mean(0)

    def fault_masks(self, generator: np.random.Generator | None) -> torch.Tensor | None:
        """The random-subset term's masks of the next batch (None without the term), drawn from the epoch's
        :func:`fault_generator`: a function of (seed, epoch, batch number) alone, so that a resumed run and every
        process of a member-parallel one draw the same."""
        if generator is None:
            return None
        return subset_masks(generator, self.config.fault_draws, self.spec.n_members).to(self.device)

    def batches(self, epoch: int) -> list[torch.Tensor]:
        """Row indices of each batch of ``epoch`` (a final batch of one example is dropped: batch norm needs 2)."""
        n = len(self.data["train"][0])
        order = torch.randperm(n, generator=epoch_generator(self.config.seed, epoch)).to(self.device)
        chunks = list(order.split(self.config.batch_size))
        return chunks if len(chunks[-1]) > 1 or len(chunks) == 1 else chunks[:-1]

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the training data; returns the epoch's training measures."""
        self.model.train()
        x_all, y_all = self.data["train"]
        batches = self.batches(epoch)
        self.callbacks.epoch_start(epoch, len(batches))
        m = self.spec.n_members
        sums = torch.zeros(5, device=self.device)  # total, ensemble nll, member nll, ambiguity, ensemble errors
        seen = 0
        faults = fault_generator(self.config.seed, epoch) if self.config.fault_weight else None
        for number, index in enumerate(batches, 1):
            x, y = x_all[index], y_all[index]
            eta = self.model(x)
            parts, eta_bar = self.loss(eta, y, index, self.fault_masks(faults))
            self.optimizer.zero_grad(set_to_none=True)
            (parts.total * m).backward()  # per-member learning-rate convention (edgens.config)
            self.optimizer.step()
            with torch.no_grad():
                errors = self._ensemble_errors(eta_bar, y)
                sums += torch.stack([parts.total.detach(), parts.ensemble_nll.detach(), parts.member_nll.detach(),
                                     parts.ambiguity.detach(), errors / len(y)]) * len(y)
            seen += len(y)
            shown = None
            if number % SYNC_EVERY == 0 or number == len(batches):
                shown = float(sums[0]) / seen
                if not math.isfinite(shown):
                    raise TrainingDivergedError(
                        f"training diverged in epoch {epoch + 1} (loss {shown}); lower the learning rate "
                        f"(now {self.lr} per member, --lr)")
            self.callbacks.batch_end(number, shown)
            raise_if_interrupted()  # a Ctrl-C that a finalizer swallowed stops training here
        means = (sums / seen).tolist()
        return dict(zip(("loss", "ensemble_loss", "member_loss", "ambiguity", "ensemble_error"), means))

    def _ensemble_errors(self, eta_bar: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.config.family == "categorical":
            return (eta_bar.argmax(-1) != y).float().sum()
        mean = torch.exp(eta_bar) if self.config.family == "poisson" else eta_bar
        return ((mean.squeeze(-1) - y) ** 2).sum()

    def validation_score(self, diagnostics: dict) -> float:
        """Lower is better: validation error for categorical, validation ensemble loss otherwise."""
        return diagnostics["ensemble_error" if self.config.family == "categorical" else "ensemble_loss"]

    # --- the run --------------------------------------------------------------------------------------------
    def fit(self) -> None:
        """Train from ``self.epoch`` to the last epoch (or early stop), checkpointing after every epoch."""
        config = self.config
        while self.epoch < config.epochs:
            if config.patience is not None and self.epochs_without_improvement >= config.patience:
                break
            started = time.perf_counter()
            lr_used = self.optimizer.param_groups[0]["lr"]
            train = self.train_epoch(self.epoch)
            self.scheduler.step()
            val_eta = self.predict(self.data["val"][0])  # None on the processes that do not write the run
            val = self.share(epoch_diagnostics(val_eta, self.data["val"][1], config.family) if self.is_main else None)
            probe_eta = self.predict(self.data["train"][0][self.probe])
            collusion = self.share(collusion_diagnostics(probe_eta, self.data["train"][1][self.probe], val_eta,
                                                         self.data["val"][1], config.family)
                                   if self.is_main else None)
            self.epoch += 1
            score = self.validation_score(val)
            improved = score < self.best_score
            if improved:
                self.best_epoch, self.best_score, self.epochs_without_improvement = self.epoch, score, 0
            else:
                self.epochs_without_improvement += 1
            dominated = is_dominated(val, self.spec.n_members)
            if dominated and not self.dominance_warned:
                self.dominance_warned = True
                log.warning("module dominance at epoch %d: the best member's validation error %.4f is <= %.0f%% of the "
                            "median member's %.4f (one member fits the data, the others lag; see the paper's "
                            "CIFAR-10 results near lam = 1)", self.epoch, val["best_member_error"],
                            100 * DOMINANCE_RATIO,
                            val["median_member_error"])
            colluding = is_colluding(collusion)
            if colluding and not self.collusion_warned:
                self.collusion_warned = True
                log.warning("learner collusion at epoch %d: the members' validation diversity is %.0f%% of their own "
                            "loss and %.0f%% of their spread is constant offsets that cancel in the ensemble; expect "
                            "a large rise in error when members are dropped (Jeffares et al.; a lam further from 1 "
                            "keeps members useful alone)", self.epoch, 100 * collusion["val_diversity_ratio"],
                            100 * collusion["val_debiased_fraction"])
            record = {"epoch": self.epoch, "lr": lr_used, "time_s": round(time.perf_counter() - started, 3),
                      "train": train, "val": val, "best_epoch": self.best_epoch, "dominance": dominated,
                      "collusion": collusion, "colluding": colluding}
            self.history.append(record)
            best = {"epoch": self.epoch, "model": self.model_state(), "spec": self.spec.to_dict()} if improved else None
            last = self.state()
            if self.is_main:
                # Checkpoint first, then metrics: metrics.jsonl never runs ahead of what a resume restores.
                if best is not None:
                    save_checkpoint(self.run.best_checkpoint, best)
                save_checkpoint(self.run.last_checkpoint, last)
                self.run.write_metrics(self.history)
            self.callbacks.epoch_end(record)

    def finish(self) -> dict:
        """Evaluate the best checkpoint on validation and test data, save member outputs, write summary.json."""
        best = self.share(self.run.checkpoint("best")["model"] if self.is_main else None)
        self.load_model_state(best)
        x_test = torch.from_numpy(self.dataset.normalize(self.dataset.test_x)).to(self.device)
        target_dtype = self.data["val"][1].dtype
        y_test = torch.as_tensor(self.dataset.test_y, dtype=target_dtype, device=self.device)
        results = {}
        for split, x, y in (("val", self.data["val"][0], self.data["val"][1]), ("test", x_test, y_test)):
            eta = self.predict(x)
            if eta is not None:
                results[split] = epoch_diagnostics(eta, y, self.config.family)
                self.run.write_outputs(split, eta.cpu().numpy(), y.cpu().numpy())
        if not self.is_main:
            return self.share(None)
        summary = {
            "preset": self.config.preset, "lam": self.config.lam, "method": self.config.method,
            "family": self.config.family,
            "n_members": self.spec.n_members, "params_per_member": self.model.params_per_member(),
            "flops_per_member": self.model.flops_per_member(), "best_epoch": self.best_epoch,
            "epochs_run": self.epoch, "stopped_early": self.epoch < self.config.epochs,
            "train_time_s": round(sum(record["time_s"] for record in self.history), 2), "device": str(self.device),
            "val": results["val"], "test": results["test"],
        }
        raise_if_interrupted()  # summary.json marks the run finished: never after a Ctrl-C
        self.run.write_summary(summary)
        return self.share(summary)


def build_run_config(config: TrainConfig, dataset: Dataset, spec: StackSpec, device: torch.device) -> dict:
    """What a run's ``config.json`` holds: the settings, what they resolved to, the stack, the data, versions."""
    return {"config": config.to_dict(),
            "resolved": {"lr": config.resolved_lr(), "lr_convention": LR_CONVENTION, "device": str(device),
                         "milestone_epochs": config.milestone_epochs()},
            "stack": spec.to_dict(), "data": dataset.describe(), "versions": library_versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def with_resolved_prefixes(config: TrainConfig, n_members: int) -> TrainConfig:
    """``config`` with the anytime term's default prefixes written out, so that the run's config.json says which
    prefixes it trained (export and the benches read them; a later default must not change an old run's meaning)."""
    if not config.anytime_weight or config.prefixes is not None:
        return config
    return dataclasses.replace(config, prefixes=config.resolved_prefixes(n_members))


def load_data(config: TrainConfig) -> Dataset:
    """The data set a training configuration names, split as it says."""
    return load_dataset(config.dataset, config.data_dir, config.val_size, config.split_seed, config.family,
                        config.train_limit)


def train(config: TrainConfig, run_dir: str | Path, callbacks: Callbacks | None = None) -> dict:
    """Train a new run into ``run_dir`` (which must not hold a run); return its summary.

    Raises:
        ConfigError: bad settings; DataNotFoundError / InputError: data problems (nothing is written then);
        RunDirectoryError: ``run_dir`` already holds files; TrainingDivergedError: the loss became non-finite.
    """
    config.validate()
    run = RunDir(run_dir)
    run.check_new()  # before loading data: fail fast, write nothing
    device = resolve_device(config.device)
    dataset = load_data(config)
    spec = preset_spec(config.preset, dataset.input_shape, dataset.n_outputs, config.n_members)
    config = with_resolved_prefixes(config, spec.n_members)
    trainer = Trainer(config, run, dataset, spec, device, callbacks)
    run.create(build_run_config(config, dataset, spec, device))
    log.info("training %s (%d members, lam=%g) on %s, %s", config.preset, spec.n_members, config.lam, device,
             dataset.name)
    trainer.fit()
    return trainer.finish()


def resume(run_dir: str | Path, callbacks: Callbacks | None = None, device: str | None = None) -> dict:
    """Continue an interrupted run from its last checkpoint; return its summary.

    A finished run is not trained again: its summary is returned.

    Raises:
        DataNotFoundError: no run at ``run_dir``; RunDirectoryError: the run's files disagree.
    """
    run = RunDir(run_dir)
    stored = run.config()
    if run.is_finished():
        log.info("%s has already finished", run.path)
        return run.summary()
    run.remove_stale_temporaries()
    config = run.train_config(stored)
    if device is not None:
        config.device = device
    dataset = load_data(config)
    spec = run.stack_spec(stored)
    trainer = Trainer(config, run, dataset, spec, resolve_device(config.device), callbacks)
    if run.last_checkpoint.is_file():
        trainer.load_state(run.checkpoint("last", trainer.device, stored))
        log.info("resuming %s after epoch %d of %d", run.path, trainer.epoch, config.epochs)
    trainer.fit()
    return trainer.finish()
