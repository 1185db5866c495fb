"""The interface every inference backend implements: a :class:`Backend` makes one :class:`StackRunner` per stack.

Modelled on NVIDIA Polygraphy's runners: a runner is a context manager (``activate`` loads the stack, ``deactivate``
frees it), :meth:`StackRunner.infer` checks its input before the backend sees it and records how long inference
took. The predictor calls :meth:`StackRunner.run`, the unchecked fast path, because it has already checked and
normalised the batch once for all stacks. A new backend is one new module with a Backend and a StackRunner subclass,
registered in ``edgens.runtime.backends.BACKENDS``.
"""

from __future__ import annotations

import os
import platform
import time
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from edgens.errors import ConfigError, InputError
from edgens.runtime.device_info import cpu_name, device_model
from edgens.runtime.bundle import Manifest, StackInfo
from edgens.runtime.checksums import output_shape


class StackRunner(ABC):
    """Runs one stack: ``x (B, *input_shape) float32 -> eta (members, B, n_outputs) float32``; a checked stack's
    runner returns ``(members + 1, B, n_outputs + 2)``, its hidden residual merged into the check row
    (:func:`edgens.runtime.checksums.merge`).

    Attributes:
        stack: the stack's manifest entry.
        input_shape: shape of one example.
        n_outputs: K.
        last_inference_ms: wall time of the last :meth:`infer` call.
    """

    def __init__(self, stack: StackInfo, input_shape: tuple[int, ...], n_outputs: int):
        self.stack = stack
        self.input_shape = tuple(input_shape)
        self.n_outputs = n_outputs
        self.last_inference_ms: float | None = None

    @property
    def name(self) -> str:
        return self.stack.name

    @property
    @abstractmethod
    def is_active(self) -> bool:
        """Whether the stack is loaded and can run."""

    @property
    def providers(self) -> list[str]:
        """What really executes the stack (e.g. onnxruntime's providers in use), for reports."""
        return []

    @abstractmethod
    def activate(self) -> None:
        """Load the stack (idempotent).

        Raises:
            BundleError: the file cannot be loaded or its inputs and outputs do not match the manifest.
            BackendUnavailableError: the backend cannot run here.
        """

    @abstractmethod
    def deactivate(self) -> None:
        """Free the stack's resources (idempotent)."""

    @abstractmethod
    def run(self, x: np.ndarray) -> np.ndarray:
        """Run the stack on a checked, normalised, C-contiguous float32 batch, without checks (the fast path)."""

    def cancel(self) -> None:
        """Ask a run in progress in another thread to stop early; best effort (a GPU kernel cannot be stopped)."""

    @property
    def stoppable(self) -> bool:
        """Whether :meth:`cancel` makes a run in progress return promptly (by raising): then a stack timeout
        watches its runs in the caller's thread rather than handing them to a worker thread
        (:mod:`edgens.runtime.watchdog`)."""
        return False

    def expected_output_shape(self, batch: int) -> tuple[int, int, int]:
        """``(members, batch, n_outputs)``; for a checked stack ``(members + 1, batch, n_outputs + 2)``
        (:mod:`edgens.runtime.checksums`)."""
        return output_shape(self.stack, self.n_outputs, batch)

    def check_input(self, x: Any) -> np.ndarray:
        """Check a normalised batch against the stack's input.

        Raises:
            InputError: not a float32 array of shape ``(B, *input_shape)`` with B >= 1.
        """
        if not isinstance(x, np.ndarray):
            raise InputError(f"stack {self.name}: received {type(x).__name__}, expected a numpy array")
        if x.dtype != np.float32:
            raise InputError(f"stack {self.name}: received dtype {x.dtype}, expected float32")
        if x.ndim != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape or len(x) == 0:
            raise InputError(f"stack {self.name}: received shape {tuple(x.shape)}, expected "
                             f"(B, {', '.join(str(d) for d in self.input_shape)}) with B >= 1")
        return np.ascontiguousarray(x)

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Check ``x``, run the stack and record the time in :attr:`last_inference_ms`.

        Raises:
            InputError: ``x`` does not fit the stack's input.
            BundleError: the runner is not active.
        """
        x = self.check_input(x)
        if not self.is_active:
            from edgens.errors import BundleError

            raise BundleError(f"stack {self.name} is not loaded; call activate() or use the runner as a context "
                              f"manager")
        start = time.perf_counter()
        out = self.run(x)
        self.last_inference_ms = (time.perf_counter() - start) * 1e3
        return out

    def __enter__(self) -> StackRunner:
        self.activate()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.deactivate()

    def __repr__(self) -> str:
        state = "active" if self.is_active else "inactive"
        return f"{type(self).__name__}({self.name!r}, {state})"


class Backend(ABC):
    """Makes runners for a bundle's stacks on one kind of engine.

    Attributes:
        name: the backend's registry name (``onnxruntime``, ``tensorrt``).
    """

    name: str = ""

    def __init__(self, bundle_dir: str | Path, manifest: Manifest):
        self.bundle_dir = Path(bundle_dir)
        self.manifest = manifest

    @classmethod
    @abstractmethod
    def check_available(cls) -> None:
        """Raise if this backend cannot run on this machine.

        Raises:
            BackendUnavailableError: its library is not installed (the message names the pip extra).
        """

    @classmethod
    def is_available(cls) -> bool:
        """Whether :meth:`check_available` passes."""
        try:
            cls.check_available()
        except ImportError:  # BackendUnavailableError is an ImportError
            return False
        return True

    def can_run(self) -> bool:
        """Whether this backend can run this bundle here (e.g. TensorRT: engines exist for this GPU)."""
        return True

    @abstractmethod
    def runner(self, stack: StackInfo) -> StackRunner:
        """A runner for one stack (not yet active).

        Raises:
            BundleError: the bundle has nothing this backend can run for the stack.
        """

    def lean_runner(self, stack: StackInfo) -> StackRunner | None:
        """A second runner (not yet active) of ``stack`` for calls that keep a deadline: one that shares the cores
        with the stacks after it (one thread, no busy waiting). None when the stack's own runner already is one.
        """
        return None

    def graph_runner(self, stack: StackInfo, model: bytes) -> StackRunner:
        """A runner (not yet active) of ``model``, the stack's serialized ONNX graph changed in memory (fault
        injection corrupts weights this way, after the file passed its checksum).

        Raises:
            ConfigError: this backend does not run ONNX graphs.
        """
        raise ConfigError(f"weight faults are injected into ONNX graphs run by onnxruntime; this predictor runs "
                          f"{self.name}")

    def checksum_roundoff(self, stack: StackInfo) -> float:
        """The unit roundoff a checked stack's checksums are bounded with on this backend (the graph's, by
        default; :mod:`edgens.runtime.checksums`)."""
        assert stack.checksum is not None
        return stack.checksum.unit_roundoff

    def describe(self) -> dict[str, Any]:
        """What runs the stacks, for latency tables and reports: backend, providers, device."""
        return {"backend": self.name, "providers": [], "device": describe_device()}


def describe_device() -> str:
    """A short name of this machine's processor (a Jetson's model name where there is one).

    Latency tables are kept per device under this name, so it must be stable on one machine. Read below
    :func:`edgens.runtime.device_info.system_root` (``$EDGENS_SYSTEM_ROOT`` reads a recorded device).
    """
    model = device_model()  # Jetson and other ARM boards
    if model:
        return model
    name = cpu_name()
    if name:
        return f"{name} x{os.cpu_count()}"
    return f"{platform.machine() or 'unknown'} {platform.processor()} x{os.cpu_count()}".strip()
