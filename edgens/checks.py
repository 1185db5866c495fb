"""Checking numeric settings, the one way (standard library only: the CLI, training, export and the torch-free
runtime all use it).

``check_number("weight_decay", value, low=0)`` returns the value or raises a :class:`~edgens.errors.ConfigError`
that names the setting, the value received and the range expected. NaN and infinities are refused everywhere
(``nan < 0`` is False, so a plain range test lets NaN through), and so are booleans posing as numbers.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

from edgens.errors import ConfigError


def describe_range(low: float | None, high: float | None, low_open: bool, high_open: bool, integer: bool) -> str:
    """``an integer >= 1``, ``a finite number in (0, 1]``, ...: the expectation in words."""
    kind = "an integer" if integer else "a finite number"
    if low is not None and high is not None:
        return f"{kind} in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{kind} {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{kind} {'<' if high_open else '<='} {high:g}"
    return kind


def check_number(name: str, value: object, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, integer: bool = False) -> float | int:
    """``value`` if it is a finite number (an integer where ``integer``) within the bounds.

    Args:
        name: the setting's name, as the user wrote it (``--weight-decay``, ``deadline_ms``).
        value: what was received.
        low, high: bounds (None: unbounded); ``low_open`` / ``high_open`` exclude them.
        integer: require an integer.

    Raises:
        ConfigError: not a number, not finite, not an integer where one is needed, or out of range.
    """
    expected = describe_range(low, high, low_open, high_open, integer)
    wrong_type = isinstance(value, bool) or not isinstance(value, Integral if integer else Real)
    if wrong_type or not finite(value):  # type: ignore[arg-type]
        raise ConfigError(f"{name}: expected {expected}, got {shown(value)}")
    number = int(value) if integer else float(value)  # type: ignore[arg-type]
    below = low is not None and (number <= low if low_open else number < low)
    above = high is not None and (number >= high if high_open else number > high)
    if below or above:
        raise ConfigError(f"{name}: expected {expected}, got {shown(value)}")
    return number


def finite(value: float) -> bool:
    """Whether a number is finite and has a float value (an integer of 400 digits has none: ``math.isfinite``
    raises OverflowError for it)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def shown(value: object) -> str:
    """``repr(value)`` for a one-line message, cut short: a user or client may send anything, of any length."""
    return cut(repr(value))


def cut(text: str, limit: int = 60) -> str:
    """``text`` if at most ``limit`` characters, else its start and its length."""
    return text if len(text) <= limit else f"{text[:limit - 10]}... ({len(text)} characters)"
