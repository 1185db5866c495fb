"""CIFAR-10 and CIFAR-100 from the standard python-format archives (Krizhevsky 2009)."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np

from edgens.data.download import download_verified
from edgens.data.locations import candidate_dirs, download_dir
from edgens.errors import DataNotFoundError, InputError

# name -> (archive, folder inside it, train members, test member, meta member, label key, label-names key, md5)
ARCHIVES = {
    "cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                "test_batch", "batches.meta", b"labels", b"label_names", "c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python", ["train"], "test", "meta", b"fine_labels",
                 b"fine_label_names", "eb9058c3a382ffc7106e4002c42a8d85"),
}
BASE_URL = "https://www.cs.toronto.edu/~kriz/"


def _how_to_get(name: str) -> str:
    archive, folder = ARCHIVES[name][0], ARCHIVES[name][1]
    return (f"download {BASE_URL}{archive} and put it (or the extracted folder {folder}/) in a directory passed with "
            f"--data-dir or $EDGENS_DATA")


def _read_members(name: str, source: Path) -> dict[str, bytes]:
    """Read the pickled batches from an archive or an extracted folder."""
    _, folder, train, test, meta, *_ = ARCHIVES[name]
    wanted = train + [test, meta]
    if source.is_dir():
        missing = [m for m in wanted if not (source / m).is_file()]
        if missing:
            raise InputError(f"{source}: missing {', '.join(missing)} (expected the {name} python-format batches)")
        return {m: (source / m).read_bytes() for m in wanted}
    contents = {}
    try:
        with tarfile.open(source, "r:*") as archive:
            for member in wanted:
                handle = archive.extractfile(f"{folder}/{member}")
                if handle is None:
                    raise KeyError(member)
                contents[member] = handle.read()
    except (tarfile.TarError, KeyError, OSError) as err:
        raise InputError(f"{source}: not a valid {name} python-format archive ({err})") from None
    return contents


def _unpickle(blob: bytes, what: str) -> dict:
    try:
        return pickle.load(io.BytesIO(blob), encoding="bytes")  # noqa: S301 (the data set's own format)
    except Exception as err:  # pickle raises many types on corrupt data
        raise InputError(f"{what}: cannot be unpickled ({err})") from None


def locate(name: str, data_dir: str | os.PathLike[str] | None = None, download: bool = True) -> Path:
    """Return the archive or extracted folder of ``name``, downloading the archive if it is nowhere.

    Raises:
        DataNotFoundError: not found and the download failed or was not allowed.
    """
    archive, folder, *_, md5 = ARCHIVES[name]
    if data_dir is not None and not Path(data_dir).is_dir():
        raise DataNotFoundError(f"data directory {data_dir} does not exist; {_how_to_get(name)}")
    searched = candidate_dirs(data_dir, name)
    for directory in searched:
        if (directory / folder).is_dir():
            return directory / folder
        if (directory / archive).is_file():
            return directory / archive
    where = ", ".join(str(d) for d in searched)
    if not download:
        raise DataNotFoundError(f"{name} not found (searched {where}); {_how_to_get(name)}")
    url = os.environ.get("EDGENS_CIFAR_URL", BASE_URL).rstrip("/") + "/" + archive
    try:
        return download_verified([url], download_dir(data_dir, name) / archive, md5, algorithm="md5")
    except DataNotFoundError as err:
        raise DataNotFoundError(f"{name} not found (searched {where}) and {err}; {_how_to_get(name)}") from None


def load(name: str, data_dir: str | os.PathLike[str] | None = None, download: bool = True
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str], dict]:
    """Load CIFAR-10/100 as uint8 images (N, 3, 32, 32), int64 labels and the class names.

    Returns:
        ``(train_x, train_y, test_x, test_y, class_names, source)``.
    """
    source_path = locate(name, data_dir, download)
    _, _, train, test, meta, label_key, names_key, _ = ARCHIVES[name]
    blobs = _read_members(name, source_path)

    def batch(member: str) -> tuple[np.ndarray, np.ndarray]:
        d = _unpickle(blobs[member], f"{source_path}:{member}")
        try:
            x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            y = np.asarray(d[label_key], dtype=np.int64)
        except (KeyError, ValueError) as err:
            raise InputError(f"{source_path}:{member}: unexpected contents ({err})") from None
        if len(x) != len(y):
            raise InputError(f"{source_path}:{member}: {len(x)} images but {len(y)} labels")
        return x, y

    parts = [batch(m) for m in train]
    train_x, train_y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    test_x, test_y = batch(test)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in _unpickle(blobs[meta], "meta")[names_key]]
    return train_x, train_y, test_x, test_y, names, {"dataset": name, "path": str(source_path)}
