"""Fault injection: make chosen stacks of a predictor fail on purpose, for tests and benchmarks.

    with inject_faults(predictor, {"general-001": "raise", "general-003": Fault("sleep", sleep_ms=50)}):
        prediction = predictor.predict(x)     # the prediction of the other stacks' members

A :class:`FaultyRunner` wraps a stack's real runner and, per call, raises, returns NaN, Inf or a wrongly shaped
output, or sleeps before running the real stack (a slow stack; with a stack timeout it times out). The sleep stops
early when the runner is cancelled, as a real timed-out run is.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from edgens.errors import unknown_choice
from edgens.runtime.backends.base import StackRunner
from edgens.runtime.predictor import Predictor

FAULT_KINDS = ("raise", "nan", "inf", "shape", "sleep")


class InjectedFault(RuntimeError):
    """The error a ``raise`` fault raises (it stands for a backend crashing, so it is not an EdgensError)."""


@dataclass(frozen=True)
class Fault:
    """What a faulty stack does.

    Attributes:
        kind: ``raise``, ``nan`` (NaN in its output), ``inf``, ``shape`` (one member row missing) or ``sleep``
            (wait ``sleep_ms``, then answer correctly).
        sleep_ms: the delay of a ``sleep`` fault.
        times: fail only this many calls, then behave (None: every call).
    """

    kind: str
    sleep_ms: float = 0.0
    times: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise unknown_choice("fault kind", self.kind, FAULT_KINDS)


class FaultyRunner(StackRunner):
    """Wraps a runner and applies a :class:`Fault` to its calls.

    Attributes:
        calls: calls so far.
        faults: calls that were made to fail.
    """

    def __init__(self, inner: StackRunner, fault: Fault):
        super().__init__(inner.stack, inner.input_shape, inner.n_outputs)
        self.inner = inner
        self.fault = fault
        self.calls = 0
        self.faults = 0
        self._cancelled = threading.Event()

    @property
    def is_active(self) -> bool:
        return self.inner.is_active

    @property
    def providers(self) -> list[str]:
        return self.inner.providers

    def activate(self) -> None:
        self.inner.activate()

    def deactivate(self) -> None:
        self.inner.deactivate()

    def cancel(self) -> None:
        self._cancelled.set()
        self.inner.cancel()

    def run(self, x: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.fault.times is not None and self.faults >= self.fault.times:
            return self.inner.run(x)
        self.faults += 1
        kind = self.fault.kind
        if kind == "raise":
            raise InjectedFault(f"injected fault in stack {self.name}")
        if kind == "sleep":
            self._cancelled.clear()
            self._cancelled.wait(self.fault.sleep_ms / 1e3)
            return self.inner.run(x)
        out = self.inner.run(x)
        if kind == "shape":
            return out[:-1] if len(out) > 1 else out[:, :, :-1]
        out = out.copy()
        out[0, 0, 0] = np.nan if kind == "nan" else np.inf
        return out


@contextmanager
def inject_faults(predictor: Predictor, faults: Mapping[str, Fault | str]) -> Iterator[dict[str, FaultyRunner]]:
    """Make the named stacks of ``predictor`` faulty inside the ``with`` block; restore them afterwards.

    Args:
        predictor: a loaded predictor.
        faults: ``{stack name: Fault or fault kind}``; only loaded stacks can be made faulty.

    Yields:
        ``{stack name: FaultyRunner}``, to inspect calls.

    Raises:
        ConfigError: an unknown stack (or one that is not loaded) or fault kind.
    """
    wrapped = {}
    for name, fault in faults.items():
        if name not in predictor.runners:
            raise unknown_choice("loaded stack", name, list(predictor.runners))
        wrapped[name] = FaultyRunner(predictor.runners[name], Fault(fault) if isinstance(fault, str) else fault)
    originals = predictor.replace_runners(wrapped)
    try:
        yield wrapped
    finally:
        predictor.replace_runners(originals)


def random_faults(stacks: Sequence[str], fraction: float, seed: int | np.random.Generator = 0,
                  fault: Fault | str = "raise") -> dict[str, Fault | str]:
    """Pick ``round(fraction * len(stacks))`` stacks at random and give each ``fault``."""
    rng = np.random.default_rng(seed)
    n = int(round(fraction * len(stacks)))
    chosen = rng.choice(len(stacks), size=n, replace=False) if n else []
    return {stacks[int(i)]: fault for i in chosen}
