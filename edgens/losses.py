"""The modular loss of Webb et al. (arXiv 1902.04422) for ensembles of exponential-family members.

For M members with natural parameters ``eta_j`` (logits for categorical) and the ensemble ``eta_bar`` = mean over
members of ``eta_j``, per example::

    L_lam = lam * NLL(eta_bar) + (1 - lam) * (1/M) sum_j NLL(eta_j)           (convex form)
          = (1/M) sum_j NLL(eta_j) - lam * (1/M) sum_j KL(q_bar || q_j)         (ambiguity form)

lam = 0 is independent training, lam = 1 end-to-end training; lam outside [0, 1] is refused (lam > 1 makes the
loss unbounded below, their Theorem 1). NLLs are given up to constants that do not depend on eta:
categorical cross-entropy, gaussian (unit variance) squared error / 2, poisson exp(eta) - y * eta.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from edgens.config import check_prefixes
from edgens.ensemble import FAMILIES
from edgens.errors import ConfigError, InputError, unknown_choice



@dataclass
class ModularLoss:
    """The parts of the modular loss, each a scalar tensor averaged over the batch."""

    total: torch.Tensor
    """lam * ensemble_nll + (1 - lam) * member_nll."""
    ensemble_nll: torch.Tensor
    """NLL of the ensemble (the mean of the members' natural parameters)."""
    member_nll: torch.Tensor
    """Mean over members of each member's NLL."""
    ambiguity: torch.Tensor
    """Mean over members of KL(q_bar || q_j): the ensemble's diversity; member_nll - ensemble_nll."""
    anytime: torch.Tensor | None = None
    """The nested-prefix term sum_k (k / M) NLL(mean of the first k members), before its weight; None without it."""
    faults: torch.Tensor | None = None
    """The random-subset term (:func:`subset_term`), before its weight; None without it."""


def class_log_probs(eta: torch.Tensor) -> torch.Tensor:
    """log-softmax of ``eta`` (..., K) over its last axis, returned with the class axis moved first: (K, ...).

    Why class-first: on CPU, PyTorch's log-softmax over a short last axis (K = 10) is ~10x slower than the same
    reduction over a leading axis, and it dominated the training step of 256 small members.
    """
    return F.log_softmax(eta.movedim(-1, 0), dim=0)


def member_nll(eta: torch.Tensor, target: torch.Tensor, family: str = "categorical") -> torch.Tensor:
    """Per-member, per-example NLL of natural parameters ``eta`` (..., B, K); returns shape (..., B).

    ``target``: class indices (B,) for categorical; values (B,) for gaussian and poisson (K = 1).
    """
    if family == "categorical":
        log_p = class_log_probs(eta)
        return -log_p.gather(0, target.expand(1, *eta.shape[:-1]))[0]
    value = eta.squeeze(-1)
    if family == "gaussian":
        return 0.5 * (value - target) ** 2
    if family == "poisson":
        return torch.exp(value) - target * value
    raise unknown_choice("target family", family, FAMILIES)


def kl_to_members(eta_bar: torch.Tensor, eta: torch.Tensor, family: str = "categorical") -> torch.Tensor:
    """KL(q_bar || q_j) for each member j: ``eta_bar`` (B, K), ``eta`` (M, B, K) -> (M, B).

    For a natural exponential family with log-partition A: KL = A(eta_j) - A(eta_bar) - (eta_j - eta_bar) mu_bar.
    """
    if family == "categorical":
        log_q_bar = class_log_probs(eta_bar)[:, None]  # (K, 1, B)
        return (log_q_bar.exp() * (log_q_bar - class_log_probs(eta))).sum(0)
    diff = (eta - eta_bar).squeeze(-1)
    if family == "gaussian":
        return 0.5 * diff**2
    if family == "poisson":
        # A(eta) = exp(eta): KL = exp(eta_bar) * (exp(d) - 1 - d), d = eta_j - eta_bar (always >= 0).
        return torch.exp(eta_bar.squeeze(-1)) * (torch.expm1(diff) - diff)
    raise unknown_choice("target family", family, FAMILIES)


def check_lam(lam: float) -> float:
    """Return ``lam`` as a float if it lies in [0, 1].

    Raises:
        ConfigError: lam is not a finite number in [0, 1].
    """
    lam = float(lam)
    if not (math.isfinite(lam) and 0.0 <= lam <= 1.0):
        hint = " (lam > 1 makes the loss unbounded below: it can go to -inf while the ensemble gets worse)" \
            if lam > 1 else ""
        raise ConfigError(f"lam must be in [0, 1], got {lam}{hint}")
    return lam


def check_inputs(eta: torch.Tensor, target: torch.Tensor, family: str) -> None:
    """Check shapes, label ranges and finiteness of a modular-loss call.

    Raises:
        InputError: the message names the bad argument and what was expected.
        ConfigError: an unknown family.
    """
    if family not in FAMILIES:
        raise unknown_choice("target family", family, FAMILIES)
    if eta.dim() != 3 or eta.shape[0] < 1 or eta.shape[1] < 1:
        raise InputError(f"eta must have shape (members, batch, outputs) with members, batch >= 1; got "
                         f"{tuple(eta.shape)}")
    m, b, k = eta.shape
    if family != "categorical" and k != 1:
        raise InputError(f"{family} members have one output (K = 1); eta has K = {k}")
    if target.shape != (b,):
        raise InputError(f"target must have shape ({b},) to match eta {tuple(eta.shape)}; got {tuple(target.shape)}")
    if not torch.isfinite(eta).all():
        raise InputError("eta holds NaN or infinite values")
    if family == "categorical":
        if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise InputError(f"categorical targets must be integer class indices, got dtype {target.dtype}")
        low, high = int(target.min()), int(target.max())
        if low < 0 or high >= k:
            raise InputError(f"class labels must be in [0, {k - 1}] for K = {k} outputs; got labels in "
                             f"[{low}, {high}]")
    else:
        if not torch.isfinite(target).all():
            raise InputError("target holds NaN or infinite values")
        if family == "poisson" and float(target.min()) < 0:
            raise InputError(f"poisson targets must be counts >= 0, got {float(target.min())}")


def anytime_term(prefix_sums: torch.Tensor, target: torch.Tensor, prefixes: tuple[int, ...], n_members: int,
                 family: str = "categorical") -> torch.Tensor:
    """The nested-prefix term: sum over k of (k / M) * NLL(mean of the first k members), averaged over the batch.

    Args:
        prefix_sums: (P, B, K): for each k of ``prefixes``, the sum of the first k members' natural parameters.
        target: (B,) targets, as for :func:`modular_loss` (already long / float).
        prefixes: the P member counts k.
        n_members: M.

    The k / M weight keeps each member's gradient on the scale of the full-ensemble term: NLL(mean of k) gives each
    of its k members 1 / k of the gradient of the mean, so (k / M) * that is 1 / M, as the lam term gives every
    member.
    """
    sizes = torch.tensor(prefixes, dtype=prefix_sums.dtype, device=prefix_sums.device)
    nll = member_nll(prefix_sums / sizes[:, None, None], target, family).mean(-1)  # (P,)
    return (sizes / n_members * nll).sum()


def subset_term(subset_sums: torch.Tensor, sizes: torch.Tensor, target: torch.Tensor, n_members: int,
                family: str = "categorical") -> torch.Tensor:
    """The random-subset term: the mean over R draws of (k / M) * NLL(mean of the k members the draw kept),
    averaged over the batch, as random faults and drops leave an ensemble.

    Args:
        subset_sums: (R, B, K): each draw's sum of its kept members' natural parameters.
        sizes: (R,): how many members each draw kept (>= 1).
        target: (B,) targets (already long / float).
        n_members: M.

    The k / M weight gives each kept member 1 / M of the gradient, as :func:`anytime_term` and the lam term do.
    """
    nll = member_nll(subset_sums / sizes[:, None, None], target, family).mean(-1)  # (R,)
    return (sizes / n_members * nll).mean()


def subset_masks(rng: np.random.Generator, draws: int, n_members: int,
                 keep: tuple[float, float] = (0.05, 0.5)) -> torch.Tensor:
    """(R, M) 0/1 float masks of the members each of R draws keeps: draw r keeps each member with a probability p_r
    drawn log-uniformly from ``keep`` (budgets and faults leave a few members as often as many); a draw that would
    keep none keeps one member at random. One draw serves the whole batch: the term is then one (R + P) x M matrix
    product with the prefix term's (:func:`subset_sums`), where a draw per example cost 1.35x the step of the
    anytime term alone (issue 27). Drawn on the CPU from ``rng``, so that every process of a member-parallel run
    draws the same masks."""
    low, high = math.log(keep[0]), math.log(keep[1])
    p = np.exp(low + (high - low) * rng.random((draws, 1)))
    masks = rng.random((draws, n_members)) < p
    chosen = rng.integers(n_members, size=draws)  # drawn always: the same stream either way
    empty = ~masks.any(axis=1)
    masks[empty, chosen[empty]] = True
    return torch.from_numpy(masks.astype(np.float32))


@functools.lru_cache(maxsize=8)
def prefix_masks(prefixes: tuple[int, ...], n_members: int) -> torch.Tensor:
    """(P, M) 0/1 float masks of the nested prefixes: row p keeps the first ``prefixes[p]`` members (made once per
    setting: every training step needs them; callers must not change the tensor)."""
    return (torch.arange(n_members)[None, :] < torch.tensor(prefixes)[:, None]).float()


def subset_sums(masks: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """(S, B, K): for each of S member masks (S, M), the sum of the kept members' natural parameters ``eta``
    (M, B, K): one matrix product."""
    return (masks.to(eta.dtype) @ eta.reshape(eta.shape[0], -1)).view(len(masks), *eta.shape[1:])


def prefix_sums(eta: torch.Tensor, prefixes: tuple[int, ...]) -> torch.Tensor:
    """(P, B, K): for each k of ``prefixes``, the sum of the first k members of ``eta`` (M, B, K)."""
    return subset_sums(prefix_masks(prefixes, eta.shape[0]).to(eta.device), eta)


def modular_loss(eta: torch.Tensor, target: torch.Tensor, lam: float, family: str = "categorical",
                 validate: bool = True, member_weights: torch.Tensor | None = None, anytime_weight: float = 0.0,
                 prefixes: tuple[int, ...] = (), fault_weight: float = 0.0,
                 fault_masks: torch.Tensor | None = None) -> ModularLoss:
    """The modular loss of an ensemble, averaged over the batch.

    Args:
        eta: natural parameters, shape (M, B, K): members first; K = 1 for gaussian and poisson.
        target: (B,) class indices (categorical) or target values.
        lam: in [0, 1]: 0 = independent training, 1 = end-to-end training of the ensemble.
        family: ``categorical``, ``gaussian`` or ``poisson``.
        validate: check shapes, label range and finiteness (the training loop turns this off: each check is a
            device sync; it checks the loss instead).
        member_weights: optional (M, B) weights of each example in each member's NLL term (bagging: bootstrap
            counts, with lam = 0). The ensemble term and the ambiguity stay unweighted.
        anytime_weight: mu >= 0: adds mu * :func:`anytime_term` over ``prefixes`` (anytime-aware training: the
            ensembles of the first k members, in index order, the order the deployed runtime runs them in).
        prefixes: member counts k in [1, M) of the nested prefixes (used when ``anytime_weight`` > 0; checked with
            ``validate``).
        fault_weight: nu >= 0: adds nu * :func:`subset_term` over ``fault_masks`` (fault-aware training: the
            ensembles of random member subsets per example, what random faults and drops leave).
        fault_masks: (R, M) 0/1 masks from :func:`subset_masks` (used when ``fault_weight`` > 0).

    Returns:
        :class:`ModularLoss` with ``total``, ``ensemble_nll``, ``member_nll`` and ``ambiguity``.

    Raises:
        ConfigError: lam outside [0, 1], an unknown family, or (``validate``) prefixes outside [1, M).
        InputError: bad shapes, labels out of range, non-finite values.
    """
    lam = check_lam(lam)
    if validate:
        check_inputs(eta, target, family)
        if anytime_weight:
            check_prefixes(tuple(prefixes), eta.shape[0])
    if family == "categorical":
        target = target.long()
    else:
        target = target.to(eta.dtype)
    eta_bar = eta.mean(dim=0)
    ensemble = member_nll(eta_bar, target, family).mean()
    per_member = member_nll(eta, target, family)
    members = per_member.mean()
    # Ambiguity by the identity mean_j NLL(eta_j) - NLL(eta_bar) = mean_j KL(q_bar || q_j) (exact for natural
    # exponential families); cheaper than the KLs themselves. Tests check it against kl_to_members.
    ambiguity = members - ensemble
    if member_weights is not None:
        if member_weights.shape != per_member.shape:
            raise InputError(f"member_weights must have shape {tuple(per_member.shape)} (members, batch); got "
                             f"{tuple(member_weights.shape)}")
        members = (per_member * member_weights).mean()
    total = lam * ensemble + (1.0 - lam) * members
    if fault_weight and fault_masks is None:
        raise ConfigError("fault_weight needs fault_masks (subset_masks)")
    # The prefix and random-subset sums in one matrix product: (P + R) x M against M x (B K).
    masks = [prefix_masks(tuple(prefixes), eta.shape[0]).to(eta.device)] if anytime_weight else []
    masks += [fault_masks.to(eta.device)] if fault_weight else []
    sums = subset_sums(torch.cat(masks), eta) if masks else None
    p = len(prefixes) if anytime_weight else 0
    anytime = None
    if anytime_weight:
        anytime = anytime_term(sums[:p], target, prefixes, eta.shape[0], family)
        total = total + anytime_weight * anytime
    faults = None
    if fault_weight:
        faults = subset_term(sums[p:], fault_masks.to(eta.dtype).sum(1), target, eta.shape[0], family)
        total = total + fault_weight * faults
    return ModularLoss(total=total, ensemble_nll=ensemble, member_nll=members, ambiguity=ambiguity, anytime=anytime,
                       faults=faults)
