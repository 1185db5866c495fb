"""Triton's system shared-memory extension in `edgens serve`, driven by stock tritonclient.utils.shared_memory regions
with tritonclient.http and tritonclient.grpc: answers equal to the same requests sent inline, every bound checked,
unknown regions refused, a region unregistered while a request uses it, the token guarding registration."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
import tritonclient.utils.shared_memory as shm
from bundle_factory import SyntheticBundle, make_data
from server_process import Server
from tritonclient.utils import InferenceServerException

MODEL = "model"
CLIENTS = {"http": thttp, "grpc": tgrpc}


@pytest.fixture(scope="module")
def server(served_bundle: SyntheticBundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(served_bundle.path, tmp_path_factory.mktemp("shm"), "--grpc-port", "0",
                     "--allow-fault-injection")
    yield running
    assert running.stop() == 0


class Regions:
    """Shared-memory objects made with tritonclient's utilities, destroyed at the end."""

    def __init__(self) -> None:
        self.handles: list = []

    def make(self, size: int) -> tuple[str, object]:
        key = f"/edgens-test-{uuid.uuid4().hex[:12]}"
        handle = shm.create_shared_memory_region(key.strip("/"), key, size)
        self.handles.append(handle)
        return key, handle

    def close(self) -> None:
        for handle in self.handles:
            shm.destroy_shared_memory_region(handle)


@pytest.fixture
def regions() -> Iterator[Regions]:
    made = Regions()
    yield made
    made.close()


def _client(server: Server, transport: str):
    module = CLIENTS[transport]
    port = server.port if transport == "http" else server.grpc_port
    return module, module.InferenceServerClient(f"127.0.0.1:{port}")


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_inputs_and_outputs_in_shared_memory_equal_inline_answers(server: Server, regions: Regions,
                                                                  served_bundle: SyntheticBundle,
                                                                  transport: str) -> None:
    module, client = _client(server, transport)
    x, _ = make_data(3, seed=61)
    in_key, in_handle = regions.make(x.nbytes + 64)
    out_key, out_handle = regions.make(3 * 10 * 4 + 16)
    shm.set_shared_memory_region(in_handle, [x], offset=64)  # the input 64 bytes into its object
    client.register_system_shared_memory("in", in_key, x.nbytes, offset=64)
    client.register_system_shared_memory("out", out_key, 3 * 10 * 4 + 16)
    try:
        status = client.get_system_shared_memory_status()
        names = sorted(r["name"] for r in status) if transport == "http" else sorted(status.regions)
        assert names == ["in", "out"]
        tensor = module.InferInput("x", list(x.shape), "UINT8")
        tensor.set_shared_memory("in", x.nbytes)
        placed = module.InferRequestedOutput("probabilities")
        placed.set_shared_memory("out", 3 * 10 * 4, offset=16)
        result = client.infer(MODEL, [tensor], outputs=[placed, module.InferRequestedOutput("members_used")],
                              parameters={"members": 8})
        in_shared = shm.get_contents_as_numpy(out_handle, np.float32, [3, 10], offset=16)
        inline = module.InferInput("x", list(x.shape), "UINT8")
        inline.set_data_from_numpy(x)
        plain = client.infer(MODEL, [inline], parameters={"members": 8})
        np.testing.assert_array_equal(in_shared, plain.as_numpy("probabilities"))
        np.testing.assert_allclose(in_shared, served_bundle.expected(x, served_bundle.order[:8]), atol=2e-5)
        assert result.as_numpy("members_used").tolist() == [8, 8, 8]
        output = result.get_output("probabilities")
        if transport == "http":  # no data in the response (and no parameters: the C++ client reads any as binary)
            assert "data" not in output and "parameters" not in output
        else:  # an empty raw entry keeps the outputs' order; the parameters say where the data went
            parameters = {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in output.parameters.items()}
            assert parameters["shared_memory_region"] == "out" and parameters["shared_memory_byte_size"] == 120
            assert result.get_response().raw_output_contents[0] == b""
    finally:
        client.unregister_system_shared_memory()
    assert not client.get_system_shared_memory_status() if transport == "http" else \
        not client.get_system_shared_memory_status().regions


@pytest.mark.parametrize("case", ["offset past the region", "size past the region", "size unlike the shape",
                                  "unknown region", "output too small"])
@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_every_bound_is_checked(server: Server, regions: Regions, transport: str, case: str) -> None:
    module, client = _client(server, transport)
    x, _ = make_data(1, seed=62)
    key, handle = regions.make(4096)
    shm.set_shared_memory_region(handle, [x])
    client.register_system_shared_memory("r", key, 1024)  # 1,024 of the object's 4,096 bytes
    try:
        tensor = module.InferInput("x", list(x.shape), "UINT8")
        outputs = None
        size, offset, words = x.nbytes, 0, ""
        if case == "offset past the region":
            offset, words = 512, "do not fit shared-memory region 'r' of 1024 bytes"
        elif case == "size past the region":
            tensor = module.InferInput("x", [2, 1, 28, 28], "UINT8")
            size, words = 2 * 784, "do not fit shared-memory region 'r' of 1024 bytes"
        elif case == "size unlike the shape":
            size, words = 700, "shared_memory_byte_size 700 does not match shape"
        elif case == "unknown region":
            words = "no shared-memory region 'other' is registered"
        elif case == "output too small":
            placed = module.InferRequestedOutput("probabilities")
            placed.set_shared_memory("r", 8, offset=800)
            outputs, words = [placed], "the output has 40 bytes, more than the shared_memory_byte_size 8"
        tensor.set_shared_memory("other" if case == "unknown region" else "r", size, offset=offset)
        with pytest.raises(InferenceServerException) as caught:
            client.infer(MODEL, [tensor], outputs=outputs)
        assert words in str(caught.value), str(caught.value)
        assert (caught.value.status() in ("400", "StatusCode.INVALID_ARGUMENT")), caught.value.status()
    finally:
        client.unregister_system_shared_memory()


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_registration_is_checked(server: Server, regions: Regions, tmp_path: Path, transport: str) -> None:
    _, client = _client(server, transport)
    key, _ = regions.make(256)
    link = Path("/dev/shm") / f"edgens-test-link-{uuid.uuid4().hex[:8]}"
    os.symlink(Path("/dev/shm") / key.strip("/"), link)
    try:
        cases = [(("big", key, 512, 0), "exceed the 256 bytes of shared-memory object"),
                 (("off", key, 200, 100), "exceed the 256 bytes"),
                 (("none", "/edgens-no-such-object", 16, 0), "cannot open shared-memory object"),
                 (("up", "/../etc/passwd", 16, 0), "expected a shared-memory object's name"),
                 (("link", "/" + link.name, 16, 0), "cannot open shared-memory object")]
        for (name, bad_key, size, offset), words in cases:
            with pytest.raises(InferenceServerException) as caught:
                client.register_system_shared_memory(name, bad_key, size, offset=offset)
            assert words in str(caught.value), (name, str(caught.value))
        client.register_system_shared_memory("once", key, 64)
        with pytest.raises(InferenceServerException, match="already registered"):
            client.register_system_shared_memory("once", key, 64)
        with pytest.raises(InferenceServerException, match="no shared-memory region 'never'"):
            client.unregister_system_shared_memory("never")
    finally:
        client.unregister_system_shared_memory()
        link.unlink()


def test_a_region_unregistered_while_a_request_uses_it_still_gets_its_answer(server: Server, regions: Regions,
                                                                            served_bundle: SyntheticBundle) -> None:
    _, client = _client(server, "http")
    x, _ = make_data(2, seed=63)
    out_key, out_handle = regions.make(80)
    client.register_system_shared_memory("late", out_key, 80)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        http.post("/edgens/faults", json={"stack": "prefix-0008", "kind": "hold"})
        try:
            answers: list = []

            def call() -> None:
                tensor = thttp.InferInput("x", list(x.shape), "UINT8")
                tensor.set_data_from_numpy(x)
                placed = thttp.InferRequestedOutput("probabilities")
                placed.set_shared_memory("late", 80)
                own = thttp.InferenceServerClient(f"127.0.0.1:{server.port}")
                answers.append(own.infer(MODEL, [tensor], outputs=[placed], parameters={"members": 8}))

            thread = threading.Thread(target=call)
            thread.start()
            while "edgens_requests_in_flight 1.0" not in http.get("/metrics").text:
                assert thread.is_alive()
            client.unregister_system_shared_memory("late")  # while the request holds it
            assert client.get_system_shared_memory_status() == []
        finally:
            http.post("/edgens/faults", json={"stack": "prefix-0008", "clear": True})
        thread.join(30)
    assert len(answers) == 1
    np.testing.assert_allclose(shm.get_contents_as_numpy(out_handle, np.float32, [2, 10]),
                               served_bundle.expected(x, served_bundle.order[:8]), atol=2e-5)


def test_the_token_guards_registration(served_bundle: SyntheticBundle, regions: Regions, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("shm-token-for-tests-0123456789\n")
    token_file.chmod(0o600)
    server = Server(served_bundle.path, tmp_path, "--grpc-port", "0", "--token-file", str(token_file))
    try:
        key, _ = regions.make(64)
        for transport in ("http", "grpc"):
            _, client = _client(server, transport)
            with pytest.raises(InferenceServerException, match="unauthorized"):
                client.register_system_shared_memory("r", key, 64)
            with pytest.raises(InferenceServerException, match="unauthorized"):
                client.get_system_shared_memory_status()
            headers = {"authorization": "Bearer shm-token-for-tests-0123456789"}
            client.register_system_shared_memory("r", key, 64, headers=headers)
            client.unregister_system_shared_memory(headers=headers)
    finally:
        assert server.stop() == 0
