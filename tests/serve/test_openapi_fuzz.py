"""Every endpoint of `edgens serve` fuzzed from its OpenAPI description (docs/serve-openapi.yaml) by schemathesis
against a real server: valid and invalid requests alike get an answer below 500, and no answer carries a
traceback. Also checks that the description lists every route the application has."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from bundle_factory import SyntheticBundle
from hypothesis import HealthCheck, settings
from server_process import Server

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (the test extra has it)")

DESCRIPTION = Path(__file__).resolve().parents[2] / "docs" / "serve-openapi.yaml"
schema = schemathesis.openapi.from_path(DESCRIPTION)


@pytest.fixture(scope="module")
def server(served_bundle: SyntheticBundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(served_bundle.path, tmp_path_factory.mktemp("fuzz"), "--no-access-log",
                     "--max-request-bytes", str(1 << 16))
    yield running
    with httpx.Client(base_url=running.url, timeout=30) as http:
        http.post("/v2/systemsharedmemory/unregister")  # any region a fuzzed key happened to name
    assert running.stop() == 0


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_5xx_or_a_traceback(case, server: Server) -> None:
    response = case.call(base_url=server.url, timeout=30)
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
    assert b"Traceback" not in response.content
    content_type = response.headers.get("content-type") or [""]  # schemathesis keeps each header's values
    if response.status_code >= 400 and content_type[0].startswith("application/json"):
        error = response.json().get("error")
        assert isinstance(error, str) and "\n" not in error, response.text[:300]


def test_the_description_lists_every_route() -> None:
    from edgens.serve.app import ServeState, create_app

    class Nothing:  # create_app only keeps the service for its handlers
        model = None

    app = create_app(ServeState(Nothing()))  # type: ignore[arg-type]
    described = set(schema.raw_schema["paths"])
    for route in app.routes:
        path = re.sub(r"\{(\w+)\}", r"{\1}", route.path)
        if "/cudasharedmemory/" in path and path != "/v2/cudasharedmemory/status":
            continue  # the refused extension: its status is described, the rest answer alike
        assert path in described, f"{path} is served but not in {DESCRIPTION.name}"
