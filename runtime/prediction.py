"""What a call returns: :class:`Prediction`, the ensemble of the members that answered, and how the call went."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from edgens.errors import ConfigError
from edgens.runtime.health import StackFailure


@dataclass
class Prediction:
    """The result of one call.

    Attributes:
        family: the bundle's target family.
        mean: ``(B, K)`` the prediction: class probabilities (categorical), the mean (gaussian), the rate (poisson).
        eta: ``(B, K)`` the mean natural parameters of the members used.
        labels: ``(B,)`` the most probable class (categorical), else None.
        members_used: ``(B,)`` members averaged for each example.
        stacks_run: stacks that answered, in the order they finished.
        failures: stacks that failed in this call.
        elapsed_ms: wall time of the call, input checks included.
        stack_ms: wall time of each stack that ran (failed ones included).
        budget: the budget, as text.
        deadline_ms: the deadline of a ``deadline_ms`` call, else None.
        task: the specialist task of a ``task`` call, else None.
        outliers_checked: whether silent-fault detection checked this call's members (it needs the bundle's
            thresholds and at least three groups answered, and does not run under confidence or task budgets).
        promise_ms: for a deadline call, how far past the deadline it may finish by its promise: one stack, the
            90th percentile latency (this device's latency table, else the slowest recent run) of the slowest stack
            it started, plus :data:`~edgens.runtime.execution.OWN_WORK_MS` for the runtime's own work; None
            otherwise, or when no latency is known yet.
        queued_ms: for a request served by a :class:`~edgens.runtime.batching.Batcher`, the time from its arrival
            to the start of its first stack call; None for a direct call.
    """

    family: str
    mean: np.ndarray
    eta: np.ndarray
    labels: np.ndarray | None
    members_used: np.ndarray
    stacks_run: list[str]
    failures: list[StackFailure]
    elapsed_ms: float
    stack_ms: dict[str, float] = field(default_factory=dict)
    budget: str = "all members"
    deadline_ms: float | None = None
    task: str | None = None
    outliers_checked: bool = False
    promise_ms: float | None = None
    queued_ms: float | None = None

    @property
    def probabilities(self) -> np.ndarray:
        """Class probabilities (B, K) of a categorical bundle.

        Raises:
            ConfigError: the bundle is gaussian or poisson (use ``mean``).
        """
        if self.family != "categorical":
            raise ConfigError(f"a {self.family} bundle predicts means, not probabilities; use Prediction.mean")
        return self.mean

    @property
    def overrun_ms(self) -> float:
        """How far past its deadline the call finished (0 if in time or without a deadline)."""
        return max(0.0, self.elapsed_ms - self.deadline_ms) if self.deadline_ms is not None else 0.0

    @property
    def within_promise(self) -> bool:
        """Whether the call kept its deadline's promise: in time, or late by at most one stack (``promise_ms``)."""
        overrun = self.overrun_ms
        return overrun == 0.0 or (self.promise_ms is not None and overrun <= self.promise_ms)

    def select(self, rows: slice | np.ndarray, **changes: Any) -> Prediction:
        """The prediction of some examples only (e.g. one request's rows of a merged batch), with ``changes`` to
        its other fields (``elapsed_ms``, ``budget``...)."""
        return replace(self, mean=self.mean[rows], eta=self.eta[rows],
                       labels=None if self.labels is None else self.labels[rows],
                       members_used=self.members_used[rows], stacks_run=list(self.stacks_run),
                       failures=list(self.failures), stack_ms=dict(self.stack_ms), **changes)
