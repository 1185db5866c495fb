"""Shared fixtures and automatic skips for markers that need hardware or packages we may not have."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _has_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skips = {
        "gpu": (None if _has_cuda() else "needs a CUDA GPU"),
        "tensorrt": (None if importlib.util.find_spec("tensorrt") else "needs TensorRT (pip install edgens[tensorrt])"),
    }
    for item in items:
        for marker, reason in skips.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    """Debian's Fashion-MNIST (package dataset-fashion-mnist; .ci/run installs it)."""
    if not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed: apt-get install dataset-fashion-mnist")
    return DEBIAN_FASHION_MNIST


@pytest.fixture()
def isolated_data_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No $EDGENS_DATA, a fresh user cache, and no Debian copy: data must come from where the test says."""
    from edgens.data import fashion_mnist

    monkeypatch.delenv("EDGENS_DATA", raising=False)
    monkeypatch.delenv("EDGENS_FASHION_MNIST_URL", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "no-debian-copy")
    return tmp_path
