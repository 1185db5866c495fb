"""Member-parallel training: each rank trains a contiguous slice of the members (the paper's Section 3.3).

Per step, rank r computes its members' natural parameters eta_j (M_r, B, K); one all-reduce (sum) of
``sum_{j in r} eta_j`` (B x K numbers, plus two loss sums for the display) gives ``eta_bar`` = mean over all M
members on every rank. The loss each rank backpropagates,

    lam * NLL(eta_bar) + (1 - lam) * (1/M) * sum_{j in r} NLL(eta_j)     (averaged over the batch, times M),

has exactly the single-process gradient for the rank's members, (1/M) (yhat_j - y - lam (yhat_j - ybar)) per
example and member before the M scaling, because the all-reduce passes the gradient of the replicated ensemble term
straight through (:class:`edgens.distributed.comm.Communicator.sum_across_ranks`) and the member term's mean is over
all M members. Every rank sees the same batches (each epoch's order is a function of (seed, epoch)), so no data is
exchanged.

Rank 0 writes the run directory in the single-process format: validation and test outputs and the checkpoints'
model and optimiser state are gathered from all ranks and joined along the member axis
(:mod:`edgens.distributed.slices`); the validation diagnostics rank 0 computes are shared, so every rank makes the
same best-epoch and early-stopping decisions. A run can be resumed with any number of processes, or none.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TypeVar

import torch

from edgens.config import TrainConfig
from edgens.data import Dataset
from edgens.distributed.comm import Communicator, process_group, use_rank_device
from edgens.distributed.launch import DEFAULT_TIMEOUT_S
from edgens.distributed.slices import (concat_model_members, concat_optimizer_members, member_slices,
                                       take_model_members, take_optimizer_members, to_cpu)
from edgens.losses import ModularLoss, anytime_term, member_nll, prefix_masks, subset_sums, subset_term
from edgens.presets import preset_spec
from edgens.rundir import RunDir
from edgens.stacks import MemberStack, StackSpec, build_stack
# The run-config and data helpers are train.py's own, shared so both paths record and load runs identically.
from edgens.train import (Callbacks, Trainer, build_run_config, load_data, predict_members,
                          with_resolved_prefixes)

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class DistributedTrainer(Trainer):
    """A :class:`~edgens.train.Trainer` for one rank: it holds and trains only this rank's members."""

    def __init__(self, config: TrainConfig, run: RunDir, dataset: Dataset, spec: StackSpec, device: torch.device,
                 comm: Communicator, callbacks: Callbacks | None = None) -> None:
        self.comm = comm
        self.slices = member_slices(spec.n_members, comm.world_size)
        self.members = self.slices[comm.rank]
        super().__init__(config, run, dataset, spec, device, callbacks)
        if self.weights is not None:  # bagging: the bootstrap counts of this rank's members
            self.weights = self.weights[self.members.start:self.members.stop]

    @property
    def is_main(self) -> bool:  # type: ignore[override]
        """True on rank 0, which writes the run directory."""
        return self.comm.is_main

    # --- hooks of Trainer -----------------------------------------------------------------------------------
    def build_model(self) -> MemberStack:
        """This rank's members, initialised exactly as in a single-process run with the same seed.

        Every rank draws the whole ensemble from the seed and keeps its slice: the union of the slices is the
        single-process initialisation, whatever the number of ranks. (The whole stack is built once, on the CPU.)
        """
        return build_stack(self.spec).subset(list(self.members))

    def predict(self, x: torch.Tensor) -> torch.Tensor | None:
        """All members' natural parameters (M, N, K) on rank 0 (gathered from every rank); None elsewhere."""
        local = predict_members(self.model, x, self.config.eval_batch_size)
        return self.comm.gather_rows_to_main(local, [len(members) for members in self.slices])

    def model_state(self) -> dict | None:
        """The whole ensemble's model state dict on rank 0 (on the CPU); None elsewhere."""
        parts = self.comm.gather_to_main(to_cpu(self.model.state_dict()))
        return None if parts is None else concat_model_members(parts)

    def load_model_state(self, state: dict) -> None:
        """Load this rank's slice of a whole-ensemble model state dict.

        Raises:
            RunDirectoryError: the state belongs to another ensemble.
        """
        super().load_model_state(take_model_members(state, self.spec.n_members, self.members))

    def share(self, value: _T) -> _T:
        """Rank 0's ``value`` on every rank.

        Raises:
            DistributedError: another rank died or did not answer within the timeout.
        """
        return self.comm.share(value)

    def state(self) -> dict | None:
        """Everything needed to resume (model and optimiser joined from all ranks) on rank 0; None elsewhere."""
        state = super().state()  # its "model" is gathered by model_state()
        optimizers = self.comm.gather_to_main(to_cpu(self.optimizer.state_dict()))
        if optimizers is None:
            return None
        state["optimizer"] = concat_optimizer_members(optimizers)
        return state

    def load_state(self, state: dict) -> None:
        """Restore this rank's slice of a whole-ensemble :meth:`state` (as written by any number of processes).

        Raises:
            RunDirectoryError: the state belongs to another ensemble.
        """
        state = dict(state, optimizer=take_optimizer_members(state["optimizer"], self.spec.n_members, self.members))
        super().load_state(state)

    def loss(self, eta: torch.Tensor, y: torch.Tensor, index: torch.Tensor,
             masks: torch.Tensor | None = None) -> tuple[ModularLoss, torch.Tensor]:
        """The modular loss of the whole ensemble on a batch, differentiable w.r.t. this rank's members only.

        ``eta``: this rank's members' natural parameters (M_r, B, K). The returned parts hold the whole ensemble's
        values (identical on every rank); ``total``'s gradient is the single-process gradient for these members.

        Raises:
            DistributedError: another rank died or did not answer within the timeout.
        """
        config, m, batch = self.config, self.spec.n_members, len(y)
        target = y.long() if config.family == "categorical" else y.to(eta.dtype)
        per_member = member_nll(eta, target, config.family)  # (M_r, B)
        weighted = per_member if self.weights is None else per_member * self.weights[:, index].float()
        # The step's one collective: the members' sum of eta and, detached, the two member-NLL sums for the
        # reported losses (8 more bytes instead of a second collective).
        sums = torch.stack([per_member.sum(), weighted.sum()]).detach()
        # With the anytime term, each prefix's sum of natural parameters is the sum of every rank's partial sum
        # over its own members below k (one more B x K per prefix in the same collective).
        # With the random-subset term, each draw's sum over the members it kept is likewise the sum of every rank's
        # partial sum over its own kept members (R more B x K; every rank drew the same masks).
        selected = [prefix_masks(self.prefixes, m)] if self.prefixes else []
        selected += [masks.cpu()] if masks is not None else []
        partial = (subset_sums(torch.cat(selected)[:, self.members].to(eta.device), eta).flatten() if selected
                   else eta.new_zeros(0))
        reduced = self.comm.sum_across_ranks(torch.cat([eta.sum(0).flatten(), partial, sums]))
        eta_bar = reduced[:eta[0].numel()].view(eta.shape[1:]) / m
        all_members, all_weighted = reduced[-2:].detach() / (m * batch)
        ensemble = member_nll(eta_bar, target, config.family).mean()
        # Value: the mean over all M members' NLLs; gradient: this rank's members' share of it (the other ranks'
        # members are constants here). ``local - local.detach()`` is exactly 0, so the value is identical on every
        # rank, and so are the divergence checks made from it.
        local = weighted.sum() / (m * batch)
        members = all_weighted + (local - local.detach())
        total = config.lam * ensemble + (1.0 - config.lam) * members
        anytime = None
        size, p = eta[0].numel(), len(self.prefixes)
        if self.prefixes:
            prefix_sums = reduced[size:size * (1 + p)].view(p, *eta.shape[1:])
            anytime = anytime_term(prefix_sums, target, self.prefixes, m, config.family)
            total = total + config.anytime_weight * anytime
        faults = None
        if masks is not None:
            draws = len(masks)
            kept_sums = reduced[size * (1 + p):size * (1 + p + draws)].view(draws, *eta.shape[1:])
            faults = subset_term(kept_sums, masks.sum(1).to(eta.dtype), target, m, config.family)
            total = total + config.fault_weight * faults
        parts = ModularLoss(total=total, ensemble_nll=ensemble, member_nll=members, ambiguity=all_members - ensemble,
                            anytime=anytime, faults=faults)
        return parts, eta_bar.detach()


def _distributed_run_config(config: TrainConfig, dataset: Dataset, spec: StackSpec, trainer: DistributedTrainer
                            ) -> dict:
    record = build_run_config(config, dataset, spec, trainer.device)
    # One extra entry under "resolved" (how the run was started); every other field is the single-process one.
    record["resolved"]["distributed"] = {
        "world_size": trainer.comm.world_size,
        "members_per_rank": [[s.start, s.stop] for s in trainer.slices],
        "backend": torch.distributed.get_backend(),
    }
    return record


def train_distributed(config: TrainConfig, run_dir: str | Path, callbacks: Callbacks | None = None,
                      timeout_s: float = DEFAULT_TIMEOUT_S) -> dict:
    """Train a new run as one rank of a torchrun job; rank 0 writes ``run_dir``; every rank returns the summary.

    Call it in every process torchrun started (``edgens train`` does). ``timeout_s``: how long a rank waits for
    the others in any collective before failing.

    Raises:
        ConfigError: bad settings, or more processes than members; DataNotFoundError / InputError: data problems;
        RunDirectoryError: ``run_dir`` already holds files (raised on every rank); TrainingDivergedError: the loss
        became non-finite (on every rank); DistributedError: not started by torchrun, or a rank died or hung.
    """
    config.validate()
    with process_group(timeout_s) as comm:
        run = RunDir(run_dir)
        comm.run_on_main(run.check_new)  # before loading data: fail fast, write nothing
        device = use_rank_device(config.device, comm.local_rank)
        dataset = load_data(config)
        spec = preset_spec(config.preset, dataset.input_shape, dataset.n_outputs, config.n_members)
        config = with_resolved_prefixes(config, spec.n_members)
        trainer = DistributedTrainer(config, run, dataset, spec, device, comm, callbacks)
        record = _distributed_run_config(config, dataset, spec, trainer)
        comm.run_on_main(lambda: run.create(record))
        if comm.is_main:
            log.info("training %s (%d members, lam=%g) on %d processes (members per rank: %s), %s", config.preset,
                     spec.n_members, config.lam, comm.world_size, [len(s) for s in trainer.slices], dataset.name)
        trainer.fit()
        return trainer.finish()


def _read_for_resume(run: RunDir) -> tuple[dict, dict | None, dict | None]:
    """Rank 0: the run's config.json, its summary if finished, else its last checkpoint (or None)."""
    stored = run.config()
    if run.is_finished():
        return stored, run.summary(), None
    run.remove_stale_temporaries()
    if not run.last_checkpoint.is_file():
        return stored, None, None
    return stored, None, run.checkpoint("last", "cpu", stored)


def resume_distributed(run_dir: str | Path, callbacks: Callbacks | None = None, device: str | None = None,
                       timeout_s: float = DEFAULT_TIMEOUT_S) -> dict:
    """Continue an interrupted run (written by any number of processes) as one rank of a torchrun job.

    Rank 0 reads the run directory and sends the settings and the last checkpoint to the others; each rank keeps
    its members' slice of the model and of the optimiser's momentum. A finished run is not trained again.

    Raises:
        DataNotFoundError: no run at ``run_dir``; RunDirectoryError: the run's files disagree (on every rank);
        ConfigError: more processes than members; DistributedError: not started by torchrun, or a rank died or hung.
    """
    with process_group(timeout_s) as comm:
        run = RunDir(run_dir)
        stored, summary, state = comm.run_on_main(lambda: _read_for_resume(run))
        if summary is not None:
            if comm.is_main:
                log.info("%s has already finished", run.path)
            return summary
        config = run.train_config(stored)
        if device is not None:
            config.device = device
        dataset = load_data(config)
        spec = run.stack_spec(stored)
        trainer = DistributedTrainer(config, run, dataset, spec, use_rank_device(config.device, comm.local_rank),
                                     comm, callbacks)
        if state is not None:
            trainer.load_state(state)
            if comm.is_main:
                log.info("resuming %s after epoch %d of %d on %d processes", run.path, trainer.epoch, config.epochs,
                         comm.world_size)
        trainer.fit()
        return trainer.finish()
