"""Checking and normalising the caller's raw input, once per call, before any stack runs.

Callers pass data as the data set stores it (Fashion-MNIST: uint8 0..255 of shape ``(B, 28, 28)`` or
``(B, 1, 28, 28)``); float and other integer arrays are read in the same raw units. The bundle's preprocessing
``(raw - mean[c]) / std[c]`` (``c``: axis 0 of one example) is applied here, so stack graphs get normalised float32.

Inputs only need to be finite and in the data's domain: values beyond the training data's range (the manifest's
``input.raw_range``; for older bundles, the range of their integer raw dtype) widened by :data:`RANGE_MARGIN` times
its width on each side are refused, so that an absurd request (say FP32 values of 3e38 for an image model) fails
alone, in one line, instead of making healthy members look corrupted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgens.errors import InputError
from edgens.runtime.bundle import InputSpec, Preprocessing

log = logging.getLogger(__name__)

# How far beyond the training data's range raw inputs may lie, in multiples of the range's width on each side: for
# Fashion-MNIST (0..255), -255..510. Wide enough for any real image or sensor reading in those units, and far below
# the magnitudes that overflow the members' float32 sums.
RANGE_MARGIN = 1.0


@dataclass(frozen=True)
class PreparedInput:
    """A batch :meth:`Predictor.prepare` checked and normalised; ``predict``, ``anytime`` and ``stepwise`` take it
    without checking it again (the serving batcher prepares each request as it arrives, then merges them)."""

    array: np.ndarray  # (B, *input.shape) float32, normalised

    def __len__(self) -> int:
        return len(self.array)

    @staticmethod
    def concatenate(parts: Sequence[PreparedInput]) -> PreparedInput:
        """One batch of several prepared batches, in order."""
        return parts[0] if len(parts) == 1 else PreparedInput(np.concatenate([part.array for part in parts]))


def _fmt(shape: tuple[int, ...]) -> str:
    return "(B, " + ", ".join(str(d) for d in shape) + ")"


class InputPreparer:
    """Checks a raw batch against the bundle's input and returns it normalised.

    Accepted shapes are ``(B, *shape)`` and, when the example has a single channel, ``(B, *shape[1:])`` (images
    without a channel axis).
    """

    def __init__(self, spec: InputSpec, preprocessing: Preprocessing):
        self.shape = tuple(spec.shape)
        self.raw_dtype = np.dtype(spec.raw_dtype)
        broadcast = (-1,) + (1,) * (len(self.shape) - 1)  # per channel: axis 0 of one example
        self._mean = np.asarray(preprocessing.mean, dtype=np.float32).reshape(broadcast)
        self._std = np.asarray(preprocessing.std, dtype=np.float32).reshape(broadcast)
        self.accepted = [self.shape] + ([self.shape[1:]] if self.shape[0] == 1 and len(self.shape) > 1 else [])
        self._warned_units = False
        self.allowed = allowed_range(spec)
        self._within: dict[np.dtype, bool] = {}  # per integer dtype: every value it holds is allowed
        if self.allowed is None:
            log.warning("the bundle records no input range (exported before edgens recorded one, from a float data "
                        "set): inputs far outside the training data cannot be refused; export it again")

    def describe_expected(self) -> str:
        """The accepted shapes, e.g. ``(B, 1, 28, 28) or (B, 28, 28)``."""
        return " or ".join(_fmt(shape) for shape in self.accepted)

    def __call__(self, x: Any) -> np.ndarray:
        """Check ``x`` and return ``(B, *shape)`` float32, normalised and C-contiguous.

        Raises:
            InputError: not a numeric array, a shape that does not fit, an empty batch, NaN or infinite values,
                values beyond the bundle's input range.
        """
        return self.normalise(self.check(x))

    def check(self, x: Any) -> np.ndarray:
        """``x`` as a numeric array of an accepted shape, its values not yet looked at (cheap: what a caller checks
        before queueing it; :meth:`normalise` does the rest).

        Raises:
            InputError: not a numeric array, a shape that does not fit, an empty batch.
        """
        if not isinstance(x, np.ndarray):
            received = type(x).__name__
            try:
                x = np.asarray(x)
            except (ValueError, TypeError):  # ragged nested lists and the like
                x = np.empty(0, dtype=object)
            if x.dtype == object:
                raise InputError(f"input: received a {received} that is not a numeric array, expected a numpy array "
                                 f"of shape {self.describe_expected()}")
        if x.dtype.kind not in "uif":
            raise InputError(f"input: received dtype {x.dtype}, expected {self.raw_dtype} (as the data set stores "
                             f"it) or another integer or float type")
        if tuple(x.shape[1:]) not in self.accepted or x.ndim < 2:
            single = " (a single example needs a batch axis: x[None])" if tuple(x.shape) in self.accepted else ""
            raise InputError(f"input: received shape {tuple(x.shape)}, expected {self.describe_expected()}{single}")
        if len(x) == 0:
            raise InputError(f"input: received an empty batch (shape {tuple(x.shape)}), expected at least one "
                             f"example")
        return x

    def normalise(self, x: np.ndarray) -> np.ndarray:
        """The checked array ``x`` (:meth:`check`) as ``(B, *shape)`` float32, normalised and C-contiguous.

        Raises:
            InputError: NaN or infinite values, values beyond the bundle's input range.
        """
        # One copy into float32, then normalise in place: the doc's formula, (raw - mean) / std.
        out = np.array(x, dtype=np.float32, order="C").reshape((len(x), *self.shape))  # np.array always copies
        if not self.values_need_no_check(x.dtype):
            self._check_values(out, x.dtype.kind == "f")
        np.subtract(out, self._mean, out=out)
        np.divide(out, self._std, out=out)
        return out

    def values_need_no_check(self, dtype: np.dtype) -> bool:
        """Whether arrays of ``dtype`` are normalised without looking at their values: an integer type whose every
        value is allowed (a uint8 image for a uint8 data set). Such checked arrays can be merged raw and normalised
        once (the serving batcher does)."""
        return dtype.kind in "ui" and self._dtype_within(dtype)

    def _dtype_within(self, dtype: np.dtype) -> bool:
        """Whether every value an integer ``dtype`` can hold is allowed (a uint8 image for a uint8 data set): then
        its values need no check."""
        within = self._within.get(dtype)
        if within is None:
            info = np.iinfo(dtype)
            within = self._within[dtype] = self.allowed is None or self.allowed[0] <= info.min <= info.max <= \
                self.allowed[1]
        return within

    def _check_values(self, x: np.ndarray, floats: bool) -> None:
        """Finite, within the allowed range, and (float input) in raw units: one min and one max in the common
        case."""
        low, high = float(x.min()), float(x.max())  # NaN anywhere makes both NaN; Inf shows in one of them
        if not (math.isfinite(low) and math.isfinite(high)):
            bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
            raise InputError(f"input: received {int(bad.sum())} example(s) with NaN or infinite values (first: "
                             f"example {int(np.flatnonzero(bad)[0])}), expected finite values")
        allowed = self.allowed
        if allowed is not None and (low < allowed[0] or high > allowed[1]):
            flat = x.reshape(len(x), -1)
            bad = (flat.min(axis=1) < allowed[0]) | (flat.max(axis=1) > allowed[1])
            raise InputError(f"input: received values from {low:.4g} to {high:.4g} ({int(bad.sum())} example(s), "
                             f"first: example {int(np.flatnonzero(bad)[0])}), expected raw values within "
                             f"{allowed[0]:g}..{allowed[1]:g} (the training data's range widened by its width on "
                             f"each side)")
        if floats:
            self._check_units(low, high)

    def _check_units(self, low: float, high: float) -> None:
        # A common mistake is to pass data already scaled to 0..1 or normalised; the runtime expects raw units.
        if self._warned_units or self.raw_dtype.kind not in "ui":
            return
        if high <= 1.0 or low < 0.0:
            self._warned_units = True
            log.warning("input values lie in [%.3g, %.3g], but the bundle expects raw %s units (e.g. 0..255); pass "
                        "data as the data set stores it, not scaled or normalised", low, high, self.raw_dtype)


def allowed_range(spec: InputSpec) -> tuple[float, float] | None:
    """The raw values a bundle accepts: its training range (or, without one, its integer raw dtype's range)
    widened by :data:`RANGE_MARGIN` times the range's width on each side; None when neither is known."""
    if spec.raw_range is not None:
        low, high = spec.raw_range
    elif np.dtype(spec.raw_dtype).kind in "ui":
        info = np.iinfo(np.dtype(spec.raw_dtype))
        low, high = float(info.min), float(info.max)
    else:
        return None
    width = (high - low) or max(abs(high), 1.0)  # a constant training value still allows its own scale
    return low - RANGE_MARGIN * width, high + RANGE_MARGIN * width
