"""Anytime inference: deadlines, the iterator of improving predictions, early stop, and per-example early exit."""

from __future__ import annotations

import numpy as np
import pytest
from bundle_factory import SyntheticBundle, make_bundle

from edgens.errors import ConfigError, NoMembersAvailableError
from edgens.runtime import LatencyTable, Predictor, fit_confidence, save_latency_table
from edgens.runtime.early_exit import early_exit
from edgens.runtime.faults import Fault, inject_faults
from edgens.runtime.latency import StackLatency

GENERAL = ["general-000", "general-001", "general-002"]
PREFIXES = [[0, 1], [0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]
SLEEP_MS = 40.0  # each stack made this slow; the deadlines below leave ~20 ms of slack either way


def _slow(predictor: Predictor):
    return inject_faults(predictor, {name: Fault("sleep", sleep_ms=SLEEP_MS) for name in GENERAL})


def _table(predictor: Predictor, bundle: SyntheticBundle, ms: float, batch: int) -> None:
    table = LatencyTable(**predictor.backend.describe())
    table.stacks = {name: {batch: StackLatency(ms, ms)} for name in GENERAL}
    save_latency_table(bundle.path, table)
    predictor.reload_latency()


def test_iterator_yields_improving_predictions(predictor: Predictor, bundle: SyntheticBundle, data) -> None:
    x, _ = data
    predictions = list(predictor.anytime(x))
    assert [p.stacks_run for p in predictions] == [GENERAL[:1], GENERAL[:2], GENERAL]
    for prediction, ids in zip(predictions, PREFIXES, strict=True):
        np.testing.assert_allclose(prediction.mean, bundle.expected(x, ids), atol=2e-5)
        assert (prediction.members_used == len(ids)).all()


def test_a_bundle_with_prefix_stacks_answers_after_the_smallest_then_each_general_stack(tmp_path, data) -> None:
    # issue 28, item 1: the plan of all members is the prefix stack of all, one graph; an anytime caller gets the
    # smallest prefix stack's answer first and one more after each general stack
    x, _ = data
    made = make_bundle(tmp_path / "b", n_members=8, per_stack=2, prefixes=[4, 8])
    with Predictor.load(made.path, "onnxruntime", lanes=1) as predictor:
        assert predictor.predict(x).stacks_run == ["prefix-0008"]
        parts = list(predictor.anytime(x))
        assert [p.stacks_run[-1] for p in parts] == ["prefix-0004", "general-002", "general-003"]
        for part, k in zip(parts, (4, 6, 8), strict=True):
            np.testing.assert_allclose(part.mean, made.expected(x, made.order[:k]), atol=2e-5)
            assert (part.members_used == k).all()
        assert [int(p.members_used[0]) for p in predictor.anytime(x, members=6)] == [4, 6]
        seen: list[list[str]] = []
        first = predictor.predict(x, on_update=lambda p: seen.append(p.stacks_run) or True)
        assert seen == [["prefix-0004"]] and (first.members_used == 4).all()
        with inject_faults(predictor, {"prefix-0004": "raise"}):  # its general stacks stand in, one answer each
            assert [int(p.members_used[0]) for p in predictor.anytime(x)] == [2, 4, 6, 8]


def test_a_streaming_deadline_call_starts_small_without_a_latency_table(tmp_path, data) -> None:
    # Without a latency table only stacks that ran have estimates. Once an all-members call has run the prefix stack
    # of all, a streaming deadline call must still start with the smallest prefix stack (its estimate bounded by the
    # larger one's), not answer once after every member.
    x, _ = data
    made = make_bundle(tmp_path / "b", n_members=8, per_stack=2, prefixes=[4, 8])
    with Predictor.load(made.path, "onnxruntime", lanes=1) as predictor:
        assert predictor.latency_table is None
        assert predictor.predict(x).stacks_run == ["prefix-0008"]  # the only prefix stack with an estimate
        answers = list(predictor.anytime(x, deadline_ms=10_000))
        assert [p.stacks_run[-1] for p in answers] == ["prefix-0004", "general-002", "general-003"]
        assert [int(p.members_used[0]) for p in answers] == [4, 6, 8]
        # a caller who wants one answer still gets the largest prefix stack that fits
        assert predictor.predict(x, deadline_ms=10_000).stacks_run == ["prefix-0008"]


def test_iterator_can_stop_early(predictor: Predictor, data) -> None:
    counting = {name: Fault("sleep", sleep_ms=0.0) for name in GENERAL}  # a zero sleep: counts calls only
    with inject_faults(predictor, counting) as runners:
        iterator = predictor.anytime(data[0], members=6)
        first = next(iterator)
        iterator.close()  # the caller has what it needs: no further stack runs
    assert first.stacks_run == GENERAL[:1]
    assert [runners[name].calls for name in GENERAL] == [1, 0, 0]


def test_callback_stops_the_call(predictor: Predictor, bundle: SyntheticBundle, data) -> None:
    x, _ = data
    seen = []

    def enough(partial) -> bool:
        seen.append(partial.stacks_run)
        return len(partial.stacks_run) == 2

    prediction = predictor.predict(x, deadline_ms=10_000, on_update=enough)
    assert seen == [GENERAL[:1], GENERAL[:2]]
    np.testing.assert_allclose(prediction.mean, bundle.expected(x, PREFIXES[1]), atol=2e-5)


def test_deadline_with_a_latency_table_does_not_start_what_cannot_finish(predictor: Predictor,
                                                                         bundle: SyntheticBundle, data) -> None:
    x, _ = data
    _table(predictor, bundle, SLEEP_MS, len(x))
    with _slow(predictor):
        prediction = predictor.predict(x, deadline_ms=2.5 * SLEEP_MS)
    # Starts at 0 and ~40 ms; at ~80 ms only ~20 ms are left, less than a stack needs.
    assert prediction.stacks_run == GENERAL[:2]
    np.testing.assert_allclose(prediction.mean, bundle.expected(x, PREFIXES[1]), atol=2e-5)
    assert prediction.overrun_ms == 0.0 and prediction.deadline_ms == 2.5 * SLEEP_MS


def test_deadline_without_a_table_overruns_by_at_most_one_stack(predictor: Predictor, data) -> None:
    x, _ = data
    with _slow(predictor):
        first = predictor.predict(x, deadline_ms=2.5 * SLEEP_MS)
        # Nothing known about the stacks yet: the third starts at ~80 ms (before the deadline) and overruns.
        assert first.stacks_run == GENERAL
        # The promise: never overrun by more than one stack's latency (plus the runtime's own sub-ms work; half a
        # stack of room for a loaded machine, far from the second stack a broken deadline would add).
        assert 0 < first.overrun_ms <= max(first.stack_ms.values()) + SLEEP_MS / 2
        # Now each stack's latency at this batch size has been observed: the same call stays in time.
        second = predictor.predict(x, deadline_ms=2.5 * SLEEP_MS)
        assert second.stacks_run == GENERAL[:2] and second.overrun_ms == 0.0


def test_a_deadline_shorter_than_one_stack_still_answers(predictor: Predictor, bundle: SyntheticBundle,
                                                         data) -> None:
    x, _ = data
    _table(predictor, bundle, SLEEP_MS, len(x))
    with _slow(predictor):
        prediction = predictor.predict(x, deadline_ms=1.0)
    assert prediction.stacks_run == GENERAL[:1]  # the first stack is always waited for
    np.testing.assert_allclose(prediction.mean, bundle.expected(x, PREFIXES[0]), atol=2e-5)
    assert 0 < prediction.overrun_ms <= prediction.stack_ms["general-000"] + SLEEP_MS / 2


def _expected_exit(bundle: SyntheticBundle, x: np.ndarray, p: float) -> np.ndarray:
    """Members used per example under confidence=p, computed independently from the member weights."""
    used = np.full(len(x), 6)
    # An example stops at the first prefix that is confident enough: take the smallest such prefix.
    for i in range(len(x)):
        for ids in PREFIXES:
            if bundle.expected(x[i:i + 1], ids).max() >= p:
                used[i] = len(ids)
                break
        else:
            used[i] = 6
    return used


def test_confidence_exits_per_example(predictor: Predictor, bundle: SyntheticBundle, data) -> None:
    x, _ = data
    first = bundle.expected(x, PREFIXES[0]).max(axis=1)
    p = float(np.median(first))  # about half the examples stop after the first stack
    prediction = predictor.predict(x, confidence=p)
    expected_used = _expected_exit(bundle, x, p)
    assert len(set(expected_used)) >= 2  # the test sees both early and late exits
    np.testing.assert_array_equal(prediction.members_used, expected_used)
    for i in range(len(x)):
        ids = PREFIXES[[2, 4, 6].index(expected_used[i])]
        np.testing.assert_allclose(prediction.mean[i], bundle.expected(x[i:i + 1], ids)[0], atol=2e-5)


def test_confidence_one_uses_every_member_unless_certain(predictor: Predictor, data) -> None:
    prediction = predictor.predict(data[0], confidence=1.0)
    assert (prediction.members_used == 6).all()


def test_fit_confidence_hits_the_target_mean_members(predictor: Predictor, bundle: SyntheticBundle, data) -> None:
    x, _ = data
    p = fit_confidence(predictor, x, target_members=4.0, batch_size=10)
    used = _expected_exit(bundle, x, p)
    assert used.mean() <= 4.0
    # p is the largest threshold that fits: the next confidence level the ensemble reaches needs more members.
    levels = np.unique(np.concatenate([bundle.expected(x, ids).max(axis=1) for ids in PREFIXES]))
    above = levels[levels > p * (1 + 1e-5)]  # p comes from float32 outputs: its own float64 level is not above it
    if len(above):
        assert _expected_exit(bundle, x, float(above[0])).mean() > 4.0
    assert predictor.predict(x, confidence=p).members_used.mean() == pytest.approx(used.mean())
    assert fit_confidence(predictor, x, target_members=6.0) == 1.0
    with pytest.raises(ConfigError, match="below the first stack's 2 members"):
        fit_confidence(predictor, x, target_members=1.0)


def test_fit_confidence_when_no_stack_answers(predictor: Predictor, data) -> None:
    with inject_faults(predictor, {name: "raise" for name in GENERAL}):
        with pytest.raises(NoMembersAvailableError, match="no general stack .* answered on the 32 inputs"):
            fit_confidence(predictor, data[0], target_members=4.0)
    # one stack answering is enough to fit on
    with inject_faults(predictor, {"general-000": "nan", "general-002": "raise"}):
        assert 0 < fit_confidence(predictor, data[0], target_members=2.0) <= 1


def test_early_exit_simulation_matches_the_runtime(predictor: Predictor, data) -> None:
    x, _ = data
    outputs = predictor.stack_outputs(x)
    for p in (0.3, 0.5, 0.9):
        used, eta = early_exit([outputs[name] for name in GENERAL], p)
        prediction = predictor.predict(x, confidence=p)
        np.testing.assert_array_equal(prediction.members_used, used)
        np.testing.assert_allclose(prediction.eta, eta, atol=1e-6)


# --- deadlines without a latency table: estimates from observed times recover after a slow call ------------------
def test_observed_latency_is_robust_and_measures_again() -> None:
    from edgens.runtime.latency import ObservedLatency

    observed = ObservedLatency(window=8, probe_after=4, max_probe_after=16)
    assert observed.estimate("s", 8) is None  # never ran: unknown
    for ms in (1.0, 1.2, 0.9, 50.0, 1.1):  # one stall among normal runs does not move the estimate
        observed.observe("s", 8, ms)
    assert observed.estimate("s", 8) == 1.1 and observed.estimate("s", 16) is None  # lower median of 5
    observed.observe("t", 8, 50.0)  # only a stall seen: the estimate keeps it out ...
    for _ in range(4):
        assert observed.estimate("t", 8) == 50.0
        observed.skipped("t", 8)
    assert observed.estimate("t", 8) is None  # ... until it is due to be measured again
    observed.observe("t", 8, 1.0)
    assert observed.estimate("t", 8) == 1.0  # lower median of (50, 1)
    # a stack that stays slow is measured again ever more rarely: after 4, 8, 16, 16 skips
    observed.observe("u", 8, 50.0)
    waits = []
    for _ in range(4):
        skips = 0
        while observed.estimate("u", 8) is not None:
            observed.skipped("u", 8)
            skips += 1
        waits.append(skips)
        observed.observe("u", 8, 50.0)
    assert waits == [4, 8, 16, 16]


def test_deadlines_recover_after_one_slow_call(predictor: Predictor, data) -> None:
    x, _ = data
    assert predictor.latency_table is None
    with inject_faults(predictor, {"general-001": Fault("sleep", sleep_ms=SLEEP_MS)}):
        stalled = predictor.predict(x, deadline_ms=SLEEP_MS / 2)  # general-001 stalls once (the first stack ran)
    assert stalled.stacks_run == GENERAL[:2] and stalled.overrun_ms > 0
    used = [int(predictor.predict(x, deadline_ms=SLEEP_MS / 2).members_used[0]) for _ in range(10)]
    # kept out while its one observation says 40 ms, then measured again and back for good
    assert used[:4] == [2, 2, 2, 2] and used[4:] == [6] * 6, used


def test_a_stack_that_stays_slow_overruns_rarely(predictor: Predictor, data) -> None:
    x, _ = data
    with inject_faults(predictor, {"general-001": Fault("sleep", sleep_ms=SLEEP_MS)}) as runners:
        predictions = [predictor.predict(x, deadline_ms=SLEEP_MS / 2) for _ in range(40)]
        slow_runs = runners["general-001"].calls
    overruns = sum(p.overrun_ms > 0 for p in predictions)
    # measured on the first call, then again after 4, 8 and 16 skips: calls 1, 6, 15 and 32 (one more overrun is
    # allowed for a stall of this machine itself)
    assert slow_runs == 4 and 4 <= overruns <= 5
    assert all(p.members_used[0] >= 2 for p in predictions)
