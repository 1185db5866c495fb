"""Fixtures for the runtime's tests: real bundles built without torch, and torch blocked while the tests run.

The runtime must work on devices without torch. Every test in this directory runs with ``sys.modules["torch"]``
set to None (an import of torch raises), so a lazy torch import anywhere in the runtime fails the test that reaches
it. Importing the runtime in a fresh interpreter with torch blocked is checked by ``test_no_torch.py``; set
``EDGENS_BLOCK_TORCH=1`` to block torch for the whole session (then collection is covered too):

    EDGENS_BLOCK_TORCH=1 python -m pytest tests/runtime
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

if os.environ.get("EDGENS_BLOCK_TORCH") == "1":
    sys.modules["torch"] = None  # type: ignore[assignment]

from bundle_factory import SyntheticBundle, make_bundle, make_data  # noqa: E402

from edgens.runtime import Predictor  # noqa: E402


@pytest.fixture(autouse=True)
def _block_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    # Restored after each test, so other test directories in the same session still get torch.
    monkeypatch.setitem(sys.modules, "torch", None)


@pytest.fixture(scope="session")
def _template(tmp_path_factory: pytest.TempPathFactory) -> SyntheticBundle:
    """6 members in 3 general stacks of 2 (order 0..5), and specialist-3 with members 4 and 5."""
    return make_bundle(tmp_path_factory.mktemp("template") / "bundle", n_members=6, per_stack=2, hidden=8)


@pytest.fixture()
def bundle(_template: SyntheticBundle, tmp_path: Path) -> SyntheticBundle:
    """A fresh copy of the template bundle that a test may damage."""
    path = tmp_path / "bundle"
    shutil.copytree(_template.path, path)
    return SyntheticBundle(path=path, manifest=_template.manifest, members=_template.members,
                           mean=_template.mean, std=_template.std, family=_template.family,
                           stack_members=_template.stack_members)


@pytest.fixture()
def predictor(bundle: SyntheticBundle) -> Iterator[Predictor]:
    with Predictor.load(bundle.path, "onnxruntime", lanes=1) as loaded:  # lanes: test_lanes.py
        yield loaded


@pytest.fixture(scope="session")
def data() -> tuple[np.ndarray, np.ndarray]:
    """32 raw uint8 images (32, 1, 28, 28) and their labels."""
    return make_data(32, seed=7)
