"""Parallel lanes and prefix stacks: the same members and numbers as one stack after another, deadlines kept across
lanes (no member that finished late), and a failed prefix stack replaced by its general stacks."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import SyntheticBundle, make_bundle

from edgens.runtime import LatencyTable, Predictor, save_latency_table
from edgens.runtime.faults import Fault, FaultyRunner, inject_faults
from edgens.runtime.latency import StackLatency

# 8 members by id; general stacks [0, 1], [2, 3], [4, 5, 6, 7]; prefix stacks of the first 4 and of all 8.
GENERAL = ["general-000", "general-001", "general-002"]
MEMBERS = {"general-000": [0, 1], "general-001": [2, 3], "general-002": [4, 5, 6, 7]}


@pytest.fixture(scope="module")
def lane_bundle(tmp_path_factory: pytest.TempPathFactory) -> SyntheticBundle:
    return make_bundle(tmp_path_factory.mktemp("lanes") / "bundle", n_members=8, per_stack=[2, 2, 4], hidden=8,
                       prefixes=[4, 8])


@pytest.fixture()
def lanes(lane_bundle: SyntheticBundle) -> Iterator[Predictor]:
    with Predictor.load(lane_bundle.path, "onnxruntime", lanes=2) as predictor:
        yield predictor


@pytest.fixture()
def in_order(lane_bundle: SyntheticBundle) -> Iterator[Predictor]:
    with Predictor.load(lane_bundle.path, "onnxruntime", lanes=1) as predictor:
        yield predictor


class _Timed(FaultyRunner):
    """A stack made slow (``sleep_ms``) that records when and in which thread each of its runs happened."""

    def __init__(self, inner, sleep_ms: float, log: list):
        super().__init__(inner, Fault("sleep", sleep_ms=sleep_ms))
        self.log = log

    def run(self, x: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        out = super().run(x)
        self.log.append((self.name, threading.current_thread().name, start, time.perf_counter()))
        return out


def _timed(predictor: Predictor, sleep_ms: dict[str, float]) -> list:
    log: list = []
    predictor.replace_runners({name: _Timed(predictor.runners[name], ms, log) for name, ms in sleep_ms.items()})
    return log


def test_an_all_members_call_runs_the_prefix_stack_alone(lanes: Predictor, lane_bundle: SyntheticBundle,
                                                          data) -> None:
    x, _ = data
    prediction = lanes.predict(x)
    assert prediction.stacks_run == ["prefix-0008"]
    np.testing.assert_allclose(prediction.mean, lane_bundle.expected(x, list(range(8))), atol=2e-5)
    members3 = lanes.predict(x, members=3)  # general-000 and a row of general-001 = the first 3 rows of prefix-0004
    assert members3.stacks_run == ["prefix-0004"] and (members3.members_used == 3).all()
    np.testing.assert_allclose(members3.mean, lane_bundle.expected(x, [0, 1, 2]), atol=2e-5)
    flops = lanes.manifest.stack("general-000").flops * 2  # fits general-000 and general-001: prefix-0004
    assert lanes.predict(x, flops=flops).stacks_run == ["prefix-0004"]


@pytest.mark.parametrize("budget", [{}, {"members": 3}, {"members": 8}, {"deadline_ms": 60_000}])
def test_lanes_give_the_same_prediction_as_one_stack_after_another(lanes: Predictor, in_order: Predictor,
                                                                    lane_bundle: SyntheticBundle, data,
                                                                    budget: dict) -> None:
    x, _ = data
    for predictor in (lanes, in_order):  # prefix stacks out of the way: the general stacks must run
        predictor.replace_runners({name: FaultyRunner(predictor.runners[name], Fault("raise"))
                                   for name in ("prefix-0004", "prefix-0008")})
    log = _timed(lanes, {name: 30.0 for name in GENERAL})
    lanes.predict(x, **budget)  # the first call measures the stacks: slow enough for lanes from now on
    log.clear()
    got, want = lanes.predict(x, **budget), in_order.predict(x, **budget)
    assert sorted(got.stacks_run) == sorted(want.stacks_run) == sorted({n for n, *_ in log})
    np.testing.assert_array_equal(got.members_used, want.members_used)
    ids = [m for name in want.stacks_run for m in MEMBERS[name]][:budget.get("members", 8)]
    np.testing.assert_allclose(got.mean, lane_bundle.expected(x, ids), atol=2e-5)
    np.testing.assert_allclose(got.mean, want.mean, atol=1e-6)
    # They ran at the same time, in two lanes.
    (a, ta, sa, ea), (b, tb, sb, eb) = sorted(log, key=lambda r: r[2])[:2]
    assert ta != tb and sb < ea, f"{a} and {b} did not overlap: {log}"


def test_a_deadline_on_lanes_leaves_out_members_that_finish_late(lanes: Predictor, lane_bundle: SyntheticBundle,
                                                                  data) -> None:
    x, _ = data
    lanes.replace_runners({name: FaultyRunner(lanes.runners[name], Fault("raise")) for name in ("prefix-0004",
                                                                                                 "prefix-0008")})
    # One lane runs general-000 (10 ms) then general-002 (10 ms); the other is stuck in general-001 (800 ms).
    log = _timed(lanes, {"general-000": 10.0, "general-001": 800.0, "general-002": 10.0})
    table = LatencyTable(**lanes.backend.describe())
    table.stacks = {name: {len(x): StackLatency(10.0, 10.0)} for name in GENERAL}  # lanes from the first call
    save_latency_table(lane_bundle.path, table)
    try:
        lanes.reload_latency()
        prediction = lanes.predict(x, deadline_ms=300)
    finally:
        (lane_bundle.path / "latency.json").unlink()
    assert sorted(prediction.stacks_run) == ["general-000", "general-002"]
    np.testing.assert_allclose(prediction.mean, lane_bundle.expected(x, [0, 1, 4, 5, 6, 7]), atol=2e-5)
    # The calling thread is a lane too. If a helper lane was stuck, the call returned at the deadline without
    # waiting for it; if the caller itself was, it returned when that stack ended (one stack late, as in order).
    late_in_caller = [(name, thread) for name, thread, *_ in log if name == "general-001"]
    assert late_in_caller in ([], [("general-001", threading.current_thread().name)])
    assert prediction.elapsed_ms < 700 or late_in_caller


def test_a_failed_prefix_stack_is_replaced_by_its_general_stacks(lanes: Predictor, lane_bundle: SyntheticBundle,
                                                                  data) -> None:
    x, _ = data
    with inject_faults(lanes, {"prefix-0008": "raise", "prefix-0004": "nan"}):
        every = lanes.predict(x)
        first3 = lanes.predict(x, members=3)
    # (on lanes, stacks_run lists the stacks in the order they finished)
    assert [f.stack for f in every.failures] == ["prefix-0008"] and sorted(every.stacks_run) == GENERAL
    np.testing.assert_allclose(every.mean, lane_bundle.expected(x, list(range(8))), atol=2e-5)
    assert [(f.stack, f.kind) for f in first3.failures] == [("prefix-0004", "non-finite")]
    assert sorted(first3.stacks_run) == ["general-000", "general-001"] and (first3.members_used == 3).all()
    np.testing.assert_allclose(first3.mean, lane_bundle.expected(x, [0, 1, 2]), atol=2e-5)


def test_the_prefix_of_every_member_serves_a_call_when_a_general_stack_is_lost(lane_bundle: SyntheticBundle,
                                                                              tmp_path: Path, data) -> None:
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(lane_bundle.path, copy)
    (copy / "stacks" / "general-001.onnx").write_bytes(b"corrupt")
    with Predictor.load(copy, "onnxruntime", lanes=2) as predictor:
        assert predictor.health()["general-001"].status == "excluded"
        prediction = predictor.predict(data[0])
        assert prediction.stacks_run == ["prefix-0008"] and (prediction.members_used == 8).all()
        assert predictor.predict(data[0], members=3).stacks_run == ["general-000", "general-002"]


def test_threads_sharing_a_predictor_with_lanes_each_get_their_own_answer(lanes: Predictor,
                                                                           lane_bundle: SyntheticBundle) -> None:
    from bundle_factory import make_data

    lanes.replace_runners({name: FaultyRunner(lanes.runners[name], Fault("raise")) for name in ("prefix-0004",
                                                                                                 "prefix-0008")})
    _timed(lanes, {name: 3.0 for name in GENERAL})
    batches = [make_data(4 + i, seed=i)[0] for i in range(4)]
    errors: list[BaseException] = []

    def caller(x: np.ndarray) -> None:
        try:
            for _ in range(4):
                prediction = lanes.predict(x, deadline_ms=60_000)
                np.testing.assert_allclose(prediction.mean, lane_bundle.expected(x, list(range(8))), atol=2e-5)
        except BaseException as err:  # noqa: BLE001  (re-raised in the main thread)
            errors.append(err)

    threads = [threading.Thread(target=caller, args=(x,)) for x in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors[0]


def test_a_profile_that_found_lanes_slower_keeps_calls_in_order(lanes: Predictor, lane_bundle: SyntheticBundle,
                                                                 data) -> None:
    from edgens.runtime.latency import ChainLatency, LatencyTable

    x, _ = data
    lanes.replace_runners({name: FaultyRunner(lanes.runners[name], Fault("raise")) for name in ("prefix-0004",
                                                                                                 "prefix-0008")})
    log = _timed(lanes, {name: 5.0 for name in GENERAL})
    table = LatencyTable(**lanes.backend.describe())
    table.stacks = {name: {1: StackLatency(5.0, 5.0)} for name in GENERAL}
    table.lanes = {1: ChainLatency(2, in_order_ms=15.0, lanes_ms=16.0), 16: ChainLatency(2, 15.0, 9.0)}
    assert LatencyTable.from_dict(table.to_dict()).lanes == table.lanes
    save_latency_table(lane_bundle.path, table)
    try:
        lanes.reload_latency()
        lanes.predict(x[:8], deadline_ms=60_000)  # batch 8: the table's batch 1 applies, where lanes were slower
        assert {thread for _, thread, _, _ in log} == {threading.current_thread().name}
        log.clear()
        lanes.predict(x[:16], deadline_ms=60_000)  # batch 16: lanes measured 1.67x faster
        assert len({thread for _, thread, _, _ in log}) == 2
    finally:
        (lane_bundle.path / "latency.json").unlink()


def test_a_failed_prefix_stack_under_a_latency_budget_runs_only_what_still_fits(in_order: Predictor,
                                                                                 lane_bundle: SyntheticBundle,
                                                                                 data) -> None:
    x, _ = data
    lanes = in_order
    _timed(lanes, {name: 30.0 for name in GENERAL})  # as slow as the table says
    table = LatencyTable(**lanes.backend.describe())
    # The prefix of all 8 is cheap; the general stacks cost 30 ms each, so only the prefix fits 50 ms.
    table.stacks = {"prefix-0004": {len(x): StackLatency(20.0, 20.0)},
                    "prefix-0008": {len(x): StackLatency(40.0, 40.0)},
                    **{name: {len(x): StackLatency(30.0, 30.0)} for name in GENERAL}}
    save_latency_table(lane_bundle.path, table)
    try:
        lanes.reload_latency()
        with inject_faults(lanes, {"prefix-0008": "raise"}):
            prediction = lanes.predict(x, latency_ms=50)
    finally:
        (lane_bundle.path / "latency.json").unlink()
    # The plan is the prefix of all 8 (40 ms). It fails at once; its first general stack still fits the 50 ms
    # (30 ms), the second, starting at ~30 ms, would not.
    assert [f.stack for f in prediction.failures] == ["prefix-0008"]
    assert prediction.stacks_run == ["general-000"]
    np.testing.assert_allclose(prediction.mean, lane_bundle.expected(x, [0, 1]), atol=2e-5)
