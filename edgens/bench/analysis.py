"""Benchmark maths on members' outputs (numpy only): drop curves, specialists, stacking, entropy, confusion.

Everything takes members' natural parameters ``eta`` (M, N, K) and integer class targets ``y`` (N,) of a
classification problem, and combines members the way edgens does everywhere: the ensemble's logits are the mean of
the kept members' logits (the paper's eta_bar). Selections (the greedy anytime order, specialists, the stacking
combiner) are made on validation outputs and evaluated on test outputs; the functions that fit something take only
the data they may fit on, so test data cannot leak into a fit.

Random protocols use ``numpy.random.default_rng(seed)``, so the same seed draws the same members for every run
being compared (common random numbers: the differences between runs are not sampling noise of the draws).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from edgens.ensemble import log_softmax, nll_per_example
from edgens.errors import InputError
from edgens.selection import (best_of_random_specialists, best_single_member, f1_one_vs_rest, greedy_specialist,
                              subset_f1)

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``, as drawn by :class:`edgens.cli.progress.StageProgress`."""

CHUNK_EXAMPLES = 500  # examples per block in the random-drop protocols: bounds memory at M * CHUNK * K doubles


def no_progress(stage: str, done: int, total: int) -> None:
    """The default :data:`Progress`: draws nothing."""


# --- checks and basic measures ---------------------------------------------------------------------------------
def check_outputs(eta: np.ndarray, y: np.ndarray) -> tuple[int, int, int]:
    """Check members' logits (M, N, K) against class targets (N,); return (M, N, K).

    Raises:
        InputError: wrong dimensions, mismatched sizes, K < 2, labels outside [0, K), or non-finite logits.
    """
    eta, y = np.asarray(eta), np.asarray(y)
    if eta.ndim != 3 or y.ndim != 1 or eta.shape[1] != len(y) or eta.shape[0] < 1 or len(y) == 0:
        raise InputError(f"expected member logits (M, N, K) and targets (N,) with M, N >= 1; got {eta.shape} and "
                         f"{y.shape}")
    m, n, k = eta.shape
    if k < 2:
        raise InputError(f"the benchmarks need a classification problem (K >= 2 classes); got K = {k}")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= k:
        raise InputError(f"targets must be integer class labels in [0, {k - 1}]; got dtype {y.dtype}, range "
                         f"[{y.min()}, {y.max()}]")
    if not np.isfinite(eta).all():
        raise InputError("member logits contain NaN or Inf")
    return m, n, k


def ensemble_metrics(eta: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Error and NLL of the full ensemble (mean of all members' logits).

    Raises:
        InputError: see :func:`check_outputs`.
    """
    check_outputs(eta, y)
    logits = eta.astype(np.float64).mean(0)
    return {"error": float((logits.argmax(-1) != y).mean()), "nll": float(nll_per_example(logits, y).mean())}


def member_metrics(eta: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Each member's error and NLL alone: ``{"error": (M,), "nll": (M,)}``."""
    check_outputs(eta, y)
    return {"error": (eta.argmax(-1) != y).mean(1), "nll": nll_per_example(eta.astype(np.float64), y).mean(1)}


def mean_and_se(values: Sequence[float] | np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error of the mean (sample std with ddof=1 over sqrt(n)) along ``axis``.

    With a single value the standard error is NaN (unknown), not 0.
    """
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[axis]
    mean = values.mean(axis)
    if n < 2:
        return mean, np.full_like(mean, np.nan)
    return mean, values.std(axis, ddof=1) / math.sqrt(n)


# --- members dropped at random per test example --------------------------------------------------------------
@dataclass
class DropCurve:
    """Error and NLL vs members dropped, mean and standard error over repeats (index d = members dropped)."""

    n_members: int
    dropped: np.ndarray        # (M,) 0 .. M-1
    error_mean: np.ndarray     # (M,)
    error_se: np.ndarray
    nll_mean: np.ndarray
    nll_se: np.ndarray
    repeats: int
    seed: int

    def at_fraction(self, fraction: float) -> dict[str, float]:
        """The point with ``round(fraction * M)`` members dropped (capped at M - 1)."""
        d = min(int(round(fraction * self.n_members)), self.n_members - 1)
        return {"dropped": d, "kept": self.n_members - d, "error": float(self.error_mean[d]),
                "error_se": float(self.error_se[d]), "nll": float(self.nll_mean[d]), "nll_se": float(self.nll_se[d])}

    def to_dict(self) -> dict:
        """JSON-able form."""
        return {"protocol": "random members dropped independently per example", "n_members": self.n_members,
                "repeats": self.repeats, "seed": self.seed, "dropped": self.dropped.tolist(),
                "error_mean": self.error_mean.tolist(), "error_se": _nan_to_none(self.error_se),
                "nll_mean": self.nll_mean.tolist(), "nll_se": _nan_to_none(self.nll_se)}


def _nan_to_none(values: np.ndarray) -> list[float | None]:
    return [None if not math.isfinite(v) else float(v) for v in np.asarray(values, dtype=np.float64)]


def random_drop_curve(eta: np.ndarray, y: np.ndarray, repeats: int = 20, seed: int = 0,
                      progress: Progress = no_progress) -> DropCurve:
    """The paper's robustness protocol: for each test example independently, drop d members chosen at random and
    predict with the mean logits of the rest; error and NLL for every d = 0 .. M-1, over ``repeats`` repeats.

    One uniformly random permutation of the members per example and repeat gives every d at once: its first
    M - d members are a uniformly random (M - d)-subset.

    Raises:
        InputError: bad outputs (see :func:`check_outputs`) or ``repeats`` < 1.
    """
    m, n, k = check_outputs(eta, y)
    if repeats < 1:
        raise InputError(f"repeats must be >= 1, got {repeats}")
    rng = np.random.default_rng(seed)
    errors = np.zeros((repeats, m))  # indexed by kept - 1
    nlls = np.zeros((repeats, m))
    kept = np.arange(1, m + 1, dtype=np.float64)[:, None, None]
    blocks = range(0, n, CHUNK_EXAMPLES)
    for r in range(repeats):
        for start in blocks:
            stop = min(start + CHUNK_EXAMPLES, n)
            order = np.argsort(rng.random((stop - start, m)), axis=1)  # a random member order per example
            gathered = eta[order.T, np.arange(start, stop)[None, :]].astype(np.float64)  # (M, n, K)
            logits = np.cumsum(gathered, axis=0, out=gathered) / kept  # row i: mean of the first i + 1 members
            yb = y[start:stop]
            errors[r] += (logits.argmax(-1) != yb).sum(1)
            nlls[r] += nll_per_example(logits, yb).sum(1)
        progress("random drop", r + 1, repeats)
    errors /= n
    nlls /= n
    # reverse: index d (dropped) = M - kept
    error_mean, error_se = mean_and_se(errors[:, ::-1])
    nll_mean, nll_se = mean_and_se(nlls[:, ::-1])
    return DropCurve(m, np.arange(m), error_mean, error_se, nll_mean, nll_se, repeats, seed)


def bernoulli_keep_curve(eta: np.ndarray, y: np.ndarray, keep_probs: Sequence[float], repeats: int = 20,
                         seed: int = 0, progress: Progress = no_progress) -> dict:
    """Each member kept independently with probability p for each test example (a device where every member fails
    on its own); error and NLL per p, mean and standard error over ``repeats``.

    When every member is dropped for an example there is no prediction. We count that example as an error and give
    it the uniform distribution's NLL, log K (what a device without any answer can claim), and report how often it
    happened (``all_dropped_mean``) next to its probability (1 - p)^M. We do not redraw: redrawing would hide exactly
    the failures this protocol is meant to show.

    Returns:
        ``{"keep_prob", "error_mean", "error_se", "nll_mean", "nll_se", "all_dropped_mean",
        "all_dropped_expected", "repeats", "seed"}`` with one list entry per p.

    Raises:
        InputError: bad outputs, ``repeats`` < 1, or a p outside [0, 1].
    """
    m, n, k = check_outputs(eta, y)
    probs = [float(p) for p in keep_probs]
    if repeats < 1:
        raise InputError(f"repeats must be >= 1, got {repeats}")
    if not probs or any(not 0.0 <= p <= 1.0 for p in probs):
        raise InputError(f"keep probabilities must be in [0, 1]; got {probs}")
    rng = np.random.default_rng(seed)
    errors = np.zeros((repeats, len(probs)))
    nlls = np.zeros((repeats, len(probs)))
    empty = np.zeros((repeats, len(probs)))
    members_first = np.ascontiguousarray(eta.transpose(1, 0, 2), dtype=np.float64)  # (N, M, K) for matmul
    log_k = math.log(k)
    for r in range(repeats):
        for i, p in enumerate(probs):
            mask = rng.random((n, m)) < p
            count = mask.sum(1)
            sums = np.matmul(mask[:, None, :].astype(np.float64), members_first)[:, 0]  # (N, K)
            logits = sums / np.maximum(count, 1)[:, None]
            none = count == 0
            wrong = (logits.argmax(-1) != y) | none
            nll = np.where(none, log_k, nll_per_example(logits, y))
            errors[r, i], nlls[r, i], empty[r, i] = wrong.mean(), nll.mean(), none.mean()
        progress("keep probability", r + 1, repeats)
    error_mean, error_se = mean_and_se(errors)
    nll_mean, nll_se = mean_and_se(nlls)
    return {"protocol": "each member kept independently with probability p per example; an example with no member "
                        "left counts as an error with NLL log K",
            "keep_prob": probs, "error_mean": error_mean.tolist(), "error_se": _nan_to_none(error_se),
            "nll_mean": nll_mean.tolist(), "nll_se": _nan_to_none(nll_se),
            "all_dropped_mean": empty.mean(0).tolist(), "all_dropped_expected": [(1 - p) ** m for p in probs],
            "repeats": repeats, "seed": seed}


def prefix_curve(eta: np.ndarray, y: np.ndarray, order: Sequence[int]) -> dict[str, list[float]]:
    """Error and NLL of the first k members of ``order`` (k = 1 .. len(order)), e.g. the greedy anytime order.

    Raises:
        InputError: bad outputs, or ``order`` not distinct member ids.
    """
    m, n, k = check_outputs(eta, y)
    order = [int(i) for i in order]
    if not order or len(set(order)) != len(order) or min(order) < 0 or max(order) >= m:
        raise InputError(f"order must hold distinct member ids in [0, {m - 1}]; got {len(order)} ids")
    running = np.zeros((n, k))
    errors, nlls = [], []
    for count, member in enumerate(order, 1):
        running += eta[member]
        logits = running / count
        errors.append(float((logits.argmax(-1) != y).mean()))
        nlls.append(float(nll_per_example(logits, y).mean()))
    return {"error": errors, "nll": nlls}


# --- specialists ---------------------------------------------------------------------------------------------
def random_subsets_f1(eta: np.ndarray, y: np.ndarray, classes: Sequence[int], size: int, draws: int = 200,
                      seed: int = 0) -> dict[int, float]:
    """Mean one-vs-rest F1 per class of ``draws`` random ``size``-member sub-ensembles (what a random pick gets)."""
    check_outputs(eta, y)
    rng = np.random.default_rng(seed)
    m = eta.shape[0]
    size = min(size, m)
    labels = np.stack([eta[rng.choice(m, size, replace=False)].mean(0).argmax(-1) for _ in range(draws)])
    return {c: float(f1_one_vs_rest(labels, y, c).mean()) for c in classes}


def specialists_table(val_eta: np.ndarray, val_y: np.ndarray, test_eta: np.ndarray, test_y: np.ndarray,
                      size: int = 20, candidates: int = 200, seed: int = 0,
                      progress: Progress = no_progress) -> dict:
    """The paper's Figure 5 for each one-vs-rest problem "is it class c?": mean test F1 of single members, of random
    ``size``-member subsets, and of specialists selected on validation (greedy forward selection and the best of
    ``candidates`` random subsets), plus the best single member (chosen on validation) and the full ensemble.

    Selection sees only ``val_*``; ``test_*`` is used only to score the selections.

    Returns:
        ``{"classes": [per-class dicts], "mean": {column: mean over classes}, "size", "candidates", "seed"}``.

    Raises:
        InputError: bad outputs, or validation and test with different member or class counts.
    """
    mv, _, kv = check_outputs(val_eta, val_y)
    mt, _, kt = check_outputs(test_eta, test_y)
    if (mv, kv) != (mt, kt):
        raise InputError(f"validation and test outputs must have the same members and classes; got "
                         f"{val_eta.shape} and {test_eta.shape}")
    classes = list(range(kv))
    best_random = best_of_random_specialists(val_eta, val_y, classes, size, candidates, seed)
    random_test = random_subsets_f1(test_eta, test_y, classes, size, candidates, seed + 1)
    member_labels = test_eta.argmax(-1)
    full_labels = test_eta.mean(0).argmax(-1)
    rows = []
    for c in classes:
        greedy_members, greedy_val = greedy_specialist(val_eta, val_y, c, size)
        single, _ = best_single_member(val_eta, val_y, c)
        rows.append({
            "class": c,
            "single_mean": float(f1_one_vs_rest(member_labels, test_y, c).mean()),
            "single_best": float(f1_one_vs_rest(member_labels[single], test_y, c)),
            "random_subsets": random_test[c],
            "greedy": subset_f1(test_eta, test_y, greedy_members, c),
            "best_of_random": subset_f1(test_eta, test_y, best_random[c][0], c),
            "full_ensemble": float(f1_one_vs_rest(full_labels, test_y, c)),
            "greedy_val": greedy_val, "best_of_random_val": best_random[c][1],
            "greedy_members": greedy_members, "best_of_random_members": best_random[c][0]})
        progress("specialists", c + 1, len(classes))
    columns = ("single_mean", "single_best", "random_subsets", "greedy", "best_of_random", "full_ensemble")
    return {"size": min(size, mv), "candidates": candidates, "seed": seed, "classes": rows,
            "mean": {col: float(np.mean([row[col] for row in rows])) for col in columns}}


# --- stacking ------------------------------------------------------------------------------------------------
@dataclass
class StackingCombiner:
    """Linear stacking of members' logits: ``logits = sum_j w_j eta_j + b`` (one weight per member, a bias per
    class), fitted by regularised multinomial logistic regression on validation outputs."""

    weights: np.ndarray          # (M,)
    bias: np.ndarray             # (K,)
    l2: float
    iterations: int
    val_nll: float               # the fitted objective's data term, on the data it was fitted on
    history: list[float] = field(default_factory=list)

    def logits(self, eta: np.ndarray) -> np.ndarray:
        """The combiner's logits (N, K) for members' logits ``eta`` (M, N, K).

        Raises:
            InputError: ``eta`` has another member or class count than the fit.
        """
        if eta.ndim != 3 or eta.shape[0] != len(self.weights) or eta.shape[2] != len(self.bias):
            raise InputError(f"the combiner was fitted for {len(self.weights)} members and {len(self.bias)} classes; "
                             f"got outputs of shape {eta.shape}")
        return np.tensordot(self.weights, eta.astype(np.float64), axes=(0, 0)) + self.bias

    def evaluate(self, eta: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """Error and NLL of the combiner on ``(eta, y)``."""
        check_outputs(eta, y)
        logits = self.logits(eta)
        return {"error": float((logits.argmax(-1) != y).mean()), "nll": float(nll_per_example(logits, y).mean())}

    def to_dict(self) -> dict:
        """JSON-able form."""
        return {"weights": self.weights.tolist(), "bias": self.bias.tolist(), "l2": self.l2,
                "iterations": self.iterations, "val_nll": self.val_nll}


def fit_stacking(val_eta: np.ndarray, val_y: np.ndarray, l2: float = 1e-3, max_iter: int = 50,
                 tol: float = 1e-7) -> StackingCombiner:
    """Fit a :class:`StackingCombiner` on validation outputs only (the members stay fixed).

    Parametrised as ``w_j = u_j / M`` with ``u = 1, b = 0`` at the start (the plain mean of logits, i.e. the
    modular ensemble) and the penalty ``l2 / 2 * mean_j (u_j - 1)^2`` (shrinks towards the plain mean; a tiny
    penalty on ``b`` removes the softmax's shift invariance). The objective is convex; we minimise it with Newton's
    method and a backtracking line search (deterministic, converges in a few steps for M + K parameters).

    Raises:
        InputError: bad outputs or ``l2`` <= 0.
    """
    m, n, k = check_outputs(val_eta, val_y)
    if not l2 > 0:
        raise InputError(f"l2 must be > 0 (it makes the fit unique), got {l2}")
    eta = val_eta.astype(np.float64) / m                       # so that logits = tensordot(u, eta) + b
    onehot = np.eye(k)[val_y]
    p_count = m + k
    bias_l2 = 1e-6
    theta = np.concatenate([np.ones(m), np.zeros(k)])

    def objective(theta: np.ndarray) -> tuple[float, float]:
        logits = np.tensordot(theta[:m], eta, axes=(0, 0)) + theta[m:]
        data = float(nll_per_example(logits, val_y).mean())
        penalty = 0.5 * l2 * float(np.mean((theta[:m] - 1) ** 2)) + 0.5 * bias_l2 * float(theta[m:] @ theta[m:])
        return data + penalty, data

    value, data = objective(theta)
    history = [value]
    iterations = 0
    eye_k = np.eye(k)
    for iterations in range(1, max_iter + 1):
        grad = np.zeros(p_count)
        hess = np.zeros((p_count, p_count))
        for start in range(0, n, CHUNK_EXAMPLES):
            stop = min(start + CHUNK_EXAMPLES, n)
            # Jacobian of each example's logits w.r.t. theta: (n, K, M + K)
            jac = np.concatenate([eta[:, start:stop].transpose(1, 2, 0),
                                  np.broadcast_to(eye_k, (stop - start, k, k))], axis=2)
            logits = jac[..., :m] @ theta[:m] + theta[m:]
            prob = np.exp(log_softmax(logits))
            grad += np.einsum("nk,nkp->p", prob - onehot[start:stop], jac)
            # Hessian of softmax cross-entropy: J^T (diag(p) - p p^T) J, as two matrix products
            weighted = (np.sqrt(prob)[..., None] * jac).reshape(-1, p_count)
            projected = np.einsum("nk,nkp->np", prob, jac)
            hess += weighted.T @ weighted - projected.T @ projected
        grad /= n
        hess /= n
        grad[:m] += l2 * (theta[:m] - 1) / m
        grad[m:] += bias_l2 * theta[m:]
        hess[np.arange(m), np.arange(m)] += l2 / m
        hess[np.arange(m, p_count), np.arange(m, p_count)] += bias_l2
        step = np.linalg.solve(hess, -grad)
        decrease = float(grad @ step)  # negative: a descent direction (hess is positive definite)
        if -decrease < tol:
            break
        scale = 1.0
        while True:
            candidate = theta + scale * step
            new_value, new_data = objective(candidate)
            if new_value <= value + 0.25 * scale * decrease or scale < 1e-8:
                break
            scale *= 0.5
        theta, value, data = candidate, new_value, new_data
        history.append(value)
    log.debug("stacking fit: %d Newton steps, objective %.6f", iterations, value)
    return StackingCombiner(theta[:m] / m, theta[m:].copy(), l2, iterations, data, history)


# --- per-member statistics -----------------------------------------------------------------------------------
def member_entropies(eta: np.ndarray) -> np.ndarray:
    """Each member's mean predictive entropy (nats) over the examples: (M, N, K) -> (M,)."""
    log_p = log_softmax(np.asarray(eta, dtype=np.float64))
    return -(np.exp(log_p) * log_p).sum(-1).mean(-1)


def entropy_stats(eta: np.ndarray) -> dict[str, float]:
    """Statistics across members of their mean predictive entropy (the paper's Table 6: a large std means some
    members are confident and others near uniform, a sign of module dominance)."""
    entropy = member_entropies(eta)
    ensemble = float(member_entropies(np.asarray(eta, dtype=np.float64).mean(0, keepdims=True))[0])
    return {"min": float(entropy.min()), "max": float(entropy.max()), "mean": float(entropy.mean()),
            "std": float(entropy.std()), "ensemble": ensemble, "uniform": math.log(eta.shape[-1])}


def confusion_matrix(labels: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts ``[true class, predicted class]`` of predicted ``labels`` (..., N) against ``y`` (N,) -> (..., K, K).

    Raises:
        InputError: labels or targets outside [0, n_classes).
    """
    labels = np.asarray(labels)
    if labels.shape[-1] != len(y):
        raise InputError(f"labels (..., N) and targets (N,) must match; got {labels.shape} and {y.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes or y.min() < 0 or y.max() >= n_classes):
        raise InputError(f"labels and targets must be in [0, {n_classes - 1}]")
    lead = labels.shape[:-1]
    flat = labels.reshape(-1, len(y))
    cells = y[None, :] * n_classes + flat  # one bin per (true, predicted)
    counts = np.stack([np.bincount(row, minlength=n_classes * n_classes) for row in cells])
    return counts.reshape(*lead, n_classes, n_classes)


def member_confusions(eta: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each member's confusion matrix (M, K, K), rows = true class, columns = predicted."""
    m, n, k = check_outputs(eta, y)
    return confusion_matrix(eta.argmax(-1), y, k)
