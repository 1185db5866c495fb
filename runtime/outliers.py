"""Silent-fault detection: find the group of members whose outputs deviate abnormally from the others', in numpy.

A corrupted weight (a bit flip in memory, after the file passed its checksum) makes its member's outputs wrong but
finite, often huge, and the ensemble mean follows them without any error being raised. Members trained with lam < 1
are each a classifier, so the others outvote it: :func:`find_outliers` leaves out the groups that deviate too far.

The statistic, and why:
- **Groups, not single members.** A group is the members of one general stack (16 or 32 of 256 by default); a
  prefix stack's output rows split into the groups it holds. A group's mean is far less noisy than one member's
  (lam = 0.99 members have logits of magnitude up to ~250 on clean data, their groups' means deviate by at most
  ~30), so a corrupted member stands out more against its group's clean spread than against its own; the statistic
  costs a few operations on ``(groups, B, K)`` sums instead of passes over every member's outputs (measured: 7-11%
  of a full-budget call at batch 64 on 2 cores, benchmarks/README.md); and leaving out one group is exactly what
  the runtime does when a stack fails loudly.
- **Distance to the leave-one-out mean**: ``D_g = || c(mean of group g - mean of the other groups' members) ||``
  per example, L2 over the outputs, where ``c`` removes the per-example mean over classes for categorical
  bundles (softmax ignores it, so only the centred part can change a prediction).
- **Scaled per group**: ``D_g`` is divided by the group's threshold ``tau_g``, the largest ``D_g`` on the
  validation split over every prefix of the anytime order with at least ``min_groups`` groups (so the threshold
  covers the noisier references of small budgets), fitted at export and stored in the manifest. A group whose
  largest ratio over the call's examples exceeds ``margin`` is an outlier for that call.
- **One at a time**: a huge outlier drags the others' reference along and inflates their deviations too; so the
  largest ratio is removed first and the rest measured again, until no ratio exceeds the margin or fewer than
  ``min_groups`` remain.
- **Too few to outvote**: with fewer than ``min_groups`` (3) groups answered, the deviation of one from the other is
  symmetric and nothing can be outvoted; such calls are not checked (``Prediction.outliers_checked`` says so).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from edgens.runtime.bundle import OutlierInfo

STATISTIC = "group-loo-l2"
DEFAULT_MARGIN = 1.5
MIN_GROUPS = 3


_CENTERING: dict[tuple[int, str], np.ndarray] = {}


def _centering(k: int, dtype: np.dtype) -> np.ndarray:
    """The ``(K, K)`` matrix that removes the mean over outputs (a matrix product is faster than a reduction over
    the short last axis)."""
    key = (k, np.dtype(dtype).str)
    if key not in _CENTERING:
        _CENTERING[key] = (np.eye(k) - 1.0 / k).astype(dtype)
    return _CENTERING[key]


def worst_deviations(sums: np.ndarray, sizes: np.ndarray, centered: bool) -> np.ndarray:
    """Per group, the largest ``D_g`` squared over the examples: ``(G,)`` from the groups' output sums
    ``(G, B, K)`` and member counts ``(G,)`` (at least two groups).

    ``D_g = || c(mean_g - (S - P_g) / (M - n_g)) || = || c(P_g * M / n_g - S) || / (M - n_g)`` with ``P_g`` the
    group's sum, ``S`` the sum over all groups and ``M`` their members.
    """
    sizes = np.asarray(sizes, dtype=np.float64)
    return _worst_scaled(sums, (sizes.sum() / sizes).astype(sums.dtype)[:, None, None], centered) / (
        sizes.sum() - sizes) ** 2


def _worst_scaled(sums: np.ndarray, scale: np.ndarray, centered: bool) -> np.ndarray:
    """``max over examples || c(P_g * scale_g - S) ||^2`` per group, in as few numpy calls as possible (this runs
    in every call: on 2 cores, ~20 us for 12 groups x 64 examples x 10 classes)."""
    k = sums.shape[2]
    if centered:
        scaled = (sums.reshape(-1, k) @ _centering(k, sums.dtype)).reshape(sums.shape)
    else:
        scaled = sums.copy()
    overall = scaled.sum(axis=0)
    scaled *= scale
    scaled -= overall
    return np.einsum("gbk,gbk->gb", scaled, scaled).max(axis=1).astype(np.float64)


class GroupCheck:
    """The outlier test for one fixed set of groups, with everything that does not depend on the outputs computed
    once (the predictor caches one per plan).

    Args:
        sizes: members per group.
        thresholds: per group, its fitted threshold ``tau_g`` (for a part of a group, scaled by the square root of
            full over part size: a mean of fewer members is noisier).
        centered: remove the per-example mean over outputs (categorical).
        margin: outlier when ``D_g > margin * tau_g`` on any example of the call.
        min_groups: check only while at least this many groups remain.
    """

    def __init__(self, sizes: Sequence[int], thresholds: Sequence[float], centered: bool,
                 margin: float = DEFAULT_MARGIN, min_groups: int = MIN_GROUPS):
        self.sizes = np.asarray(sizes, dtype=np.float64)
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self.centered, self.margin, self.min_groups = centered, margin, min_groups
        total = self.sizes.sum()
        self._scale = {np.dtype(np.float64): (total / self.sizes)[:, None, None]}
        self._scale[np.dtype(np.float32)] = self._scale[np.dtype(np.float64)].astype(np.float32)
        # D_g > margin * tau_g  <=>  max ||c(P_g M / n_g - S)||^2 > (margin * tau_g * (M - n_g))^2
        self._bound = (margin * self.thresholds * (total - self.sizes)) ** 2

    def ratios(self, sums: np.ndarray) -> np.ndarray:
        """``(max over examples D_g / (margin * tau_g))^2`` per group (inf for a deviation that overflowed)."""
        scale = self._scale.get(sums.dtype)
        if scale is None:
            scale = self._scale[np.dtype(np.float64)].astype(sums.dtype)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            worst = _worst_scaled(sums, scale, self.centered)
            if not math.isfinite(worst.sum()) and sums.dtype != np.float64:
                # A corrupted group's huge outputs overflowed float32 and made every group's deviation inf (a tie
                # that would leave out the wrong one): again in float64, where no finite float32 input overflows.
                worst = _worst_scaled(sums.astype(np.float64), self._scale[np.dtype(np.float64)], self.centered)
            ratios = worst / self._bound
        if math.isnan(ratios.sum()):  # 0 / 0: identical groups, no deviation
            ratios = np.where(np.isnan(ratios), 0.0, ratios)
        return ratios

    def any_outlier(self, sums: np.ndarray) -> bool:
        """Whether any group exceeds the margin (what :meth:`outliers` would find first), in one pass."""
        return len(sums) >= max(self.min_groups, 2) and bool(self.ratios(sums).max() > 1.0)

    def outliers(self, sums: np.ndarray) -> list[tuple[int, float]]:
        """The groups to leave out, largest ratio first, each with its ``max D_g / tau_g``: the largest is removed
        and the rest measured again, until none exceeds the margin or fewer than ``min_groups`` remain."""
        if len(sums) < max(self.min_groups, 2):
            return []
        ratios = self.ratios(sums)
        pick = int(np.argmax(ratios))
        if ratios[pick] <= 1.0:
            return []
        found = [(pick, math.sqrt(ratios[pick]) * self.margin)]
        rest = [i for i in range(len(sums)) if i != pick]
        smaller = GroupCheck(self.sizes[rest], self.thresholds[rest], self.centered, self.margin, self.min_groups)
        return found + [(rest[i], ratio) for i, ratio in smaller.outliers(sums[rest])]


def find_outliers(sums: np.ndarray, sizes: Sequence[int], thresholds: Sequence[float], centered: bool,
                  margin: float = DEFAULT_MARGIN, min_groups: int = MIN_GROUPS) -> list[tuple[int, float]]:
    """The groups to leave out of a call, with their deviation ratios ``max D_g / tau_g``, in the order found
    (:class:`GroupCheck` with these settings)."""
    return GroupCheck(sizes, thresholds, centered, margin, min_groups).outliers(sums)


def fit_thresholds(eta: np.ndarray, groups: dict[str, Sequence[int]], family: str, margin: float = DEFAULT_MARGIN,
                   min_groups: int = MIN_GROUPS) -> OutlierInfo | None:
    """Fit each group's threshold on validation outputs.

    Args:
        eta: ``(M, N, K)`` every member's natural parameters on the validation split.
        groups: general stack name -> its member ids, in anytime order.
        family: the bundle's family (categorical outputs are centred).
        margin: stored with the thresholds.
        min_groups: the fewest groups a prefix needs to be checked.

    Returns:
        The thresholds, or None with fewer than ``min_groups`` groups (nothing could outvote one).
    """
    names = list(groups)
    if len(names) < min_groups:
        return None
    sums = np.stack([eta[list(groups[name])].sum(axis=0, dtype=np.float64) for name in names])
    sizes = np.array([len(groups[name]) for name in names], dtype=np.float64)
    worst = np.zeros(len(names))
    for n in range(min_groups, len(names) + 1):
        d = np.sqrt(np.maximum(worst_deviations(sums[:n], sizes[:n], family == "categorical"), 0.0))
        worst[:n] = np.maximum(worst[:n], d)
    return OutlierInfo(thresholds={name: float(t) for name, t in zip(names, worst, strict=True)}, margin=margin,
                       min_groups=min_groups, statistic=STATISTIC, examples=int(eta.shape[1]))
