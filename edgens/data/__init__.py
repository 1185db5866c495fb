"""Data sets (numpy only, no torch): Fashion-MNIST, CIFAR-10/100 and users' own ``.npz`` files.

``load_dataset("fashion-mnist")`` returns a :class:`Dataset` with a seeded validation split held out of the training
data and normalisation statistics from the training part only.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgens.data import cifar, fashion_mnist, npz
from edgens.data.dataset import Dataset, make_dataset, split_off
from edgens.ensemble import FAMILIES
from edgens.errors import ConfigError, unknown_choice

BUILTIN = ("fashion-mnist", "cifar10", "cifar100")
# Validation examples held out of the training data by default (Fashion-MNIST: 10,000, as in the paper).
DEFAULT_VAL_SIZE = {"fashion-mnist": 10_000, "cifar10": 5_000, "cifar100": 5_000}
NPZ_TEST_FRACTION = 0.2
NPZ_VAL_FRACTION = 0.1

__all__ = ["BUILTIN", "Dataset", "load_dataset", "parse_spec"]


def parse_spec(spec: str) -> tuple[str, Path | None]:
    """Split a data set spec into its kind and path: ``fashion-mnist``, ``cifar10``, ``cifar100``, ``npz:PATH`` or
    a path ending in ``.npz``.

    Raises:
        ConfigError: an unknown name.
    """
    if spec.startswith("npz:"):
        return "npz", Path(spec[4:])
    if spec.endswith(".npz"):
        return "npz", Path(spec)
    if spec not in BUILTIN:
        raise unknown_choice("data set", spec, list(BUILTIN) + ["npz:PATH"])
    return spec, None


def load_dataset(spec: str = "fashion-mnist", data_dir: str | os.PathLike[str] | None = None,
                 val_size: int | None = None, split_seed: int = 0, family: str = "categorical",
                 train_limit: int | None = None, download: bool = True) -> Dataset:
    """Load a data set and split it.

    Args:
        spec: ``fashion-mnist`` (default), ``cifar10``, ``cifar100``, or ``npz:PATH``.
        data_dir: where to look first (then ``$EDGENS_DATA``, the user cache, and for Fashion-MNIST Debian's
            ``/usr/share/datasets/fashion-mnist``).
        val_size: validation examples held out of the training data (default: 10,000 for Fashion-MNIST, 5,000 for
            CIFAR, 10% for npz files).
        split_seed: seed of the validation (and, for npz files without test arrays, test) split. It is separate from
            the training seed so that runs with different seeds share one validation set.
        family: target family for npz files (built-in data sets are categorical).
        train_limit: keep only this many (random) training examples, for quick experiments.
        download: allow downloading built-in data sets that are not found locally.

    Raises:
        ConfigError: unknown data set or family, split sizes out of range.
        DataNotFoundError: files not found (the message says how to get them).
        InputError: corrupt files or bad arrays.
    """
    kind, path = parse_spec(spec)
    if family not in FAMILIES:
        raise unknown_choice("target family", family, FAMILIES)
    if kind != "npz" and family != "categorical":
        raise ConfigError(f"{kind} is a classification data set; family must be categorical, got {family!r}")
    if kind == "fashion-mnist":
        train_x, train_y, test_x, test_y, source = fashion_mnist.load(data_dir, download)
        names: list[str] | None = list(fashion_mnist.CLASS_NAMES)
    elif kind in ("cifar10", "cifar100"):
        train_x, train_y, test_x, test_y, names, source = cifar.load(kind, data_dir, download)
    else:
        assert path is not None
        train_x, train_y, test_x_opt, test_y_opt, names, source = npz.load(path, family)
        if test_x_opt is None or test_y_opt is None:
            n_test = max(1, int(round(NPZ_TEST_FRACTION * len(train_x))))
            train_x, train_y, test_x, test_y = split_off(train_x, train_y, n_test, split_seed + 7, "test")
        else:
            test_x, test_y = test_x_opt, test_y_opt
    if val_size is None:
        val_size = DEFAULT_VAL_SIZE.get(kind) or max(1, int(round(NPZ_VAL_FRACTION * len(train_x))))
    return make_dataset(kind if kind != "npz" else f"npz:{path}", family, train_x, train_y, test_x, test_y, names,
                        source, val_size, split_seed, train_limit)
