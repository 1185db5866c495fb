"""Early exit off-line: simulate the ``confidence=p`` budget on precomputed stack outputs, and fit p on data.

:func:`fit_confidence` drives a :class:`~edgens.runtime.predictor.Predictor` (it runs the stacks once on validation
inputs); the live budget itself is planned in :mod:`edgens.runtime.policies`, which this module builds on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgens.checks import check_number
from edgens.errors import ConfigError, NoMembersAvailableError
from edgens.ensemble import confidence as max_probability
from edgens.runtime.policies import still_unsure
from edgens.runtime.predictor import Predictor


def early_exit(stack_etas: Sequence[np.ndarray], p: float) -> tuple[np.ndarray, np.ndarray]:
    """Simulate the ``confidence=p`` budget on precomputed stack outputs.

    Args:
        stack_etas: each general stack's output ``(members, B, K)``, in anytime order.
        p: the confidence threshold.

    Returns:
        ``(members used per example (B,), mean natural parameters (B, K))``.
    """
    eta_sum = np.zeros(stack_etas[0].shape[1:], dtype=np.float64)
    counts = np.zeros(stack_etas[0].shape[1], dtype=np.int64)
    active = np.ones(len(counts), dtype=bool)
    for eta in stack_etas:
        if not active.any():
            break
        eta_sum[active] += eta[:, active].sum(axis=0)
        counts[active] += len(eta)
        active[active] = still_unsure(eta_sum[active], counts[active], p)
    return counts, eta_sum / counts[:, None]


def fit_confidence(predictor: Predictor, x: np.ndarray, target_members: float, batch_size: int = 256) -> float:
    """The confidence threshold p for which early exit uses about ``target_members`` members per example on ``x``.

    Returns the largest p whose mean number of members on ``x`` is at most ``target_members`` (larger p: more
    members, better accuracy), searched over the confidences the ensemble actually reaches. No labels are needed.

    Args:
        predictor: a loaded categorical predictor.
        x: raw validation inputs.
        target_members: the wanted mean number of members per example.
        batch_size: examples per stack run.

    Raises:
        ConfigError: not a categorical bundle, or ``target_members`` is below the first stack's size.
        InputError: bad ``x``.
        NoMembersAvailableError: no general stack answered on ``x``.
    """
    if predictor.manifest.family != "categorical":
        raise ConfigError(f"confidence budgets need a categorical bundle, this one is {predictor.manifest.family}")
    check_number("target_members", target_members, low=0, low_open=True)
    check_number("batch_size", batch_size, low=1, integer=True)
    outputs = predictor.stack_outputs(x, batch_size=batch_size)
    etas = [outputs[stack.name] for stack in predictor.manifest.general_stacks if stack.name in outputs]
    if not etas:
        raise NoMembersAvailableError(f"fit_confidence: no general stack of {predictor.bundle_dir} answered on the "
                                      f"{len(x)} inputs; {predictor.describe_health()}")
    if target_members < len(etas[0]):
        raise ConfigError(f"target_members={target_members} is below the first stack's {len(etas[0])} members; "
                          f"early exit never uses fewer")
    # Candidates: the confidences reached after each prefix of stacks (p just above one changes a decision).
    eta_sum = np.zeros(etas[0].shape[1:])
    levels = []
    count = 0
    for eta in etas:
        eta_sum += eta.sum(axis=0)
        count += len(eta)
        levels.append(max_probability(eta_sum / count))
    candidates = np.unique(np.concatenate(levels + [np.array([1.0])]))
    low, high = 0, len(candidates) - 1  # the mean members grow with p: binary search the largest p that fits
    best = float(candidates[0])
    while low <= high:
        middle = (low + high) // 2
        used, _ = early_exit(etas, float(candidates[middle]))
        if used.mean() <= target_members:
            best, low = float(candidates[middle]), middle + 1
        else:
            high = middle - 1
    return best
