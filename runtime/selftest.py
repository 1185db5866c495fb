"""The self-test's comparison: a stack's outputs on the stored inputs against those recorded at export.

Load-time checksums prove the file is intact, not the weights in memory afterwards; rerunning a stack on inputs
whose outputs are known catches a change there. The tolerance is relative to the size of the stack's outputs (a
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

from dataclasses import dataclass

import numpy as np

RELATIVE_TOLERANCE = {"fp32": 1e-4, "int8": 1e-2, "fp16": 1e-2, "gpu": 1e-2}


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


def compare_outputs(stack: str, got: np.ndarray, expected: np.ndarray, kind: str) -> SelfTestResult:
    """Compare a stack's outputs on the self-test inputs with the stored ones."""
    allowed = tolerance(expected, kind)
    if getattr(got, "shape", None) != expected.shape:
        return SelfTestResult(stack, False, float("inf"), allowed,
                              f"returned shape {getattr(got, 'shape', type(got))}, expected {expected.shape}")
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(got.astype(np.float64) - expected)
    worst = float(diff.max()) if np.isfinite(diff).all() else float("inf")
    if worst <= allowed:
        return SelfTestResult(stack, True, worst, allowed, f"outputs match (max difference {worst:.3g})")
    changed = int((~(diff <= allowed)).sum())  # NaN counts as changed
    return SelfTestResult(stack, False, worst, allowed, f"outputs changed: {changed} of {diff.size} values differ by "
                                                        f"more than {allowed:.3g} (max {worst:.3g})")
