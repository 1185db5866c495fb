"""A real `edgens serve` process for the server's tests and benchmarks: started on a free loopback port (the
server writes the port it bound into --port-file), logging JSON lines to a file, stopped with SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


class Server:
    """One `edgens serve` process: started with ``args`` (or exactly ``command``, which must write the port to
    ``tmp / "port"``), stopped with SIGTERM."""

    def __init__(self, bundle: Path, tmp: Path, *args: str, command: list[str] | None = None):
        self.port_file = tmp / "port"
        self.log_path = tmp / "serve.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115  (closed in stop)
        command = command or [sys.executable, "-m", "edgens", "serve", str(bundle), "--port", "0", "--port-file",
                              str(self.port_file), *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self.log, env=env)
        deadline = time.monotonic() + 60
        while not self.port_file.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"edgens serve exited with {self.process.returncode}: {self.stderr()}")
            if time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"edgens serve did not start in 60 s: {self.stderr()}")
            time.sleep(0.05)
        ports = self.port_file.read_text().split()
        self.port = int(ports[0])
        self.grpc_port = int(ports[1]) if len(ports) > 1 else None
        self.url = f"http://127.0.0.1:{self.port}"

    def stderr(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def log_entries(self) -> list[dict]:
        return [json.loads(line) for line in self.stderr().splitlines() if line.startswith("{")]

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode


def json_request(x: np.ndarray, parameters: dict | None = None, outputs: list | None = None,
                 nested: bool = False) -> dict:
    """An infer request with the input as JSON data (flat, or ``nested`` lists)."""
    data = x.tolist() if nested else x.reshape(-1).tolist()
    request: dict = {"inputs": [{"name": "x", "datatype": "UINT8", "shape": list(x.shape), "data": data}]}
    if parameters:
        request["parameters"] = parameters
    if outputs:
        request["outputs"] = outputs
    return request


def members_of(bundle, stacks_run: str) -> list[int]:
    """The members a response says it used: those of the stacks it ran (``stacks_run``, comma-separated), once."""
    return list(dict.fromkeys(m for name in stacks_run.split(",") for m in bundle.manifest.stack(name).members))
