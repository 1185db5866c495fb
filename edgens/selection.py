"""Choosing members from their validation outputs (numpy only): the anytime order and specialist sub-ensembles.

Everything here works on members' natural parameters ``eta`` (M, N, K) and targets ``y`` (N,) of a validation set,
and combines members the way the runtime does: the mean of natural parameters.
"""

from __future__ import annotations

import numpy as np

from edgens.ensemble import error_rate, mean_nll
from edgens.errors import InputError

CHUNK = 32  # candidates evaluated at once: bounds memory at CHUNK * N * K floats


def _check(eta: np.ndarray, y: np.ndarray) -> None:
    if eta.ndim != 3 or eta.shape[0] < 1 or eta.shape[1] != len(y) or len(y) == 0:
        raise InputError(f"expected member outputs (M, N, K) and targets (N,) with N >= 1; got {eta.shape} and "
                         f"{y.shape}")


def ensemble_error(eta: np.ndarray, y: np.ndarray, members: list[int] | np.ndarray,
                   family: str = "categorical") -> float:
    """Error of the sub-ensemble ``members`` (mean of their natural parameters)."""
    return float(error_rate(eta[np.asarray(members)].mean(0), y, family))


def prefix_errors(eta: np.ndarray, y: np.ndarray, order: list[int] | np.ndarray,
                  family: str = "categorical") -> list[float]:
    """Error of the first k members of ``order`` for k = 1..len(order)."""
    _check(eta, y)
    running = np.zeros(eta.shape[1:], dtype=np.float64)
    errors = []
    for k, member in enumerate(order, 1):
        running += eta[member]
        errors.append(float(error_rate(running / k, y, family)))
    return errors


def greedy_order(eta: np.ndarray, y: np.ndarray, family: str = "categorical",
                 blocks: list[int] | tuple[int, ...] = ()) -> tuple[list[int], list[float]]:
    """Forward selection: each next member is the one that most lowers the validation error of the running mean of
    natural parameters (ties broken by NLL), so every prefix is a strong sub-ensemble.

    Args:
        blocks: member counts k at which the order must hold exactly the members 0..k-1 (the prefixes a run was
            trained for, ``--anytime-weight``): the selection then only reorders members inside each block
            [previous k, k), which keeps every trained prefix and makes the prefixes between them stronger.

    Returns:
        ``(order, errors)``: all member ids, and the error of each prefix k = 1..M.

    Raises:
        InputError: inconsistent shapes.
    """
    _check(eta, y)
    m = eta.shape[0]
    ends = sorted({k for k in blocks if 0 < k < m} | {m})
    block_of = np.searchsorted(ends, np.arange(m), side="right")  # the block each member id belongs to
    remaining = list(range(m))
    running = np.zeros(eta.shape[1:], dtype=np.float32)
    order: list[int] = []
    errors: list[float] = []
    # argmax (the categorical error) does not change when dividing by k: skip that pass over the candidates
    scale = (lambda k: 1.0) if family == "categorical" else (lambda k: 1.0 / k)
    for k in range(1, m + 1):
        if len(ends) > 1:  # only the current block's members may come next
            current = int(np.searchsorted(ends, k - 1, side="right"))
            remaining_all, remaining = remaining, [j for j in remaining if block_of[j] == current]
        candidate_errors = np.empty(len(remaining))
        for start in range(0, len(remaining), CHUNK):
            ids = remaining[start:start + CHUNK]
            candidate_errors[start:start + len(ids)] = error_rate((running + eta[ids]) * scale(k), y, family)
        tied = np.flatnonzero(candidate_errors == candidate_errors.min())
        if len(tied) > 1:
            nlls = mean_nll((running + eta[[remaining[i] for i in tied]]) / k, y, family)
            best = tied[int(np.argmin(nlls))]
        else:
            best = tied[0]
        member = remaining.pop(int(best))
        if len(ends) > 1:
            remaining = [j for j in remaining_all if j != member]
        order.append(member)
        errors.append(float(candidate_errors[best]))
        running += eta[member]
    return order, errors


def trained_order(eta: np.ndarray, y: np.ndarray, prefixes: tuple[int, ...] | list[int],
                  family: str = "categorical") -> tuple[list[int], list[float], str]:
    """The deployment order of a run trained for its nested ``prefixes`` (``--anytime-weight``): by index, or with
    greedy selection inside each trained prefix (:func:`greedy_order` with ``blocks``) when that has the lower mean
    prefix error on these (validation) outputs.

    Returns:
        ``(order, errors, method)``: the order, the error of each prefix, and ``trained`` or ``trained-greedy``.
    """
    order = list(range(eta.shape[0]))
    errors = prefix_errors(eta, y, order, family)
    refined, refined_errors = greedy_order(eta, y, family, prefixes)
    if np.mean(refined_errors) < np.mean(errors):
        return refined, refined_errors, "trained-greedy"
    return order, errors, "trained"


def random_prefix_errors(eta: np.ndarray, y: np.ndarray, draws: int = 20, seed: int = 0,
                         family: str = "categorical") -> list[float]:
    """Mean error over ``draws`` random orders of the first k members, for k = 1..M: the random-drop curve.

    The first k members of a random permutation are a uniformly random k-subset, so one permutation gives every k.
    """
    _check(eta, y)
    rng = np.random.default_rng(seed)
    curves = [prefix_errors(eta, y, rng.permutation(eta.shape[0]), family) for _ in range(draws)]
    return np.mean(curves, axis=0).tolist()


def random_subset_errors(eta: np.ndarray, y: np.ndarray, sizes: list[int] | range, draws: int = 20,
                         seed: int = 0, family: str = "categorical") -> list[float]:
    """Mean error of ``draws`` random sub-ensembles of each size (the curve to beat for an anytime order)."""
    _check(eta, y)
    rng = np.random.default_rng(seed)
    m = eta.shape[0]
    result = []
    for size in sizes:
        if size >= m:
            result.append(float(error_rate(eta.mean(0), y, family)))
            continue
        result.append(float(np.mean([error_rate(eta[rng.choice(m, size, replace=False)].mean(0), y, family)
                                     for _ in range(draws)])))
    return result


def f1_one_vs_rest(labels: np.ndarray, y: np.ndarray, positive: int) -> np.ndarray:
    """F1 of the problem "is it ``positive``?" for predicted ``labels`` (..., N) against ``y`` (N,)."""
    predicted = labels == positive
    actual = y == positive
    true_pos = (predicted & actual).sum(-1)
    denominator = predicted.sum(-1) + actual.sum()
    return np.where(denominator > 0, 2.0 * true_pos / np.maximum(denominator, 1), 0.0)


def subset_f1(eta: np.ndarray, y: np.ndarray, members: list[int] | np.ndarray, positive: int) -> float:
    """One-vs-rest F1 for class ``positive`` of the sub-ensemble ``members``."""
    return float(f1_one_vs_rest(eta[np.asarray(members)].mean(0).argmax(-1), y, positive))


def greedy_specialist(eta: np.ndarray, y: np.ndarray, positive: int, size: int) -> tuple[list[int], float]:
    """Forward selection of ``size`` members maximising the validation F1 of "is it ``positive``?".

    Each step adds the member that gives the sub-ensemble (mean of natural parameters, then argmax) the best F1;
    ties go to the member with the higher mean log-probability of the true class on the positive examples.

    Returns:
        ``(members, f1)`` of the selected sub-ensemble.
    """
    _check(eta, y)
    m = eta.shape[0]
    size = min(size, m)
    remaining = list(range(m))
    running = np.zeros(eta.shape[1:], dtype=np.float32)
    chosen: list[int] = []
    best_f1 = 0.0
    positives = y == positive
    for k in range(1, size + 1):
        scores = np.empty(len(remaining))
        for start in range(0, len(remaining), CHUNK):
            ids = remaining[start:start + CHUNK]
            scores[start:start + len(ids)] = f1_one_vs_rest((running + eta[ids]).argmax(-1), y, positive)
        tied = np.flatnonzero(scores == scores.max())
        if len(tied) > 1 and positives.any():
            candidates = (running + eta[[remaining[i] for i in tied]]) / k
            fit = -mean_nll(candidates[:, positives], y[positives], "categorical")
            pick = tied[int(np.argmax(fit))]
        else:
            pick = tied[0]
        best_f1 = float(scores[pick])
        member = remaining.pop(int(pick))
        chosen.append(member)
        running += eta[member]
    return chosen, best_f1


def best_of_random_specialists(eta: np.ndarray, y: np.ndarray, classes: list[int] | range, size: int,
                               candidates: int = 200, seed: int = 0) -> dict[int, tuple[list[int], float, float]]:
    """The paper's selection: for each class, the best validation F1 among ``candidates`` random ``size``-subsets.

    The same random subsets serve every class (each subset's predictions are computed once).

    Returns:
        ``{class: (members, best_f1, mean_f1)}``: the winning subset, its F1, and the mean F1 over all candidates
        (what a random sub-ensemble of that size gets).
    """
    _check(eta, y)
    rng = np.random.default_rng(seed)
    m = eta.shape[0]
    size = min(size, m)
    subsets = [np.sort(rng.choice(m, size, replace=False)) for _ in range(candidates)]
    labels = np.stack([eta[s].mean(0).argmax(-1) for s in subsets])  # (candidates, N)
    result = {}
    for positive in classes:
        scores = f1_one_vs_rest(labels, y, positive)
        best = int(np.argmax(scores))
        result[positive] = (subsets[best].tolist(), float(scores[best]), float(scores.mean()))
    return result


def best_single_member(eta: np.ndarray, y: np.ndarray, positive: int) -> tuple[int, float]:
    """The member with the best validation F1 for class ``positive`` and that F1."""
    scores = f1_one_vs_rest(eta.argmax(-1), y, positive)
    best = int(np.argmax(scores))
    return best, float(scores[best])
