"""The serving batcher (edgens.runtime.batching): merged calls give each request the prediction numpy computes for
the members it reports, deadline requests leave their cohort at their own deadlines, the queue is bounded, closing
answers what was admitted. Also the deadline policy's prefix stacks and the observed latencies it borrows."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import numpy as np
import pytest
from bundle_factory import SyntheticBundle, make_bundle, make_data

from edgens.errors import ConfigError, InputError, NoMembersAvailableError, OverloadedError, ServiceStoppingError
from edgens.runtime import Predictor
from edgens.runtime.batching import Batcher
from edgens.runtime.faults import Fault, FaultyRunner, inject_faults
from edgens.runtime.latency import ObservedLatency
from edgens.runtime.policies import Budget, Step, prefix_within

SLEEP_MS = 40.0  # a slow general stack in the deadline tests


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> SyntheticBundle:
    """16 members in 4 general stacks of 4, prefix stacks of 8 and 16, a specialist for class 3."""
    return make_bundle(tmp_path_factory.mktemp("batching") / "bundle", n_members=16, per_stack=4, hidden=8,
                       prefixes=[8, 16])


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> SyntheticBundle:
    """16 members in 4 general stacks of 4, no prefix stacks (deadline calls run the general stacks in turn)."""
    return make_bundle(tmp_path_factory.mktemp("batching-plain") / "bundle", n_members=16, per_stack=4, hidden=8)


def _members(bundle: SyntheticBundle, stacks: list[str]) -> list[int]:
    return [m for name in stacks for m in bundle.manifest.stack(name).members]


def _general(stacks: list[str], bundle: SyntheticBundle) -> list[int]:
    """The members of the stacks a call ran (a prefix stack holds the first general stacks' members)."""
    return list(dict.fromkeys(_members(bundle, stacks)))


def _blocker(batcher: Batcher, x: np.ndarray, held: FaultyRunner) -> Future:
    """A task request whose specialist stack is held (a ``hold`` fault): once it returns, the worker is busy with it
    until the test releases the stack, and requests the test submits meanwhile wait in the queue."""
    future = batcher.submit(x[:1], Budget.parse(task="class-3"))
    assert held.entered.wait(30), "the worker did not take the blocking request"
    return future


def test_fixed_budgets_are_merged_and_equal_numpy(guarded: SyntheticBundle) -> None:
    x, _ = make_data(30, seed=3)
    calls: list[tuple[int, int]] = []
    budgets = [Budget.parse(members=8), Budget.parse(), Budget.parse(members=5), Budget.parse(task="class-3")]
    with Predictor.load(guarded.path, "onnxruntime", lanes=1) as predictor, \
            inject_faults(predictor, {"specialist-3": Fault("hold", times=1)}) as held:
        batcher = Batcher(predictor, max_batch=64, max_queue=64, on_batch=lambda e, r: calls.append((e, r)))
        blocker = _blocker(batcher, x, held["specialist-3"])
        futures = [batcher.submit(x[3 * i:3 * i + 3], budgets[i % 4]) for i in range(10)]
        held["specialist-3"].release()
        results = [f.result(timeout=30) for f in futures]
        blocker.result(timeout=30)
        assert batcher.close(timeout=30)
    order = guarded.order
    wanted = {0: order[:8], 1: order, 2: order[:5], 3: guarded.manifest.specialists[0].members}
    for i, result in enumerate(results):
        np.testing.assert_allclose(result.probabilities, guarded.expected(x[3 * i:3 * i + 3], wanted[i % 4]),
                                   atol=2e-5)
        assert result.members_used.tolist() == [len(wanted[i % 4])] * 3
        assert result.budget == str(budgets[i % 4])
    # the ten requests waited behind the blocker: each budget's requests went in one call (3 or 2 requests)
    assert sorted(r for _, r in calls[1:]) == [2, 2, 3, 3], calls
    assert sorted(e for e, _ in calls[1:]) == [6, 6, 9, 9], calls


def test_uint8_requests_of_both_accepted_shapes_are_merged_raw_and_equal_numpy(guarded: SyntheticBundle) -> None:
    """uint8 images need no value check, so the worker merges them raw and normalises the batch once; images with
    and without their channel axis go in one call."""
    x, _ = make_data(7, seed=5)
    calls: list[tuple[int, int]] = []
    with Predictor.load(guarded.path, "onnxruntime", lanes=1) as predictor, \
            inject_faults(predictor, {"specialist-3": Fault("hold", times=1)}) as held:
        batcher = Batcher(predictor, max_batch=64, max_queue=64, on_batch=lambda e, r: calls.append((e, r)))
        blocker = _blocker(batcher, x, held["specialist-3"])
        parts = [x[0:1], x[1:4, 0], x[4:5], x[5:7, 0]]  # (B, 1, 28, 28) and (B, 28, 28)
        futures = [batcher.submit(part, Budget.parse()) for part in parts]
        held["specialist-3"].release()
        results = [future.result(timeout=30) for future in futures]
        blocker.result(timeout=30)
        assert batcher.close(timeout=30)
    assert calls[1:] == [(7, 4)], calls
    for result, rows in zip(results, (x[0:1], x[1:4], x[4:5], x[5:7]), strict=True):
        np.testing.assert_allclose(result.probabilities, guarded.expected(rows, guarded.order), atol=2e-5)


def test_deadline_requests_leave_at_their_own_deadlines(plain: SyntheticBundle) -> None:
    x, _ = make_data(3, seed=4)
    calls: list[tuple[int, int]] = []
    slow = {f"general-{i:03d}": Fault("sleep", sleep_ms=SLEEP_MS) for i in range(4)}
    with Predictor.load(plain.path, "onnxruntime", lanes=1) as predictor, inject_faults(predictor, slow):
        predictor.warm_up((1, 4), repeats=1)  # observed latencies: about SLEEP_MS per general stack
        stack = inject_faults(predictor, {"specialist-3": Fault("hold", times=1)})
        held = stack.__enter__()["specialist-3"]
        batcher = Batcher(predictor, on_batch=lambda e, r: calls.append((e, r)))
        blocker = _blocker(batcher, x, held)
        deadlines = [100.0, 140.0, 10_000.0]  # 2, 3 and 4 stacks of SLEEP_MS, with 20 ms to spare
        futures = [batcher.submit(x[i:i + 1], Budget.parse(deadline_ms=d)) for i, d in enumerate(deadlines)]
        held.release()  # the three wait together: one merged cohort
        results = [f.result(timeout=30) for f in futures]
        blocker.result(timeout=30)
        batcher.close(timeout=30)
        stack.__exit__(None, None, None)
    members = [int(r.members_used[0]) for r in results]
    assert members[0] < members[1] < members[2] == 16, members
    assert (3, 3) in calls  # one merged cohort: its first stack call held all three requests
    for result, deadline, i in zip(results, deadlines, range(3), strict=True):
        # within its deadline plus one stack (its slowest, as measured), answered as soon as it left; half a stack
        # more for scheduling on a loaded machine, still far from the two stacks a missed deadline would cost
        assert result.elapsed_ms <= deadline + 1.5 * max(result.stack_ms.values()), (result.elapsed_ms, deadline)
        assert result.deadline_ms == deadline
        used = _general(result.stacks_run, plain)
        assert len(used) == result.members_used[0]
        np.testing.assert_allclose(result.probabilities, plain.expected(x[i:i + 1], used), atol=2e-5)
    # the short deadlines did not wait for the long one's stacks
    assert results[0].elapsed_ms < results[2].elapsed_ms - SLEEP_MS
    assert results[1].elapsed_ms < results[2].elapsed_ms - SLEEP_MS / 2


def test_a_deadline_cohort_starts_with_the_prefix_stack_that_fits(guarded: SyntheticBundle) -> None:
    x, _ = make_data(4, seed=5)
    with Predictor.load(guarded.path, "onnxruntime", lanes=1) as predictor:
        predictor.warm_up((4,))
        batcher = Batcher(predictor)
        result = batcher.submit(x, Budget.parse(deadline_ms=10_000)).result(timeout=30)
        batcher.close()
    assert result.stacks_run == ["prefix-0016"]
    np.testing.assert_allclose(result.probabilities, guarded.expected(x, guarded.order), atol=2e-5)


def test_the_queue_is_bounded(guarded: SyntheticBundle) -> None:
    x, _ = make_data(4, seed=6)
    with Predictor.load(guarded.path, "onnxruntime", lanes=1) as predictor, \
            inject_faults(predictor, {"specialist-3": Fault("hold", times=1)}) as held:
        batcher = Batcher(predictor, max_queue=2)
        blocker = _blocker(batcher, x, held["specialist-3"])
        admitted = [batcher.submit(x[:1], Budget.parse(deadline_ms=5)) for _ in range(2)]
        with pytest.raises(OverloadedError, match="queue is full .2 requests waiting"):
            batcher.submit(x[:1], Budget.parse(deadline_ms=5))
        assert not blocker.done()  # refused at once: while the blocker still holds the worker
        assert batcher.queue_depth == 2
        held["specialist-3"].release()
        for future in [blocker, *admitted]:
            assert future.result(timeout=30).members_used[0] >= 1
        batcher.close()


def test_close_answers_what_was_admitted_then_refuses(guarded: SyntheticBundle) -> None:
    x, _ = make_data(4, seed=7)
    with Predictor.load(guarded.path, "onnxruntime", lanes=1) as predictor, \
            inject_faults(predictor, {"specialist-3": Fault("hold", times=1)}) as held:
        batcher = Batcher(predictor)
        futures = [_blocker(batcher, x, held["specialist-3"])]
        futures += [batcher.submit(x, Budget.parse(members=4)) for _ in range(3)]
        stopped: list[bool] = []
        closing = threading.Thread(target=lambda: stopped.append(batcher.close(timeout=30)))
        closing.start()  # close while the blocker holds the worker, with three requests admitted behind it
        held["specialist-3"].release()
        closing.join(60)
        assert stopped == [True]
        assert all(f.done() and f.exception() is None for f in futures)
        with pytest.raises(ServiceStoppingError, match="shutting down"):
            batcher.submit(x, Budget.parse())


def test_requests_are_checked_before_they_queue(guarded: SyntheticBundle) -> None:
    x, _ = make_data(8, seed=8)
    with Predictor.load(guarded.path, "onnxruntime", lanes=1) as predictor:
        batcher = Batcher(predictor, max_batch=4)
        with pytest.raises(InputError, match="batch of 8 examples, expected at most 4"):
            batcher.submit(x, Budget.parse())
        with pytest.raises(InputError, match="shape"):
            batcher.submit(x[:2, 0, :5], Budget.parse())
        with pytest.raises(ConfigError, match="unknown task"):
            batcher.submit(x[:2], Budget.parse(task="class-9"))
        with pytest.raises(ConfigError, match="latency table"):
            batcher.submit(x[:2], Budget.parse(latency_ms=5))
        assert batcher.queue_depth == 0
        batcher.close()


def test_a_request_whose_values_are_refused_fails_alone_in_its_merged_call(guarded: SyntheticBundle) -> None:
    """Values are checked (and inputs normalised) by the worker, off the caller's thread: a request with NaN in a
    merged call gets the InputError, the others their predictions."""
    x, _ = make_data(6, seed=10)
    bad = x[:2].astype(np.float32)
    bad[1, 0, 3, 3] = np.nan
    with Predictor.load(guarded.path, "onnxruntime", lanes=1) as predictor, \
            inject_faults(predictor, {"specialist-3": Fault("hold", times=1)}) as held:
        batcher = Batcher(predictor, max_batch=64, max_queue=64)
        blocker = _blocker(batcher, x, held["specialist-3"])
        futures = [batcher.submit(x[2:4], Budget.parse()), batcher.submit(bad, Budget.parse()),
                   batcher.submit(x[4:6], Budget.parse())]  # accepted: their shapes fit
        held["specialist-3"].release()
        blocker.result(timeout=30)
        with pytest.raises(InputError, match="NaN or infinite"):
            futures[1].result(timeout=30)
        for future, rows in ((futures[0], x[2:4]), (futures[2], x[4:6])):
            np.testing.assert_allclose(future.result(timeout=30).probabilities, guarded.expected(rows, guarded.order),
                                       atol=2e-5)
        assert batcher.in_flight == 0 and batcher.close(timeout=30)


def test_failed_stacks_are_dropped_and_no_member_fails_every_request(plain: SyntheticBundle) -> None:
    x, _ = make_data(6, seed=9)
    with Predictor.load(plain.path, "onnxruntime", lanes=1, quarantine_after=None) as predictor:
        batcher = Batcher(predictor)
        with inject_faults(predictor, {"general-001": "raise"}):
            futures = [batcher.submit(x[2 * i:2 * i + 2], Budget.parse(deadline_ms=10_000)) for i in range(3)]
            for i, future in enumerate(futures):
                result = future.result(timeout=30)
                assert [f.stack for f in result.failures] == ["general-001"]
                survivors = _general(["general-000", "general-002", "general-003"], plain)
                np.testing.assert_allclose(result.probabilities, plain.expected(x[2 * i:2 * i + 2], survivors),
                                           atol=2e-5)
        with inject_faults(predictor, {name: "raise" for name in predictor.runners}):
            futures = [batcher.submit(x[:2], Budget.parse(deadline_ms=50)), batcher.submit(x[:2], Budget.parse())]
            for future in futures:
                assert isinstance(future.exception(timeout=30), NoMembersAvailableError)
        batcher.close()


def test_prefix_within_picks_the_largest_prefix_stack_that_fits(guarded: SyntheticBundle) -> None:
    manifest = guarded.manifest
    steps = [Step(s.name, None, tuple(s.members)) for s in manifest.general_stacks]
    estimates = {"prefix-0008": 1.0, "prefix-0016": 3.0}
    every = lambda name: True  # noqa: E731

    def chosen(limit_ms: float, available=every, rows=None) -> list[str]:
        plan = list(steps) if rows is None else [Step(steps[0].stack, rows, steps[0].members[:2]), *steps[1:]]
        return [s.stack for s in prefix_within(plan, manifest, available, estimates.get, limit_ms)]

    assert chosen(5.0) == ["prefix-0016"]
    assert chosen(2.0) == ["prefix-0008", "general-002", "general-003"]
    assert chosen(0.5) == [s.stack for s in steps]
    assert chosen(5.0, available=lambda name: name != "prefix-0016") == ["prefix-0008", "general-002",
                                                                           "general-003"]
    assert chosen(5.0, rows=(0, 1))[0] == "general-000"  # a plan cut inside a stack holds no prefix's members
    replaced = prefix_within(steps, manifest, every, estimates.get, 2.0)[0]
    assert [s.stack for s in replaced.fallback] == ["general-000", "general-001"]
    assert prefix_within(steps, manifest, every, lambda name: None, 100.0) == steps


def test_in_process_deadline_calls_use_a_prefix_stack_only_when_it_fits(guarded: SyntheticBundle) -> None:
    x, _ = make_data(4, seed=10)
    with Predictor.load(guarded.path, "onnxruntime", lanes=1) as predictor:
        predictor.warm_up((4,))
        assert predictor.predict(x, deadline_ms=10_000).stacks_run == ["prefix-0016"]
    with Predictor.load(guarded.path, "onnxruntime", lanes=1) as predictor, \
            inject_faults(predictor, {"prefix-0016": Fault("sleep", sleep_ms=150),
                                      "prefix-0008": Fault("sleep", sleep_ms=150)}):
        predictor.warm_up((4,), repeats=1)  # the prefix stacks are slow here
        prediction = predictor.predict(x, deadline_ms=100)
    assert prediction.stacks_run[0] == "general-000"
    np.testing.assert_allclose(prediction.probabilities,
                               guarded.expected(x, _general(prediction.stacks_run, guarded)), atol=2e-5)


def test_observed_latency_borrows_the_next_larger_batch() -> None:
    observed = ObservedLatency()
    assert observed.estimate("s", 4) is None
    for ms in (3.0, 5.0, 4.0):
        observed.observe("s", 64, ms)
    observed.observe("s", 8, 1.0)
    assert observed.estimate("s", 64) == 4.0  # the lower median of its own runs
    assert observed.estimate("s", 16) == 4.0  # borrowed from 64
    assert observed.estimate("s", 2) == 1.0  # borrowed from 8
    assert observed.estimate("s", 128) is None  # nothing larger was seen
    assert observed.estimate("t", 8) is None


def test_warm_up_measures_every_stack_and_survives_a_failing_one(guarded: SyntheticBundle) -> None:
    with Predictor.load(guarded.path, "onnxruntime", lanes=1) as predictor, \
            inject_faults(predictor, {"general-001": "raise"}):
        predictor.warm_up((1, 8), repeats=2)
        assert predictor.stack_ms("general-001", 8) is None
        for name in ("general-000", "prefix-0016", "specialist-3"):
            assert predictor.stack_ms(name, 8) > 0 and predictor.stack_ms(name, 4) == predictor.stack_ms(name, 8)
