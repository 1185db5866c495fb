"""Stack timeouts under the watchdog: stoppable runners run in the caller's thread and are stopped when they overrun;
the others keep their worker threads (tests/runtime/test_faults.py)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from bundle_factory import SyntheticBundle

from edgens.runtime import Predictor
from edgens.runtime.backends.base import StackRunner
from edgens.runtime.watchdog import Watchdog

ALL = [0, 1, 2, 3, 4, 5]


class _Stoppable(StackRunner):
    """Wraps a runner; its next ``overruns`` runs wait until cancelled (then raise, as onnxruntime does), the
    others answer as the wrapped runner. Records the thread each run ran in."""

    def __init__(self, inner: StackRunner, overruns: int = 1):
        super().__init__(inner.stack, inner.input_shape, inner.n_outputs)
        self.inner, self.overruns = inner, overruns
        self.cancelled = threading.Event()
        self.threads: list[int] = []

    is_active = property(lambda self: self.inner.is_active)
    stoppable = property(lambda self: True)

    def activate(self) -> None:
        self.inner.activate()

    def deactivate(self) -> None:
        self.inner.deactivate()

    def cancel(self) -> None:
        self.cancelled.set()

    def run(self, x: np.ndarray) -> np.ndarray:
        self.threads.append(threading.get_ident())
        if self.overruns:
            self.overruns -= 1
            assert self.cancelled.wait(60), "the watchdog never stopped the run"
            self.cancelled.clear()
            raise RuntimeError("stopped")  # what onnxruntime raises when its terminate flag is set
        return self.inner.run(x)


def _check(prediction, bundle: SyntheticBundle, x: np.ndarray, ids: list[int]) -> None:
    np.testing.assert_allclose(prediction.mean, bundle.expected(x, ids), atol=2e-5, rtol=1e-5)
    assert (prediction.members_used == len(ids)).all()


def test_an_overrunning_stoppable_stack_is_stopped_in_the_callers_thread(bundle: SyntheticBundle, data) -> None:
    x, _ = data
    with Predictor.load(bundle.path, "onnxruntime", stack_timeout_ms=200, lanes=1) as predictor:
        stoppable = _Stoppable(predictor.runners["general-001"])
        predictor.replace_runners({"general-001": stoppable})
        first = predictor.predict(x)
        second = predictor.predict(x)  # it answers again at once: nothing of the stopped run is left running
    assert [(f.stack, f.kind) for f in first.failures] == [("general-001", "timeout")]
    assert "200 ms" in str(first.failures[0])
    _check(first, bundle, x, [0, 1, 4, 5])
    assert second.failures == []
    _check(second, bundle, x, ALL)
    assert stoppable.threads == [threading.get_ident()] * 2  # no handoff to a worker thread


def test_onnxruntime_runners_on_the_cpu_are_stoppable_and_need_no_worker_thread(bundle: SyntheticBundle,
                                                                                 data) -> None:
    x, _ = data
    with Predictor.load(bundle.path, "onnxruntime", stack_timeout_ms=1000, lanes=1) as predictor:
        assert all(runner.stoppable for runner in predictor.runners.values())
        before = {thread.name for thread in threading.enumerate()}
        _check(predictor.predict(x), bundle, x, ALL)
        _check(predictor.predict(x, deadline_ms=1000), bundle, x, ALL)
        started = {thread.name for thread in threading.enumerate()} - before
    assert started <= {"edgens-watchdog"}, started  # no per-stack worker thread


def test_onnxruntime_stops_a_run_whose_terminate_flag_is_set(bundle: SyntheticBundle, data) -> None:
    """The premise of stoppable onnxruntime runners: a run with the flag set raises instead of answering."""
    import onnxruntime as ort

    x, _ = data
    stack = bundle.manifest.stack("general-000")
    session = ort.InferenceSession(str(bundle.path / stack.file), providers=["CPUExecutionProvider"])
    options = ort.RunOptions()
    options.terminate = True
    with pytest.raises(Exception, match="(?i)terminat"):
        session.run(None, {stack.input_name: bundle.normalise(x).astype(np.float32).reshape(len(x), 1, 28, 28)},
                    options)


class _Waiting(StackRunner):
    """A bare runner for the watchdog alone: cancel() sets an event."""

    def __init__(self) -> None:  # noqa: D107  (no stack: only cancel() is used)
        self.cancelled = threading.Event()

    is_active = property(lambda self: True)
    activate = deactivate = lambda self: None  # noqa: E731
    run = lambda self, x: x  # noqa: E731

    def cancel(self) -> None:
        self.cancelled.set()


def _watchdog_threads() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.name == "edgens-watchdog"}


def test_the_watchdog_stops_only_runs_past_their_deadline() -> None:
    before = _watchdog_threads()
    watchdog = Watchdog(0.5)
    quick, slow = _Waiting(), _Waiting()
    run = watchdog.start(quick)
    assert watchdog.finish(run) is False  # returned at once
    run = watchdog.start(slow)
    assert slow.cancelled.wait(30)  # the watchdog woke for its deadline
    assert watchdog.finish(run) is True
    assert not quick.cancelled.is_set()
    (thread,) = _watchdog_threads() - before  # started with the first run
    assert thread.daemon
    watchdog.close()
    thread.join(30)
    assert not thread.is_alive()
