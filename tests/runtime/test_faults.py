"""Fault tolerance: a failing stack is dropped and the prediction is the mean over the survivors' members."""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest
from bundle_factory import Member, SyntheticBundle, stack_graph

from edgens.errors import BundleError, ConfigError, NoMembersAvailableError
from edgens.fileio import sha256_file
from edgens.runtime import Predictor
from edgens.runtime.faults import Fault, FaultyRunner, inject_faults, random_faults

ALL = [0, 1, 2, 3, 4, 5]


def _check(prediction, bundle: SyntheticBundle, x: np.ndarray, ids: list[int]) -> None:
    np.testing.assert_allclose(prediction.mean, bundle.expected(x, ids), atol=2e-5, rtol=1e-5)
    assert (prediction.members_used == len(ids)).all()


@pytest.mark.parametrize(("kind", "reported"), [("raise", "error"), ("nan", "non-finite"), ("inf", "non-finite"),
                                                ("shape", "shape")])
def test_a_failing_stack_is_dropped_for_the_call(predictor: Predictor, bundle: SyntheticBundle, data, kind: str,
                                                 reported: str) -> None:
    x, _ = data
    with inject_faults(predictor, {"general-001": kind}):
        prediction = predictor.predict(x)
    _check(prediction, bundle, x, [0, 1, 4, 5])
    assert prediction.stacks_run == ["general-000", "general-002"]
    assert [(f.stack, f.kind) for f in prediction.failures] == [("general-001", reported)]
    # After the block the real runner is back.
    _check(predictor.predict(x), bundle, x, ALL)


def test_failures_inside_a_members_budget_are_not_replaced(predictor: Predictor, bundle: SyntheticBundle,
                                                           data) -> None:
    x, _ = data
    with inject_faults(predictor, {"general-001": "raise"}):
        _check(predictor.predict(x, members=3), bundle, x, [0, 1])


def test_the_first_stack_failing_under_early_exit(predictor: Predictor, bundle: SyntheticBundle, data) -> None:
    x, _ = data
    with inject_faults(predictor, {"general-000": "nan"}):
        prediction = predictor.predict(x, confidence=1.0)
    _check(prediction, bundle, x, [2, 3, 4, 5])


def test_a_slow_stack_times_out(bundle: SyntheticBundle, data) -> None:
    x, _ = data
    with Predictor.load(bundle.path, "onnxruntime", stack_timeout_ms=100) as predictor:
        with inject_faults(predictor, {"general-002": Fault("sleep", sleep_ms=5_000)}) as faulty:
            start = time.perf_counter()
            prediction = predictor.predict(x)
            elapsed = time.perf_counter() - start
        assert elapsed < 2.0  # did not wait the 5 s
        _check(prediction, bundle, x, [0, 1, 2, 3])
        assert [(f.stack, f.kind) for f in prediction.failures] == [("general-002", "timeout")]
        assert faulty["general-002"].calls == 1
        # The cancelled sleep ends at once; the late run then finishes in milliseconds and the stack answers again.
        time.sleep(0.3)
        _check(predictor.predict(x), bundle, x, ALL)


class _Stubborn(FaultyRunner):
    """A slow stack that cannot be cancelled, like a running GPU kernel."""

    def cancel(self) -> None:
        pass


def test_a_stack_still_running_from_an_earlier_timeout_is_busy(bundle: SyntheticBundle, data) -> None:
    x, _ = data
    # a 100 ms timeout: a healthy stack runs in well under 1 ms, but a loaded CI machine once stalled one past 20 ms
    with Predictor.load(bundle.path, "onnxruntime", stack_timeout_ms=100) as predictor:
        slow = _Stubborn(predictor.runners["general-000"], Fault("sleep", sleep_ms=800, times=1))
        original = predictor.replace_runners({"general-000": slow})
        first = predictor.predict(x)
        second = predictor.predict(x)
        time.sleep(1.0)
        third = predictor.predict(x)
        predictor.replace_runners(original)
    assert [f.kind for f in first.failures] == ["timeout"]
    assert [f.kind for f in second.failures] == ["busy"]
    _check(second, bundle, x, [2, 3, 4, 5])
    assert third.failures == []
    _check(third, bundle, x, ALL)


def test_repeated_failures_quarantine_a_stack_until_retried(predictor: Predictor, bundle: SyntheticBundle, data,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    x, _ = data
    with inject_faults(predictor, {"general-001": "raise"}) as faulty:
        with caplog.at_level(logging.WARNING, logger="edgens.runtime"):
            for _ in range(5):
                prediction = predictor.predict(x)
        assert faulty["general-001"].calls == 3  # quarantine_after=3: not planned after the third failure
        assert prediction.failures == [] and prediction.stacks_run == ["general-000", "general-002"]
        _check(prediction, bundle, x, [0, 1, 4, 5])
        health = predictor.health()["general-001"]
        assert (health.status, health.failures, health.calls) == ("quarantined", 3, 3)
        assert "failed 3 calls in a row" in health.reason
        assert any("quarantined" in r.getMessage() for r in caplog.records)
    assert predictor.retry() == ["general-001"]
    _check(predictor.predict(x), bundle, x, ALL)
    assert predictor.health()["general-001"].status == "ok"


def test_an_intermittent_failure_does_not_quarantine(predictor: Predictor, bundle: SyntheticBundle, data) -> None:
    x, _ = data
    with inject_faults(predictor, {"general-001": Fault("raise", times=2)}):
        assert len(predictor.predict(x).failures) == 1
        assert len(predictor.predict(x).failures) == 1
        _check(predictor.predict(x), bundle, x, ALL)
    assert predictor.health()["general-001"].consecutive_failures == 0


def test_no_member_answering_raises(predictor: Predictor, data) -> None:
    with inject_faults(predictor, {name: "raise" for name in ["general-000", "general-001", "general-002"]}):
        with pytest.raises(NoMembersAvailableError, match=r"no member answered \(all members\): failures: "
                                                          r"general-000 \(error: InjectedFault"):
            predictor.predict(data[0])
        with pytest.raises(NoMembersAvailableError):
            list(predictor.anytime(data[0]))


def test_all_stacks_quarantined_raises_with_a_hint(predictor: Predictor, data) -> None:
    with inject_faults(predictor, {name: "raise" for name in ["general-000", "general-001", "general-002"]}):
        for _ in range(3):
            with pytest.raises(NoMembersAvailableError):
                predictor.predict(data[0])
        with pytest.raises(NoMembersAvailableError, match=r"no stack is available .*Predictor.retry\(\)"):
            predictor.predict(data[0])


def test_deleted_and_corrupted_files_are_excluded_with_a_warning(bundle: SyntheticBundle, data,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    x, _ = data
    (bundle.path / "stacks" / "general-000.onnx").unlink()
    path = bundle.path / "stacks" / "general-002.onnx"
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01
    path.write_bytes(bytes(damaged))
    with caplog.at_level(logging.WARNING, logger="edgens.runtime"):
        predictor = Predictor.load(bundle.path, "onnxruntime")
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "stack general-000 excluded: stacks/general-000.onnx is missing" in messages
    assert "stack general-002 excluded: stacks/general-002.onnx has sha256" in messages
    health = predictor.health()
    assert health["general-000"].status == health["general-002"].status == "excluded"
    _check(predictor.predict(x), bundle, x, [2, 3])
    # Budgets count the available members: the first member that can answer is 2.
    _check(predictor.predict(x, members=1), bundle, x, [2])
    assert predictor.retry(["general-000"]) == []  # still missing
    assert "is missing" in predictor.health()["general-000"].reason
    predictor.close()


def test_strict_mode_refuses_a_bundle_with_a_bad_file(bundle: SyntheticBundle) -> None:
    (bundle.path / "stacks" / "general-001.onnx").unlink()
    with pytest.raises(BundleError, match=r"stack general-001: stacks/general-001.onnx is missing \(strict mode"):
        Predictor.load(bundle.path, "onnxruntime", strict=True)


def test_an_excluded_stack_comes_back_when_its_file_is_restored(bundle: SyntheticBundle, data) -> None:
    x, _ = data
    path = bundle.path / "stacks" / "general-001.onnx"
    saved = path.read_bytes()
    path.unlink()
    with Predictor.load(bundle.path, "onnxruntime") as predictor:
        _check(predictor.predict(x), bundle, x, [0, 1, 4, 5])
        path.write_bytes(saved)
        assert predictor.retry() == ["general-001"]
        _check(predictor.predict(x), bundle, x, ALL)


def _rewrite_stack(bundle: SyntheticBundle, name: str, content: bytes) -> None:
    """Replace a stack file and fix its checksum in the manifest, so only loading can find the problem."""
    path = bundle.path / "stacks" / f"{name}.onnx"
    path.write_bytes(content)
    data = json.loads((bundle.path / "manifest.json").read_text())
    for stack in data["stacks"]:
        if stack["name"] == name:
            stack["sha256"], stack["bytes"] = sha256_file(path), path.stat().st_size
    (bundle.path / "manifest.json").write_text(json.dumps(data))


def test_an_unloadable_graph_is_excluded(bundle: SyntheticBundle, data) -> None:
    _rewrite_stack(bundle, "general-000", b"this is not an onnx file")
    with Predictor.load(bundle.path, "onnxruntime") as predictor:
        health = predictor.health()["general-000"]
        assert health.status == "excluded" and "onnxruntime cannot load" in health.reason
        _check(predictor.predict(data[0]), bundle, data[0], [2, 3, 4, 5])


def test_a_graph_that_does_not_match_the_manifest_is_excluded(bundle: SyntheticBundle, data) -> None:
    members = [bundle.members[0], bundle.members[1]]
    _rewrite_stack(bundle, "general-000", stack_graph(members, (1, 28, 28), 10, input_name="images")
                   .SerializeToString())
    narrow = Member(None, None, np.zeros((28 * 27, 10), np.float32), np.zeros(10, np.float32))
    _rewrite_stack(bundle, "general-001", stack_graph([narrow], (1, 28, 27), 10).SerializeToString())
    with Predictor.load(bundle.path, "onnxruntime") as predictor:
        health = predictor.health()
        assert "the graph's inputs are ['images'], the manifest expects one input 'x'" in health["general-000"].reason
        assert "the graph's input shape is ['batch', 1, 28, 27]" in health["general-001"].reason
        _check(predictor.predict(data[0]), bundle, data[0], [4, 5])


def test_nothing_loadable_raises_at_load(bundle: SyntheticBundle) -> None:
    for path in (bundle.path / "stacks").glob("*.onnx"):
        path.unlink()
    with pytest.raises(NoMembersAvailableError, match="no stack of .* could be loaded: general-000 excluded"):
        Predictor.load(bundle.path, "onnxruntime")


def test_fault_helpers(predictor: Predictor) -> None:
    with pytest.raises(ConfigError, match="unknown fault kind 'explode'"):
        Fault("explode")
    with pytest.raises(ConfigError, match="unknown loaded stack 'general-009'"):
        with inject_faults(predictor, {"general-009": "raise"}):
            pass
    names = [f"s{i}" for i in range(20)]
    assert len(random_faults(names, 0.25, seed=1)) == 5
    assert random_faults(names, 0.25, seed=1) == random_faults(names, 0.25, seed=1)
    assert random_faults(names, 0.0) == {}
