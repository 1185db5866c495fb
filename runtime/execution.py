"""Running one call's plan: its stacks in order or on the lanes, within what its budget family allows.

A :class:`Call` holds the batch, the plan, the latency view it plans with, a :class:`Mode` and the
:class:`~edgens.runtime.tally.Tally` its stacks' sums go to. The mode is one small object per budget family, and
says what differs between them:

- :class:`FixedPlan` (members, flops, latency, task, all members): the plan runs whole; for ``latency_ms``, a failed
  prefix stack's general stacks start only while they fit the budget.
- :class:`Deadline`: stacks start while they are expected to finish before the wall-clock deadline (the first
  always: a prediction needs a member), the first being the largest prefix stack that fits; lanes only if asked.
- :class:`Confidence`: early exit; stacks run one at a time in the calling thread, each on the examples still
  below the wanted probability.

An :class:`Executor` runs calls with the predictor's pool, tally rules, latency estimates and lanes. It records the
call's outcomes in the pool once, when the call ends (:meth:`Executor.finish`). :class:`StepwiseCall` lets an owner
(the serving batcher) run a call one stack at a time.
"""

from __future__ import annotations

import math
import queue
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from edgens.errors import NoMembersAvailableError
from edgens.runtime import policies
from edgens.runtime.bundle import Manifest
from edgens.runtime.lanes import LANE_MIN_MS, LANE_MIN_SPEEDUP, Lanes, LaneWork
from edgens.runtime.latency import LatencyEstimates, LatencyView
from edgens.runtime.policies import Budget, Step
from edgens.runtime.pool import StackPool, StackResult
from edgens.runtime.prediction import Prediction
from edgens.runtime.tally import Tally, TallyRules


# What a deadline call's promise allows for the runtime's own work beside the late stack: checking the input before
# it, combining the members after it (on 2 cores at batch 64: 0.09 ms median, 0.27 ms p99). Generous for batch 1
# and fast devices; the tails the promise is about (a stalled or spinning core) are milliseconds.
OWN_WORK_MS = 0.25


class Mode:
    """How a call of one budget family decides what to start, where, and when to stop.

    Attributes:
        streaming: the caller sees each partial prediction (the anytime iterator, ``on_update``).
        eager: settle after every stack (someone looks at partial results).
        lean: run stacks' lean twins where they have one (:meth:`~edgens.runtime.pool.StackPool.run`).
        deadline: the absolute wall-clock deadline (``time.perf_counter()`` seconds) of a deadline call.
        active: the examples still running (early exit), else None: all.
        task: the specialist task of a ``task`` call.
    """

    deadline: float | None = None
    active: np.ndarray | None = None
    task: str | None = None
    lean: bool = False

    def __init__(self, streaming: bool):
        self.streaming = streaming
        self.eager = streaming

    def start_by(self, is_fallback: bool) -> float | None:
        """The time by which a stack must be expected to finish for the call to start it (None: any time)."""
        return self.deadline

    def lanes(self, asked: bool) -> bool:
        """Whether the call may run its stacks on the lanes (``asked``: lanes were asked for at load)."""
        return True

    def update(self, tally: Tally) -> bool:
        """After a stack settled: whether the call still wants more stacks."""
        return True


class FixedPlan(Mode):
    """A plan known before the call (members, flops, latency, task, all members), run whole."""

    def __init__(self, streaming: bool, fallback_by: float | None = None, task: str | None = None):
        super().__init__(streaming)
        self.fallback_by, self.task = fallback_by, task

    def start_by(self, is_fallback: bool) -> float | None:
        return self.fallback_by if is_fallback else None


class Deadline(Mode):
    """Anytime within a wall-clock deadline: stop starting stacks that would not finish before it."""

    def __init__(self, streaming: bool, deadline: float):
        super().__init__(streaming)
        # lean: a stack that takes every core and spins would make the stacks after it, or itself, overrun
        self.eager, self.deadline, self.lean = True, deadline, True

    def lanes(self, asked: bool) -> bool:
        return asked  # deadlines keep to the calling thread unless lanes were asked for (docs/runtime.md, Lanes)


class Confidence(Mode):
    """Early exit: per example, stop once the running ensemble's largest class probability reaches ``p``."""

    def __init__(self, streaming: bool, batch: int, p: float):
        super().__init__(streaming)
        self.eager, self.active, self.p = True, np.arange(batch), p

    def lanes(self, asked: bool) -> bool:
        return False  # each stack's answer decides which examples the next one runs

    def update(self, tally: Tally) -> bool:
        active = self.active
        assert active is not None and tally.counts is not None
        self.active = active[policies.still_unsure(tally.eta_sum[active], tally.counts[active], self.p)]
        return bool(len(self.active))


_PLAIN = FixedPlan(streaming=False)  # the common call's mode (it holds no state of the call)


def mode_for(budget: Budget, manifest: Manifest, start: float, batch: int, streaming: bool) -> Mode:
    """The mode of a call with this budget that started at ``start``."""
    kind = budget.kind
    if kind is None or kind == "members" or kind == "flops":
        return FixedPlan(streaming) if streaming else _PLAIN
    if kind == "deadline_ms":
        return Deadline(streaming, start + budget.value / 1e3)
    if kind == "confidence":
        return Confidence(streaming, batch, budget.value)
    if kind == "latency_ms":
        return FixedPlan(streaming, fallback_by=start + budget.value / 1e3)
    return FixedPlan(streaming, task=policies.resolve_task(manifest, budget.value).task)


@dataclass
class Call:
    """The state of one call while its stacks run.

    Attributes:
        x: the normalised batch.
        budget: its budget.
        steps: its plan.
        start: ``time.perf_counter()`` when the call began.
        latency: the latency view it plans and runs with.
        mode: its budget family's rules.
        tally: its members' accumulation.
        todo: in-order runs: the steps still to run, each with whether it stands in for a failed stack.
        replanned: ``steps`` became the fallback of the one stack planned, which failed.
    """

    x: np.ndarray
    budget: Budget
    steps: list[Step]
    start: float
    latency: LatencyView
    mode: Mode
    tally: Tally
    todo: deque[tuple[Step, bool]] | None = None
    replanned: bool = False


class Executor:
    """Runs calls with a predictor's stack pool, tally rules, latency estimates and lanes.

    Args:
        manifest: the bundle's manifest.
        pool: the stacks.
        rules: how members are combined.
        latency: the latency estimates.
        lanes: the lanes, or None (one lane: everything in the calling thread).
        lanes_asked: lanes were asked for at load (deadline calls use them only then).
    """

    def __init__(self, manifest: Manifest, pool: StackPool, rules: TallyRules, latency: LatencyEstimates,
                 lanes: Lanes | None, lanes_asked: bool):
        self.manifest, self.pool, self.rules, self.latency = manifest, pool, rules, latency
        self.lanes, self.lanes_asked = lanes, lanes_asked

    def begin(self, x: np.ndarray, budget: Budget, steps: list[Step], start: float, view: LatencyView,
              streaming: bool) -> Call:
        """A call of ``steps`` on the normalised batch ``x``, not yet started."""
        mode = mode_for(budget, self.manifest, start, len(x), streaming)
        if streaming and mode.deadline is None:  # an early answer first (deadline calls choose when they start)
            steps = policies.progressive(steps, self.manifest, self.pool.available)
        return Call(x, budget, steps, start, view, mode, Tally(self.rules, len(x), mode.active is not None))

    def run(self, step: Step, x: np.ndarray, lean: bool = False) -> StackResult:
        """Run one stack (``lean``: its lean twin, if any) and reduce its outputs (in a lane's thread too)."""
        return self.rules.reduce(self.pool.run(step, x, lean), x)

    def estimate(self, call: Call, name: str, p90: bool = False) -> float | None:
        """The expected (``p90``: 90th percentile) latency of stack ``name`` in this call: its lean twin's where the
        call runs one and it was measured (a table profiled before twins existed has only the stack's own), else
        the stack's."""
        batch = len(call.x)
        get = self.latency.p90 if p90 else self.latency.estimate
        if call.mode.lean:
            lean = get(self.pool.latency_key(name, True), batch, call.latency)
            if lean is not None:
                return lean
        return get(name, batch, call.latency)

    def complete(self, call: Call, on_update: Callable[[Prediction], bool | None] | None = None) -> Prediction:
        """Run the call to its end (or until ``on_update``, called after each stack that answers, returns True) and
        return its prediction.

        Raises:
            NoMembersAvailableError: no member answered.
        """
        if len(call.steps) == 1 and not call.mode.eager:
            prediction = self.predict_one(call)
            if prediction is not None:
                return prediction
        steps = self.execute(call)
        try:
            for _ in steps:
                if on_update is not None and on_update(self.prediction(call)):
                    break
        finally:
            steps.close()
        self.finish(call)
        return self.prediction(call)

    def iterate(self, call: Call) -> Iterator[Prediction]:
        """The call's improving predictions, one after each stack that answers; the call ends (and its outcomes
        are recorded) when the iteration does, also when the caller stops early.

        Raises:
            NoMembersAvailableError: (when iterating) no member answered.
        """
        answered = False
        try:
            for _ in self.execute(call):
                answered = True
                yield self.prediction(call)
        finally:
            self.finish(call)
        if not answered:
            self.prediction(call)  # raises NoMembersAvailableError with the reasons

    def predict_one(self, call: Call) -> Prediction | None:
        """The hot path of a plan of one stack (a prefix stack, a specialist): run it and combine its rows. None if
        it failed: then ``call.steps`` holds what runs instead (its fallback)."""
        step, tally = call.steps[0], call.tally
        if not tally.take_only(self.rules.reduce(self.pool.run(step, call.x), call.x)):
            call.steps, call.replanned = list(step.fallback), True
            return None
        self.pool.record(tally.stacks_run, tally.failures)  # settled: nothing is pending
        return tally.prediction(call.budget, call.start, call.mode.task)  # it answered: every example has members

    def execute(self, call: Call) -> Iterator[None]:
        """Run the call's stacks; when eager, yields after each one that answers."""
        if self._use_lanes(call, call.steps):
            assert self.lanes is not None
            return self._in_lanes(call, self.lanes, call.steps, fallback=call.replanned)
        return self.in_order(call)

    def finish(self, call: Call) -> None:
        """Settle what is pending and record the call's outcomes in the pool (once, when the call ends)."""
        tally = call.tally
        tally.settle(call.mode.active)
        self.pool.record(tally.stacks_run, tally.failures)

    def prediction(self, call: Call) -> Prediction:
        """The prediction so far.

        Raises:
            NoMembersAvailableError: no member has answered.
        """
        tally = call.tally
        if not tally.has_answer():
            failed = "; ".join(str(f) for f in tally.failures) or "none ran"
            raise NoMembersAvailableError(f"no member answered ({call.budget}): failures: {failed}; unavailable: "
                                          f"{self.pool.describe_health()}")
        promise = None
        if call.mode.deadline is not None:  # a deadline call promises to overrun by one stack at most: the slowest
            slowest = max((p for name in tally.stack_ms if (p := self.estimate(call, name, p90=True)) is not None),
                          default=None)
            promise = None if slowest is None else slowest + OWN_WORK_MS
        return tally.prediction(call.budget, call.start, call.mode.task, promise)

    def _use_lanes(self, call: Call, steps: list[Step] | tuple[Step, ...]) -> bool:
        """Whether ``steps`` run on the lanes: more than one, a mode that allows it, and lanes measured faster at
        this batch size by ``edgens profile`` or, without that measurement, stacks heavy enough to repay the
        handoff (:data:`~edgens.runtime.lanes.LANE_MIN_MS`; unknown until a stack ran once here: in order)."""
        if self.lanes is None or len(steps) < 2 or not call.mode.lanes(self.lanes_asked):
            return False
        batch = len(call.x)
        table = call.latency.table
        measured = None if table is None else table.lanes_pay(batch, self.lanes.count, LANE_MIN_SPEEDUP)
        if measured is not None:
            return measured
        first = self.estimate(call, steps[0].stack)
        return first is not None and first >= LANE_MIN_MS

    def _may_start(self, call: Call, step: Step, is_fallback: bool, answered: bool, slowdown: float = 1.0) -> bool:
        """Whether the call still wants ``step`` started: deadlines (and, for fallbacks, latency budgets) allow it.
        ``slowdown``: how much longer a stack takes than its estimate because other lanes run beside it."""
        deadline = call.mode.start_by(is_fallback)
        if deadline is None:
            return True
        batch = len(call.x)
        estimate = self.estimate(call, step.stack)
        if estimate is not None:
            estimate *= slowdown
        now = time.perf_counter()
        if policies.may_start(now, deadline, estimate, answered):
            return True
        if call.latency.table is None and estimate is not None and now < deadline:
            self.latency.skipped(step.stack, batch)  # left out for its estimate: counts toward measuring it again
        return False

    def in_order(self, call: Call) -> Iterator[None]:
        """Run the stacks one after another in the calling thread; when eager, yields after each that answers."""
        mode, tally = call.mode, call.tally
        if call.todo is None:
            call.todo = deque((step, call.replanned) for step in call.steps)
            if mode.deadline is not None and not call.replanned:  # a deadline call starts with what fits in it
                self.prefix_within(call, (mode.deadline - time.perf_counter()) * 1e3, smallest=mode.streaming)
        todo = call.todo
        while todo:
            step, is_fallback = todo.popleft()
            if not self._may_start(call, step, is_fallback, tally.answered):
                break
            active = mode.active
            x = call.x if active is None or len(active) == len(call.x) else call.x[active]
            if not tally.add(self.run(step, x, mode.lean)):
                if self._use_lanes(call, step.fallback):  # a failed prefix stack's general stacks, side by side
                    assert self.lanes is not None
                    yield from self._in_lanes(call, self.lanes, step.fallback, fallback=True)
                else:
                    todo.extendleft((fallback, True) for fallback in reversed(step.fallback))
                continue
            if not mode.eager or not tally.settle(active):
                continue
            more = mode.update(tally)
            yield
            if not more:
                break

    def prefix_within(self, call: Call, limit_ms: float, smallest: bool = False) -> None:
        """Start a call that has not run a stack yet with the largest (``smallest``: for a caller who sees each
        partial prediction, the smallest) prefix stack expected to fit ``limit_ms``
        (:func:`~edgens.runtime.policies.prefix_within`)."""
        assert call.todo is not None
        if not self.manifest.prefix_stacks or not math.isfinite(limit_ms) or call.tally.answered:
            return
        steps = [step for step, _ in call.todo]
        chosen = policies.prefix_within(steps, self.manifest, self.pool.available,
                                        lambda name: self.estimate(call, name), limit_ms,
                                        smallest)
        if chosen is not steps:
            call.todo = deque((step, False) for step in chosen)

    def _in_lanes(self, call: Call, lanes: Lanes, steps: list[Step] | tuple[Step, ...],
                  fallback: bool = False) -> Iterator[None]:
        """Run ``steps`` on the lanes (``fallback``: in place of a failed stack); this thread collects their results
        and keeps the deadline. Members that finish after the deadline are left out (unless none finished before
        it: a prediction needs one)."""
        # The latency table timed each stack alone; beside other lanes it takes longer (what `edgens profile`
        # measured for the lanes says how much). Observed latencies were measured beside them already.
        mode, tally = call.mode, call.tally
        table = call.latency.table
        slowdown = 1.0 if table is None else table.lane_slowdown(len(call.x), lanes.count)
        work = LaneWork(list(steps), lambda step: self.run(step, call.x, mode.lean),
                        lambda step, is_fallback, answered: self._may_start(call, step, is_fallback, answered,
                                                                            slowdown), fallback=fallback)
        # Unless the caller wants each partial prediction as it comes, this thread is one of the lanes: a thread
        # that sleeps while others compute costs a wake-up per result (tens of microseconds on a small VM).
        inline = not mode.streaming
        serving = min(lanes.count - inline, len(steps) - inline)
        lanes.submit(work, serving)
        try:
            if inline:
                work.serve()
                serving += 1
            past_deadline = False
            while serving:
                timeout = None
                if mode.deadline is not None and tally.answered:
                    timeout = mode.deadline - time.perf_counter()
                    past_deadline = timeout <= 0
                try:
                    # past the deadline, only what already finished is collected; what still runs is late
                    result = work.results.get_nowait() if past_deadline else work.results.get(timeout=timeout)
                except queue.Empty:
                    if past_deadline:
                        break
                    past_deadline = True
                    continue
                if result is None:
                    serving -= 1
                    continue
                if mode.deadline is not None and result.finished > mode.deadline and tally.answered:
                    continue
                if tally.add(result) and mode.eager and tally.settle():
                    yield
        finally:
            work.stop()


class StepwiseCall:
    """An anytime call over the general stacks in the anytime order, run one stack at a time by its owner.

    Made by :meth:`Predictor.stepwise <edgens.runtime.predictor.Predictor.stepwise>`. The owner decides when (and
    whether) the next stack runs; the serving batcher (:mod:`edgens.runtime.batching`) interleaves several such
    calls by their requests' deadlines. Each :meth:`step` runs as ``Predictor.anytime`` would: failed stacks are
    dropped, and groups of members that deviate are left out (silent faults).
    """

    def __init__(self, executor: Executor, call: Call):
        self._executor = executor
        self._call = call
        call.todo = deque((step, False) for step in call.steps)
        self._steps = executor.in_order(call)
        self._started = self._closed = False

    def __len__(self) -> int:
        """The batch size."""
        return len(self._call.x)

    @property
    def next_stack(self) -> str | None:
        """The stack the next :meth:`step` starts with (None: none left)."""
        todo = self._call.todo
        return todo[0][0].stack if todo else None

    def next_stack_ms(self) -> float | None:
        """The expected latency of the next stack at this batch size (None: none left, or no estimate yet)."""
        name = self.next_stack
        return None if name is None else self._executor.estimate(self._call, name)

    def step(self, within_ms: float | None = None) -> bool:
        """Run stacks until one answers (stacks that fail on the way are dropped); False if none is left.

        Args:
            within_ms: for the first step only: the time its answer must come within; the largest prefix stack
                expected to fit runs instead of the first general stacks (the same members in one call).
        """
        if self._closed:
            return False
        if within_ms is not None and not self._started:
            self._executor.prefix_within(self._call, within_ms)
        self._started = True
        try:
            next(self._steps)
        except StopIteration:
            return False
        return True

    def prediction(self) -> Prediction:
        """The prediction of the members answered so far.

        Raises:
            NoMembersAvailableError: no member has answered.
        """
        return self._executor.prediction(self._call)

    def close(self) -> None:
        """Stop the call and record its stacks' health (once)."""
        if not self._closed:
            self._closed = True
            self._steps.close()
            self._executor.finish(self._call)
