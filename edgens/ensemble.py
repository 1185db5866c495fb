"""Ensemble maths in numpy, the one implementation every part of edgens uses (the runtime, export, selection, the
benches): combining members, their predictive distribution, and the NLL and error of a combination.

Members are combined by the mean of their natural parameters, ``eta_bar = (1/|S|) sum_{j in S} eta_j`` (the
paper's eta_bar: for classification, the normalised geometric mean of the members' probabilities), then the
family's inverse link: softmax (categorical), identity (gaussian: the mean of a unit-variance Gaussian) or exp
(poisson: the rate). NLLs drop constants as the training loss does: gaussian ``(eta - y)^2 / 2``, poisson
``exp(eta) - y eta``.

Shapes: ``eta`` is ``(..., N, K)`` (K = 1 for gaussian and poisson) with targets ``y`` ``(N,)``; functions that
reduce over examples return ``(...)``, so a stack of candidate combinations is evaluated in one call. Results keep
the input's float dtype: cast to float64 first where the sums must be exact to more digits than float32 holds.
numpy and the error family only: the torch-free runtime imports this module.
"""

from __future__ import annotations

import numpy as np

from edgens.errors import ConfigError, unknown_choice

FAMILIES = ("categorical", "gaussian", "poisson")
# How members' natural parameters are combined: the paper's mean, or a robust statistic that one corrupted member
# cannot drag arbitrarily far (per example and output).
COMBINERS = ("mean", "median", "trimmed")
DEFAULT_TRIM = 0.1


def combine(eta: np.ndarray, combiner: str = "mean", trim: float = DEFAULT_TRIM) -> np.ndarray:
    """Combine members' natural parameters over the first axis: ``(M, ..., K) -> (..., K)``.

    Args:
        eta: the members' natural parameters.
        combiner: ``mean`` (the paper's eta_bar), ``median`` (per example and output) or ``trimmed`` (the mean
            after dropping the ``floor(trim * M)`` smallest and largest values per example and output).
        trim: the fraction trimmed from each end by ``trimmed`` (0 <= trim < 0.5).

    Raises:
        ConfigError: an unknown combiner or a trim out of range.
    """
    if combiner == "mean":
        return eta.mean(axis=0)
    if combiner == "median":
        return np.median(eta, axis=0)
    if combiner == "trimmed":
        if not 0 <= trim < 0.5:
            raise ConfigError(f"trim {trim} is out of range; expected 0 <= trim < 0.5")
        cut = int(np.floor(trim * len(eta)))
        if cut == 0:
            return eta.mean(axis=0)
        kept = np.partition(eta, (cut - 1, len(eta) - cut), axis=0)[cut:len(eta) - cut]
        return kept.mean(axis=0)
    raise unknown_choice("combiner", combiner, COMBINERS)


def softmax(eta: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, stable for large logits (a new array)."""
    shifted = eta - eta.max(axis=-1, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=-1, keepdims=True)
    return shifted


def log_softmax(eta: np.ndarray) -> np.ndarray:
    """Log-probabilities over the last axis, stable for large logits."""
    shifted = eta - eta.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def inverse_link(family: str, eta: np.ndarray) -> np.ndarray:
    """The mean of the predictive distribution for mean natural parameters ``eta`` (a new array).

    Raises:
        ConfigError: an unknown family.
    """
    if family == "categorical":
        return softmax(eta)
    if family == "gaussian":
        return eta.copy()
    if family == "poisson":
        return np.exp(eta)
    raise unknown_choice("target family", family, FAMILIES)


def confidence(eta: np.ndarray) -> np.ndarray:
    """Per example, the largest class probability of ``softmax(eta)`` (the early-exit criterion)."""
    return softmax(eta).max(axis=-1)


def nll_per_example(eta: np.ndarray, y: np.ndarray, family: str = "categorical") -> np.ndarray:
    """NLL of each example under natural parameters ``eta`` (..., N, K) with targets ``y`` (N,) -> (..., N).

    Raises:
        ConfigError: an unknown family.
    """
    if family == "categorical":
        top = eta.max(axis=-1, keepdims=True)
        log_z = np.log(np.exp(eta - top).sum(axis=-1)) + top[..., 0]
        index = np.broadcast_to(np.asarray(y)[:, None], eta.shape[:-1] + (1,))
        return log_z - np.take_along_axis(eta, index, axis=-1)[..., 0]
    value = eta[..., 0]
    if family == "gaussian":
        return 0.5 * (value - y) ** 2
    if family == "poisson":
        return np.exp(value) - y * value
    raise unknown_choice("target family", family, FAMILIES)


def mean_nll(eta: np.ndarray, y: np.ndarray, family: str = "categorical") -> np.ndarray:
    """Mean NLL over the examples: ``eta`` (..., N, K) -> (...)."""
    return nll_per_example(eta, y, family).mean(axis=-1)


def error_rate(eta: np.ndarray, y: np.ndarray, family: str = "categorical") -> np.ndarray:
    """Error over the examples: ``eta`` (..., N, K) -> (...): the misclassification rate (categorical), else the
    mean squared error of the predictive mean.

    Raises:
        ConfigError: an unknown family.
    """
    if family == "categorical":
        return (eta.argmax(axis=-1) != y).mean(axis=-1)
    return ((inverse_link(family, eta)[..., 0] - y) ** 2).mean(axis=-1)
