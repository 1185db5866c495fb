"""Triton's own load generator, perf_analyzer, against a real `edgens serve`: HTTP and gRPC at concurrency 1 to 4
with a server-side default deadline (perf_analyzer over HTTP cannot send request parameters), and once with
system shared memory. Installed by scripts/install_perf_analyzer.sh (scripts/test.sh runs it, and sets
EDGENS_REQUIRE_PERF_ANALYZER so that CI fails rather than skips without it)."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from bundle_factory import SyntheticBundle
from server_process import Server

MODEL = "model"
DEFAULT = Path(os.environ.get("EDGENS_PERF_VENV", "/opt/edgens-perf-analyzer")) / "bin" / "perf_analyzer"
PERF_ANALYZER = Path(os.environ.get("EDGENS_PERF_ANALYZER", DEFAULT))
THROUGHPUT = re.compile(r"Concurrency: (\d+), throughput: ([0-9.]+) infer/sec, latency (\d+) usec")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(served_bundle: SyntheticBundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if not PERF_ANALYZER.exists():
        message = f"perf_analyzer is not installed at {PERF_ANALYZER} (bash scripts/install_perf_analyzer.sh)"
        if os.environ.get("EDGENS_REQUIRE_PERF_ANALYZER"):
            pytest.fail(message)
        pytest.skip(message)
    running = Server(served_bundle.path, tmp_path_factory.mktemp("perf"), "--grpc-port", "0",
                     "--default-deadline-ms", "5", "--no-access-log")
    yield running
    assert running.stop() == 0


@pytest.mark.parametrize("transport, extra", [("http", []), ("grpc", []),
                                              ("grpc", ["--shared-memory", "system", "--concurrency-range", "1:2"]),
                                              ("http", ["--shared-memory", "system", "--concurrency-range", "1:1"])],
                         ids=["http", "grpc", "grpc-shm", "http-shm"])
def test_perf_analyzer_measures_edgens(server: Server, transport: str, extra: list[str]) -> None:
    port = server.port if transport == "http" else server.grpc_port
    # a bounded sweep: short windows, and a stability band wide enough for a shared 2-core machine
    command = [str(PERF_ANALYZER), "-m", MODEL, "-u", f"127.0.0.1:{port}", "-i", transport,
               "--concurrency-range", "1:4", "--measurement-interval", "500", "--stability-percentage", "500",
               "--max-trials", "4", *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    measured = THROUGHPUT.findall(done.stdout)
    last = int(extra[extra.index("--concurrency-range") + 1].split(":")[1]) if extra else 4
    assert [int(c) for c, _, _ in measured] == list(range(1, last + 1)), done.stdout[-2000:]
    assert all(float(throughput) > 0 for _, throughput, _ in measured)
    assert "Server:" in done.stdout and "compute infer" in done.stdout  # the statistics extension's breakdown
    assert "Unable to" not in done.stdout + done.stderr
