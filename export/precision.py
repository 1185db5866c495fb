"""Lower-precision stacks, with an accuracy guard: int8 (static QDQ quantization with onnxruntime's quantization tools,
calibrated on validation inputs) and fp16 (a graph computing in float16, float32 in and out, for GPUs).

Each converted stack is run on validation data next to its fp32 original; when its own error (the mean of its
members' natural parameters, as the runtime combines them) rises by more than the tolerance, the conversion is
refused and the stack stays fp32, with the reason in the manifest (``precision_note``). The change is recorded
either way (``val_error_change``).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgens.ensemble import error_rate
from edgens.errors import ExportError
from edgens.export.onnx_export import graph_outputs
from edgens.runtime.bundle import ChecksumInfo

log = logging.getLogger(__name__)

CALIBRATION_BATCHES = 8  # int8 calibration: this many batches of CALIBRATION_BATCH validation inputs
CALIBRATION_BATCH = 64
CHECK_BATCH = 512


@dataclass
class PrecisionCheck:
    """A converted stack next to its fp32 graph on the same validation examples."""

    fp32_error: float
    error: float
    cpu_checked: bool
    """False when onnxruntime on this CPU cannot run the converted graph (fp16 without float16 kernels): the error
    is then torch's float16 computation of the same stack."""

    @property
    def change(self) -> float:
        return self.error - self.fp32_error


def stack_outputs(path: Path, x: np.ndarray, checksum: ChecksumInfo | None = None) -> np.ndarray:
    """``eta (members, N, K)`` of an ONNX stack on normalised inputs, with onnxruntime on the CPU (a checked
    graph's checksums verified)."""
    return graph_outputs(path, x, checksum, CHECK_BATCH)


def stack_error(eta: np.ndarray, y: np.ndarray, family: str) -> float:
    """The error of a stack's members combined as the runtime combines them (mean natural parameters)."""
    return float(error_rate(eta.mean(axis=0, dtype=np.float64), y, family))


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over batches of normalised validation inputs."""

    def __init__(self, x: np.ndarray, input_name: str):
        n = min(len(x), CALIBRATION_BATCHES * CALIBRATION_BATCH)
        self._batches = iter([{input_name: np.ascontiguousarray(x[i:i + CALIBRATION_BATCH])}
                              for i in range(0, n, CALIBRATION_BATCH)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize_int8(source: Path, destination: Path, calibration_x: np.ndarray, input_name: str = "x") -> None:
    """Write a static QDQ int8 version of ``source`` (per-channel int8 weights, int8 activations calibrated by
    min-max on ``calibration_x``: normalised validation inputs).

    Raises:
        ExportError: onnxruntime's quantizer failed.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        try:
            # Shape inference and graph cleanup first, as onnxruntime recommends for static quantization.
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            quantize_static(str(prepared), str(destination), _Calibration(calibration_x, input_name),
                            quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                            weight_type=QuantType.QInt8, per_channel=True, calibrate_method=CalibrationMethod.MinMax)
        except Exception as err:  # the quantizer raises many types; say which stack and why
            raise ExportError(f"int8 quantization of {source.name} failed: {type(err).__name__}: {err}") from err


def check_converted(fp32_path: Path, converted_path: Path, x: np.ndarray, y: np.ndarray, family: str,
                    torch_float16_eta: Callable[[], np.ndarray] | None = None,
                    fp32_checksum: ChecksumInfo | None = None,
                    checksum: ChecksumInfo | None = None) -> PrecisionCheck:
    """Both graphs' stack error on the same validation examples (``torch_float16_eta``: computes the fallback
    outputs, called only when onnxruntime cannot run the converted graph here; ``fp32_checksum``, ``checksum``: the
    graphs' checksums, when checked)."""
    fp32_error = stack_error(stack_outputs(fp32_path, x, fp32_checksum), y, family)
    try:
        eta = stack_outputs(converted_path, x, checksum)
        cpu_checked = True
    except Exception as err:  # noqa: BLE001  (onnxruntime raises NOT_IMPLEMENTED for missing float16 kernels)
        if torch_float16_eta is None:
            raise ExportError(f"onnxruntime cannot run {converted_path.name} to check it: {err}") from err
        log.info("%s: onnxruntime cannot run it here (%s); checked in torch float16 instead", converted_path.name,
                 err)
        eta, cpu_checked = torch_float16_eta(), False
    return PrecisionCheck(fp32_error, stack_error(eta, y, family), cpu_checked)
