"""Users' own data: an ``.npz`` file with arrays ``x`` and ``y`` (and optionally ``x_test``, ``y_test``,
``class_names``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edgens.arrays import UNREADABLE, load_array
from edgens.errors import DataNotFoundError, InputError



def _check_pair(x: np.ndarray, y: np.ndarray, family: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    if x.ndim < 2:
        raise InputError(f"{where}: x has shape {x.shape}; expected (N, features...) with at least 2 axes")
    if len(x) == 0:
        raise InputError(f"{where}: x is empty; expected at least one example")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.shape != (len(x),):
        raise InputError(f"{where}: y has shape {y.shape}; expected ({len(x)},), one target per row of x")
    if x.dtype.kind not in "uif" or y.dtype.kind not in "uif":
        raise InputError(f"{where}: x and y must be numeric arrays, got {x.dtype} and {y.dtype}")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise InputError(f"{where}: x holds NaN or infinite values")
    if y.dtype.kind == "f" and not np.isfinite(y).all():
        raise InputError(f"{where}: y holds NaN or infinite values")
    if family == "categorical":
        if y.dtype.kind == "f" and not np.all(y == np.round(y)):
            raise InputError(f"{where}: categorical targets must be integer class labels, got fractional values")
        if y.min() < 0:
            raise InputError(f"{where}: class labels must be >= 0, got {y.min()}")
        y = y.astype(np.int64)
    elif family == "poisson":
        if y.min() < 0:
            raise InputError(f"{where}: poisson targets must be counts >= 0, got {y.min()}")
        y = y.astype(np.float32)
    else:
        y = y.astype(np.float32)
    if x.ndim == 3:  # (N, H, W) images: add the channel axis
        x = x[:, None]
    if x.dtype.kind == "f":
        x = x.astype(np.float32)
    return x, y


def load(path: str | os.PathLike[str], family: str = "categorical"
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None, list[str] | None, dict]:
    """Load ``x``/``y`` (and ``x_test``/``y_test`` if present) from an npz file.

    Returns:
        ``(x, y, x_test, y_test, class_names, source)``; the test arrays are None when the file has none.

    Raises:
        DataNotFoundError: the file does not exist.
        InputError: keys, shapes, dtypes or values are wrong (the message says which and what was expected).
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"npz file {path} does not exist")
    fix = "expected an archive written by numpy.savez with arrays x and y"
    data = load_array(path, InputError, fix)
    if not hasattr(data, "files"):  # a .npy (one array), not an archive
        raise InputError(f"{path}: holds a single array, not an .npz archive; {fix}")
    try:
        with data:
            arrays = {key: data[key] for key in data.files}
    except UNREADABLE as err:  # a damaged member of the archive
        raise InputError(f"{path}: not a readable .npz file ({type(err).__name__}: {err}); {fix}") from None
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise InputError(f"{path}: missing array(s) {', '.join(missing)}; expected keys x and y "
                         f"(optional: x_test, y_test, class_names), found {', '.join(sorted(arrays)) or 'none'}")
    x, y = _check_pair(arrays["x"], arrays["y"], family, f"{path}")
    x_test = y_test = None
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise InputError(f"{path}: has only one of x_test and y_test; give both or neither")
    if "x_test" in arrays:
        x_test, y_test = _check_pair(arrays["x_test"], arrays["y_test"], family, f"{path} (test)")
        if x_test.shape[1:] != x.shape[1:]:
            raise InputError(f"{path}: x_test examples have shape {x_test.shape[1:]}, x has {x.shape[1:]}")
    names = [str(n) for n in arrays["class_names"]] if "class_names" in arrays else None
    return x, y, x_test, y_test, names, {"dataset": "npz", "path": str(path.resolve()), "family": family}
