"""onnxruntime backend: one ``InferenceSession`` per stack file.

Providers are asked for in priority order (TensorRT EP, CUDA EP, CPU) among those the installed onnxruntime build
offers. onnxruntime falls back to CPU silently when a GPU provider cannot start (missing CUDA libraries, no GPU), so
the runner reads ``session.get_providers()`` after loading, reports those as the truth, and logs a warning when a
requested GPU provider is not among them.

Threads: general and specialist stacks run side by side on the predictor's lanes (one per core, at most 4), so each
of their sessions gets the cores left per lane (``threads``, at least 1, at most 4), and their threads never spin
while idle: spinning threads of one session steal the cores the next session needs (measured on 2 cores: p90
latency of 4 stacks at batch 64 went from 1.1 ms to 17 ms with 2 spinning threads per session); a 16-member stack
is faster with 1 thread than with 2 at every batch size. A prefix stack is the one stack of its call and large
enough for more threads to pay off, so its session gets every core (``solo_threads``, at most 8) and its threads
may spin between runs (onnxruntime's default). Measured on 2 cores (AMD EPYC), a 256-member prefix graph at batch
64: 1.72 ms with 1 thread, 1.1-1.4 ms with 2 parked threads (waking them every run), 0.9-1.0 ms with 2 spinning
ones; at batch 1: 0.12 ms, 0.15 ms and 0.07 ms. Spinning is CPU time (and power) spent waiting, briefly after each
run; ``solo_threads=1`` gives prefix stacks one thread and no spinning. Deadline calls run a prefix stack's lean
twin instead (:meth:`OnnxRuntimeBackend.lean_runner`: one thread, no spinning): spinning threads steal the core the
next stack needs, and a parallel run waits on a core the VM took away (p99 overruns of 4-9 ms at batch 1 and 64 on
2 cores, 0.15-1 ms with one thread; benchmarks/README.md).
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from edgens.errors import BackendUnavailableError, BundleError, unknown_choice
from edgens.runtime.backends.base import Backend, StackRunner, describe_device
from edgens.runtime.device_info import JETSON_ONNXRUNTIME_INSTALL, nvidia_gpu_name, on_jetson
from edgens.runtime.lanes import default_lanes
from edgens.runtime.bundle import Manifest, StackInfo
from edgens.runtime.checksums import merge

log = logging.getLogger(__name__)

PRIORITY = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as err:
        if on_jetson():
            raise BackendUnavailableError(
                f"the onnxruntime backend needs onnxruntime, which is not importable ({err}); on a Jetson install "
                f"NVIDIA's GPU build: `{JETSON_ONNXRUNTIME_INSTALL}` (docs/jetson.md)") from None
        raise BackendUnavailableError(
            f"the onnxruntime backend needs onnxruntime, which is not importable ({err}); install it with "
            f"`pip install edgens[runtime]` (CPU) or `pip install edgens[runtime-gpu]` (CUDA), not both") from None
    return onnxruntime


def session_options(threads: int, spin: bool = False) -> Any:
    """The session options every stack runs with (the benchmarks' bare sessions reuse them, to compare like with
    like): ``threads`` intra-op threads, which spin while idle only with ``spin``, sequential execution, all graph
    optimisations."""
    ort = _ort()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.log_severity_level = 3  # errors only: onnxruntime's warnings are not the user's to act on
    return options


def load_session(model: str | Path | bytes, threads: int | None = None, spin: bool = False,
                 providers: list[Any] | None = None) -> Any:
    """A plain onnxruntime session of a graph (a file or its bytes), on the CPU unless ``providers`` says otherwise:
    the reference that export checks its stacks and engines with, and the bare sessions the benchmarks compare the
    runtime against.

    Args:
        threads: with a number, the options every stack runs with (:func:`session_options`); None: onnxruntime's
            own defaults (every core).
        spin: with ``threads``, whether idle threads spin.
        providers: onnxruntime providers (default: ``CPUExecutionProvider`` only).

    Raises:
        BackendUnavailableError: onnxruntime is not installed.
    """
    ort = _ort()
    options = None if threads is None else session_options(threads, spin)
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                providers=providers or ["CPUExecutionProvider"])


def default_threads() -> int:
    """Intra-op threads per general stack's session: the cores per lane, between 1 and 4 (module docstring)."""
    return max(1, min(4, (os.cpu_count() or 1) // default_lanes()))


def default_solo_threads() -> int:
    """Intra-op threads of a prefix stack's session, which runs alone: every core, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


class OnnxRuntimeRunner(StackRunner):
    """One onnxruntime session for one stack file."""

    def __init__(self, stack: StackInfo, path: Path, input_shape: tuple[int, ...], n_outputs: int,
                 providers: list[Any], threads: int, spin: bool = False, model: bytes | None = None):
        super().__init__(stack, input_shape, n_outputs)
        self.path = path
        self.model = model  # the graph's bytes, when given (fault injection), instead of reading ``path``
        self.requested_providers = providers
        self.threads = threads
        self.spin = spin
        self._session: Any = None
        self._run_options: Any = None
        self._cpu_only = False
        self._outputs = [stack.output_name] + ([stack.checksum.output] if stack.checksum is not None else [])

    @property
    def is_active(self) -> bool:
        return self._session is not None

    @property
    def providers(self) -> list[str]:
        return list(self._session.get_providers()) if self._session is not None else []

    def activate(self) -> None:
        if self._session is not None:
            return
        ort = _ort()
        options = session_options(self.threads, self.spin)
        try:
            # onnxruntime warns (warnings.warn) about requested providers it does not have; the check below reports
            # what really runs, through logging, so its warnings are not passed on.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                session = ort.InferenceSession(str(self.path) if self.model is None else self.model, options,
                                               providers=self.requested_providers)
        except Exception as err:  # onnxruntime raises its own exception types for bad files
            message = " ".join(str(err).split())  # one line: onnxruntime's messages end with newlines
            found = re.search(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)", message)
            if found:  # the machine, not the stack: every stack of the bundle would fail the same way
                raise BackendUnavailableError(
                    f"onnxruntime {ort.__version__} reads ONNX IR versions up to {found.group(2)}, the bundle's stacks "
                    f"are IR version {found.group(1)}: upgrade it (pip install -U 'onnxruntime>=1.18', or "
                    f"onnxruntime-gpu)") from None
            raise BundleError(f"stack {self.name}: onnxruntime cannot load {self.path} ({message})") from None
        self._check_io(session)
        requested = [p if isinstance(p, str) else p[0] for p in self.requested_providers]
        self._session = session
        self._cpu_only = session.get_providers() == ["CPUExecutionProvider"]
        self._run_options = ort.RunOptions()
        missing = [p for p in requested if p in GPU_PROVIDERS and p not in session.get_providers()]
        if missing:
            log.warning("stack %s: onnxruntime did not start %s and runs on %s instead (it falls back silently; "
                        "check the CUDA/TensorRT libraries)", self.name, ", ".join(missing),
                        ", ".join(session.get_providers()))

    def _check_io(self, session: Any) -> None:
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = [o.name for o in session.get_outputs()]
        if self.stack.input_name not in inputs or len(inputs) != 1:
            raise BundleError(f"stack {self.name}: the graph's inputs are {sorted(inputs)}, the manifest expects one "
                              f"input {self.stack.input_name!r}")
        if any(name not in outputs for name in self._outputs):
            raise BundleError(f"stack {self.name}: the graph's outputs are {outputs}, the manifest expects "
                              f"{', '.join(repr(name) for name in self._outputs)}")
        if inputs[self.stack.input_name].type != "tensor(float)":
            raise BundleError(f"stack {self.name}: the graph's input is {inputs[self.stack.input_name].type}, "
                              f"expected tensor(float) (float32)")
        shape = inputs[self.stack.input_name].shape
        # The batch axis is dynamic (a name or None); the others must match the manifest's input shape.
        fixed = [d if isinstance(d, int) else None for d in shape[1:]]
        if len(shape) != len(self.input_shape) + 1 or any(d is not None and d != e
                                                          for d, e in zip(fixed, self.input_shape, strict=True)):
            raise BundleError(f"stack {self.name}: the graph's input shape is {shape}, the manifest expects "
                              f"(batch, {', '.join(str(d) for d in self.input_shape)})")

    def deactivate(self) -> None:
        self._session = None
        self._run_options = None

    def run(self, x: np.ndarray) -> np.ndarray:
        self._run_options.terminate = False
        out = self._session.run(self._outputs, {self.stack.input_name: x}, self._run_options)
        return out[0] if len(out) == 1 else merge(*out)

    def cancel(self) -> None:
        # onnxruntime checks this flag between graph nodes and then raises from run().
        if self._run_options is not None:
            self._run_options.terminate = True

    @property
    def stoppable(self) -> bool:
        # On the CPU the flag stops a run at its next operator; a GPU kernel in flight cannot be stopped.
        return self._session is not None and self._cpu_only


class OnnxRuntimeBackend(Backend):
    """Runs the bundle's ONNX stack files with onnxruntime.

    Args:
        bundle_dir: the bundle.
        manifest: its manifest.
        providers: onnxruntime providers in priority order (names or ``(name, options)`` pairs); default: those of
            TensorRT EP, CUDA EP and CPU that this onnxruntime build offers.
        threads: intra-op threads per general stack's session (default: :func:`default_threads`).
        solo_threads: intra-op threads of prefix stacks' sessions, which may spin (default:
            :func:`default_solo_threads`).

    Raises:
        BackendUnavailableError: onnxruntime is not installed.
        ConfigError: a requested provider is not offered by this onnxruntime build.
    """

    name = "onnxruntime"

    def __init__(self, bundle_dir: str | Path, manifest: Manifest, providers: list[Any] | None = None,
                 threads: int | None = None, solo_threads: int | None = None):
        super().__init__(bundle_dir, manifest)
        ort = _ort()
        available = ort.get_available_providers()
        if providers is None:
            providers = [self._with_options(p) for p in PRIORITY if p in available]
        else:
            for provider in providers:
                provider_name = provider if isinstance(provider, str) else provider[0]
                if provider_name not in available:
                    raise unknown_choice("onnxruntime provider (not in this build)", provider_name, available)
        self.providers = providers
        self.threads = threads or default_threads()
        self.solo_threads = solo_threads or default_solo_threads()
        self._runners: list[OnnxRuntimeRunner] = []

    @classmethod
    def check_available(cls) -> None:
        _ort()

    @staticmethod
    def _with_options(provider: str) -> Any:
        if provider == "TensorrtExecutionProvider":
            # Building TensorRT engines takes minutes; cache them per user so the second start is fast.
            cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgens" / "trt-ep"
            return (provider, {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache)})
        return provider

    def runner(self, stack: StackInfo) -> OnnxRuntimeRunner:
        runner = self._runner(stack, None)
        self._runners.append(runner)  # the bundle's own runners say what runs it
        return runner

    def lean_runner(self, stack: StackInfo) -> OnnxRuntimeRunner | None:
        if stack.role != "prefix" or self.solo_threads == 1:
            return None  # general and specialist stacks, and prefix stacks with one thread, are lean already
        return OnnxRuntimeRunner(stack, self.bundle_dir / stack.file, self.manifest.input.shape,
                                 self.manifest.n_outputs, self.providers, threads=1, spin=False)

    def graph_runner(self, stack: StackInfo, model: bytes) -> OnnxRuntimeRunner:
        return self._runner(stack, model)  # injected graphs come and go: not among the runners reported

    def _runner(self, stack: StackInfo, model: bytes | None) -> OnnxRuntimeRunner:
        solo = stack.role == "prefix"
        return OnnxRuntimeRunner(stack, self.bundle_dir / stack.file, self.manifest.input.shape,
                                 self.manifest.n_outputs, self.providers, self.solo_threads if solo else self.threads,
                                 spin=solo and self.solo_threads > 1, model=model)

    def providers_in_use(self) -> list[str]:
        """The providers the active sessions really use (all of them, in priority order)."""
        used = {p for runner in self._runners for p in runner.providers}
        ordered = [p for p in PRIORITY if p in used]
        return ordered + sorted(used - set(ordered))

    def describe(self) -> dict[str, Any]:
        # Before any session is active, report what was asked for.
        providers = self.providers_in_use() or [p if isinstance(p, str) else p[0] for p in self.providers]
        device = describe_device()
        if any(p in GPU_PROVIDERS for p in providers):
            device = f"{device} + {nvidia_gpu_name() or 'GPU'}"
        return {"backend": self.name, "providers": list(providers), "device": device}
