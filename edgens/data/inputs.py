"""Inputs for inference from the command line: a ``.npy`` / ``.npz`` file or a data set split (numpy only).

``load_input("fashion-mnist:test")`` or ``load_input("x.npy")``: what ``edgens infer --input`` and the benchmarks
read. Data is returned raw (as the data set stores it); the runtime normalises it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgens.errors import ConfigError, DataNotFoundError, InputError

SPLITS = ("train", "val", "test")


def load_input(spec: str, data_dir: str | None = None) -> tuple[Any, Any, str]:
    """Load ``FILE.npy``, ``FILE.npz`` (arrays ``x`` and optional ``y``; or ``x_test``/``y_test``) or
    ``DATASET:SPLIT`` (e.g. ``fashion-mnist:test``).

    Returns:
        ``(x, y or None, description)``.

    Raises:
        DataNotFoundError: the file or data set is missing.
        InputError: the file holds no usable arrays.
        ConfigError: an unknown data set or split.
    """
    path = Path(spec)
    if spec.endswith((".npy", ".npz")):
        if not path.is_file():
            raise DataNotFoundError(f"--input {spec}: no such file")
        try:
            data = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise InputError(f"--input {spec}: not a readable numpy file ({err})") from None
        if spec.endswith(".npy"):
            return data, None, f"{spec} ({len(data)} examples, no labels)"
        with data:
            key = "x" if "x" in data.files else "x_test" if "x_test" in data.files else None
            if key is None:
                raise InputError(f"--input {spec}: expected an array x (and optionally y) or x_test (and y_test), "
                                 f"found {', '.join(data.files) or 'none'}")
            label_key = "y" if key == "x" else "y_test"
            x = data[key]
            y = data[label_key] if label_key in data.files else None
        return x, y, f"{spec} [{key}] ({len(x)} examples{'' if y is not None else ', no labels'})"
    name, _, split = spec.partition(":")
    if split not in SPLITS:
        raise ConfigError(f"--input {spec!r}: expected FILE.npy, FILE.npz or DATASET:SPLIT with SPLIT one of "
                          f"{', '.join(SPLITS)} (e.g. fashion-mnist:test)")
    from edgens.data import load_dataset  # the package imports this module

    dataset = load_dataset(name, data_dir=data_dir)
    x, y = getattr(dataset, f"{split}_x"), getattr(dataset, f"{split}_y")
    return x, y, f"{name} {split} split ({len(x)} examples)"
