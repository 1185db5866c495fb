"""No client can take members out (issue 28, item 3): against a real `edgens serve`, absurd inputs are refused with
a 400 before any stack runs and leave readiness and every stack untouched, while a genuinely corrupted stack is
still quarantined at once (its self-test confirms the outlier)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from bundle_factory import SyntheticBundle, make_bundle, make_data
from server_process import Server, json_request

MODEL = "model"


@pytest.fixture(scope="module")
def checked_bundle(tmp_path_factory: pytest.TempPathFactory) -> SyntheticBundle:
    """16 members in 4 general stacks, prefix stacks of 8 and 16, outlier thresholds and self-test data."""
    return make_bundle(tmp_path_factory.mktemp("checked") / MODEL, n_members=16, per_stack=4, hidden=8,
                       prefixes=[8, 16], outliers=True, self_test=True)


@pytest.fixture(scope="module")
def client(checked_bundle: SyntheticBundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    server = Server(checked_bundle.path, tmp_path_factory.mktemp("server"), "--allow-fault-injection")
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http
    server.stop()


def _binary(x: np.ndarray, parameters: dict | None = None) -> tuple[bytes, dict[str, str]]:
    header = {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape),
                          "parameters": {"binary_data_size": x.nbytes}}]}
    if parameters:
        header["parameters"] = parameters
    encoded = json.dumps(header).encode()
    return encoded + x.tobytes(), {"Inference-Header-Content-Length": str(len(encoded))}


def test_a_thousand_absurd_requests_change_nothing(client: httpx.Client) -> None:
    absurd = np.full((1, 1, 28, 28), 3e38, dtype=np.float32)
    for i in range(1000):
        body, headers = _binary(absurd * (1 if i % 2 else -1), {"deadline_ms": 50} if i % 3 else None)
        response = client.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers)
        assert response.status_code == 400, response.text
        assert "expected raw values within -255..510" in response.json()["error"]
    ready = client.get("/v2/health/ready").json()
    assert ready["ready"] and ready["members_available"] == 1.0 and ready["unavailable"] == {}
    metrics = client.get("/metrics").text
    assert "edgens_quarantined_stacks 0.0" in metrics
    assert 'edgens_requests_total{outcome="bad_request"} 1000.0' in metrics
    x, _ = make_data(2, seed=3)
    answer = client.post(f"/v2/models/{MODEL}/infer", json=json_request(x)).json()
    assert answer["parameters"]["members_used"] == 16 and answer["parameters"]["failure_count"] == 0


def test_a_corrupted_stack_is_still_quarantined_at_once(client: httpx.Client) -> None:
    x, _ = make_data(4, seed=5)
    assert client.post("/edgens/faults", json={"stack": "prefix-0016", "kind": "flip", "bit": 28,
                                               "row": 1}).status_code == 200
    try:
        first = client.post(f"/v2/models/{MODEL}/infer", json=json_request(x)).json()["parameters"]
        assert "prefix-0016 (outlier" in first["failures"] and first["members_used"] == 12
        ready = client.get("/v2/health/ready").json()
        assert ready["unavailable"]["prefix-0016"].startswith("quarantined: self-test confirmed the outlier")
        after = client.post(f"/v2/models/{MODEL}/infer", json=json_request(x)).json()["parameters"]
        assert after["failure_count"] == 0 and after["members_used"] == 16 and "prefix-0016" not in after["stacks_run"]
    finally:
        client.post("/edgens/faults", json={"clear": True})
        assert client.post("/edgens/retry").json()["available_again"] == ["prefix-0016"]
