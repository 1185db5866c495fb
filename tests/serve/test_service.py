"""The service behind `edgens serve` without HTTP: readiness, metadata, inference through the real batcher and
predictor, the error-to-status table, and fault administration. Answers are checked against numpy's ensemble of
the members the prediction says it used."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import numpy as np
import pytest
from bundle_factory import SyntheticBundle, make_data

from edgens.errors import (BundleError, ConfigError, InputError, NoMembersAvailableError, OverloadedError,
                           PredictorClosedError, ServiceStoppingError)
from edgens.runtime import Predictor
from edgens.runtime.batching import Batcher
from edgens.serve.metrics import ServeMetrics
from edgens.serve.protocol import ModelInfo, ProtocolError
from edgens.runtime.policies import Budget
from edgens.serve.service import ERROR_STATUS, MIN_IN_SERVICE, InferenceService, RateMeter, refusal_for


@pytest.fixture()
def service(served_bundle: SyntheticBundle) -> Iterator[InferenceService]:
    with Predictor.load(served_bundle.path, "onnxruntime", lanes=1) as predictor:
        batcher = Batcher(predictor, max_batch=8, max_queue=4)
        metrics = ServeMetrics(predictor, batcher)
        yield InferenceService(predictor, batcher, ModelInfo.from_manifest(predictor.manifest, "model"), metrics,
                               min_available=0.5, allow_fault_injection=True)
        batcher.close()


def _body(x: np.ndarray, **parameters: object) -> bytes:
    request: dict = {"inputs": [{"name": "x", "datatype": "UINT8", "shape": list(x.shape),
                                 "data": x.reshape(-1).tolist()}]}
    if parameters:
        request["parameters"] = parameters
    return json.dumps(request).encode()


def _infer(service: InferenceService, body: bytes) -> tuple[dict, object]:
    answer = asyncio.run(service.infer(body, None, 0.0))
    assert answer.json_length is None  # JSON outputs unless asked otherwise
    return json.loads(answer.content), answer.prediction


def _outputs(response: dict) -> dict[str, np.ndarray]:
    return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in response["outputs"]}


def _counted(service: InferenceService, outcome: str) -> float:
    return service.metrics.registry.get_sample_value("edgens_requests_total", {"outcome": outcome})


def test_inference_answers_the_ensemble_of_the_members_used(service: InferenceService,
                                                            served_bundle: SyntheticBundle) -> None:
    x, _ = make_data(3, seed=11)
    response, prediction = _infer(service, _body(x, members=8))
    outputs = _outputs(response)
    members = [m for name in prediction.stacks_run for m in served_bundle.manifest.stack(name).members][:8]
    np.testing.assert_allclose(outputs["probabilities"], served_bundle.expected(x, members), rtol=1e-4, atol=1e-6)
    assert outputs["members_used"].tolist() == [8, 8, 8]
    assert _counted(service, "ok") == 1


def test_readiness_follows_the_members_available_and_draining(service: InferenceService) -> None:
    ready, body = service.readiness()
    assert ready and body["members_available"] == 1.0 and not body["degraded"] and body["unavailable"] == {}
    service.predictor.pool.quarantine("general-000", "for the test")
    ready, body = service.readiness()
    assert ready and body["degraded"] and body["members_available"] == 0.75
    assert body["unavailable"] == {"general-000": "quarantined: for the test"}
    service.predictor.pool.quarantine("general-001", "for the test")
    assert service.readiness()[0]  # 8 of 16 members: exactly min_available
    service.predictor.pool.quarantine("general-002", "for the test")
    assert not service.readiness()[0]
    assert sorted(service.predictor.retry()) == ["general-000", "general-001", "general-002"]
    service.draining = True
    ready, body = service.readiness()
    assert not ready and body["draining"]
    with pytest.raises(ServiceStoppingError, match="draining"):
        service.admit("model")


def test_metadata_and_unknown_models(service: InferenceService) -> None:
    assert service.server_metadata()["extensions"] == ["binary_tensor_data", "parameters", "model_configuration",
                                                       "statistics", "system_shared_memory"]
    assert service.model_metadata("model", "1")["inputs"][0]["shape"] == [-1, 1, 28, 28]
    for name, version in (("other", None), ("model", "2")):
        with pytest.raises(ProtocolError) as caught:
            service.model_metadata(name, version)
        refusal = service.refusal(caught.value, infer=False)
        assert (refusal.status, refusal.outcome) == (404, "not_found") and "\n" not in refusal.message
    assert _counted(service, "not_found") == 0  # only infer requests are counted


@pytest.mark.parametrize(("error", "status", "outcome"), [
    (ProtocolError("bad", 400), 400, "bad_request"), (ProtocolError("big", 413), 413, "too_large"),
    (InputError("x"), 400, "bad_request"), (ConfigError("x"), 400, "bad_request"),
    (OverloadedError("full"), 503, "overloaded"), (ServiceStoppingError("x"), 503, "stopping"),
    (PredictorClosedError("x"), 503, "stopping"), (NoMembersAvailableError("x"), 503, "unavailable"),
    (BundleError("x"), 500, "error"), (RuntimeError("boom"), 500, "error")])
def test_every_error_has_one_status(error: Exception, status: int, outcome: str) -> None:
    refusal = refusal_for(error)
    assert (refusal.status, refusal.outcome) == (status, outcome)
    assert refusal.headers == ({"Retry-After": "1"} if outcome == "overloaded" else {})
    assert refusal.message == (f"internal error: {type(error).__name__}: {error}" if status == 500 else str(error))


def test_the_table_lists_each_error_class_once() -> None:
    classes = [cls for cls, _, _ in ERROR_STATUS]
    assert len(set(classes)) == len(classes)


def test_bad_requests_are_refused_and_counted(service: InferenceService) -> None:
    x, _ = make_data(1, seed=3)
    for body, message in ((b"{", "malformed JSON"), (_body(x, members=0), "members: expected a count >= 1"),
                          (_body(x[:, :, :5]), "shape")):
        with pytest.raises((ProtocolError, ConfigError, InputError), match=message) as caught:
            asyncio.run(service.infer(body, None, 0.0))
        assert service.refusal(caught.value).status == 400
    assert _counted(service, "bad_request") == 3


def test_fault_administration(service: InferenceService, served_bundle: SyntheticBundle) -> None:
    with pytest.raises(ProtocolError, match="unknown stack 'nope'"):
        service.apply_fault({"stack": "nope", "kind": "raise"})
    with pytest.raises(ProtocolError, match="kind: expected one of"):
        service.apply_fault({"stack": "general-001", "kind": "melt"})
    with pytest.raises(ProtocolError, match="unexpected keyword argument 'colour'"):
        service.apply_fault({"stack": "general-001", "kind": "raise", "colour": "red"})
    assert service.apply_fault({"stack": "general-002", "kind": "raise"})["stack"] == "general-002"
    x, _ = make_data(2, seed=5)
    _, prediction = _infer(service, _body(x, members=12))  # the prefix stack of 8, then general-002
    assert [f.stack for f in prediction.failures] == ["general-002"]
    members = [m for name in prediction.stacks_run for m in served_bundle.manifest.stack(name).members]
    assert len(members) == 8 and prediction.members_used.tolist() == [8, 8]
    np.testing.assert_allclose(prediction.probabilities, served_bundle.expected(x, members), rtol=1e-4, atol=1e-6)
    assert service.apply_fault({"clear": True}) == {"cleared": ["general-002"]}
    service.allow_fault_injection = False
    with pytest.raises(ProtocolError, match="fault injection is off") as caught:
        service.apply_fault({"stack": "general-001", "kind": "raise"})
    assert caught.value.status == 403


def test_the_rate_meter_counts_whole_windows() -> None:
    meter = RateMeter(window_s=1.0)
    assert meter.rate() is None  # nothing yet
    now = time.perf_counter()
    for k in range(500):  # 500 events in the first second, then one that closes the window
        meter.tick(now - 1.2 + k * 0.002)
    meter.tick(now - 0.1)
    assert meter.rate() == pytest.approx(500 / 1.1, rel=1e-6)
    stale = RateMeter(window_s=1.0)
    stale.tick(now - 5.0)
    stale.tick(now - 3.5)  # a window closed long ago says nothing about now
    assert stale.rate() is None


def test_admission_limits_the_requests_in_service_by_the_rate_and_the_default_deadline(
        served_bundle: SyntheticBundle) -> None:
    with Predictor.load(served_bundle.path, "onnxruntime", lanes=1) as predictor:
        batcher = Batcher(predictor, max_batch=8, max_queue=4)
        try:
            info = ModelInfo.from_manifest(predictor.manifest, "model")
            plain = InferenceService(predictor, batcher, info, ServeMetrics(predictor, batcher))
            assert plain.service_limit() == 4 + 8  # no default deadline: max_queue + max_batch
            timed = InferenceService(predictor, batcher, info, ServeMetrics(predictor, batcher),
                                     default_budget=Budget.parse(deadline_ms=5))
            assert timed.service_limit() == 12  # no rate known yet
            now = time.perf_counter()
            for k in range(3001):  # 3,000 answers/s over the last second
                timed._answers.tick(now - 1.0 + k / 3000)
            assert timed.service_limit() == int(3000 * 2 * 0.005)  # what it answers in twice the deadline: 30
            timed.in_service = 30
            with pytest.raises(OverloadedError, match="30 requests are in service.*3000 answers/s over twice the "
                                                      "default deadline of 5 ms"):
                timed.admit("model")
            timed.in_service = 29
            with timed.admission("model"):  # admitted: counted while it is served
                assert timed.in_service == 30
            assert timed.in_service == 29
            for k in range(101):  # slow lately (100 answers/s): still 16 at once, the floor
                timed._answers.tick(now + 1.0 + k / 100)
            assert timed.service_limit() == MIN_IN_SERVICE == 16
        finally:
            batcher.close()
