"""A data set split into train / validation / test, with normalisation statistics from the training part."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgens.errors import ConfigError, InputError


@dataclass
class Dataset:
    """Raw arrays of one data set, split, plus what is needed to normalise them.

    ``*_x`` hold raw values as the data set stores them (uint8 images, or float32), shaped ``(N, *input_shape)``
    with channels first. ``*_y`` hold int64 class labels (categorical) or float32 targets. ``mean`` and ``std``
    are per channel (axis 1 of ``x``), in raw units, computed on ``train_x`` only.
    """

    name: str
    family: str
    n_outputs: int
    class_names: list[str] | None
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    source: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, channels first (e.g. ``(1, 28, 28)``)."""
        return tuple(self.train_x.shape[1:])

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """Return ``(x - mean) / std`` per channel as float32."""
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return ((x.astype(np.float32) - self.mean.reshape(shape)) / self.std.reshape(shape)).astype(np.float32)

    def describe(self) -> dict:
        """JSON-able summary: sizes, shapes, statistics and where the data came from."""
        return {"name": self.name, "family": self.family, "n_outputs": self.n_outputs,
                "class_names": self.class_names, "input_shape": list(self.input_shape),
                "raw_dtype": str(self.train_x.dtype), "sizes": {"train": len(self.train_x), "val": len(self.val_x),
                                                               "test": len(self.test_x)},
                "mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std], "source": self.source}


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (axis 1) of ``x`` in float64, computed in chunks to bound memory.

    A channel with zero spread gets std 1, so normalising it does not divide by zero.
    """
    axes = (0,) + tuple(range(2, x.ndim))
    count = x.shape[0] * int(np.prod(x.shape[2:], dtype=np.int64))
    total = np.zeros(x.shape[1])
    total_sq = np.zeros(x.shape[1])
    for start in range(0, len(x), 8192):
        chunk = x[start:start + 8192].astype(np.float64)
        total += chunk.sum(axis=axes)
        total_sq += (chunk * chunk).sum(axis=axes)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
    std[std < 1e-8] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


def split_off(x: np.ndarray, y: np.ndarray, size: int, seed: int, what: str
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Hold ``size`` random examples out of ``(x, y)``: returns ``(rest_x, rest_y, held_x, held_y)``.

    Raises:
        ConfigError: ``size`` leaves no example on either side.
    """
    if not 0 < size < len(x):
        raise ConfigError(f"{what} size {size} is out of range; expected 1..{len(x) - 1} for {len(x)} examples")
    order = np.random.default_rng(seed).permutation(len(x))
    held, rest = np.sort(order[:size]), np.sort(order[size:])
    return x[rest], y[rest], x[held], y[held]


def make_dataset(name: str, family: str, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, class_names: list[str] | None, source: dict, val_size: int,
                 split_seed: int = 0, train_limit: int | None = None) -> Dataset:
    """Split validation data off the training data, optionally shrink the training part, and compute statistics.

    Raises:
        InputError: labels out of range for the given class names, or empty splits.
        ConfigError: ``val_size`` or ``train_limit`` out of range.
    """
    train_x, train_y, val_x, val_y = split_off(train_x, train_y, val_size, split_seed, "validation")
    if train_limit is not None:
        if train_limit < 1:
            raise ConfigError(f"train limit {train_limit} must be >= 1")
        # Keep a random (seeded) subset rather than the first rows, so classes stay balanced.
        keep = np.sort(np.random.default_rng(split_seed + 1).permutation(len(train_x))[:train_limit])
        train_x, train_y = train_x[keep], train_y[keep]
    if family == "categorical":
        n_outputs = int(max(train_y.max(), val_y.max(), test_y.max())) + 1
        if class_names is not None:
            if n_outputs > len(class_names):
                raise InputError(f"{name}: label {n_outputs - 1} is out of range for {len(class_names)} class names")
            n_outputs = len(class_names)
    else:
        n_outputs = 1
    mean, std = channel_stats(train_x)
    return Dataset(name, family, n_outputs, class_names, train_x, train_y, val_x, val_y, test_x, test_y, mean,
                   std, dict(source, val_size=val_size, split_seed=split_seed, train_limit=train_limit))
