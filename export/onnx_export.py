"""Export a member stack to ONNX and check the file against torch (validation is part of export, not an
afterthought).

A stack graph takes ``x`` (batch, *input_shape) float32, already normalised, and returns ``eta``
(members, batch, K): see docs/bundle-format.md. We use PyTorch's dynamo-based exporter (the default and the only
one kept in recent PyTorch) with an example batch of 4 and a dynamic batch dimension of at least 1: an example batch
of 1 would let the exporter specialise the batch axis to the constant 1.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgens.errors import ExportError
from edgens.runtime.bundle import ChecksumInfo
from edgens.runtime.checksums import CHECK_OUTPUT, ChecksumError, StackChecksum, bound_weights, merge
from edgens.stacks import MemberStack

log = logging.getLogger(__name__)

INPUT_NAME = "x"
OUTPUT_NAME = "eta"
DEFAULT_OPSET = 18
MIN_OPSET = 17
EXAMPLE_BATCH = 4
# |onnxruntime - torch| <= ATOL + RTOL * |torch| + NOISE_FACTOR * noise_j elementwise, torch computed in float64 (the
# exact model), noise_j the largest |torch float32 - torch float64| of member j over the batch: float32's own
# rounding of this member's sums, which grows with the magnitude of the terms summed, not with the output's own size.
# A run trained for its prefixes has members with logits in the hundreds (up to ~800), where an output near zero
# carries the rounding error of sums of terms in the hundreds (~1e-4): a tolerance keyed to the output alone refused
# correct exports. Any real export bug (a flipped sign, a swapped member, a dropped bias, wrong weights or layout)
# moves outputs by the order of the logits, far beyond 16 times the rounding noise.
ATOL = 1e-4
RTOL = 1e-5
NOISE_FACTOR = 16.0


@dataclass
class ParityReport:
    """How one exported graph compares with its torch stack on real inputs."""

    name: str
    max_abs_diff: float
    """Largest |onnxruntime - torch (float64)| over all outputs."""
    problems: list[str]

    @property
    def ok(self) -> bool:
        """True when names, shapes and values all matched."""
        return not self.problems


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's internal deprecation chatter and its torchvision notices (not the user's concern)."""
    noisy = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = noisy.level
    noisy.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\..*")
            yield
    finally:
        noisy.setLevel(level)


class _Float16Graph(torch.nn.Module):
    """Runs a stack in float16 with float32 input and output (for TensorRT >= 11, whose precision comes from the
    graph's types rather than builder flags)."""

    def __init__(self, stack: MemberStack) -> None:
        super().__init__()
        self.stack = stack.half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stack(x.half()).float()


def export_stack(stack: MemberStack, path: str | Path, opset: int = DEFAULT_OPSET, float16: bool = False) -> Path:
    """Write ``stack`` (in eval mode, on CPU) as an ONNX file with a dynamic batch axis.

    Args:
        stack: the member stack (not modified; a CPU copy is exported).
        path: destination file.
        opset: ONNX opset, >= 17.
        float16: compute in float16 inside the graph (input and output stay float32).

    Raises:
        ExportError: opset below 17, the exporter failed, or the file fails onnx.checker.
    """
    module: torch.nn.Module = _cpu_copy(stack).eval()
    if float16:
        module = _Float16Graph(module).eval()
    return _export_module(module, stack, path, opset, [OUTPUT_NAME])


def export_checked_stack(stack: MemberStack, path: str | Path, opset: int = DEFAULT_OPSET,
                         float16: bool = False) -> ChecksumInfo | None:
    """Write ``stack`` as a checked graph (:mod:`edgens.export.checksums`) and return its checksums' description,
    or write nothing and return None when its kind has no checked form.

    Raises:
        ExportError: as :func:`export_stack`.
    """
    from edgens.export.checksums import checked_module, checksum_info

    module = checked_module(stack, float16)
    if module is None:
        return None
    _export_module(module, stack, path, opset, [OUTPUT_NAME, CHECK_OUTPUT])
    return checksum_info(module)


def _export_module(module: torch.nn.Module, stack: MemberStack, path: str | Path, opset: int,
                   output_names: list[str]) -> Path:
    if opset < MIN_OPSET:
        raise ExportError(f"ONNX opset {opset} is too old; expected >= {MIN_OPSET}")
    path = Path(path)
    example = torch.zeros(EXAMPLE_BATCH, *stack.spec.input_shape)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    try:
        with _quiet_exporter():
            program = torch.onnx.export(module, (example,), input_names=[INPUT_NAME], output_names=output_names,
                                        opset_version=opset, dynamic_shapes={"x": {0: batch}}, dynamo=True,
                                        verbose=False)
            program.save(str(path))
    except Exception as err:  # the exporter raises many types; the user needs to know which stack failed
        raise ExportError(f"exporting {stack.kind} stack of {stack.n_members} members to ONNX failed: {err}") from err
    _check_model(path)
    return path


def _cpu_copy(stack: MemberStack) -> MemberStack:
    from edgens.stacks import build_stack

    copy = build_stack(stack.spec)
    copy.load_state_dict({k: v.detach().cpu() for k, v in stack.state_dict().items()})
    return copy


def _check_model(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as err:
        raise ExportError(f"{path.name} fails onnx.checker: {err}") from None


def check_parity(path: str | Path, stack: MemberStack, x: np.ndarray, name: str | None = None,
                 atol: float = ATOL, rtol: float = RTOL, batch_size: int = 256,
                 noise_factor: float = NOISE_FACTOR, checksum: ChecksumInfo | None = None) -> ParityReport:
    """Run the ONNX file in onnxruntime (CPU) on ``x`` and compare with the torch stack: input and output names,
    then shapes, then values (max absolute difference, reported even when it passes).

    The torch reference is computed in float64, so the check measures the exported graph's error alone; each value
    must satisfy ``|onnx - torch| <= atol + rtol * |torch| + noise_factor * noise_j``, where ``noise_j`` is the
    largest difference between torch's float32 and float64 results of that member over the batch (module comment).

    Args:
        path: the ONNX file.
        stack: the torch stack it was exported from.
        x: normalised float32 inputs (N, *input_shape), e.g. real validation examples.
        name: how the report names the stack.
        atol: absolute tolerance.
        rtol: relative tolerance (float32 rounding of large logits).
        batch_size: rows per session call.
        noise_factor: how many times float32's own rounding noise of a member the export may differ by.
        checksum: the graph's checksums (a checked graph): its members' outputs are compared, and its checksums
            must hold on every input (no false alarm on real data).
    """
    from edgens.runtime.backends.onnxruntime import load_session

    path = Path(path)
    name = name or path.stem
    problems: list[str] = []
    session = load_session(path)
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    expected_outputs = [OUTPUT_NAME] if checksum is None else [OUTPUT_NAME, checksum.output]
    if inputs != [INPUT_NAME] or outputs != expected_outputs:
        problems.append(f"graph has inputs {inputs} and outputs {outputs}; expected [{INPUT_NAME!r}] and "
                        f"{expected_outputs}")
        return ParityReport(name, float("nan"), problems)
    check = None
    if checksum is not None:
        check = StackChecksum(name, stack.n_members, checksum, stack.spec.n_outputs, float(np.abs(x).max()),
                              input_weights=bound_weights(checksum, Path(path).read_bytes))
    single = _cpu_copy(stack).float().eval()
    reference = _cpu_copy(stack).double().eval()
    max_diff, worst_excess = 0.0, -np.inf
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            chunk = np.ascontiguousarray(x[start:start + batch_size], dtype=np.float32)
            got = session.run(None, {INPUT_NAME: chunk})
            if check is not None:
                try:
                    got = [check.verified(merge(*got), chunk)]
                except ChecksumError as err:
                    problems.append(f"its checksums fail on real inputs ({err})")
                    return ParityReport(name, float("nan"), problems)
            got = got[0].astype(np.float64)
            want = reference(torch.from_numpy(chunk).double()).numpy()
            if got.shape != want.shape:
                problems.append(f"output shape {got.shape} for a batch of {len(chunk)}; expected {want.shape}")
                return ParityReport(name, float("nan"), problems)
            # (members, 1, 1): each member's float32 rounding noise over this batch
            noise = np.abs(single(torch.from_numpy(chunk)).numpy().astype(np.float64) - want).max(axis=(1, 2),
                                                                                                 keepdims=True)
            difference = np.abs(got - want)
            max_diff = max(max_diff, float(difference.max()))
            allowed = atol + rtol * np.abs(want) + noise_factor * noise
            worst_excess = max(worst_excess, float((difference - allowed).max()))
    if not np.isfinite(max_diff) or worst_excess > 0:
        problems.append(f"max |onnxruntime - torch| = {max_diff:.3g} exceeds {atol:g} + {rtol:g} * |torch| + "
                        f"{noise_factor:g} * the member's float32 rounding noise")
    return ParityReport(name, max_diff, problems)


def graph_outputs(path: str | Path, x: np.ndarray, checksum: ChecksumInfo | None = None, batch_size: int = 512,
                  input_name: str = INPUT_NAME) -> np.ndarray:
    """A stack graph's members' outputs ``(members, N, K)`` on normalised inputs, with onnxruntime on the CPU, in
    batches. A checked graph (``checksum``) has its checksums verified on every input.

    Raises:
        ExportError: the checksums of a checked graph fail on these inputs.
    """
    from edgens.runtime.backends.onnxruntime import load_session

    session = load_session(path)
    weights = None if checksum is None else bound_weights(checksum, Path(path).read_bytes)
    parts = []
    for start in range(0, len(x), batch_size):
        chunk = np.ascontiguousarray(x[start:start + batch_size], dtype=np.float32)
        out = session.run(None, {input_name: chunk})
        if checksum is not None:
            eta = merge(*out)
            check = StackChecksum(Path(path).stem, eta.shape[0] - 1, checksum, eta.shape[2] - 2,
                                  float(np.abs(chunk).max()), input_weights=weights)
            try:
                out = [check.verified(eta, chunk)]
            except ChecksumError as err:
                raise ExportError(f"{err} on clean validation inputs {start}..{start + len(chunk) - 1}") from None
        parts.append(out[0])
    return np.concatenate(parts, axis=1)

