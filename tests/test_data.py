"""Data sets: Fashion-MNIST from disk or a (local) mirror, CIFAR archives, npz files, splits, statistics."""

from __future__ import annotations

import functools
import gzip
import http.server
import io
import pickle
import shutil
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from edgens.data import fashion_mnist, load_dataset
from edgens.errors import ConfigError, DataNotFoundError, InputError


@pytest.fixture(scope="module")
def fmnist(fashion_mnist_dir: Path):
    return load_dataset("fashion-mnist", data_dir=fashion_mnist_dir)


def test_fashion_mnist_shapes_and_split(fmnist) -> None:
    assert fmnist.input_shape == (1, 28, 28) and fmnist.train_x.dtype == np.uint8
    assert (len(fmnist.train_x), len(fmnist.val_x), len(fmnist.test_x)) == (50_000, 10_000, 10_000)
    assert fmnist.n_outputs == 10 and fmnist.class_names[9] == "Ankle boot"
    # the official training set has 6,000 images per class; train + validation is that set
    counts = np.bincount(np.concatenate([fmnist.train_y, fmnist.val_y]), minlength=10)
    assert counts.tolist() == [6000] * 10


def test_validation_is_disjoint_from_training(fmnist) -> None:
    train_rows = {row.tobytes() for row in fmnist.train_x.reshape(len(fmnist.train_x), -1)}
    overlap = sum(row.tobytes() in train_rows for row in fmnist.val_x.reshape(len(fmnist.val_x), -1))
    assert overlap <= 10  # Fashion-MNIST has a handful of duplicate images; a leaky split would overlap ~thousands


def test_statistics_come_from_training_part_only(fmnist) -> None:
    np.testing.assert_allclose(fmnist.mean, [fmnist.train_x.astype(np.float64).mean()], rtol=1e-6)
    np.testing.assert_allclose(fmnist.std, [fmnist.train_x.astype(np.float64).std()], rtol=1e-6)
    normalized = fmnist.normalize(fmnist.train_x[:2000])
    assert normalized.dtype == np.float32
    assert abs(normalized.mean()) < 0.05 and abs(normalized.std() - 1) < 0.05


def test_split_is_seeded(fashion_mnist_dir: Path) -> None:
    a = load_dataset("fashion-mnist", fashion_mnist_dir, split_seed=3, train_limit=100)
    b = load_dataset("fashion-mnist", fashion_mnist_dir, split_seed=3, train_limit=100)
    c = load_dataset("fashion-mnist", fashion_mnist_dir, split_seed=4, train_limit=100)
    np.testing.assert_array_equal(a.val_y, b.val_y)
    np.testing.assert_array_equal(a.train_x, b.train_x)
    assert not np.array_equal(a.val_x, c.val_x)
    assert len(a.train_x) == 100


def test_val_size_out_of_range(fashion_mnist_dir: Path) -> None:
    with pytest.raises(ConfigError, match="validation size 60000 is out of range"):
        load_dataset("fashion-mnist", fashion_mnist_dir, val_size=60_000)


def test_missing_data_says_how_to_get_it(isolated_data_env: Path) -> None:
    with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        load_dataset("fashion-mnist", data_dir=isolated_data_env, download=False)
    assert str(isolated_data_env) in str(info.value)


def test_nonexistent_data_dir_is_an_error(isolated_data_env: Path) -> None:
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_dataset("fashion-mnist", data_dir=isolated_data_env / "typo")


def test_files_found_in_data_dir_and_env(isolated_data_env: Path, fashion_mnist_dir: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    copy = isolated_data_env / "mine" / "fashion-mnist"
    shutil.copytree(fashion_mnist_dir, copy)
    assert fashion_mnist.locate(isolated_data_env / "mine")["train_images"].parent == copy
    monkeypatch.setenv("EDGENS_DATA", str(isolated_data_env / "mine"))
    assert fashion_mnist.locate(None)["test_labels"].parent == copy


@pytest.fixture()
def mirror(tmp_path: Path):
    """A real HTTP server on localhost serving a directory (the test fills it)."""
    root = tmp_path / "mirror"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None  # keep test output quiet
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_download_from_mirror_checks_contents(isolated_data_env: Path, fashion_mnist_dir: Path, mirror,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    root, url = mirror
    for f in fashion_mnist_dir.iterdir():
        shutil.copy(f, root / f.name)
    monkeypatch.setenv("EDGENS_FASHION_MNIST_URL", url)
    paths = fashion_mnist.locate(None)
    assert paths["train_images"].parent == isolated_data_env / "cache" / "edgens" / "fashion-mnist"
    x, y, tx, ty, _ = fashion_mnist.load(None, verify=True)
    assert x.shape == (60_000, 1, 28, 28) and ty.shape == (10_000,)


def test_download_rejects_wrong_contents(isolated_data_env: Path, fashion_mnist_dir: Path, mirror,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    root, url = mirror
    for f in fashion_mnist_dir.iterdir():
        shutil.copy(f, root / f.name)
    # a mirror whose test labels were tampered with
    labels = bytearray(gzip.decompress((root / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    labels[100] = (labels[100] + 1) % 10
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(labels)))
    monkeypatch.setenv("EDGENS_FASHION_MNIST_URL", url)
    with pytest.raises(DataNotFoundError, match="sha256") as info:
        fashion_mnist.locate(None)
    assert "dataset-fashion-mnist" in str(info.value)
    assert not (isolated_data_env / "cache" / "edgens" / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").exists()


def test_corrupt_idx_file(tmp_path: Path) -> None:
    bad = tmp_path / "x-idx1-ubyte"
    bad.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05abc")
    with pytest.raises(InputError, match="truncated IDX"):
        fashion_mnist.read_idx(bad)
    bad.write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(InputError, match="not an IDX file"):
        fashion_mnist.read_idx(bad)


def _cifar_archive(path: Path, n_per_batch: int = 6) -> None:
    rng = np.random.default_rng(0)

    def blob(obj) -> bytes:
        return pickle.dumps(obj)

    with tarfile.open(path, "w:gz") as archive:
        def add(name: str, obj) -> None:
            data = blob(obj)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))

        for i in range(1, 6):
            add(f"data_batch_{i}", {b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                                    b"labels": list(rng.integers(0, 10, n_per_batch))})
        add("test_batch", {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 9]})
        add("batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})


def test_cifar10_from_local_archive(tmp_path: Path, isolated_data_env: Path) -> None:
    _cifar_archive(tmp_path / "cifar-10-python.tar.gz")
    data = load_dataset("cifar10", data_dir=tmp_path, val_size=5)
    assert data.input_shape == (3, 32, 32) and len(data.train_x) == 25 and len(data.val_x) == 5
    assert data.class_names[3] == "c3" and data.test_y.tolist() == [0, 1, 2, 9]


def test_cifar_missing_says_how_to_get_it(isolated_data_env: Path) -> None:
    with pytest.raises(DataNotFoundError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", data_dir=isolated_data_env, download=False)


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def test_npz_categorical_with_held_out_test(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = _npz(tmp_path / "d.npz", x=rng.normal(size=(200, 5)).astype(np.float32), y=rng.integers(0, 3, 200))
    data = load_dataset(f"npz:{path}")
    assert data.input_shape == (5,) and data.n_outputs == 3
    assert (len(data.train_x), len(data.val_x), len(data.test_x)) == (144, 16, 40)
    np.testing.assert_allclose(data.mean, data.train_x.mean(0), rtol=1e-5, atol=1e-6)


def test_npz_gaussian_with_given_test(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    path = _npz(tmp_path / "r.npz", x=rng.normal(size=(50, 2, 4, 4)), y=rng.normal(size=50),
                x_test=rng.normal(size=(9, 2, 4, 4)), y_test=rng.normal(size=(9, 1)))
    data = load_dataset(str(path), family="gaussian", val_size=10)
    assert data.n_outputs == 1 and data.test_y.shape == (9,) and data.train_y.dtype == np.float32


@pytest.mark.parametrize(("arrays", "family", "message"), [
    ({"x": np.zeros((4, 2))}, "categorical", "missing array.*y"),
    ({"x": np.zeros((4, 2)), "y": np.zeros(3, int)}, "categorical", r"expected \(4,\)"),
    ({"x": np.full((4, 2), np.nan), "y": np.zeros(4, int)}, "categorical", "NaN"),
    ({"x": np.zeros((4, 2)), "y": np.array([0, 1, -1, 2])}, "categorical", "labels must be >= 0"),
    ({"x": np.zeros((4, 2)), "y": np.array([0.5, 1, 1, 2])}, "categorical", "integer class labels"),
    ({"x": np.zeros((4, 2)), "y": np.array([1.0, -2, 0, 1])}, "poisson", "counts >= 0"),
    ({"x": np.zeros(4), "y": np.zeros(4, int)}, "categorical", "at least 2 axes"),
    ({"x": np.zeros((0, 2)), "y": np.zeros(0, int)}, "categorical", "empty"),
    ({"x": np.zeros((4, 2)), "y": np.zeros(4, int), "x_test": np.zeros((2, 2))}, "categorical", "only one of"),
])
def test_bad_npz_files(tmp_path: Path, arrays: dict, family: str, message: str) -> None:
    path = _npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(InputError, match=message):
        load_dataset(f"npz:{path}", family=family)


def test_unknown_dataset_and_family() -> None:
    with pytest.raises(ConfigError, match="unknown data set 'mnist'.*fashion-mnist"):
        load_dataset("mnist")
    with pytest.raises(ConfigError, match="family must be categorical"):
        load_dataset("fashion-mnist", family="gaussian")
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_dataset("npz:/nonexistent/file.npz")
