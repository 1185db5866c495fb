"""What this Python can use: onnxruntime (which build, which providers, whether a GPU provider really loads),
TensorRT and its DLA cores, cuda-python, torch, the serve extra, and whether a venv sees the system's packages.

onnxruntime lists a provider it was built with even where the provider cannot start (no CUDA libraries, no GPU) and
then falls back to the CPU silently, so a provider counts as loading only when a real session, made from a one-node
model written here, reports it among the providers in use.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
ONNXRUNTIME_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes | int) -> bytes:
    """One protobuf field: a varint (int) or length-delimited bytes."""
    if isinstance(payload, int):
        return _varint(number << 3) + _varint(payload)
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def identity_model(width: int = 4) -> bytes:
    """A serialized ONNX model ``y = Identity(x)``, ``x`` float32 of shape ``(1, width)``, written without the onnx
    package (the device install lacks it): ModelProto(ir_version 8, opset 17, one graph)."""
    def value_info(name: str) -> bytes:
        dims = _field(1, _field(1, 1)) + _field(1, _field(1, width))  # TensorShapeProto.dim: dim_value
        tensor_type = _field(1, 1) + _field(2, dims)  # elem_type FLOAT, shape
        return _field(1, name.encode()) + _field(2, _field(1, tensor_type))

    node = _field(1, b"x") + _field(2, b"y") + _field(3, b"identity") + _field(4, b"Identity")
    graph = _field(1, node) + _field(2, b"edgens-doctor") + _field(11, value_info("x")) + _field(12, value_info("y"))
    opset = _field(1, b"") + _field(2, 17)
    return _field(1, 8) + _field(2, b"edgens") + _field(7, graph) + _field(8, opset)


@dataclass
class PythonFacts:
    """What the running Python can import and use (see :func:`probe_python`).

    Attributes:
        python: the interpreter's version; executable: its path.
        in_venv: running in a virtual environment; system_site_packages: it sees the system's packages (None
            outside a venv).
        onnxruntime: the module's version, None if not importable; onnxruntime_distributions: the installed pip
            distributions providing it (both ``onnxruntime`` and ``onnxruntime-gpu`` is a conflict).
        providers: onnxruntime's available providers; provider_loads: for each GPU provider among them, True or
            why it did not load.
        tensorrt: its version, None if not importable (tensorrt_error: why); dla_cores: TensorRT's count (None
            where it could not be asked: no TensorRT or no GPU).
        cuda_python: cuda-python's version (the tensorrt backend's buffers).
        torch: its version; torch_cuda: whether it sees a GPU; cuda_device, compute_capability: the GPU's.
        serve: the serve extra's packages are importable.
    """

    python: str
    executable: str
    in_venv: bool
    system_site_packages: bool | None = None
    onnxruntime: str | None = None
    onnxruntime_distributions: list[str] = field(default_factory=list)
    providers: list[str] = field(default_factory=list)
    provider_loads: dict[str, Any] = field(default_factory=dict)
    tensorrt: str | None = None
    tensorrt_error: str | None = None
    dla_cores: int | None = None
    cuda_python: str | None = None
    torch: str | None = None
    torch_cuda: bool | None = None
    cuda_device: str | None = None
    compute_capability: str | None = None
    serve: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _system_site_packages() -> bool | None:
    if sys.prefix == sys.base_prefix:
        return None
    try:
        text = (Path(sys.prefix) / "pyvenv.cfg").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "include-system-site-packages":
            return value.strip().lower() == "true"
    return False


def _probe_onnxruntime(facts: PythonFacts, load_gpu_providers: bool) -> None:
    facts.onnxruntime_distributions = [d for d in ONNXRUNTIME_DISTRIBUTIONS if _version(d) is not None]
    try:
        import onnxruntime as ort
    except ImportError:
        return
    facts.onnxruntime = str(ort.__version__)
    facts.providers = list(ort.get_available_providers())
    if not load_gpu_providers:
        return
    model = identity_model()
    for provider in (p for p in GPU_PROVIDERS if p in facts.providers):
        options = ort.SessionOptions()
        options.log_severity_level = 4  # the failure is reported below, in one line
        try:
            session = ort.InferenceSession(model, options, providers=[provider, "CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - any failure to start the provider is the finding
            facts.provider_loads[provider] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            continue
        loaded = provider in session.get_providers()
        facts.provider_loads[provider] = True if loaded else "the session fell back to the CPU (onnxruntime could " \
                                                             "not start it: CUDA libraries or GPU missing)"


def _probe_tensorrt(facts: PythonFacts) -> None:
    try:
        import tensorrt as trt
    except ImportError as err:
        facts.tensorrt_error = str(err)
        return
    facts.tensorrt = str(getattr(trt, "__version__", "unknown"))
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
        facts.dla_cores = int(builder.num_DLA_cores)
    except Exception:  # noqa: BLE001 - no GPU: TensorRT cannot make a builder; the count stays unknown
        facts.dla_cores = None


def _probe_torch(facts: PythonFacts) -> None:
    facts.torch = _version("torch")
    if facts.torch is None:
        return
    try:
        import torch
    except Exception:  # noqa: BLE001 - a broken torch install is reported as not importable
        facts.torch_cuda = None
        return
    facts.torch_cuda = bool(torch.cuda.is_available())
    if facts.torch_cuda:
        facts.cuda_device = torch.cuda.get_device_name(0)
        major, minor = torch.cuda.get_device_capability(0)
        facts.compute_capability = f"{major}.{minor}"


def probe_python(load_gpu_providers: bool = True, with_torch: bool = True) -> PythonFacts:
    """Probe this Python.

    Args:
        load_gpu_providers: start a session on each GPU provider onnxruntime offers, to see whether it loads.
        with_torch: import torch where it is installed (seconds), to ask it about CUDA.
    """
    facts = PythonFacts(python=platform.python_version(), executable=sys.executable,
                        in_venv=sys.prefix != sys.base_prefix, system_site_packages=_system_site_packages())
    _probe_onnxruntime(facts, load_gpu_providers)
    _probe_tensorrt(facts)
    facts.cuda_python = _version("cuda-python") or _version("cuda-bindings")
    if with_torch:
        _probe_torch(facts)
    else:
        facts.torch = _version("torch")
    facts.serve = all(importlib.util.find_spec(m) is not None for m in ("starlette", "uvicorn", "prometheus_client"))
    return facts
