"""Bad input gets a clear error naming what was received and what was expected, before any stack runs."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from edgens.errors import InputError
from edgens.runtime import Predictor
from edgens.runtime.faults import inject_faults

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
