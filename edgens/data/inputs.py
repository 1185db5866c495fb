"""Inputs for inference from the command line: a ``.npy`` / ``.npz`` file or a data set split (numpy only).

``load_input("fashion-mnist:test")`` or ``load_input("x.npy")``: what ``edgens infer --input`` and the benchmarks
read. Data is returned raw (as the data set stores it); the runtime normalises it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgens.arrays import UNREADABLE, load_array
from edgens.errors import ConfigError, InputError

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
        fix = "expected raw inputs saved with numpy.save (.npy) or numpy.savez (.npz, arrays x and optionally y)"
        data = load_array(path, InputError, fix)
        if spec.endswith(".npy"):
            x, y, key = data, None, None
        else:
            with data:
                key = "x" if "x" in data.files else "x_test" if "x_test" in data.files else None
                if key is None:
                    raise InputError(f"--input {spec}: expected an array x (and optionally y) or x_test (and "
                                     f"y_test), found {', '.join(data.files) or 'none'}")
                label_key = "y" if key == "x" else "y_test"
                try:
                    x = data[key]
                    y = data[label_key] if label_key in data.files else None
                except UNREADABLE as err:
                    raise InputError(f"--input {spec}: an array in it is unreadable ({type(err).__name__}: "
                                     f"{err}); {fix}") from None
        if x.ndim == 0 or len(x) == 0:
            raise InputError(f"--input {spec}{f' [{key}]' if key else ''}: holds no examples (shape {x.shape}); "
                             f"expected an array of examples (N, ...) with N >= 1")
        where = f"{spec} [{key}]" if key else spec
        return x, y, f"{where} ({len(x)} examples{'' if y is not None else ', no labels'})"
    name, _, split = spec.partition(":")
    if split not in SPLITS:
        raise ConfigError(f"--input {spec!r}: expected FILE.npy, FILE.npz or DATASET:SPLIT with SPLIT one of "
                          f"{', '.join(SPLITS)} (e.g. fashion-mnist:test)")
    from edgens.data import load_dataset  # the package imports this module

    dataset = load_dataset(name, data_dir=data_dir)
    x, y = getattr(dataset, f"{split}_x"), getattr(dataset, f"{split}_y")
    return x, y, f"{name} {split} split ({len(x)} examples)"
