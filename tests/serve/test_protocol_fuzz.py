"""Property-based tests of the infer request parser and the service behind it: whatever JSON a client sends (any
value in any field, deep nesting, numbers of any size), the answer is a prediction or a refusal with a 4xx status
and a one-line message; nothing else escapes (a 500 is a bug)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import numpy as np
import pytest
from bundle_factory import SyntheticBundle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgens.runtime import Predictor
from edgens.runtime.batching import Batcher
from edgens.runtime.policies import BUDGETS, Budget
from edgens.serve.metrics import ServeMetrics
from edgens.serve.protocol import DATATYPES, REQUEST_PARAMETERS, ModelInfo, ProtocolError, parse_infer
from edgens.serve.service import InferenceService
from edgens.errors import EdgensError

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
HUGE = st.integers(min_value=10**300, max_value=10**400) | st.integers(max_value=-10**300, min_value=-10**400)
NUMBERS = st.integers(-10, 300) | HUGE | st.floats(allow_nan=True, allow_infinity=True)
SCALARS = st.none() | st.booleans() | NUMBERS | st.text(max_size=6)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                          max_size=3), max_leaves=12)
SHAPES = st.lists(st.integers(-1, 3) | st.just(28) | HUGE, min_size=0, max_size=5) | JSON
DATA = st.lists(st.integers(-5, 300), min_size=0, max_size=800) | JSON


def tensors() -> st.SearchStrategy:
    return st.fixed_dictionaries({}, optional={
        "name": st.just("x") | JSON, "datatype": st.sampled_from(sorted(DATATYPES)) | JSON, "shape": SHAPES,
        "data": DATA, "parameters": st.fixed_dictionaries({}, optional={"binary_data_size": NUMBERS | JSON}) | JSON})


def requests() -> st.SearchStrategy:
    parameters = st.dictionaries(st.sampled_from(REQUEST_PARAMETERS) | st.text(max_size=5), JSON | NUMBERS,
                                 max_size=3)
    outputs = st.lists(st.fixed_dictionaries({}, optional={"name": st.sampled_from(["probabilities", "labels"]) | JSON,
                                                           "parameters": JSON}), max_size=3)
    return st.fixed_dictionaries({}, optional={"id": JSON, "parameters": parameters | JSON,
                                               "inputs": st.lists(tensors(), max_size=2) | JSON,
                                               "outputs": outputs | JSON})


@pytest.fixture(scope="module")
def model(served_bundle: SyntheticBundle) -> ModelInfo:
    return ModelInfo.from_manifest(served_bundle.manifest, "model")


def _one_line(err: BaseException) -> None:
    message = str(err)
    assert message and "\n" not in message and len(message) < 600, message


@SETTINGS
@given(request=requests())
def test_the_parser_takes_any_json_or_refuses_it_in_one_line(model: ModelInfo, request: dict) -> None:
    body = json.dumps(request).encode()
    try:
        parsed = parse_infer(body, None, model)
    except ProtocolError as err:
        _one_line(err)
        assert err.status in (400, 413)
    else:
        assert parsed.x.ndim == 4 and (parsed.budget is None or isinstance(parsed.budget, Budget))


@SETTINGS
@given(body=st.binary(max_size=200) | st.builds(lambda n: b"[" * n + b"{" * n, st.integers(0, 60_000)),
       header=st.none() | st.text(max_size=8))
def test_the_parser_refuses_any_bytes_in_one_line(model: ModelInfo, body: bytes, header: str | None) -> None:
    try:
        parse_infer(body, header, model)
    except ProtocolError as err:
        _one_line(err)


@SETTINGS
@given(kind=st.sampled_from(BUDGETS), value=JSON | NUMBERS)
def test_budgets_of_any_value_parse_or_say_why(kind: str, value: object) -> None:
    try:
        Budget.parse(**{kind: value})
    except EdgensError as err:
        _one_line(err)


@pytest.fixture(scope="module")
def service(served_bundle: SyntheticBundle) -> Iterator[InferenceService]:
    with Predictor.load(served_bundle.path, "onnxruntime", lanes=1) as predictor:
        batcher = Batcher(predictor, max_batch=8, max_queue=64)
        yield InferenceService(predictor, batcher, ModelInfo.from_manifest(predictor.manifest, "model"),
                               ServeMetrics(predictor, batcher))
        batcher.close()


def _valid_pixels(n: int) -> st.SearchStrategy:
    return st.lists(st.integers(0, 255), min_size=784 * n, max_size=784 * n)


@SETTINGS
@given(request=requests(), pixels=_valid_pixels(1), parameters=st.dictionaries(
    st.sampled_from(REQUEST_PARAMETERS), NUMBERS | st.text(max_size=8) | st.booleans(), max_size=2))
def test_the_service_answers_or_refuses_with_a_4xx_or_503(service: InferenceService, request: dict,
                                                          pixels: list[int], parameters: dict) -> None:
    # half of the requests get a valid input, so that their parameters reach the budget checks and the predictor
    if "inputs" not in request:
        request = {**request, "parameters": parameters,
                   "inputs": [{"name": "x", "datatype": "UINT8", "shape": [1, 28, 28], "data": pixels}]}
    try:
        answer = asyncio.run(service.infer(json.dumps(request).encode(), None, 0.0))
    except Exception as err:  # noqa: BLE001  (the assertion is about which errors escape)
        refusal = service.refusal(err)
        assert refusal.status in (400, 413, 503), f"{type(err).__name__}: {err}"
        _one_line(err)
    else:
        assert np.isfinite(answer.prediction.probabilities).all()
