"""`edgens serve --grpc-port`: a real server process, driven by the stock `tritonclient.grpc` client (and its own
generated stubs for what that client does not send, such as typed contents); the model configuration and statistics
extensions on both transports; server-side default budgets. Answers are checked against numpy's ensemble of the
members the server says it used."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from bundle_factory import SyntheticBundle, make_data
from server_process import Server, json_request, members_of
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

MODEL = "model"
ROOT = Path(__file__).resolve().parents[2]
TOKEN = "grpc-token-for-tests-0123456789"
DEFAULT_DEADLINE_MS = 250.0


@pytest.fixture(scope="module")
def server(served_bundle: SyntheticBundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(served_bundle.path, tmp_path_factory.mktemp("grpc"), "--grpc-port", "0",
                     "--default-deadline-ms", str(DEFAULT_DEADLINE_MS), "--max-request-bytes", str(1 << 20))
    yield running
    assert running.stop() == 0


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[tgrpc.InferenceServerClient]:
    with tgrpc.InferenceServerClient(f"127.0.0.1:{server.grpc_port}") as grpc_client:
        yield grpc_client


def _input(x: np.ndarray) -> tgrpc.InferInput:
    tensor = tgrpc.InferInput("x", list(x.shape), "UINT8")
    tensor.set_data_from_numpy(x)
    return tensor


def _parameters(result: tgrpc.InferResult) -> dict:
    return {key: getattr(value, value.WhichOneof("parameter_choice"))
            for key, value in result.get_response().parameters.items()}


def test_the_generated_modules_match_the_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools is not installed")
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_grpc.sh")], check=True,
                   env={**os.environ, "OUT": str(tmp_path)})
    for name in ("grpc_service_pb2.py", "grpc_service_pb2_grpc.py"):
        committed = (ROOT / "edgens" / "serve" / "proto" / name).read_text()
        assert (tmp_path / name).read_text() == committed, f"{name} is stale: run scripts/gen_grpc.sh"


def test_the_proto_agrees_with_tritons_on_every_field_it_has() -> None:
    """Wire compatibility: each message edgens defines has Triton's name, and each of its fields Triton's number
    and type (tritonclient's own generated descriptors are the reference)."""
    from tritonclient.grpc import model_config_pb2

    from edgens.serve.proto import grpc_service_pb2 as ours

    theirs = {**service_pb2.DESCRIPTOR.message_types_by_name, **model_config_pb2.DESCRIPTOR.message_types_by_name}

    def check(message, reference) -> None:
        for field in message.fields:
            other = reference.fields_by_name.get(field.name)
            assert other is not None, f"{message.full_name}.{field.name} is not Triton's"
            assert (field.number, field.type, field.is_repeated) == (other.number, other.type, other.is_repeated), \
                f"{message.full_name}.{field.name}"
        for nested in message.nested_types:
            check(nested, reference.nested_types_by_name[nested.name])

    for name, message in ours.DESCRIPTOR.message_types_by_name.items():
        check(message, theirs[name])
    methods = {m.name: m for m in service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods}
    for method in ours.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        reference = methods[method.name]
        assert (method.input_type.full_name, method.output_type.full_name) == \
            (reference.input_type.full_name, reference.output_type.full_name)


def test_health_metadata_config_over_grpc(client: tgrpc.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    metadata = client.get_server_metadata(as_json=True)
    assert metadata["name"] == "edgens" and "model_configuration" in metadata["extensions"]
    model = client.get_model_metadata(MODEL, as_json=True)
    assert model["inputs"] == [{"name": "x", "datatype": "UINT8", "shape": ["-1", "1", "28", "28"]}]
    config = client.get_model_config(MODEL, as_json=True)["config"]
    assert config["max_batch_size"] == 64 and config["input"][0]["dims"] == ["1", "28", "28"]
    assert config["input"][0]["data_type"] == "TYPE_UINT8"
    assert [o["name"] for o in config["output"]] == ["probabilities", "labels", "members_used"]
    policy = config["dynamic_batching"]["default_queue_policy"]
    assert policy["default_timeout_microseconds"] == str(round(DEFAULT_DEADLINE_MS * 1e3))
    assert policy["max_queue_size"] == 64 and policy["allow_timeout_override"]


def test_raw_tensors_and_budgets_give_the_ensemble_numpy_computes(client: tgrpc.InferenceServerClient,
                                                                 served_bundle: SyntheticBundle) -> None:
    x, _ = make_data(5, seed=41)
    for parameters, k in (({"members": 8}, 8), ({"members": 0.25}, 4), ({"deadline_ms": 1000.0}, None)):
        result = client.infer(MODEL, [_input(x)], parameters=parameters, request_id="r1")
        report = _parameters(result)
        used = served_bundle.order[:k] if k is not None else members_of(served_bundle, report["stacks_run"])
        assert report["members_used"] == len(used)
        np.testing.assert_allclose(result.as_numpy("probabilities"), served_bundle.expected(x, used), atol=2e-5)
        assert result.as_numpy("labels").tolist() == served_bundle.expected(x, used).argmax(axis=1).tolist()
        assert result.get_response().id == "r1"


def test_typed_contents_equal_raw_contents(server: Server) -> None:
    x, _ = make_data(3, seed=42)
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        typed = service_pb2.ModelInferRequest(model_name=MODEL)
        tensor = typed.inputs.add(name="x", datatype="UINT8", shape=list(x.shape))
        tensor.contents.uint_contents.extend(x.reshape(-1).tolist())
        typed.parameters["members"].int64_param = 8
        raw = service_pb2.ModelInferRequest(model_name=MODEL, raw_input_contents=[x.tobytes()])
        raw.inputs.add(name="x", datatype="UINT8", shape=list(x.shape))
        raw.parameters["members"].int64_param = 8
        answers = [stub.ModelInfer(request, timeout=30) for request in (typed, raw)]
    probabilities = [np.frombuffer(a.raw_output_contents[0], "<f4").reshape(3, -1) for a in answers]
    np.testing.assert_array_equal(probabilities[0], probabilities[1])
    assert [o.name for o in answers[0].outputs] == ["probabilities", "labels", "members_used"]


def test_a_request_without_a_budget_gets_the_servers_default_on_both_transports(
        server: Server, client: tgrpc.InferenceServerClient) -> None:
    x, _ = make_data(2, seed=43)
    assert _parameters(client.infer(MODEL, [_input(x)]))["budget"] == f"deadline_ms={DEFAULT_DEADLINE_MS}"
    assert _parameters(client.infer(MODEL, [_input(x)], parameters={"members": 4}))["budget"] == "members=4"
    with httpx.Client(base_url=server.url, timeout=30) as http:
        body = http.post(f"/v2/models/{MODEL}/infer", json=json_request(x)).json()
        assert body["parameters"]["budget"] == f"deadline_ms={DEFAULT_DEADLINE_MS}"
        assert body["parameters"]["deadline_ms"] == DEFAULT_DEADLINE_MS
        body = http.post(f"/v2/models/{MODEL}/infer", json=json_request(x, {"members": 0.5})).json()
        assert body["parameters"]["budget"] == "members=0.5"


@pytest.mark.parametrize("case", ["unknown model", "wrong shape", "unknown parameter", "bad budget", "both datas",
                                  "no data", "wrong version"])
def test_bad_requests_get_the_grpc_status_that_fits(server: Server, case: str) -> None:
    x, _ = make_data(1, seed=44)
    request = service_pb2.ModelInferRequest(model_name=MODEL, raw_input_contents=[x.tobytes()])
    tensor = request.inputs.add(name="x", datatype="UINT8", shape=list(x.shape))
    expected, words = grpc.StatusCode.INVALID_ARGUMENT, ""
    if case == "unknown model":
        request.model_name, expected, words = "nope", grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"
    elif case == "wrong version":
        request.model_version, expected, words = "7", grpc.StatusCode.NOT_FOUND, "unknown version '7'"
    elif case == "wrong shape":
        del tensor.shape[:]
        tensor.shape.extend([1, 27, 28])
        words = "does not fit the model"
    elif case == "unknown parameter":
        request.parameters["speed"].string_param = "fast"
        words = "unknown parameter(s) 'speed'"
    elif case == "bad budget":
        request.parameters["members"].double_param = 1.5
        words = "members: expected a fraction in (0, 1]"
    elif case == "both datas":
        tensor.contents.uint_contents.extend([0] * 784)
        words = "give raw_input_contents or contents, not both"
    elif case == "no data":
        del request.raw_input_contents[:]
        words = "no data"
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        with pytest.raises(grpc.RpcError) as caught:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert caught.value.code() == expected, caught.value.details()
    details = caught.value.details()
    assert words in details and "\n" not in details and "Traceback" not in details


def test_a_stream_answers_each_request_in_order_and_reports_errors(client: tgrpc.InferenceServerClient,
                                                                   served_bundle: SyntheticBundle) -> None:
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        xs = [make_data(2, seed=50 + i)[0] for i in range(3)]
        for i, x in enumerate(xs):
            client.async_stream_infer(MODEL, [_input(x)], request_id=f"s{i}", parameters={"members": 8})
        bad = tgrpc.InferInput("x", [1, 3, 3], "UINT8")
        bad.set_data_from_numpy(np.zeros((1, 3, 3), np.uint8))
        client.async_stream_infer(MODEL, [bad], request_id="bad")
        got = [answers.get(timeout=30) for _ in range(4)]
    finally:
        client.stop_stream()
    order = served_bundle.order[:8]
    for i, (result, error) in enumerate(got[:3]):
        assert error is None and result.get_response().id == f"s{i}"
        np.testing.assert_allclose(result.as_numpy("probabilities"), served_bundle.expected(xs[i], order), atol=2e-5)
    assert got[3][0] is None and "does not fit the model" in str(got[3][1])


def test_statistics_count_what_was_answered_and_refused(server: Server, client: tgrpc.InferenceServerClient) -> None:
    def stats() -> dict:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            body = http.get(f"/v2/models/{MODEL}/stats").json()
            assert http.get("/v2/models/stats").json()["model_stats"][0]["name"] == MODEL
        return body["model_stats"][0]

    before = stats()
    x, _ = make_data(3, seed=45)
    latencies = []
    for _ in range(4):
        start = time.perf_counter()
        client.infer(MODEL, [_input(x)], parameters={"members": 8})
        latencies.append((time.perf_counter() - start) * 1e9)
    with pytest.raises(InferenceServerException):
        client.infer(MODEL, [_input(x)], parameters={"members": 99})
    after = stats()
    grpc_stats = client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    assert int(grpc_stats["inference_count"]) == after["inference_count"]
    assert after["inference_count"] - before["inference_count"] == 12
    assert after["execution_count"] - before["execution_count"] == 4
    phases = after["inference_stats"]
    assert phases["success"]["count"] - before["inference_stats"]["success"]["count"] == 4
    assert phases["fail"]["count"] - before["inference_stats"]["fail"]["count"] == 1
    # the phases add up to the whole, and the server's time of a request is within the client's
    total = sum(phases[key]["ns"] - before["inference_stats"][key]["ns"]
                for key in ("queue", "compute_input", "compute_infer", "compute_output"))
    success_ns = phases["success"]["ns"] - before["inference_stats"]["success"]["ns"]
    assert abs(total - success_ns) <= 4 * 4  # rounding to whole nanoseconds, per phase and request
    assert 0 < success_ns < sum(latencies)
    assert after["last_inference"] >= before["last_inference"] > 0 or before["inference_count"] == 0
    # the access log has each of them, on its transport
    lines = [e for e in server.log_entries() if e.get("event") == "infer" and e.get("transport") == "grpc"]
    assert any(e["outcome"] == "ok" and e["budget"] == "members=8" for e in lines)
    assert any(e["outcome"] == "bad_request" and "members" in e["error"] for e in lines)


def test_config_and_stats_with_a_stock_http_client(server: Server) -> None:
    http = thttp.InferenceServerClient(f"127.0.0.1:{server.port}")
    config = http.get_model_config(MODEL)
    assert config["name"] == MODEL and config["max_batch_size"] == 64 and config["input"][0]["dims"] == [1, 28, 28]
    assert config["parameters"]["default_budget"]["string_value"] == f"deadline_ms={DEFAULT_DEADLINE_MS}"
    assert http.get_inference_statistics(MODEL)["model_stats"][0]["version"] == "1"
    with pytest.raises(InferenceServerException, match="unknown model"):
        http.get_model_config("nope")


def test_the_token_guards_grpc_too(served_bundle: SyntheticBundle, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    server = Server(served_bundle.path, tmp_path, "--grpc-port", "0", "--token-file", str(token_file))
    try:
        address = f"127.0.0.1:{server.grpc_port}"
        x, _ = make_data(1, seed=46)
        with tgrpc.InferenceServerClient(address) as anonymous:
            assert anonymous.is_server_live() and anonymous.is_server_ready()  # probes are open
            for call in (partial(anonymous.infer, MODEL, [_input(x)]), partial(anonymous.get_model_config, MODEL),
                         partial(anonymous.get_model_metadata, MODEL)):
                with pytest.raises(InferenceServerException) as caught:
                    call()
                assert caught.value.status() == "StatusCode.UNAUTHENTICATED" and "no authorization" in str(caught.value)
            with pytest.raises(InferenceServerException, match="bearer token is wrong"):
                anonymous.infer(MODEL, [_input(x)], headers={"authorization": "Bearer wrong"})
            result = anonymous.infer(MODEL, [_input(x)], headers={"authorization": f"Bearer {TOKEN}"})
            assert result.as_numpy("probabilities").shape == (1, 10)
    finally:
        assert server.stop() == 0


def test_a_full_queue_and_a_drain_get_their_grpc_status(served_bundle: SyntheticBundle, tmp_path: Path) -> None:
    server = Server(served_bundle.path, tmp_path, "--grpc-port", "0", "--allow-fault-injection", "--max-queue", "1")
    address = f"127.0.0.1:{server.grpc_port}"
    x, _ = make_data(1, seed=47)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        # every call of the all-members stack sleeps: the first request runs, one waits, the rest are refused
        http.post("/edgens/faults", json={"stack": "prefix-0016", "kind": "sleep", "sleep_ms": 1500})
    results: list = [None] * 4

    def call(i: int) -> None:
        with tgrpc.InferenceServerClient(address) as own:
            try:
                results[i] = own.infer(MODEL, [_input(x)]).as_numpy("members_used").tolist()
            except InferenceServerException as err:
                results[i] = err

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    refused: list = []
    deadline = time.monotonic() + 30
    while len(refused) < 2 and time.monotonic() < deadline:  # two must be refused while one runs and one waits
        refused = [r for r in results if isinstance(r, InferenceServerException)]
        time.sleep(0.01)
    assert [r.status() for r in refused] == ["StatusCode.RESOURCE_EXHAUSTED"] * 2
    assert all("queue is full" in str(r) for r in refused)
    server.process.send_signal(signal.SIGTERM)  # one in flight, one queued: both answered; a new one refused
    with tgrpc.InferenceServerClient(address) as late:
        deadline = time.monotonic() + 30
        while True:
            try:
                late.infer(MODEL, [_input(x)])
            except InferenceServerException as err:
                if err.status() == "StatusCode.UNAVAILABLE":
                    assert "draining" in str(err)
                    break
                assert err.status() == "StatusCode.RESOURCE_EXHAUSTED"  # the queue is still full: try again
            assert time.monotonic() < deadline
    for thread in threads:
        thread.join(60)
    assert sum(r == [16] for r in results) == 2
    assert server.stop() == 0


def test_a_busy_grpc_port_fails_in_one_line(served_bundle: SyntheticBundle, tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "edgens", "serve", str(served_bundle.path), "--port", "0",
                               "--grpc-port", str(port)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
