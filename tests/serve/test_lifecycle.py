"""`edgens serve` processes around requests: bearer tokens, refusing to bind beyond loopback without one, a full
queue answered with 503 at once, and SIGTERM draining the requests in flight before exiting with status 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import tritonclient.http as triton
from bundle_factory import SyntheticBundle, make_data
from server_process import Server, json_request

MODEL = "model"


def _in_threads(count: int, call) -> list:
    results: list = [None] * count

    def run(i: int) -> None:
        try:
            results[i] = call(i)
        except Exception as err:  # noqa: BLE001  (the test looks at it)
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    return [threads, results]


def _serve_command(bundle: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgens", "serve", str(bundle), *args], capture_output=True,
                          text=True, timeout=60)


def test_a_token_guards_everything_but_the_health_checks(served_bundle: SyntheticBundle, tmp_path: Path) -> None:
    token = "s3cret-token-for-tests-0123456789"
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    server = Server(served_bundle.path, tmp_path, "--token-file", str(token_file))
    try:
        x, _ = make_data(2, seed=31)
        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert http.get("/v2/health/live").status_code == 200
            assert http.get("/v2/health/ready").status_code == 200
            for path in ("/v2", f"/v2/models/{MODEL}", "/metrics"):
                response = http.get(path)
                assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer", path
                assert "no Authorization header" in response.json()["error"]
            wrong = http.post(f"/v2/models/{MODEL}/infer", json=json_request(x), headers={"Authorization": "Bearer no"})
            assert wrong.status_code == 401 and "token is wrong" in wrong.json()["error"]
            right = {"Authorization": f"Bearer {token}"}
            assert http.post(f"/v2/models/{MODEL}/infer", json=json_request(x), headers=right).status_code == 200
            assert 'edgens_requests_total{outcome="unauthorized"} 1.0' in http.get("/metrics", headers=right).text
        client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
        tensor = triton.InferInput("x", list(x.shape), "UINT8")
        tensor.set_data_from_numpy(x)
        result = client.infer(MODEL, [tensor], headers=right)
        assert result.as_numpy("members_used").tolist() == [16, 16]
        client.close()
    finally:
        assert server.stop() == 0


def test_binding_beyond_loopback_needs_a_token(served_bundle: SyntheticBundle, tmp_path: Path) -> None:
    result = _serve_command(served_bundle.path, "--host", "0.0.0.0", "--port", "0")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("Error: --host 0.0.0.0 is reachable from other "
                                                             "machines: give --token-file FILE")
    short = tmp_path / "short"
    short.write_text("abc")
    result = _serve_command(served_bundle.path, "--host", "0.0.0.0", "--port", "0", "--token-file", str(short))
    assert result.returncode == 2 and "at least 16 characters" in result.stderr
    result = _serve_command(served_bundle.path, "--token-file", str(tmp_path / "missing"))
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_a_busy_port_fails_in_one_line(served_bundle: SyntheticBundle, tmp_path: Path) -> None:
    server = Server(served_bundle.path, tmp_path)
    try:
        result = _serve_command(served_bundle.path, "--port", str(server.port))
        assert result.returncode == 2
        assert f"cannot listen on 127.0.0.1:{server.port}" in result.stderr.strip().splitlines()[-1]
    finally:
        server.stop()


def test_a_full_queue_is_refused_at_once(served_bundle: SyntheticBundle, tmp_path: Path) -> None:
    server = Server(served_bundle.path, tmp_path, "--allow-fault-injection", "--max-queue", "2")
    try:
        x, _ = make_data(1, seed=32)
        with httpx.Client(base_url=server.url, timeout=30) as http:
            http.post("/edgens/faults", json={"stack": "prefix-0016", "kind": "sleep", "sleep_ms": 400})

        def call(i: int) -> tuple[int, float, dict]:
            with httpx.Client(base_url=server.url, timeout=30) as http:
                start = time.perf_counter()
                response = http.post(f"/v2/models/{MODEL}/infer", json=json_request(x))
                return response.status_code, time.perf_counter() - start, response.json()

        threads, results = _in_threads(8, call)
        for thread in threads:
            thread.join(60)
        statuses = sorted(r[0] for r in results)
        refused = [r for r in results if r[0] == 503]
        # one runs (400 ms), two wait behind it, the rest are refused
        assert 3 <= statuses.count(200) and len(refused) >= 3, statuses
        assert all(r[1] < 0.3 and "queue is full (2 requests waiting)" in r[2]["error"] for r in refused)
        with httpx.Client(base_url=server.url, timeout=30) as http:
            metrics = http.get("/metrics").text
        assert f'edgens_requests_total{{outcome="overloaded"}} {float(len(refused))}' in metrics
    finally:
        assert server.stop() == 0


def test_a_full_queue_refuses_before_the_body_is_read(served_bundle: SyntheticBundle, tmp_path: Path) -> None:
    """One request held in a stack, one waiting (--max-queue 1): a third that sends its headers and never its body
    is answered 503 with Retry-After at once; then the held ones are answered."""
    server = Server(served_bundle.path, tmp_path, "--allow-fault-injection", "--max-queue", "1")
    try:
        x, _ = make_data(1, seed=33)
        def infer(i: int) -> int:
            return httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=json_request(x), timeout=60).status_code

        with httpx.Client(base_url=server.url, timeout=30) as http:
            http.post("/edgens/faults", json={"stack": "prefix-0016", "kind": "hold"})
            held, first = _in_threads(1, infer)  # one at a time: two waiting together would be merged into one call
            _wait_until(lambda: _gauge(http, "edgens_requests_in_flight") == 1)
            waiting, second = _in_threads(1, infer)
            _wait_until(lambda: _gauge(http, "edgens_queue_depth") == 1)
            head = (f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                    f"Content-Length: 100000\r\n\r\n").encode()
            with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
                sock.sendall(head)  # and no body
                with sock.makefile("rb") as reader:
                    status = reader.readline()
                    headers = [line.decode().strip().lower() for line in iter(reader.readline, b"\r\n")]
                    length = next(int(h.split(":")[1]) for h in headers if h.startswith("content-length"))
                    error = json.loads(reader.read(length))["error"]
            assert status.split()[1] == b"503" and "retry-after: 1" in headers, (status, headers)
            assert "queue is full (1 requests waiting)" in error
            http.post("/edgens/faults", json={"stack": "prefix-0016", "clear": True})
        for thread in held + waiting:
            thread.join(60)
        assert first + second == [200, 200]
    finally:  # released (again) so that the server can drain even when an assertion failed
        httpx.post(f"{server.url}/edgens/faults", json={"stack": "prefix-0016", "clear": True}, timeout=30)
        assert server.stop() == 0


def test_connections_beyond_the_bound_get_one_503_and_are_closed(served_bundle: SyntheticBundle,
                                                                    tmp_path: Path) -> None:
    server = Server(served_bundle.path, tmp_path, "--max-connections", "2")
    try:
        kept = [httpx.Client(base_url=server.url, timeout=30) for _ in range(2)]
        assert all(client.get("/v2/health/live").status_code == 200 for client in kept)  # two held open
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock, \
                sock.makefile("rb") as reader:
            answer = reader.read()  # the whole answer, then the server closes: nothing was sent
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in head.lower(), head
        assert "2 connections open" in json.loads(body)["error"]
        kept[0].close()  # one leaves: a new one is served
        _wait_until(lambda: httpx.get(f"{server.url}/v2/health/live", timeout=5).status_code == 200)
        kept[1].close()
    finally:
        assert server.stop() == 0


def test_sigterm_answers_the_requests_in_flight_then_exits_0(served_bundle: SyntheticBundle, tmp_path: Path) -> None:
    server = Server(served_bundle.path, tmp_path, "--allow-fault-injection")
    x, _ = make_data(1, seed=33)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        # each call of the stack sleeps long enough for the checks below to happen while requests are in flight
        http.post("/edgens/faults", json={"stack": "prefix-0016", "kind": "sleep", "sleep_ms": 1500})

        def call(i: int) -> int:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                return client.post(f"/v2/models/{MODEL}/infer", json=json_request(x)).status_code

        threads, results = _in_threads(4, call)
        _wait_until(lambda: _gauge(http, "edgens_requests_in_flight") + _gauge(http, "edgens_queue_depth") == 4)
    server.process.send_signal(signal.SIGTERM)  # all four in flight: one in the sleeping stack, three queued
    _wait_until(lambda: not _accepts(server.url))  # no longer accepting connections, while it drains
    assert all(thread.is_alive() for thread in threads)
    for thread in threads:
        thread.join(60)
    assert results == [200, 200, 200, 200]
    assert server.stop() == 0
    events = [entry.get("event") for entry in server.log_entries()]
    assert events.index("draining") < events.index("stopped")
    assert sum(e == "infer" for e in events[events.index("draining"):]) == 4


def test_serve_help_names_its_options() -> None:
    result = subprocess.run([sys.executable, "-m", "edgens", "serve", "--help"], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0
    for option in ("--max-batch", "--max-queue", "--token-file", "--insecure", "--min-available",
                   "--stack-timeout-ms", "--max-request-bytes", "--allow-fault-injection"):
        assert option in result.stdout


def test_the_server_modules_import_without_torch() -> None:
    code = ("import sys; sys.modules['torch'] = None\n"
            "import edgens.serve.server, edgens.serve.app, edgens.cli.serve_cmd\n"
            "assert 'onnx' not in sys.modules, 'the server imported onnx'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_the_printed_systemd_unit_runs_this_server(served_bundle: SyntheticBundle, tmp_path: Path) -> None:
    import configparser
    import shlex

    port_file = tmp_path / "port"
    printed = _serve_command(served_bundle.path, "--port", "0", "--port-file", str(port_file), "--max-batch", "16",
                             "--no-access-log", "--drain-timeout-s", "5", "--systemd-unit")
    assert printed.returncode == 0, printed.stderr
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # systemd's keys are case-sensitive
    unit.read_string(printed.stdout)
    assert unit["Install"]["WantedBy"] == "multi-user.target" and unit["Service"]["KillSignal"] == "SIGTERM"
    assert unit["Service"]["TimeoutStopSec"] == "15" and unit["Service"]["Type"] == "exec"
    command = shlex.split(unit["Service"]["ExecStart"].replace("%%", "%"))
    assert command[:4] == [sys.executable, "-m", "edgens", "serve"]
    assert command[4:] == [str(served_bundle.path.absolute()), "--port", "0", "--max-batch", "16",
                           "--drain-timeout-s", "5.0", "--no-access-log", "--port-file", str(port_file)]
    server = Server(served_bundle.path, tmp_path, command=command)  # what systemd would start
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert http.get("/v2/health/ready").status_code == 200
            x, _ = make_data(2, seed=5)
            assert http.post(f"/v2/models/{MODEL}/infer", json=json_request(x)).status_code == 200
    finally:
        assert server.stop() == 0  # systemctl stop sends SIGTERM: drained, exit 0
    missing = _serve_command(tmp_path / "nowhere", "--systemd-unit")
    assert missing.returncode == 2 and missing.stdout == "" and "nowhere" in missing.stderr


def test_unit_arguments_are_quoted_for_systemd() -> None:
    from edgens.cli.systemd_unit import quote
    from edgens.errors import ConfigError

    assert (quote("/srv/my bundle"), quote("50%"), quote("/srv/b-1.2")) == ('"/srv/my bundle"', "50%%", "/srv/b-1.2")
    for bad in ("/srv/$HOME", 'a"b', "a\\b"):
        with pytest.raises(ConfigError, match="cannot write .* into a systemd unit"):
            quote(bad)


def test_metrics_name_the_power_mode_and_follow_a_change(served_bundle: SyntheticBundle, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    root = tmp_path / "orin-nano"
    shutil.copytree(Path(__file__).resolve().parents[1] / "fixtures" / "devices" / "orin-nano-super-jp62", root)
    monkeypatch.setenv("EDGENS_SYSTEM_ROOT", str(root))  # the server reads this copy as its device
    server = Server(served_bundle.path, tmp_path, "--no-access-log")
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            metrics = http.get("/metrics").text
            assert 'edgens_power_mode{mode="25W"} 1.0' in metrics and "edgens_latency_table 0.0" in metrics
            (root / "var/lib/nvpmodel/status").write_text("pmode:0002\n")  # sudo nvpmodel -m 2 while it runs
            deadline = time.monotonic() + 10  # the mode is read at most every 2 s
            while 'mode="MAXN_SUPER"' not in (metrics := http.get("/metrics").text) and time.monotonic() < deadline:
                time.sleep(0.25)
            assert 'edgens_power_mode{mode="MAXN_SUPER"} 1.0' in metrics and 'mode="25W"' not in metrics
    finally:
        assert server.stop() == 0
    assert any("power mode changed from 25W to MAXN_SUPER" in line for line in server.stderr().splitlines())


def _wait_until(condition: Callable[[], bool], limit_s: float = 30.0) -> None:
    """Poll ``condition`` until it holds (a test fails after ``limit_s``, far beyond what it needs)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        time.sleep(0.005)


def _gauge(http: httpx.Client, name: str) -> float:
    line = next(line for line in http.get("/metrics").text.splitlines() if line.startswith(f"{name} "))
    return float(line.split()[1])


def _accepts(url: str) -> bool:
    try:
        httpx.get(f"{url}/v2/health/live", timeout=5)
    except httpx.TransportError:
        return False
    return True


def _exchange(reader, sock: socket.socket, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send one raw HTTP request on ``sock`` and read its response: (status, headers, body)."""
    sock.sendall(request)
    status = int(reader.readline().split()[1])
    headers = dict(line.decode().strip().lower().split(": ", 1) for line in iter(reader.readline, b"\r\n"))
    return status, headers, reader.read(int(headers["content-length"]))


def test_refusals_under_overload_keep_the_connection_and_the_token_still_comes_first(
        served_bundle: SyntheticBundle, tmp_path: Path) -> None:
    """An infer request the service refuses from its headers is answered by the server's protocol without starting
    the application: its body is dropped and the connection serves the next request; one without the token still
    gets 401; one that asks to close the connection is answered and closed."""
    token = "s3cret-token-for-tests-0123456789"
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    server = Server(served_bundle.path, tmp_path, "--allow-fault-injection", "--max-queue", "1", "--token-file",
                    str(token_file))
    auth = {"Authorization": f"Bearer {token}"}
    try:
        x, _ = make_data(1, seed=35)
        body = json.dumps(json_request(x)).encode()

        def infer(i: int) -> int:
            return httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=body, headers=auth,
                              timeout=60).status_code

        def raw(extra: str = "", authorised: bool = True) -> bytes:
            head = (f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n{extra}")
            return (head + (f"Authorization: Bearer {token}\r\n" if authorised else "") + "\r\n").encode() + body

        with httpx.Client(base_url=server.url, timeout=30, headers=auth) as http:
            http.post("/edgens/faults", json={"stack": "prefix-0016", "kind": "hold"})
            held, first = _in_threads(1, infer)
            _wait_until(lambda: _gauge(http, "edgens_requests_in_flight") == 1)
            waiting, second = _in_threads(1, infer)
            _wait_until(lambda: _gauge(http, "edgens_queue_depth") == 1)
            with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock, \
                    sock.makefile("rb") as reader:
                status, _, content = _exchange(reader, sock, raw(authorised=False))
                assert status == 401, content
                status, headers, content = _exchange(reader, sock, raw())
                assert status == 503 and headers["retry-after"] == "1", (status, headers)
                assert "queue is full (1 requests waiting)" in json.loads(content)["error"]
                assert "connection" not in headers
                assert "date" not in headers  # answered by the protocol: the application's answers carry uvicorn's
                with socket.create_connection(("127.0.0.1", server.port), timeout=30) as closing, \
                        closing.makefile("rb") as closing_reader:
                    status, headers, _ = _exchange(closing_reader, closing, raw("Connection: close\r\n"))
                    assert status == 503 and headers["connection"] == "close"
                    assert closing_reader.read() == b""  # closed by the server
                http.post("/edgens/faults", json={"stack": "prefix-0016", "clear": True})
                for thread in held + waiting:
                    thread.join(60)
                assert first + second == [200, 200]
                live = b"GET /v2/health/live HTTP/1.1\r\nHost: test\r\n\r\n"
                status, _, content = _exchange(reader, sock, live)  # the refused request's body was dropped
                assert status == 200 and json.loads(content) == {"live": True}
                status, _, content = _exchange(reader, sock, raw())  # and infer requests are served again
                assert status == 200 and json.loads(content)["outputs"], content
            metrics = http.get("/metrics").text
        assert 'edgens_requests_total{outcome="overloaded"} 2.0' in metrics
        assert 'edgens_requests_total{outcome="unauthorized"} 1.0' in metrics
    finally:
        httpx.post(f"{server.url}/edgens/faults", json={"stack": "prefix-0016", "clear": True}, headers=auth,
                   timeout=30)
        assert server.stop() == 0
