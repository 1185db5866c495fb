"""A predictor shared by threads: every call's prediction is right, and the bookkeeping the calls share (health
counts, quarantine, observed latencies) adds up exactly. The switch interval is cut to 1 us so that threads
interleave inside the runtime's Python code, not only between calls."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from bundle_factory import SyntheticBundle

from edgens.runtime import Predictor
from edgens.runtime.faults import inject_faults

THREADS, CALLS = 4, 150


@pytest.fixture()
def fast_switching() -> Iterator[None]:
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def _in_threads(work: Callable[[int], None]) -> list[BaseException]:
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            work(index)
        except BaseException as err:  # noqa: BLE001  (reported by the test, not lost in a thread)
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return errors


KINDS = ("all", "members", "deadline")


def _budget(index: int, call: int, members: int) -> tuple[str, dict]:
    """The budget thread ``index`` uses in its ``call``-th call: all members, the first ``members``, or a deadline
    long enough for every stack, in turn."""
    kind = KINDS[(index + call) % 3]
    return kind, {"all": {}, "members": {"members": members}, "deadline": {"deadline_ms": 10_000}}[kind]


def _calls_of(kind: str) -> int:
    """How many of all threads' calls use budget ``kind``."""
    return sum(KINDS[(i + c) % 3] == kind for i in range(THREADS) for c in range(CALLS))


def test_shared_predictor_answers_every_call_right(bundle: SyntheticBundle, data, fast_switching: None) -> None:
    x, _ = data
    survivors = [0, 1, 4, 5]  # general-001 (members 2, 3) raises in every call
    expected = {"all": bundle.expected(x, survivors), "members": bundle.expected(x, [0, 1]),
                "deadline": bundle.expected(x, survivors)}
    with Predictor.load(bundle.path, quarantine_after=None) as predictor, \
            inject_faults(predictor, {"general-001": "raise"}):
        def work(index: int) -> None:
            for call in range(CALLS):
                kind, budget = _budget(index, call, 2)
                prediction = predictor.predict(x, **budget)
                np.testing.assert_allclose(prediction.probabilities, expected[kind], atol=2e-5)

        assert _in_threads(work) == []
        health = predictor.health()
    calls = THREADS * CALLS
    members_calls = _calls_of("members")
    assert (health["general-000"].calls, health["general-000"].failures) == (calls, 0)
    assert (health["general-001"].calls, health["general-001"].failures) == (calls - members_calls,) * 2
    assert health["general-002"].calls == calls - members_calls and health["general-002"].failures == 0


def test_a_failing_stack_is_quarantined_once_under_concurrency(bundle: SyntheticBundle, data,
                                                               fast_switching: None) -> None:
    x, _ = data
    with Predictor.load(bundle.path, quarantine_after=3) as predictor, \
            inject_faults(predictor, {"general-002": "nan"}):
        def work(index: int) -> None:
            for _ in range(CALLS):
                assert predictor.predict(x).members_used.min() >= 4

        assert _in_threads(work) == []
        health = predictor.health()["general-002"]
        assert health.status == "quarantined" and 3 <= health.failures <= 3 + THREADS - 1
        assert predictor.retry() == ["general-002"]


def test_outlier_detection_under_concurrency(tmp_path, fast_switching: None) -> None:
    from bundle_factory import make_bundle, make_data

    from edgens.runtime.faults import Fault

    guarded = make_bundle(tmp_path / "guarded", n_members=16, per_stack=4, hidden=8, prefixes=[8, 16],
                          outliers=True)
    x, _ = make_data(32, seed=8)
    corrupted = guarded.manifest.stack("general-002").members
    survivors = [m for m in guarded.order if m not in corrupted]
    expected = {"all": guarded.expected(x, survivors), "deadline": guarded.expected(x, survivors),
                "members": guarded.expected(x, guarded.order[:8])}  # prefix-0008: two groups, not checked
    # the same member row corrupted in the general stack and in the prefix stack that holds it
    row = guarded.manifest.stack("prefix-0016").members.index(corrupted[1])
    with Predictor.load(guarded.path, quarantine_after=None) as predictor, \
            inject_faults(predictor, {"general-002": Fault("flip", bit=28, row=1),
                                      "prefix-0016": Fault("flip", bit=28, row=row)}):
        def work(index: int) -> None:
            for call in range(CALLS):
                kind, budget = _budget(index, call, 8)
                prediction = predictor.predict(x, **budget)
                np.testing.assert_allclose(prediction.probabilities, expected[kind], atol=2e-5)
                outliers = [f for f in prediction.failures if f.kind == "outlier"]
                assert len(outliers) == (0 if kind == "members" else 1), prediction.failures

        assert _in_threads(work) == []
        health = predictor.health()
    # every call but "members" found one outlier group: all-members calls in prefix-0016, deadline calls in
    # general-002 or, where the prefix stack was expected to fit the deadline, in prefix-0016
    assert health["prefix-0016"].failures >= _calls_of("all")
    assert health["prefix-0016"].failures + health["general-002"].failures == _calls_of("all") + _calls_of("deadline")
