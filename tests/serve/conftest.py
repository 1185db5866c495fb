"""Fixtures for the server's tests: real `edgens serve` processes on free loopback ports, over a real bundle built
without torch (tests/runtime/bundle_factory.py), and clients that speak to them over HTTP."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

RUNTIME_TESTS = Path(__file__).resolve().parents[1] / "runtime"
if str(RUNTIME_TESTS) not in sys.path:
    sys.path.insert(0, str(RUNTIME_TESTS))

from bundle_factory import SyntheticBundle, make_bundle  # noqa: E402
from server_process import Server  # noqa: E402

pytest.importorskip("starlette", reason="the serve extra is not installed (pip install 'edgens[serve]')")


@pytest.fixture(scope="session")
def served_bundle(tmp_path_factory: pytest.TempPathFactory) -> SyntheticBundle:
    """16 members in 4 general stacks of 4, prefix stacks of 8 and 16, a specialist for class 3, outlier
    thresholds (silent-fault detection)."""
    return make_bundle(tmp_path_factory.mktemp("served") / "model", n_members=16, per_stack=4, hidden=8,
                       prefixes=[8, 16], outliers=True)


@pytest.fixture(scope="module")
def server(served_bundle: SyntheticBundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server for the protocol tests: fault injection on, a 1 MiB request limit."""
    running = Server(served_bundle.path, tmp_path_factory.mktemp("server"), "--allow-fault-injection",
                     "--max-request-bytes", str(1 << 20), "--max-batch", "64")
    yield running
    running.stop()
