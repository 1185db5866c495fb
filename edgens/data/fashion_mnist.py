"""Fashion-MNIST (Xiao et al. 2017) from its IDX files: find them, download them, read them."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from edgens.data.download import download_verified, payload_digest
from edgens.data.locations import candidate_dirs, download_dir
from edgens.errors import DataNotFoundError, InputError

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"]

# sha256 of the *decompressed* IDX files (identical for the official files and Debian's re-compressed copies).
FILES = {
    "train_images": ("train-images-idx3-ubyte", "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    "train_labels": ("train-labels-idx1-ubyte", "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    "test_images": ("t10k-images-idx3-ubyte", "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    "test_labels": ("t10k-labels-idx1-ubyte", "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
}
MIRRORS = [
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
]
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
HOW_TO_GET = (
    "install the Debian package (apt-get install dataset-fashion-mnist, files in /usr/share/datasets/fashion-mnist), "
    "or put the four files train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
    "t10k-labels-idx1-ubyte.gz in a directory and pass it with --data-dir (or set $EDGENS_DATA)"
)


def _find_in(directory: Path) -> dict[str, Path] | None:
    found = {}
    for key, (stem, _) in FILES.items():
        for name in (stem + ".gz", stem):
            if (directory / name).is_file():
                found[key] = directory / name
                break
        else:
            return None
    return found


def locate(data_dir: str | os.PathLike[str] | None = None, download: bool = True) -> dict[str, Path]:
    """Return the paths of the four IDX files, downloading them into the cache if they are nowhere.

    Raises:
        DataNotFoundError: not found and the download failed (or was not allowed); says how to get the files.
    """
    if data_dir is not None and not Path(data_dir).is_dir():
        raise DataNotFoundError(f"data directory {data_dir} does not exist; {HOW_TO_GET}")
    searched = candidate_dirs(data_dir, "fashion-mnist") + [DEBIAN_DIR]
    for directory in searched:
        found = _find_in(directory)
        if found:
            return found
    where = ", ".join(str(d) for d in searched)
    if not download:
        raise DataNotFoundError(f"Fashion-MNIST not found (searched {where}); {HOW_TO_GET}")
    target = download_dir(data_dir, "fashion-mnist")
    base_urls = [os.environ["EDGENS_FASHION_MNIST_URL"]] if os.environ.get("EDGENS_FASHION_MNIST_URL") else MIRRORS
    paths = {}
    try:
        for key, (stem, sha256) in FILES.items():
            urls = [base.rstrip("/") + "/" + stem + ".gz" for base in base_urls]
            paths[key] = download_verified(urls, target / (stem + ".gz"), sha256, decompress=True)
    except DataNotFoundError as err:
        raise DataNotFoundError(f"Fashion-MNIST not found (searched {where}) and {err}; {HOW_TO_GET}") from None
    return paths


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or not) into a numpy array.

    Raises:
        InputError: the file is not a valid IDX file.
    """
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as err:
            raise InputError(f"{path}: not a valid gzip file ({err})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise InputError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex()!r}, expected 0x0000080N)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header + int(np.prod(shape)):
        raise InputError(f"{path}: truncated IDX file ({len(data)} bytes, expected {header + int(np.prod(shape))})")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load(data_dir: str | os.PathLike[str] | None = None, download: bool = True,
         verify: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
    """Load Fashion-MNIST as uint8 images (N, 1, 28, 28) and int64 labels.

    Returns:
        ``(train_x, train_y, test_x, test_y, source)``; ``source`` records where the files came from.

    Raises:
        DataNotFoundError: see :func:`locate`.
        InputError: a file is corrupt (or, with ``verify``, does not match the official checksum).
    """
    paths = locate(data_dir, download)
    if verify:
        for key, path in paths.items():
            if payload_digest(path.read_bytes(), path.name.endswith(".gz")) != FILES[key][1]:
                raise InputError(f"{path}: contents differ from the official Fashion-MNIST file")
    arrays = {key: read_idx(path) for key, path in paths.items()}
    train_x, test_x = arrays["train_images"][:, None], arrays["test_images"][:, None]
    train_y, test_y = arrays["train_labels"].astype(np.int64), arrays["test_labels"].astype(np.int64)
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise InputError(f"Fashion-MNIST images and labels differ in length in {paths['train_images'].parent}")
    source = {"dataset": "fashion-mnist", "directory": str(paths["train_images"].parent)}
    return train_x, train_y, test_x, test_y, source
