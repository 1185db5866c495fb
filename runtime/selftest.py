"""The self-test: rerunning stacks on inputs stored at export, comparing their outputs with those recorded then, and
quarantining (through the pool) the stacks whose outputs changed.

Load-time checksums prove the file is intact, not the weights in memory afterwards; rerunning a stack on inputs
whose outputs are known catches a change there. The bundle stores each stack's outputs on 32 inputs, compared value
by value, and each member's sums and sums of squares over 1,000 inputs: a corrupted weight of a unit that none of
the 32 switches on still moves those (with 32 inputs alone, 16 of 2,208 output-changing exponent flips of the
default bundle went unseen; benchmarks/README.md). The tolerance is relative to the size of the stack's outputs (a
lam = 0.99 member's logits reach ~250, where one float32 rounding is ~1e-5) and depends on what computes them:

- ``fp32`` graphs on CPU: ``1e-4 x`` the largest output magnitude. Different CPUs (AVX2, AVX-512, another vendor)
  round float32 sums differently, by ~1e-6 of the output scale; a changed weight that matters moves outputs by far
  more.
- ``int8`` graphs, ``fp16`` graphs, GPUs and TensorRT engines: ``1e-2 x`` that magnitude, since the reference was
  computed by onnxruntime on the export machine's CPU: float16, TF32 and fused kernels round differently, and int8
  kernels differ between CPUs (without VNNI, onnxruntime's u8s8 products can saturate where VNNI's do not). A flipped
  bit of an int8 weight moves it by 1 to 128 quantization steps; most show far above this tolerance.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgens.runtime.backends import StackRunner
from edgens.runtime.bundle import Manifest, SelfTestData, read_self_test
from edgens.runtime.pool import StackPool

log = logging.getLogger(__name__)

RELATIVE_TOLERANCE = {"fp32": 1e-4, "int8": 1e-2, "fp16": 1e-2, "gpu": 1e-2}
# After a stack passed a self-test that confirms (or clears) an outlier, later outliers within this many seconds
# are cleared without running it again: at most one self-test per stack per second under a stream of odd requests.
CONFIRM_EVERY_S = 1.0


@dataclass(frozen=True)
class SelfTestResult:
    """One stack's self-test.

    Attributes:
        stack: the stack.
        ok: outputs within tolerance.
        max_diff: the largest absolute difference from the stored outputs.
        tolerance: the largest difference allowed.
        message: what was found.
    """

    stack: str
    ok: bool
    max_diff: float
    tolerance: float
    message: str


def tolerance(expected: np.ndarray, kind: str) -> float:
    """The largest difference allowed from ``expected`` for a stack computed as ``kind`` (a precision or ``gpu``)."""
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    return RELATIVE_TOLERANCE.get(kind, RELATIVE_TOLERANCE["gpu"]) * max(scale, 1.0)


def compare_outputs(stack: str, got: np.ndarray, expected: np.ndarray, kind: str,
                    expected_sums: np.ndarray | None = None, expected_squares: np.ndarray | None = None
                    ) -> SelfTestResult:
    """Compare a stack's outputs on the self-test inputs with the stored ones.

    Args:
        stack: the stack's name.
        got: its outputs now, ``(members, N, K)`` on all N inputs.
        expected: the stored outputs on the first n inputs.
        kind: what computes the stack here (a precision or ``gpu``), for the tolerance.
        expected_sums: each member's stored sum of outputs over the N inputs, ``(members, K)``.
        expected_squares: each member's stored sum of squared outputs over the N inputs.

    The first n outputs must match value by value; the sums and sums of squares over all N within N times that
    tolerance (and twice the output scale for squares): a weight whose corruption shows on a few inputs only still
    moves them.
    """
    allowed = tolerance(expected, kind)
    n = expected.shape[1]
    if getattr(got, "shape", None) is None or got.ndim != 3 or got.shape[0] != expected.shape[0] or \
            got.shape[1] < n or got.shape[2] != expected.shape[2]:
        return SelfTestResult(stack, False, float("inf"), allowed,
                              f"returned shape {getattr(got, 'shape', type(got))}, expected {expected.shape[0]} "
                              f"members x {expected.shape[2]} outputs")
    with np.errstate(invalid="ignore", over="ignore"):
        wide = got.astype(np.float64)
        diff = np.abs(wide[:, :n] - expected)
        worst = float(diff.max()) if np.isfinite(diff).all() else float("inf")
        if worst > allowed:
            changed = int((~(diff <= allowed)).sum())  # NaN counts as changed
            return SelfTestResult(stack, False, worst, allowed, f"outputs changed: {changed} of {diff.size} values "
                                                                f"differ by more than {allowed:.3g} (max {worst:.3g})")
        if expected_sums is not None and expected_squares is not None:
            count = got.shape[1]
            scale = max(float(np.abs(expected).max()), 1.0)
            for what, value, stored, limit in (
                    ("sums", wide.sum(axis=1), expected_sums, count * allowed),
                    ("sums of squares", (wide * wide).sum(axis=1), expected_squares, count * allowed * 2 * scale)):
                gap = np.abs(value - stored)
                largest = float(gap.max()) if np.isfinite(gap).all() else float("inf")
                if largest > limit:
                    return SelfTestResult(stack, False, largest, limit,
                                          f"outputs changed: members' {what} over {count} inputs differ by up to "
                                          f"{largest:.3g} (more than {limit:.3g})")
    return SelfTestResult(stack, True, worst, allowed, f"outputs match (max difference {worst:.3g})")


class SelfTestSupervisor:
    """Runs the self-test of a pool's stacks, when asked or periodically in a thread of its own, and quarantines the
    stacks whose outputs changed (:meth:`~edgens.runtime.pool.StackPool.retry` then loads them from their files).

    Args:
        pool: the stacks.
        bundle_dir: the bundle, whose self-test file is read once, when first needed.
        manifest: its manifest.
        prepare: normalises raw inputs as calls do.
    """

    def __init__(self, pool: StackPool, bundle_dir: Path, manifest: Manifest,
                 prepare: Callable[[np.ndarray], np.ndarray]):
        self.pool, self.bundle_dir, self.manifest = pool, bundle_dir, manifest
        self._prepare = prepare
        self._data: tuple[np.ndarray, SelfTestData] | None = None  # normalised inputs, expected outputs
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._passed: dict[str, float] = {}  # when each stack last passed a confirming self-test

    def run(self, stacks: list[str] | None = None, quarantine: bool = True) -> dict[str, SelfTestResult]:
        """Test ``stacks`` (default: every loaded stack): ``{stack: result}``, empty without self-test data.

        Raises:
            BundleError: the self-test file is missing or corrupt.
        """
        results = {}
        for name in stacks if stacks is not None else list(self.pool.runners):
            result = self.test(self.manifest.stack(name).name)
            if result is None:
                return {}
            results[name] = result
            if not result.ok and quarantine:
                self.pool.quarantine(name, f"self-test: {result.message}", reload=True)
        return results

    def test(self, name: str) -> SelfTestResult | None:
        """Stack ``name``'s self-test (None: the bundle has no self-test data)."""
        data = self._stored()
        if data is None:
            return None
        x, expected = data
        runner = self.pool.runners.get(name)
        if runner is None:
            return SelfTestResult(name, False, math.inf, 0.0, "not loaded")
        try:
            # A checked stack's checksums must hold too: a corrupted checksum row changes no output, yet the stack
            # fails every call, and the self-test is what confirms (or clears) such a failure.
            chunks = [x[i:i + 256] for i in range(0, len(x), 256)]
            got = np.concatenate([self.pool.verified(name, runner.run(chunk), chunk) for chunk in chunks], axis=1)
        except Exception as err:  # noqa: BLE001  (any backend failure fails the test)
            return SelfTestResult(name, False, math.inf, 0.0, f"{type(err).__name__}: {err}")
        return compare_outputs(name, got, expected.outputs[name], self._tolerance_class(runner),
                               expected.sums[name], expected.squares[name])

    def confirm(self, name: str) -> tuple[bool, str] | None:
        """After stack ``name`` was left out of a call as an outlier: whether its self-test still passes, and what it
        found (None: the bundle has no self-test data). A stack that passed in the last :data:`CONFIRM_EVERY_S`
        seconds is not run again, which bounds what a stream of odd requests can cost."""
        now = time.monotonic()
        passed = self._passed.get(name)
        if passed is not None and now - passed < CONFIRM_EVERY_S:
            return True, f"passed its self-test {now - passed:.2f} s ago"
        result = self.test(name)
        if result is None:
            return None
        if result.ok:
            self._passed[name] = now
        return result.ok, result.message

    def problem(self, name: str) -> str | None:
        """Why stack ``name`` fails its self-test, or None (also without self-test data): what a stack reloaded
        after a self-test quarantine must pass."""
        result = self.test(name)
        return None if result is None or result.ok else f"self-test: {result.message}"

    def _stored(self) -> tuple[np.ndarray, SelfTestData] | None:
        if self._data is None:
            data = read_self_test(self.bundle_dir, self.manifest)
            if data is None:
                return None
            self._data = (self._prepare(data.x), data)
        return self._data

    def _tolerance_class(self, runner: StackRunner) -> str:
        """What the stack computes in here, for the tolerance: the graph's precision, or ``gpu`` when a GPU (or
        TensorRT) computes it, whose kernels round differently from the CPU that made the reference."""
        on_gpu = self.pool.backend.name == "tensorrt" or any(p != "CPUExecutionProvider" for p in runner.providers)
        return "gpu" if on_gpu else runner.stack.precision

    def start(self, interval_s: float) -> None:
        """Run the self-test every ``interval_s`` seconds in a background thread until :meth:`stop`."""
        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.run()
                except Exception:  # noqa: BLE001  (a background check must not die silently)
                    log.exception("periodic self-test failed")

        self._thread = threading.Thread(target=loop, name="edgens-self-test", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the periodic self-test, waiting (up to 5 s) for one in progress, whose stacks are about to be
        freed."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
