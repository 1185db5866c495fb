"""A public reader of JSON documents with errors that name the bad key's path: what the manifest parser and the
latency tables' reader build on.

    data = read_json_file(path, fix="run `edgens profile` to rewrite it")
    r = JsonReader(str(path))
    version = r.int_(data, "format_version", "", minimum=1)  # "PATH: format_version: expected an integer >= 1..."

Only the standard library and numpy (for :func:`plain`) are used here.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path, PurePath, PurePosixPath
from typing import Any

import numpy as np

from edgens.checks import shown
from edgens.errors import BundleError

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MISSING = object()


def read_json_file(path: str | Path, fix: str | None = None) -> Any:
    """The parsed content of a JSON file.

    Raises:
        BundleError: the file cannot be read, is not UTF-8 or not valid JSON (the message adds ``fix``).
    """
    then = f"; {fix}" if fix else ""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise BundleError(f"{path}: cannot read it ({err}){then}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise BundleError(f"{path}: not valid JSON ({err}){then}") from None


def plain(value: Any) -> Any:
    """Turn numpy scalars and arrays, tuples and paths into JSON values (the exporter computes with numpy)."""
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, PurePath):
        return value.as_posix()
    return value


class JsonReader:
    """Typed access to the values of a parsed JSON document; every error is a :class:`BundleError` naming
    ``source: path`` and what was expected, e.g. ``manifest.json: stacks[2].sha256: expected a hex sha256 digest``.

    Args:
        source: how errors name the document (its file's path when read from disk).
    """

    def __init__(self, source: str):
        self.source = source

    def error(self, path: str, message: str) -> BundleError:
        return BundleError(f"{self.source}: {path}: {message}")

    def fail(self, path: str, expected: str, value: Any) -> BundleError:
        return self.error(path, f"expected {expected}, got {shown(value)}")

    def get(self, obj: dict[str, Any], key: str, path: str, expected: str, default: Any = _MISSING) -> Any:
        full = f"{path}.{key}" if path else key
        if key not in obj:
            if default is _MISSING:
                raise self.error(full, f"missing; expected {expected}")
            return default
        return obj[key]

    def obj(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, "an object", value)
        return value

    def str_(self, obj: dict[str, Any], key: str, path: str, choices: tuple[str, ...] | None = None,
             default: Any = _MISSING) -> str:
        expected = f"one of {', '.join(repr(c) for c in choices)}" if choices else "a string"
        value = self.get(obj, key, path, expected, default)
        if not isinstance(value, str) or (choices is not None and value not in choices):
            raise self.fail(f"{path}.{key}" if path else key, expected, value)
        return value

    def int_(self, obj: dict[str, Any], key: str, path: str, minimum: int | None = None) -> int:
        expected = "an integer" if minimum is None else f"an integer >= {minimum}"
        return self.int_value(self.get(obj, key, path, expected), f"{path}.{key}" if path else key, minimum)

    def int_value(self, value: Any, path: str, minimum: int | None = None) -> int:
        expected = "an integer" if minimum is None else f"an integer >= {minimum}"
        # bool is an int in Python but never a valid count or id.
        if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
            raise self.fail(path, expected, value)
        return value

    def float_(self, obj: dict[str, Any], key: str, path: str) -> float:
        return self.float_value(self.get(obj, key, path, "a finite number"), f"{path}.{key}" if path else key)

    def optional_str(self, obj: dict[str, Any], key: str, path: str) -> str | None:
        value = self.get(obj, key, path, "a string or null")
        if value is not None and not isinstance(value, str):
            raise self.fail(f"{path}.{key}" if path else key, "a string or null", value)
        return value

    def optional_float(self, obj: dict[str, Any], key: str, path: str) -> float | None:
        value = self.get(obj, key, path, "a finite number or null")
        if value is None:
            return None
        return self.float_value(value, f"{path}.{key}" if path else key, "a finite number or null")

    def float_value(self, value: Any, path: str, expected: str = "a finite number") -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise self.fail(path, expected, value)
        return float(value)

    def list_(self, obj: dict[str, Any], key: str, path: str, expected: str) -> list[Any]:
        full = f"{path}.{key}" if path else key
        value = self.get(obj, key, path, expected)
        if not isinstance(value, list):
            raise self.fail(full, expected, value)
        return value

    def ints(self, obj: dict[str, Any], key: str, path: str, minimum: int | None = None,
             non_empty: bool = False) -> list[int]:
        full = f"{path}.{key}" if path else key
        expected = "a non-empty list of integers" if non_empty else "a list of integers"
        values = self.list_(obj, key, path, expected)
        if non_empty and not values:
            raise self.fail(full, expected, values)
        return [self.int_value(item, f"{full}[{i}]", minimum) for i, item in enumerate(values)]

    def floats(self, obj: dict[str, Any], key: str, path: str) -> list[float]:
        full = f"{path}.{key}" if path else key
        values = self.list_(obj, key, path, "a list of numbers")
        return [self.float_value(item, f"{full}[{i}]") for i, item in enumerate(values)]

    def relative_file(self, obj: dict[str, Any], key: str, path: str) -> str:
        value = self.str_(obj, key, path)
        pure = PurePosixPath(value)
        # A manifest must not point outside its bundle (a copied bundle must be self-contained, and a crafted one
        # must not make the runtime read arbitrary files).
        if not value or pure.is_absolute() or ".." in pure.parts or "\\" in value:
            raise self.fail(f"{path}.{key}", "a relative path inside the bundle (POSIX separators, no '..')", value)
        return value

    def sha256(self, obj: dict[str, Any], key: str, path: str) -> str:
        value = self.get(obj, key, path, "a hex sha256 digest (64 characters)")
        if not isinstance(value, str) or not _SHA256.match(value):
            raise self.fail(f"{path}.{key}", "a hex sha256 digest (64 lowercase characters)", value)
        return value
