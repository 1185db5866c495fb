"""What a device needs to catch silent faults without a data set, computed at export from the final stack graphs:
the outlier thresholds (:mod:`edgens.runtime.outliers`) and the self-test's expected outputs.

Both come from the graphs as deployed (after any int8 or fp16 conversion), run by onnxruntime on CPU, so they
describe exactly what the device runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgens.export.onnx_export import graph_outputs
from edgens.fileio import sha256_file
from edgens.runtime.bundle import OutlierInfo, SelfTestInfo, StackInfo
from edgens.runtime.outliers import fit_thresholds

SELF_TEST_FILE = "selftest.npz"
SELF_TEST_EXAMPLES = 1000  # inputs whose per-member output sums are checked
SELF_TEST_EXACT = 32  # of those, the first ones whose outputs are stored and checked value by value
BATCH = 512


def stack_outputs(directory: Path, stack: StackInfo, x: np.ndarray) -> np.ndarray:
    """A stack graph's members' outputs ``(members, N, K)`` on normalised inputs, in batches (a checked graph's
    checksums verified on every input)."""
    return graph_outputs(directory / stack.file, x, stack.checksum, BATCH)


def fit_outliers(directory: Path, stacks: list[StackInfo], val_x: np.ndarray, family: str,
                 progress: Callable[[int, int], None] | None = None) -> OutlierInfo | None:
    """Thresholds for every general stack, from the deployed graphs' outputs on the normalised validation inputs
    (None with fewer than three general stacks: nothing could outvote one)."""
    general = [stack for stack in stacks if stack.role == "general"]
    outputs, groups = [], {}
    for number, stack in enumerate(general):
        if progress is not None:
            progress(number, len(general))
        outputs.append(stack_outputs(directory, stack, val_x))
        start = sum(len(s.members) for s in general[:number])
        groups[stack.name] = list(range(start, start + len(stack.members)))
    if progress is not None:
        progress(len(general), len(general))
    return fit_thresholds(np.concatenate(outputs, axis=0), groups, family)


def write_self_test(directory: Path, stacks: list[StackInfo], raw_x: np.ndarray, normalize: Callable[[np.ndarray],
                    np.ndarray]) -> SelfTestInfo:
    """Store the first :data:`SELF_TEST_EXAMPLES` raw inputs and, per stack, its outputs on the first
    :data:`SELF_TEST_EXACT` of them and each member's sums and sums of squares of its outputs over all of them (a
    corrupted weight may change outputs on some inputs only, such as those that switch its unit on)."""
    raw = raw_x[:SELF_TEST_EXAMPLES]
    x = normalize(raw).astype(np.float32)
    arrays: dict[str, np.ndarray] = {"x": raw}
    for stack in stacks:
        outputs = stack_outputs(directory, stack, x).astype(np.float64)
        arrays[stack.name] = outputs[:, :SELF_TEST_EXACT].astype(np.float32)
        arrays[f"{stack.name}.sum"] = outputs.sum(axis=1)
        arrays[f"{stack.name}.square"] = (outputs * outputs).sum(axis=1)
    path = directory / SELF_TEST_FILE
    np.savez(path, **arrays)
    return SelfTestInfo(file=SELF_TEST_FILE, sha256=sha256_file(path), examples=len(raw))
