"""Bad input gets a clear error naming what was received and what was expected, before any stack runs."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from edgens.errors import InputError
from edgens.runtime import Predictor, load_manifest, write_manifest
from edgens.runtime.faults import Fault, inject_faults
from edgens.runtime.inputs import allowed_range

RAW = np.zeros((4, 1, 28, 28), dtype=np.uint8)


def _nan_at(index: int) -> np.ndarray:
    x = RAW.astype(np.float32)
    x[index, 0, 3, 3] = np.nan
    return x


BAD = [
    (RAW[0, 0], r"input: received shape \(28, 28\), expected \(B, 1, 28, 28\) or \(B, 28, 28\) \(a single example "
                r"needs a batch axis: x\[None\]\)"),
    (RAW[:, :, 0], r"received shape \(4, 1, 28\), expected \(B, 1, 28, 28\) or \(B, 28, 28\)$"),
    (np.zeros((4, 784), np.uint8), r"received shape \(4, 784\), expected \(B, 1, 28, 28\) or \(B, 28, 28\)"),
    (np.zeros((4, 3, 28, 28), np.uint8), r"received shape \(4, 3, 28, 28\)"),
    (np.zeros((4, 1, 32, 32), np.uint8), r"received shape \(4, 1, 32, 32\)"),
    (np.zeros((0, 28, 28), np.uint8), r"input: received an empty batch \(shape \(0, 28, 28\)\), expected at least one"),
    (RAW.astype(bool), r"input: received dtype bool, expected uint8 \(as the data set stores it\) or another integer"),
    (RAW.astype(np.complex64), r"received dtype complex64"),
    (np.full((2, 28, 28), "a"), r"received dtype <U1"),
    (_nan_at(2), r"input: received 1 example\(s\) with NaN or infinite values \(first: example 2\), expected finite"),
    (np.full((3, 28, 28), np.inf), r"received 3 example\(s\) with NaN or infinite values \(first: example 0"),
    ("not an array", r"received dtype <U12"),
    ([[1, 2], [3]], r"input: received a list that is not a numeric array, expected a numpy array of shape "
                    r"\(B, 1, 28, 28\) or"),
]


@pytest.mark.parametrize(("x", "message"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_is_refused_before_any_stack_runs(predictor: Predictor, x, message: str) -> None:
    with inject_faults(predictor, {name: "raise" for name in predictor.runners}) as faulty:
        with pytest.raises(InputError, match=message):
            predictor.predict(x)
        with pytest.raises(InputError):
            predictor.anytime(x)  # checked when called, not when first iterated
    assert all(runner.calls == 0 for runner in faulty.values())


def test_input_in_the_wrong_units_is_warned_about_once(predictor: Predictor, caplog: pytest.LogCaptureFixture) -> None:
    x = np.random.default_rng(0).random((4, 28, 28)).astype(np.float32)  # scaled to 0..1: a common mistake
    with caplog.at_level(logging.WARNING, logger="edgens.runtime"):
        predictor.predict(x)
        predictor.predict(x)
    warnings = [r for r in caplog.records if "expects raw uint8 units" in r.getMessage()]
    assert len(warnings) == 1


def test_raw_uint8_input_is_not_warned_about(predictor: Predictor, data, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="edgens.runtime"):
        predictor.predict(data[0])
        predictor.predict(data[0].astype(np.float32))
    assert not caplog.records


# Issue 28, item 3: inputs only need to be finite and in the data's domain. The template bundle is a uint8 data set
# without a recorded range: its dtype's 0..255, widened by its width on each side, is what it accepts.
@pytest.mark.parametrize(("value", "allowed"), [(3e38, False), (-3e38, False), (-256.0, False), (511.0, False),
                                                (-255.0, True), (510.0, True), (128.5, True)])
def test_inputs_beyond_the_data_range_are_refused_before_any_stack_runs(predictor: Predictor, value: float,
                                                                       allowed: bool) -> None:
    x = RAW[:3].astype(np.float32)
    x[1, 0, 5, 5] = value
    with inject_faults(predictor, {name: Fault("sleep", sleep_ms=0.0) for name in predictor.runners}) as runners:
        if allowed:
            assert np.isfinite(predictor.predict(x).probabilities).all()
            return
        with pytest.raises(InputError, match=r"input: received values from .* \(1 example\(s\), first: example 1\), "
                                             r"expected raw values within -255\.\.510 \(the training data's range "
                                             r"widened by its width on each side\)"):
            predictor.predict(x)
    assert all(runner.calls == 0 for runner in runners.values())


def test_the_recorded_range_sets_what_is_accepted(bundle, data) -> None:
    manifest = load_manifest(bundle.path)
    manifest.input.raw_range = (10.0, 20.0)  # accepts 0..30
    write_manifest(bundle.path, manifest)
    assert load_manifest(bundle.path).input.raw_range == (10.0, 20.0)
    with Predictor.load(bundle.path, "onnxruntime") as predictor:
        assert allowed_range(predictor.manifest.input) == (0.0, 30.0)
        predictor.predict(np.full((1, 28, 28), 30, dtype=np.uint8))
        with pytest.raises(InputError, match=r"from 31 to 31 .* within 0\.\.30"):
            predictor.predict(np.full((1, 28, 28), 31, dtype=np.uint8))  # an integer dtype wider than allowed


def test_a_float_bundle_without_a_range_warns_and_accepts(bundle, caplog: pytest.LogCaptureFixture) -> None:
    manifest = load_manifest(bundle.path)
    manifest.input.raw_dtype = "float32"
    write_manifest(bundle.path, manifest)
    with caplog.at_level(logging.WARNING, logger="edgens.runtime"):
        predictor = Predictor.load(bundle.path, "onnxruntime")
    assert any("records no input range" in r.getMessage() for r in caplog.records)
    with predictor:
        assert np.isfinite(predictor.predict(np.full((1, 28, 28), 1e6, dtype=np.float32)).mean).all()
