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
from edgens.stacks import MemberStack

log = logging.getLogger(__name__)

INPUT_NAME = "x"
OUTPUT_NAME = "eta"
DEFAULT_OPSET = 18
MIN_OPSET = 17
EXAMPLE_BATCH = 4
TOLERANCE = 1e-4  # max |onnxruntime - torch| in fp32


@dataclass
class ParityReport:
    """How one exported graph compares with its torch stack on real inputs."""

    name: str
    max_abs_diff: float
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
    if opset < MIN_OPSET:
        raise ExportError(f"ONNX opset {opset} is too old; expected >= {MIN_OPSET}")
    path = Path(path)
    module: torch.nn.Module = _cpu_copy(stack).eval()
    if float16:
        module = _Float16Graph(module).eval()
    example = torch.zeros(EXAMPLE_BATCH, *stack.spec.input_shape)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    try:
        with _quiet_exporter():
            program = torch.onnx.export(module, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
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
                 tolerance: float = TOLERANCE, batch_size: int = 256) -> ParityReport:
    """Run the ONNX file in onnxruntime (CPU) on ``x`` and compare with the torch stack: input and output names,
    then shapes, then values (max absolute difference, reported even when it passes).

    Args:
        path: the ONNX file.
        stack: the torch stack it was exported from.
        x: normalised float32 inputs (N, *input_shape), e.g. real validation examples.
        name: how the report names the stack.
        tolerance: largest allowed max |difference|.
        batch_size: rows per session call.
    """
    import onnxruntime as ort

    path = Path(path)
    name = name or path.stem
    problems: list[str] = []
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if inputs != [INPUT_NAME] or outputs != [OUTPUT_NAME]:
        problems.append(f"graph has inputs {inputs} and outputs {outputs}; expected [{INPUT_NAME!r}] and "
                        f"[{OUTPUT_NAME!r}]")
        return ParityReport(name, float("nan"), problems)
    reference = _cpu_copy(stack).eval()
    max_diff = 0.0
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            chunk = np.ascontiguousarray(x[start:start + batch_size], dtype=np.float32)
            got = session.run(None, {INPUT_NAME: chunk})[0]
            want = reference(torch.from_numpy(chunk)).numpy()
            if got.shape != want.shape:
                problems.append(f"output shape {got.shape} for a batch of {len(chunk)}; expected {want.shape}")
                return ParityReport(name, float("nan"), problems)
            max_diff = max(max_diff, float(np.abs(got.astype(np.float64) - want).max()))
    if not np.isfinite(max_diff) or max_diff > tolerance:
        problems.append(f"max |onnxruntime - torch| = {max_diff:.3g} exceeds {tolerance:g}")
    return ParityReport(name, max_diff, problems)
