"""Combining members: the mean of their natural parameters, then the family's inverse link.

With S the members that answered, ``eta_bar = (1/|S|) sum_{j in S} eta_j`` (a mean over members, not stacks), then
softmax (categorical), identity (gaussian, the mean of a unit-variance Gaussian) or exp (poisson, the rate).
"""

from __future__ import annotations

import numpy as np

from edgens.errors import unknown_choice

FAMILIES = ("categorical", "gaussian", "poisson")


def softmax(eta: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, stable for large logits."""
    shifted = eta - eta.max(axis=-1, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=-1, keepdims=True)
    return shifted


def inverse_link(family: str, eta: np.ndarray) -> np.ndarray:
    """The mean of the predictive distribution for mean natural parameters ``eta`` (B, K).

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
