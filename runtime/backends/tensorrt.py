"""Native TensorRT backend: runs the bundle's prebuilt engines (``engines/*.engine``) with the TensorRT 10 API.

UNVERIFIED: written against the TensorRT 10 Python API (JetPack 6 ships 10.3) and cuda-python, but never run: the
machines this was written on have no GPU or TensorRT. The test suite only checks that it raises a clear
:class:`BackendUnavailableError` where TensorRT is missing; tests marked ``tensorrt`` exercise it where it exists.

How it runs a stack: deserialise the engine, create one execution context, allocate device buffers for the engine's
largest batch once, bind them with ``set_tensor_address``, and per call copy the batch in, ``execute_async_v3`` on a
private CUDA stream, copy eta out and synchronise. Batches larger than the engine's ``max_batch`` are cut into
chunks; batches smaller than ``min_batch`` are padded with zeros. Engines whose input and output are float16 (built
from float16 graphs) get float16 input and give float16 output, converted here. Engines are specific to a GPU
(compute capability) and a TensorRT version; a stack without an engine for this device cannot run on this backend
(use onnxruntime, or ``backend="auto"``, which picks TensorRT only when every general stack has an engine here).

DLA (Jetson AGX Orin and Orin NX): engines built for a DLA core (``edgens export --add-tensorrt --dla-core N``)
are deserialised with the runtime's ``DLA_core`` set to theirs. ``accelerators=("gpu", "dla0", "dla1")`` places the
general stacks on those in turn (round robin, in the members' order), each stack on its engine for that accelerator
or, lacking one, on its GPU engine; prefix and specialist stacks stay on the GPU. The predictor's lanes then run
stacks on the GPU and the DLA cores at once. Which accelerator each stack runs on is in ``providers`` (and so keys
the latency table).

Buffers go through cuda-python (``pip install cuda-python``, NVIDIA's official bindings), imported as
``cuda.bindings.runtime`` (cuda-python >= 12.6) or ``cuda.cudart`` (older); the ``tensorrt`` extra must include it.
"""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np

from edgens.errors import BackendUnavailableError, BundleError, ConfigError, unknown_choice
from edgens.runtime.backends.base import Backend, StackRunner, describe_device
from edgens.runtime.bundle import EngineInfo, Manifest, StackInfo, check_file
from edgens.runtime.checksums import check_columns, merge

log = logging.getLogger(__name__)

INSTALL = "install it with `pip install 'edgens[tensorrt]'` (x86-64 with an NVIDIA GPU)"
# On a Jetson TensorRT's Python bindings come with JetPack, never from pip (docs/jetson.md).
JETSON_INSTALL = ("on a Jetson TensorRT comes with JetPack: `sudo apt-get install python3-libnvinfer`, in a venv made "
                  "with `python3 -m venv --system-site-packages` (JetPack 6: Python 3.10)")
PREFERENCE = ("fp16", "fp32", "int8")  # int8 may cost accuracy: only when nothing else was built
MIN_TENSORRT = 10  # the tensor-address API (set_tensor_address / execute_async_v3)


def major_version(version: str) -> int:
    """The major number of a version string like ``10.3.0.30``."""
    return int(str(version).split(".")[0])


def install_hint() -> str:
    """How to get TensorRT on this machine: JetPack's package on a Jetson, the pip extra elsewhere."""
    from edgens.runtime.device_info import on_jetson

    return JETSON_INSTALL if on_jetson() else INSTALL


def import_tensorrt(purpose: str = "the tensorrt backend") -> Any:
    """Import TensorRT (>= 10) or explain how to get it; the one place edgens imports it (export uses it too).

    Args:
        purpose: what needs TensorRT, for the message (``building TensorRT engines``).

    Raises:
        BackendUnavailableError: not importable, or older than 10; the message names JetPack's
            ``python3-libnvinfer`` on a Jetson and the ``tensorrt`` extra elsewhere.
    """
    try:
        import tensorrt
    except ImportError as err:
        raise BackendUnavailableError(f"{purpose} needs TensorRT >= {MIN_TENSORRT}, which is not importable ({err}); "
                                      f"{install_hint()}") from None
    if major_version(tensorrt.__version__) < MIN_TENSORRT:
        raise BackendUnavailableError(f"{purpose} needs TensorRT >= {MIN_TENSORRT} (the tensor-address API), found "
                                      f"{tensorrt.__version__}; {install_hint()}")
    return tensorrt


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as err:
            raise BackendUnavailableError(f"the tensorrt backend needs cuda-python for device buffers, which is not "
                                          f"importable ({err}); install it with `pip install 'cuda-python>=12,<13'` "
                                          f"(the CUDA 12 bindings; the tensorrt extra has it)") from None
    return cudart


def _check(cudart: Any, result: Any) -> Any:
    """Unpack a cuda-python call's ``(error, value...)`` tuple, raising on an error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"CUDA error {err}: {cudart.cudaGetErrorString(err)[1]}")
    return values[0] if len(values) == 1 else tuple(values)


def version_key(version: str) -> tuple[str, ...]:
    """What must match for an engine to load: TensorRT's major.minor.patch (``10.3.0.30`` -> ``10``, ``3``, ``0``)."""
    return tuple(version.split(".")[:3])


ACCELERATOR_PATTERN = "gpu, dla0, dla1..."


def parse_accelerators(accelerators: Any) -> tuple[str, ...]:
    """``"gpu,dla0"`` or ``["gpu", "dla0"]`` -> ``("gpu", "dla0")``.

    Raises:
        ConfigError: empty, repeated, or not ``gpu`` / ``dlaN``.
    """
    names = accelerators.split(",") if isinstance(accelerators, str) else list(accelerators)
    names = [str(n).strip().lower() for n in names if str(n).strip()]
    bad = [n for n in names if n != "gpu" and not (n.startswith("dla") and n[3:].isdigit())]
    if not names or bad or len(set(names)) != len(names):
        raise ConfigError(f"accelerators: expected distinct names among {ACCELERATOR_PATTERN} such as gpu,dla0,dla1, "
                          f"got {accelerators!r}")
    return tuple(names)


def engine_problem(engine: EngineInfo, compute_capability: str | None, tensorrt_version: str | None,
                   dla_cores: int | None = None) -> str | None:
    """Why ``engine`` cannot run on this GPU with this TensorRT, or None if it can: the one rule the backend and
    ``edgens doctor`` both apply. An engine loads only on the compute capability and TensorRT major.minor.patch it
    was built with, and a DLA engine only where its DLA core exists (``dla_cores``: None when not known here)."""
    if tensorrt_version is None or compute_capability is None:
        return "TensorRT or the GPU's compute capability unknown here"
    if engine.compute_capability != compute_capability:
        return f"built for compute capability {engine.compute_capability}, this GPU is {compute_capability}"
    if version_key(engine.tensorrt_version) != version_key(tensorrt_version):
        return f"built with TensorRT {engine.tensorrt_version}, this is {tensorrt_version}"
    if engine.dla_core is not None and dla_cores is not None and dla_cores <= engine.dla_core:
        return f"built for DLA core {engine.dla_core}, this module has {dla_cores}"
    return None


def select_engine(stack: StackInfo, compute_capability: str, tensorrt_version: str, precision: str | None = None,
                  accelerator: str = "gpu") -> EngineInfo | None:
    """The engine of ``stack`` built for this GPU, TensorRT version and accelerator (``gpu``, ``dla0``...), by
    precision preference (fp16, fp32, int8) unless ``precision`` names one; None if there is none."""
    fitting = [e for e in stack.engines if e.accelerator == accelerator
               and engine_problem(e, compute_capability, tensorrt_version) is None]
    for wanted in ([precision] if precision else PREFERENCE):
        for engine in fitting:
            if engine.precision == wanted:
                return engine
    return None


def place_stacks(manifest: Manifest, accelerators: tuple[str, ...]) -> dict[str, str]:
    """Which accelerator each stack is meant for: the general stacks in turn over ``accelerators``, in the members'
    order (so consecutive stacks, which a call runs side by side on its lanes, land on different ones); prefix and
    specialist stacks on the first (a prefix stack runs alone)."""
    placement = {stack.name: accelerators[0] for stack in manifest.stacks}
    for i, stack in enumerate(manifest.general_stacks):
        placement[stack.name] = accelerators[i % len(accelerators)]
    return placement


class TensorRTRunner(StackRunner):
    """One TensorRT engine for one stack (unverified, see the module docstring)."""

    def __init__(self, stack: StackInfo, engine: EngineInfo, path: Path, input_shape: tuple[int, ...],
                 n_outputs: int, device: int = 0):
        super().__init__(stack, input_shape, n_outputs)
        self.engine_info = engine
        self.path = path
        self.device = device
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._buffers: list[Any] = []
        self._dtypes = (np.dtype(np.float32), np.dtype(np.float32))  # engine input and output dtypes
        self._run_lock = threading.Lock()

    @property
    def is_active(self) -> bool:
        return self._context is not None

    @property
    def providers(self) -> list[str]:
        info = self.engine_info
        return [f"TensorRT {info.tensorrt_version} {info.precision} {info.accelerator}"] if self.is_active else []

    def activate(self) -> None:
        if self._context is not None:
            return
        trt, cudart = import_tensorrt(), _cudart()
        _check(cudart, cudart.cudaSetDevice(self.device))
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        if self.engine_info.dla_core is not None:
            if self.engine_info.dla_core >= runtime.num_DLA_cores:
                raise BundleError(f"stack {self.name}: its engine is for DLA core {self.engine_info.dla_core}, this "
                                  f"device has {runtime.num_DLA_cores} DLA cores")
            runtime.DLA_core = self.engine_info.dla_core
        engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise BundleError(f"stack {self.name}: TensorRT {trt.__version__} cannot deserialise {self.path} (built "
                              f"with TensorRT {self.engine_info.tensorrt_version} for compute capability "
                              f"{self.engine_info.compute_capability})")
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        dtypes = []
        tensors = [(self.stack.input_name, trt.TensorIOMode.INPUT), (self.stack.output_name, trt.TensorIOMode.OUTPUT)]
        if self.stack.checksum is not None:  # a checked graph's second output: the hidden residual (and bound)
            tensors.append((self.stack.checksum.output, trt.TensorIOMode.OUTPUT))
        for name, mode in tensors:
            if name not in names or engine.get_tensor_mode(name) != mode:
                raise BundleError(f"stack {self.name}: engine tensors are {sorted(names)}, expected {mode.name} "
                                  f"{name!r}")
            # Engines built from float16 graphs (TensorRT >= 11 FP16) take and give float16; convert at the edges.
            if engine.get_tensor_dtype(name) not in (trt.DataType.FLOAT, trt.DataType.HALF):
                raise BundleError(f"stack {self.name}: engine tensor {name!r} is {engine.get_tensor_dtype(name)}, "
                                  f"expected float32 or float16")
            dtypes.append(np.dtype(trt.nptype(engine.get_tensor_dtype(name))))
        self._dtypes = tuple(dtypes)
        context = engine.create_execution_context()
        stream = _check(cudart, cudart.cudaStreamCreate())
        max_batch = self.engine_info.max_batch
        sizes = [max_batch * int(np.prod(self.input_shape)), int(np.prod(self.expected_output_shape(max_batch))),
                 max_batch][:len(tensors)]
        buffers = [_check(cudart, cudart.cudaMalloc(size * dtype.itemsize)) for size, dtype in zip(sizes, dtypes)]
        for (name, _), buffer in zip(tensors, buffers, strict=True):
            context.set_tensor_address(name, int(buffer))
        self._engine, self._context, self._stream, self._buffers = engine, context, stream, buffers

    def deactivate(self) -> None:
        if self._context is None:
            return
        cudart = _cudart()
        for buffer in self._buffers:
            cudart.cudaFree(buffer)
        cudart.cudaStreamDestroy(self._stream)
        self._engine = self._context = self._stream = None
        self._buffers = []

    def run(self, x: np.ndarray) -> np.ndarray:
        # An execution context, its buffers and stream serve one inference at a time: calls of a predictor shared
        # by threads take turns on each stack (onnxruntime sessions need no such lock).
        with self._run_lock:
            return self._run(x)

    def _run(self, x: np.ndarray) -> np.ndarray:
        low, high = self.engine_info.min_batch, self.engine_info.max_batch
        if len(x) > high:
            return np.concatenate([self._run(x[i:i + high]) for i in range(0, len(x), high)], axis=1)
        batch = len(x)
        if batch < low:
            x = np.concatenate([x, np.zeros((low - batch, *x.shape[1:]), dtype=np.float32)])
        x = np.ascontiguousarray(x, dtype=self._dtypes[0])
        cudart = _cudart()
        copy_in = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        copy_out = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._context.set_input_shape(self.stack.input_name, tuple(x.shape))
        _check(cudart, cudart.cudaMemcpyAsync(self._buffers[0], x.ctypes.data, x.nbytes, copy_in, self._stream))
        if not self._context.execute_async_v3(self._stream):
            raise RuntimeError(f"stack {self.name}: TensorRT execute_async_v3 failed")
        out = np.empty(self.expected_output_shape(len(x)), dtype=self._dtypes[1])
        _check(cudart, cudart.cudaMemcpyAsync(out.ctypes.data, self._buffers[1], out.nbytes, copy_out, self._stream))
        checks = None
        if len(self._buffers) > 2:
            checks = np.empty((len(x), check_columns(self.stack.checksum)), dtype=self._dtypes[2])
            _check(cudart, cudart.cudaMemcpyAsync(checks.ctypes.data, self._buffers[2], checks.nbytes, copy_out,
                                                  self._stream))
        _check(cudart, cudart.cudaStreamSynchronize(self._stream))
        out = out.astype(np.float32, copy=False)
        if checks is not None:
            out = merge(out, checks.astype(np.float32, copy=False))
        return out[:, :batch] if batch < len(x) else out


class TensorRTBackend(Backend):
    """Runs prebuilt TensorRT engines (unverified, see the module docstring).

    Args:
        bundle_dir: the bundle.
        manifest: its manifest.
        precision: use engines of this precision only (default: the first of fp16, fp32, int8 that exists).
        device: CUDA device index.
        accelerators: where the stacks run, e.g. ``("gpu", "dla0", "dla1")`` (see :func:`place_stacks`; default:
            the GPU only).

    Raises:
        BackendUnavailableError: TensorRT >= 10 or cuda-python is not installed, or there is no CUDA device.
        ConfigError: an unknown precision or accelerator name.
    """

    name = "tensorrt"

    def __init__(self, bundle_dir: str | Path, manifest: Manifest, precision: str | None = None, device: int = 0,
                 accelerators: Any = ("gpu",)):
        super().__init__(bundle_dir, manifest)
        if precision is not None and precision not in PREFERENCE:
            raise unknown_choice("engine precision", precision, PREFERENCE)
        self.accelerators = parse_accelerators(accelerators)
        self.placement = place_stacks(manifest, self.accelerators)
        trt, cudart = import_tensorrt(), _cudart()
        try:
            props = _check(cudart, cudart.cudaGetDeviceProperties(device))
        except RuntimeError as err:
            raise BackendUnavailableError(f"the tensorrt backend found no usable CUDA device {device}: {err}") from None
        self.precision = precision
        self.device = device
        self.tensorrt_version = str(trt.__version__)
        self.compute_capability = f"{props.major}.{props.minor}"
        name = props.name
        self.device_name = name.decode(errors="replace").rstrip("\x00") if isinstance(name, bytes) else str(name)

    @classmethod
    def check_available(cls) -> None:
        import_tensorrt()
        _cudart()

    def select_engine(self, stack: StackInfo) -> EngineInfo | None:
        """The engine of ``stack`` for its accelerator here (its GPU engine where it has none for a DLA core)."""
        accelerator = self.placement.get(stack.name, "gpu")
        engine = select_engine(stack, self.compute_capability, self.tensorrt_version, self.precision, accelerator)
        if engine is None and accelerator != "gpu":
            engine = select_engine(stack, self.compute_capability, self.tensorrt_version, self.precision, "gpu")
        return engine

    def can_run(self) -> bool:
        return all(self.select_engine(stack) is not None for stack in self.manifest.general_stacks)

    def checksum_roundoff(self, stack: StackInfo) -> float:
        # TensorRT computes fp32 layers in TF32 where the GPU has it (on by default) and fp16 engines in float16:
        # both round to 11 bits. An int8 engine's sums are not exact at all: only non-finite residuals fail.
        assert stack.checksum is not None
        engine = self.select_engine(stack)
        if engine is None or engine.precision == "int8":
            return math.inf
        return max(stack.checksum.unit_roundoff, 2.0 ** -11)

    def runner(self, stack: StackInfo) -> TensorRTRunner:
        engine = self.select_engine(stack)
        if engine is None:
            built = ", ".join(f"{e.precision}/cc {e.compute_capability}/TensorRT {e.tensorrt_version}"
                              for e in stack.engines) or "none"
            raise BundleError(f"stack {stack.name}: no TensorRT engine for this device (compute capability "
                              f"{self.compute_capability}, TensorRT {self.tensorrt_version}); engines in the bundle: "
                              f"{built}. Build one on this device, or use the onnxruntime backend")
        problem = check_file(self.bundle_dir, engine.file, engine.sha256)
        if problem is not None:
            raise BundleError(f"stack {stack.name}: engine {problem}")
        log.info("stack %s: %s engine %s", stack.name, engine.precision, engine.file)
        return TensorRTRunner(stack, engine, self.bundle_dir / engine.file, self.manifest.input.shape,
                              self.manifest.n_outputs, self.device)

    def describe(self) -> dict[str, Any]:
        used = sorted({(e.precision, e.accelerator) for s in self.manifest.stacks
                       if (e := self.select_engine(s)) is not None})
        return {"backend": self.name,
                "providers": [f"TensorRT {self.tensorrt_version} {p} {a}" for p, a in used],
                # The board's name first, as onnxruntime's tables have it: one device, whatever ran the stacks.
                "device": f"{describe_device()} + {self.device_name} (cc {self.compute_capability})"}

