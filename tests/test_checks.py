"""The one numeric check: finite, in range, integer where asked, with the setting, the value and the range named."""

from __future__ import annotations

import math

import pytest

from edgens.checks import check_number, finite, shown
from edgens.errors import ConfigError


@pytest.mark.parametrize(("value", "options", "message"), [
    (math.nan, {"low": 0}, "w: expected a finite number >= 0, got nan"),
    (math.inf, {"low": 0}, "w: expected a finite number >= 0, got inf"),
    (-math.inf, {}, "w: expected a finite number, got -inf"),
    (-1e-9, {"low": 0}, "w: expected a finite number >= 0, got -1e-09"),
    (0, {"low": 0, "low_open": True}, "w: expected a finite number > 0, got 0"),
    (1.0, {"low": 0, "high": 1, "high_open": True}, r"w: expected a finite number in \[0, 1\), got 1.0"),
    (2.5, {"low": 1, "integer": True}, "w: expected an integer >= 1, got 2.5"),
    (True, {"integer": True}, "w: expected an integer, got True"),
    ("3", {}, "w: expected a finite number, got '3'"),
    (None, {}, "w: expected a finite number, got None"),
])
def test_bad_values_name_what_was_expected(value: object, options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{message}$"):
        check_number("w", value, **options)


def test_good_values_come_back_typed() -> None:
    assert check_number("w", 3, low=1, integer=True) == 3
    assert isinstance(check_number("w", 3, low=0), float)
    assert check_number("w", 1.0, low=0, high=1) == 1.0
    assert check_number("w", 0.5, low=0, high=1, low_open=True, high_open=True) == 0.5


def test_numbers_without_a_float_value_are_refused_in_one_short_line() -> None:
    # an integer of 400 digits made math.isfinite raise OverflowError (a 500 in serve, a traceback in the API)
    with pytest.raises(ConfigError, match=r"^lanes: expected an integer >= 1, got 9{50}\.\.\. \(400 characters\)$"):
        check_number("lanes", int("9" * 400), low=1, integer=True)
    assert finite(1e308) and not finite(10 ** 400) and not finite(float("nan"))
    assert shown("x" * 10) == "'xxxxxxxxxx'" and shown(10 ** 100).endswith("... (101 characters)")
