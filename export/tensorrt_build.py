"""Build TensorRT engines from a bundle's ONNX stacks with the TensorRT Python API.

UNVERIFIED: written against the TensorRT 10 API (JetPack 6 ships 10.3) and the TensorRT 11 changes, but never run:
the machines this was written on have no GPU and no TensorRT. Where ``tensorrt`` is not importable every entry point
raises :class:`BackendUnavailableError` naming the extra to install; no engine is ever faked.

Versions take different paths:

- TensorRT 10: precision is a builder flag (``FP16``, ``INT8``); INT8 is calibrated with an entropy calibrator on
  the bundle's calibration inputs (validation images) on the GPU.
- TensorRT >= 11 removed those flags: precision comes from the ONNX graph. FP16 uses a graph exported in float16
  (float32 input and output) and a strongly typed network; INT8 would need explicit quantize/dequantize nodes, which
  edgens does not write yet, so it is refused with a clear message.

Engines only load on the GPU (compute capability) and TensorRT version that built them, so their file names and
manifest entries carry both, plus the precision and, for DLA engines, the DLA core.

DLA (AGX Orin and Orin NX have two cores, Orin Nano none): ``dla_core=N`` builds with the DLA as the default device
and GPU fallback for layers it cannot run; FP16 or INT8 only (INT8 calibrated: the DLA takes no quantize/dequantize
nodes); one batch size, because the DLA has no dynamic shapes (min = opt = max). TensorRT 10.8 to 11.4.0 have no DLA
(10.7 was the last before 11.4.1); JetPack 6 ships 10.3.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgens.errors import BackendUnavailableError, ConfigError, ExportError
from edgens.runtime.backends.tensorrt import import_tensorrt, major_version

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
WORKSPACE_BYTES = 1 << 30


@dataclass
class TargetDevice:
    """What an engine is specific to."""

    name: str
    compute_capability: str
    tensorrt_version: str

    def engine_file(self, stack_name: str, precision: str, dla_core: int | None = None) -> str:
        """Bundle-relative file name keyed by stack, precision, TensorRT version, compute capability and DLA core."""
        cc = self.compute_capability.replace(".", "")
        dla = "" if dla_core is None else f".dla{dla_core}"
        return f"engines/{stack_name}.{precision}.trt{self.tensorrt_version}.sm{cc}{dla}.engine"


def target_device(tensorrt: Any) -> TargetDevice:
    """The GPU engines will be built for (CUDA device 0, through torch).

    Raises:
        BackendUnavailableError: no CUDA GPU.
    """
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailableError("building TensorRT engines needs a CUDA GPU, and torch sees none; build them on "
                                      "the target device with `edgens export --add-tensorrt BUNDLE`")
    major, minor = torch.cuda.get_device_capability(0)
    return TargetDevice(torch.cuda.get_device_name(0), f"{major}.{minor}", str(tensorrt.__version__))


def dla_supported(tensorrt_version: str) -> bool:
    """Whether this TensorRT builds DLA engines: up to 10.7, and again from 11.4.1."""
    parts = [int(p) for p in str(tensorrt_version).split(".")[:3] if p.isdigit()] + [0, 0, 0]
    return tuple(parts[:2]) <= (10, 7) or tuple(parts[:3]) >= (11, 4, 1)


def check_precision(precision: str, tensorrt_version: str, quantized_graph: bool = False,
                    dla_core: int | None = None) -> None:
    """Refuse precisions this TensorRT cannot build from our graphs.

    Args:
        quantized_graph: the ONNX graph already holds quantize/dequantize nodes (an int8 stack of the bundle).
        dla_core: the engine is for this DLA core (None: the GPU).

    Raises:
        ConfigError: unknown precision, INT8 from a float graph with TensorRT >= 11, or a DLA engine in FP32, from
            a quantized graph, or with a TensorRT that has no DLA.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if dla_core is not None:
        if dla_core < 0:
            raise ConfigError(f"--dla-core must be 0 or more (a DLA core's index), got {dla_core}")
        if precision == "fp32":
            raise ConfigError("the DLA runs FP16 and INT8 only: give --fp16 or --int8 with --dla-core")
        if quantized_graph:
            raise ConfigError("the DLA takes no quantize/dequantize nodes: build DLA engines from an fp32 or fp16 "
                              "bundle (with --int8, TensorRT 10 calibrates on the bundle's examples)")
        if not dla_supported(tensorrt_version):
            raise ConfigError(f"TensorRT {tensorrt_version} has no DLA support (10.7 was the last release with it "
                              f"before 11.4.1); JetPack 6's TensorRT 10.3 has it")
    if precision == "int8" and major_version(tensorrt_version) >= 11 and not quantized_graph:
        raise ConfigError(f"TensorRT {tensorrt_version} takes INT8 only from quantize/dequantize nodes in the ONNX "
                          f"graph: export the bundle with --precision int8, which writes them")


def needs_float16_graph(precision: str, tensorrt_version: str) -> bool:
    """TensorRT >= 11 builds FP16 engines from a float16 graph instead of a builder flag."""
    return precision == "fp16" and major_version(tensorrt_version) >= 11


class _EntropyCalibrator:
    """INT8 calibration data for TensorRT 10: batches of normalised validation inputs in GPU memory (via torch)."""

    def __init__(self, tensorrt: Any, inputs: np.ndarray, batch_size: int) -> None:
        import torch

        base = tensorrt.IInt8EntropyCalibrator2
        outer = self

        class Calibrator(base):  # type: ignore[misc, valid-type]  # TensorRT wants a subclass of its own class
            def __init__(self) -> None:
                base.__init__(self)

            def get_batch_size(self) -> int:
                return outer.batch_size

            def get_batch(self, names: list[str]) -> list[int] | None:
                return outer.next_batch()

            def read_calibration_cache(self) -> None:
                return None  # always calibrate from the data: the cache would be keyed by nothing we control

            def write_calibration_cache(self, cache: bytes) -> None:
                return None

        self.batch_size = batch_size
        self.batches = [torch.from_numpy(np.ascontiguousarray(inputs[i:i + batch_size])).cuda()
                        for i in range(0, len(inputs) - batch_size + 1, batch_size)]
        self.position = 0
        self.calibrator = Calibrator()

    def next_batch(self) -> list[int] | None:
        if self.position >= len(self.batches):
            return None
        batch = self.batches[self.position]
        self.position += 1
        return [int(batch.data_ptr())]


def build_engine(onnx_path: Path, input_name: str, input_shape: tuple[int, ...], precision: str,
                 min_batch: int = 1, opt_batch: int = 8, max_batch: int = 64,
                 calibration: np.ndarray | None = None, quantized_graph: bool = False,
                 dla_core: int | None = None) -> bytes:
    """Build a serialized engine from an ONNX stack with an optimisation profile over ``min..max_batch``.

    Args:
        onnx_path: the stack graph (for TensorRT >= 11 with fp16: the float16 graph).
        input_name: its input.
        input_shape: one example's shape.
        precision: ``fp32``, ``fp16`` or ``int8``.
        calibration: normalised float32 inputs for INT8 calibration (TensorRT 10, float graphs only).
        quantized_graph: the graph holds quantize/dequantize nodes (``--precision int8`` stacks): TensorRT takes the
            scales from them (explicit quantization) and needs no calibration.
        dla_core: build for this DLA core with GPU fallback; needs ``min_batch == opt_batch == max_batch``.

    Raises:
        BackendUnavailableError: no TensorRT or no GPU.
        ConfigError: a precision this TensorRT cannot build.
        ExportError: the ONNX parser or the builder failed (their messages are included).
    """
    trt = import_tensorrt("building TensorRT engines")
    version = str(trt.__version__)
    check_precision(precision, version, quantized_graph, dla_core)
    if dla_core is not None and not min_batch == opt_batch == max_batch:
        raise ConfigError(f"a DLA engine has one batch size (the DLA has no dynamic shapes), got {min_batch}, "
                          f"{opt_batch}, {max_batch}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if major_version(version) >= 11:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT {version} cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, (min_batch, *input_shape), (opt_batch, *input_shape), (max_batch, *input_shape))
    config.add_optimization_profile(profile)
    if dla_core is not None:
        if dla_core >= builder.num_DLA_cores:
            raise ConfigError(f"--dla-core {dla_core}: this device has {builder.num_DLA_cores} DLA cores")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)  # layers the DLA cannot run go to the GPU, not an error
    calibrator = None
    if major_version(version) < 11:
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)  # INT8 layers that do not quantise fall back to FP16, not FP32
        if precision == "int8" and quantized_graph:
            config.set_flag(trt.BuilderFlag.INT8)  # the scales come from the graph's Q/DQ nodes
        elif precision == "int8":
            if calibration is None or len(calibration) < opt_batch:
                raise ExportError(f"INT8 needs at least {opt_batch} calibration inputs; the bundle has "
                                  f"{0 if calibration is None else len(calibration)}")
            config.set_flag(trt.BuilderFlag.INT8)
            calibrator = _EntropyCalibrator(trt, calibration, opt_batch)
            config.int8_calibrator = calibrator.calibrator
            config.set_calibration_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT {version} failed to build an engine for {onnx_path.name} ({precision}); run "
                          f"with -vv to see its log")
    return bytes(serialized)
