"""Backends: the runner interface on real onnxruntime sessions, provider reports, choosing a backend, and clear
errors where a backend's library is missing."""

from __future__ import annotations

import importlib.util
import logging
import sys

import numpy as np
import pytest
from bundle_factory import SyntheticBundle

from edgens.errors import BackendUnavailableError, BundleError, ConfigError, InputError
from edgens.runtime import EngineInfo, Predictor, load_manifest, write_manifest
from edgens.runtime.backends import CHOICES, backend_class, create_backend
from edgens.runtime.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeRunner, default_threads
from edgens.runtime.backends.tensorrt import TensorRTBackend


def _has_provider(name: str) -> bool:
    import onnxruntime

    return name in onnxruntime.get_available_providers()


def _normalised(bundle: SyntheticBundle, x: np.ndarray) -> np.ndarray:
    return bundle.normalise(x).reshape(len(x), 1, 28, 28).astype(np.float32)


def test_onnxruntime_runner_interface(bundle: SyntheticBundle, data) -> None:
    manifest = load_manifest(bundle.path)
    backend = OnnxRuntimeBackend(bundle.path, manifest)
    x = _normalised(bundle, data[0])
    runner = backend.runner(manifest.stack("general-001"))
    assert not runner.is_active and runner.providers == []
    with runner:
        assert runner.is_active
        out = runner.infer(x)
        assert runner.last_inference_ms is not None and runner.last_inference_ms > 0
        assert runner.providers == ["CPUExecutionProvider"]
        np.testing.assert_allclose(out, bundle.member_etas(data[0], [2, 3]), atol=2e-5)
        with pytest.raises(InputError, match=r"stack general-001: received dtype float64, expected float32"):
            runner.infer(x.astype(np.float64))
        with pytest.raises(InputError, match=r"stack general-001: received shape \(32, 28, 28\), expected "
                                             r"\(B, 1, 28, 28\) with B >= 1"):
            runner.infer(x[:, 0])
        with pytest.raises(InputError, match=r"received list, expected a numpy array"):
            runner.infer([1.0])
    assert not runner.is_active
    with pytest.raises(BundleError, match="stack general-001 is not loaded"):
        runner.infer(x)
    assert backend.describe()["providers"] == ["CPUExecutionProvider"]


def test_silent_fallback_to_cpu_is_detected(bundle: SyntheticBundle, caplog: pytest.LogCaptureFixture) -> None:
    if _has_provider("CUDAExecutionProvider"):
        pytest.skip("CUDA starts here: the fallback cannot be provoked this way")
    manifest = load_manifest(bundle.path)
    stack = manifest.stack("general-000")
    # Asking for CUDA where it cannot start: onnxruntime quietly runs on CPU; the runner says so.
    runner = OnnxRuntimeRunner(stack, bundle.path / stack.file, (1, 28, 28), 10,
                               ["CUDAExecutionProvider", "CPUExecutionProvider"], threads=1)
    with caplog.at_level(logging.WARNING, logger="edgens.runtime"):
        with runner:
            assert runner.providers == ["CPUExecutionProvider"]
    assert any("did not start CUDAExecutionProvider and runs on CPUExecutionProvider" in r.getMessage()
               for r in caplog.records)


def test_providers_must_exist_in_the_build(bundle: SyntheticBundle) -> None:
    if _has_provider("CUDAExecutionProvider"):
        pytest.skip("this onnxruntime build has CUDA")
    with pytest.raises(ConfigError,
                       match=r"unknown onnxruntime provider \(not in this build\) 'CUDAExecutionProvider'"):
        Predictor.load(bundle.path, "onnxruntime", providers=["CUDAExecutionProvider"])


def test_threads_option_and_default(bundle: SyntheticBundle) -> None:
    assert 1 <= default_threads() <= 4
    with Predictor.load(bundle.path, "onnxruntime", threads=1) as predictor:
        assert predictor.backend.threads == 1


def test_auto_picks_onnxruntime_without_engines(bundle: SyntheticBundle) -> None:
    backend = create_backend("auto", bundle.path, load_manifest(bundle.path), threads=1)
    assert backend.name == "onnxruntime" and backend.threads == 1  # type: ignore[attr-defined]


def test_unknown_backend_or_option_lists_the_valid_ones(bundle: SyntheticBundle) -> None:
    with pytest.raises(ConfigError, match="unknown backend 'openvino'; expected one of: auto, onnxruntime, tensorrt"):
        Predictor.load(bundle.path, "openvino")
    with pytest.raises(ConfigError, match="the onnxruntime backend has no option precision; its options: providers, "
                                          "threads"):
        Predictor.load(bundle.path, "onnxruntime", precision="fp16")
    with Predictor.load(bundle.path, "auto", precision="fp16", threads=1) as predictor:  # auto passes what fits
        assert predictor.backend.name == "onnxruntime"


def test_cli_offers_the_registered_backends_and_combiners() -> None:
    from edgens.cli.infer_cmd import BACKEND_CHOICES, COMBINER_CHOICES
    from edgens.ensemble import COMBINERS

    assert set(BACKEND_CHOICES) == set(CHOICES)
    assert COMBINER_CHOICES == COMBINERS


def test_missing_tensorrt_names_the_extra(bundle: SyntheticBundle, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailableError, match=r"needs TensorRT >= 10.*pip install 'edgens\[tensorrt\]'"):
        Predictor.load(bundle.path, "tensorrt")
    assert not backend_class("tensorrt").is_available()
    assert isinstance(BackendUnavailableError("x"), ImportError)


def test_missing_onnxruntime_names_the_extras(bundle: SyntheticBundle, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailableError, match=r"pip install edgens\[runtime\]` \(CPU\) or `pip install "
                                                      r"edgens\[runtime-gpu\]` \(CUDA\), not both"):
        Predictor.load(bundle.path, "onnxruntime")
    with pytest.raises(BackendUnavailableError, match=r"no inference backend can run this bundle here: tensorrt: "
                                                      r"the bundle has no engines; onnxruntime: "):
        Predictor.load(bundle.path, "auto")


def _engine(precision: str, cc: str = "8.7", version: str = "10.3.0") -> EngineInfo:
    return EngineInfo(file=f"engines/x.{precision}.engine", sha256="0" * 64, precision=precision,
                      tensorrt_version=version, device_name="Orin", compute_capability=cc, min_batch=1, max_batch=64)


def test_tensorrt_engine_selection_without_tensorrt(bundle: SyntheticBundle) -> None:
    # The choice of engine is plain logic: check it here, where TensorRT itself cannot run.
    manifest = load_manifest(bundle.path)
    backend = TensorRTBackend.__new__(TensorRTBackend)
    backend.manifest, backend.precision, backend.placement = manifest, None, {}
    backend.compute_capability, backend.tensorrt_version = "8.7", "10.3.0.30"
    stack = manifest.stack("general-000")
    stack.engines = [_engine("int8"), _engine("fp32"), _engine("fp16", cc="8.6"), _engine("fp16", version="10.4.0")]
    assert backend.select_engine(stack).precision == "fp32"  # fp16 engines are for another GPU / TensorRT
    stack.engines.append(_engine("fp16"))
    assert backend.select_engine(stack).precision == "fp16"
    backend.precision = "int8"
    assert backend.select_engine(stack).precision == "int8"
    assert not backend.can_run()  # the other general stacks have no engines
    with pytest.raises(BundleError, match=r"stack general-001: no TensorRT engine for this device \(compute "
                                          r"capability 8.7, TensorRT 10.3.0.30\); engines in the bundle: none"):
        backend.runner(manifest.stack("general-001"))


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None or not _has_provider("CUDAExecutionProvider"),
                    reason="needs onnxruntime-gpu with CUDA")
def test_cuda_provider_runs_the_stacks(bundle: SyntheticBundle, data) -> None:
    with Predictor.load(bundle.path, "onnxruntime") as predictor:
        assert predictor.backend.describe()["providers"][0] in ("TensorrtExecutionProvider", "CUDAExecutionProvider")
        prediction = predictor.predict(data[0])
    np.testing.assert_allclose(prediction.mean, bundle.expected(data[0], [0, 1, 2, 3, 4, 5]), atol=1e-3)


@pytest.mark.tensorrt
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="needs TensorRT")
def test_tensorrt_engines_give_the_ensembles_prediction(bundle: SyntheticBundle, data) -> None:
    import tensorrt as trt

    from edgens.fileio import atomic_write_bytes, sha256_file

    backend = TensorRTBackend(bundle.path, load_manifest(bundle.path))  # skips the test's purpose if no GPU
    manifest = load_manifest(bundle.path)
    logger = trt.Logger(trt.Logger.WARNING)
    for stack in manifest.stacks:
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        assert parser.parse((bundle.path / stack.file).read_bytes())
        config = builder.create_builder_config()
        profile = builder.create_optimization_profile()
        profile.set_shape(stack.input_name, (1, 1, 28, 28), (32, 1, 28, 28), (64, 1, 28, 28))
        config.add_optimization_profile(profile)
        relative = f"engines/{stack.name}.fp32.engine"
        atomic_write_bytes(bundle.path / relative, bytes(builder.build_serialized_network(network, config)))
        stack.engines = [EngineInfo(file=relative, sha256=sha256_file(bundle.path / relative), precision="fp32",
                                    tensorrt_version=backend.tensorrt_version, device_name=backend.device_name,
                                    compute_capability=backend.compute_capability, min_batch=1, max_batch=64)]
    write_manifest(bundle.path, manifest)
    x = np.concatenate([data[0]] * 3)  # 96 examples: more than max_batch, cut into chunks
    with Predictor.load(bundle.path, "auto") as predictor:
        assert predictor.backend.name == "tensorrt"
        prediction = predictor.predict(x)
    np.testing.assert_allclose(prediction.mean, bundle.expected(x, [0, 1, 2, 3, 4, 5]), atol=1e-3)


def test_an_onnxruntime_too_old_for_the_bundle_says_so_in_one_line(bundle: SyntheticBundle) -> None:
    # issue 28, item 7: onnxruntime 1.17 cannot read the IR version torch 2.13 writes; a stack of an IR version newer
    # than this onnxruntime reads stands for that here
    import onnx

    from edgens.fileio import sha256_file

    manifest = load_manifest(bundle.path)
    for stack in manifest.stacks:
        path = bundle.path / stack.file
        model = onnx.load(path)
        model.ir_version = 99
        onnx.save(model, path)
        stack.sha256, stack.bytes = sha256_file(path), path.stat().st_size
    write_manifest(bundle.path, manifest)
    with pytest.raises(BackendUnavailableError, match=r"^onnxruntime \S+ reads ONNX IR versions up to \d+, the "
                                                      r"bundle's stacks are IR version 99: upgrade it") as caught:
        Predictor.load(bundle.path, "onnxruntime")
    assert "\n" not in str(caught.value)
