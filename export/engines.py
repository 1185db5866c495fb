"""Add TensorRT engines to a bundle, at export or later on the target device (``edgens export --add-tensorrt``).

UNVERIFIED (no GPU or TensorRT where this was written): see :mod:`edgens.export.tensorrt_build`. FP16 and INT8
engines are not held to a tolerance; instead each engine records how much its stack's validation error changes
against the fp32 ONNX graph (``val_error_change``), measured on the bundle's calibration examples.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgens.errors import ConfigError
from edgens.export.tensorrt_build import (build_engine, check_precision, import_tensorrt, needs_float16_graph,
                                          target_device)
from edgens.fileio import atomic_write_bytes, sha256_file
from edgens.runtime.inputs import InputPreparer
from edgens.runtime.checksums import members_view
from edgens.runtime.bundle import (EngineInfo, Manifest, StackInfo, load_manifest, read_calibration,
                                     write_manifest)

if TYPE_CHECKING:
    from edgens.export.run_model import LoadedRun

log = logging.getLogger(__name__)

MIN_BATCH, OPT_BATCH, MAX_BATCH = 1, 8, 64
DLA_BATCH = 8  # a DLA engine's one batch size: smaller batches are padded to it, larger ones cut into chunks


def _calibration(bundle_dir: Path, manifest: Manifest) -> tuple[np.ndarray, np.ndarray] | None:
    """The bundle's calibration examples, normalised as the runtime does, and their labels (None if none)."""
    data = read_calibration(bundle_dir, manifest)
    if data is None:
        return None
    x, y = data
    return InputPreparer(manifest.input, manifest.preprocessing)(x), y


def _stack_error(eta: np.ndarray, y: np.ndarray) -> float:
    return float((eta.mean(0).argmax(-1) != y).mean())


def _error_change(bundle_dir: Path, manifest: Manifest, stack: StackInfo, engine: EngineInfo,
                  data: tuple[np.ndarray, np.ndarray] | None) -> float | None:
    """Validation error of the stack's members with the engine minus with the fp32 ONNX graph."""
    if data is None or manifest.family != "categorical":
        return None
    from edgens.runtime.backends.onnxruntime import load_session
    from edgens.runtime.backends.tensorrt import TensorRTRunner

    x, y = data
    session = load_session(bundle_dir / stack.file)
    rows, k = len(stack.members), manifest.n_outputs
    reference = members_view(session.run(None, {stack.input_name: x})[0], rows, k)
    runner = TensorRTRunner(stack, engine, bundle_dir / engine.file, tuple(manifest.input.shape), manifest.n_outputs)
    with runner:
        got = np.concatenate([members_view(runner.run(np.ascontiguousarray(x[i:i + engine.max_batch])), rows, k)
                              for i in range(0, len(x), engine.max_batch)], axis=1)
    return _stack_error(got, y) - _stack_error(reference, y)


def add_engines(bundle_dir: Path, manifest: Manifest, precision: str,
                progress: Callable[[str, int, int], None] | None = None, loaded: LoadedRun | None = None,
                dla_core: int | None = None, dla_batch: int = DLA_BATCH) -> None:
    """Build an engine of ``precision`` for every stack of ``manifest`` and record it (in memory).

    An engine with the same precision, TensorRT version, compute capability and DLA core replaces the old entry.

    Args:
        bundle_dir: the bundle (or the export's temporary directory).
        manifest: its manifest, updated in place; the caller writes it.
        precision: ``fp32``, ``fp16`` or ``int8``.
        progress: ``(stage, done, total)`` callback.
        loaded: the training run, when called from export: TensorRT >= 11 builds FP16 from float16 graphs, which
            only the run (with torch) can produce.
        dla_core: build for this DLA core (GPU fallback), each engine with the one batch size ``dla_batch``.

    Raises:
        BackendUnavailableError: no TensorRT or GPU; ConfigError: a precision this TensorRT cannot build here;
        ExportError: parsing or building failed.
    """
    progress = progress or (lambda stage, done, total: None)
    trt = import_tensorrt("building TensorRT engines")
    device = target_device(trt)
    for stack in manifest.stacks:
        check_precision(precision, device.tensorrt_version, quantized_graph=stack.precision == "int8",
                        dla_core=dla_core)
    low, opt, high = (MIN_BATCH, OPT_BATCH, MAX_BATCH) if dla_core is None else (dla_batch,) * 3
    # A stack exported in fp16 already is a float16 graph; only fp32 ones need one made from the run.
    float16_graph = needs_float16_graph(precision, device.tensorrt_version) and any(
        stack.precision != "fp16" for stack in manifest.stacks)
    if float16_graph and loaded is None:
        raise ConfigError(f"TensorRT {device.tensorrt_version} builds FP16 engines from a float16 graph, which needs "
                          f"the training run: use `edgens export RUN -o BUNDLE --tensorrt --fp16` on a machine with "
                          f"torch, or --add-tensorrt with fp32")
    data = _calibration(bundle_dir, manifest)
    for number, stack in enumerate(manifest.stacks):
        progress("tensorrt engines", number, len(manifest.stacks))
        source = bundle_dir / stack.file
        with tempfile.TemporaryDirectory() as scratch:
            if float16_graph and stack.precision != "fp16":
                from edgens.export.onnx_export import export_checked_stack, export_stack

                assert loaded is not None
                substack, source = loaded.stack.subset(stack.members), Path(scratch) / "fp16.onnx"
                # the same outputs as the stack's ONNX graph: checked (the runtime reads both) or not
                if stack.checksum is None or export_checked_stack(substack, source, float16=True) is None:
                    export_stack(substack, source, float16=True)
            blob = build_engine(source, stack.input_name, tuple(manifest.input.shape), precision, low, opt, high,
                                calibration=None if data is None else data[0],
                                quantized_graph=stack.precision == "int8", dla_core=dla_core)
        relative = device.engine_file(stack.name, precision, dla_core)
        atomic_write_bytes(bundle_dir / relative, blob)
        engine = EngineInfo(file=relative, sha256=sha256_file(bundle_dir / relative), precision=precision,
                            tensorrt_version=device.tensorrt_version, device_name=device.name,
                            compute_capability=device.compute_capability, min_batch=low, max_batch=high,
                            dla_core=dla_core)
        engine.val_error_change = _error_change(bundle_dir, manifest, stack, engine, data)
        stack.engines = [e for e in stack.engines
                         if (e.precision, e.tensorrt_version, e.compute_capability, e.dla_core)
                         != (precision, device.tensorrt_version, device.compute_capability, dla_core)] + [engine]
        log.info("%s: %s engine for %s %s (TensorRT %s), validation error change %s", stack.name, precision,
                 device.name, engine.accelerator, device.tensorrt_version, engine.val_error_change)
    progress("tensorrt engines", len(manifest.stacks), len(manifest.stacks))


def add_tensorrt(bundle_dir: str | Path, precision: str = "fp16",
                 progress: Callable[[str, int, int], None] | None = None, dla_core: int | None = None,
                 dla_batch: int = DLA_BATCH) -> Manifest:
    """Build engines for an existing bundle on this device (on DLA core ``dla_core`` if given) and rewrite its
    manifest atomically.

    Raises:
        See :func:`add_engines`; DataNotFoundError / BundleError for a missing or broken bundle.
    """
    bundle_dir = Path(bundle_dir)
    manifest = load_manifest(bundle_dir)
    add_engines(bundle_dir, manifest, precision, progress, dla_core=dla_core, dla_batch=dla_batch)
    write_manifest(bundle_dir, manifest)
    return manifest
