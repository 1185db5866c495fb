"""Dynamic batching with per-request deadlines: one predictor serving many callers (what ``edgens serve`` runs).

    batcher = Batcher(predictor, max_batch=64, max_queue=64)
    future = batcher.submit(x, Budget.parse(deadline_ms=5))   # from any thread; the deadline counts from now
    prediction = future.result()                              # a Prediction of x's examples
    batcher.close()                                           # answers everything admitted, then stops

Requests wait in a bounded queue; when ``max_queue`` requests wait, :meth:`Batcher.submit` raises
:class:`~edgens.errors.OverloadedError` at once (an overloaded service refuses fast rather than answering late).
One worker thread runs the predictor and, between stack calls, picks what runs next:

- Requests with a fixed plan (``members``, ``flops``, ``latency_ms``, ``confidence``, ``task``, all members) that
  wait with the same budget are merged into one :meth:`Predictor.predict` call, first come first served, before
  anything else runs.
- Deadline requests (``deadline_ms``) are merged into cohorts: one :class:`~edgens.runtime.predictor.StepwiseCall`
  over the cohort's examples runs the general stacks in the anytime order, one stack call for all of them. A
  request leaves its cohort with the prediction so far as soon as the next stack could not finish before its own
  deadline (counted from its arrival, queueing included), and is answered then; the others go on.
- The next stack call is the cohort's whose open request has the earliest deadline; waiting deadline requests form
  a new cohort instead when their earliest deadline is earlier, or when one more stack of that cohort would leave a
  waiting request no time for its first stack (least laxity first). Every request gets at least one stack: a
  prediction needs a member, so a request that waited past its deadline overruns it by its first stack.

Failures are the predictor's: failed, slow and outlier stacks are dropped from the call that met them, and a call
with no member left fails its requests with :class:`~edgens.errors.NoMembersAvailableError`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from edgens.checks import check_number
from edgens.errors import InputError, OverloadedError, ServiceStoppingError
from edgens.runtime.policies import Budget, may_start
from edgens.runtime.execution import StepwiseCall
from edgens.runtime.inputs import PreparedInput
from edgens.runtime.prediction import Prediction
from edgens.runtime.predictor import Predictor

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Request:
    x: PreparedInput | np.ndarray  # checked (Predictor.inputs.check); the worker prepares it
    budget: Budget
    arrival: float  # time.perf_counter() seconds
    deadline: float | None  # absolute, for deadline budgets
    future: Future[Prediction] = field(default_factory=Future)
    rows: slice = field(default_factory=lambda: slice(0, 0))  # its examples in the merged batch
    started: float | None = None  # when its first stack call (or predict call) started


@dataclass(eq=False)
class _Cohort:
    """Deadline requests merged into one stepwise call."""

    call: StepwiseCall
    open: list[_Request]
    prediction: Prediction | None = None  # after the last step, made when the first request leaves

    def urgency(self) -> float:
        return min(request.deadline for request in self.open)  # type: ignore[type-var]


class Batcher:
    """Merges concurrent requests into batched stack calls, keeping each request's deadline (module docstring).

    Args:
        predictor: a loaded predictor; the batcher's worker thread is the only one that should call it meanwhile
            (health checks and the self-test may still run beside it).
        max_batch: the most examples one stack call takes; a request may not have more.
        max_queue: the most requests that may wait to start.
        on_batch: called from the worker with ``(examples, requests)`` of every merged stack or predict call
            (``edgens serve`` turns it into a metric); an attribute, so that it may be set after construction.
    """

    def __init__(self, predictor: Predictor, max_batch: int = 64, max_queue: int = 64,
                 on_batch: Callable[[int, int], None] | None = None):
        check_number("max_batch", max_batch, low=1, integer=True)
        check_number("max_queue", max_queue, low=1, integer=True)
        self.predictor = predictor
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.on_batch = on_batch
        self._deadline_queue: deque[_Request] = deque()
        self._fixed_queue: deque[_Request] = deque()
        self._cohorts: list[_Cohort] = []
        self._cond = threading.Condition()
        self._closing = False
        self._in_flight = 0  # requests taken from the queue and not yet answered
        self._worker = threading.Thread(target=self._serve, name="edgens-batcher", daemon=True)
        self._worker.start()

    # -------------------------------------------------------------------------------------------------- callers

    @property
    def queue_depth(self) -> int:
        """Requests waiting to start."""
        return len(self._deadline_queue) + len(self._fixed_queue)

    @property
    def in_flight(self) -> int:
        """Requests started and not yet answered."""
        return self._in_flight

    @property
    def closing(self) -> bool:
        """Whether :meth:`close` was called (no request is admitted any more)."""
        return self._closing

    def submit(self, x: object, budget: Budget, arrival: float | None = None) -> Future[Prediction]:
        """Admit one request: check it, queue it, and return the future of its prediction.

        Args:
            x: raw inputs, or a :class:`~edgens.runtime.predictor.PreparedInput` of this predictor.
            budget: the request's budget (:meth:`Budget.parse`).
            arrival: when the request arrived (``time.perf_counter()``; default now): a deadline counts from it.

        Raises:
            InputError: a type or shape that does not fit, or more examples than ``max_batch`` (values the
                predictor refuses, NaN or out of range, fail the future instead: the worker checks them).
            ConfigError, NoMembersAvailableError: a budget the predictor cannot plan now.
            OverloadedError: ``max_queue`` requests are waiting.
            ServiceStoppingError: the batcher is closing.
        """
        arrival = time.perf_counter() if arrival is None else arrival
        # type and shape only: the worker normalises it and checks its values, off the caller's thread
        checked = x if isinstance(x, PreparedInput) else self.predictor.inputs.check(x)
        if len(checked) > self.max_batch:
            raise InputError(f"input: received a batch of {len(checked)} examples, expected at most "
                             f"{self.max_batch} (the batcher's max_batch) per request")
        self.predictor.check_budget(budget, len(checked))
        deadline = arrival + budget.value / 1e3 if budget.kind == "deadline_ms" else None
        request = _Request(checked, budget, arrival, deadline)
        with self._cond:
            if self._closing:
                raise ServiceStoppingError("the service is shutting down and accepts no new requests")
            self.check_room()
            (self._deadline_queue if deadline is not None else self._fixed_queue).append(request)
            self._cond.notify()
        return request.future

    def check_room(self) -> None:
        """Raise when ``max_queue`` requests are waiting (a server asks this before it reads a request's body).

        Raises:
            OverloadedError: the queue is full.
        """
        if self.queue_depth >= self.max_queue:
            raise OverloadedError(f"the queue is full ({self.max_queue} requests waiting); try again later")

    def close(self, timeout: float | None = None) -> bool:
        """Admit no more requests, answer those admitted, and stop the worker. Returns whether it stopped within
        ``timeout`` seconds (None: wait for it)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._worker.join(timeout)
        return not self._worker.is_alive()

    # --------------------------------------------------------------------------------------------------- worker

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self.queue_depth and not self._cohorts and not self._closing:
                    self._cond.wait()
                if not self.queue_depth and not self._cohorts:
                    return  # closing, and everything admitted was answered
                fixed = self._take_fixed()
            try:
                if fixed:
                    for group in fixed:
                        self._run_fixed(group)
                else:
                    self._step_deadlines()
            except Exception as err:  # noqa: BLE001  (the worker must not die: fail what it holds, go on)
                log.exception("batcher step failed")
                self._fail_all(err)

    def _take_fixed(self) -> list[list[_Request]]:
        """The waiting fixed-plan requests, grouped by budget (first come first served), each group at most
        ``max_batch`` examples. Called under the lock."""
        groups: dict[Budget, list[list[_Request]]] = {}
        while self._fixed_queue:
            request = self._fixed_queue.popleft()
            chunks = groups.setdefault(request.budget, [[]])
            if sum(len(r.x) for r in chunks[-1]) + len(request.x) > self.max_batch:
                chunks.append([])
            chunks[-1].append(request)
            self._in_flight += 1
        return [chunk for chunks in groups.values() for chunk in chunks]

    def _run_fixed(self, group: list[_Request]) -> None:
        x, group = self._merge(group)
        if not group:
            return
        started = time.perf_counter()
        for request in group:
            request.started = started
        if self.on_batch is not None:
            self.on_batch(len(x), len(group))
        try:
            prediction = self.predictor.predict(x, group[0].budget)
        except Exception as err:  # noqa: BLE001  (delivered to the callers, who report it)
            for request in group:
                self._deliver(request, error=err)
            return
        for request in group:
            self._deliver(request, prediction)

    def _step_deadlines(self) -> None:
        """One scheduling decision among the deadline work: pick the next stack call, answer the requests that
        cannot wait for another stack, run the call."""
        now = time.perf_counter()
        with self._cond:
            waiting = list(self._deadline_queue)
        start_new, cohort, expected_s = self._choose(waiting, now)
        self._leave(now, cohort, expected_s)
        if cohort is not None and cohort not in self._cohorts:
            return  # every request of the chosen cohort left: choose again
        if start_new:
            self._start_cohort()
        elif cohort is not None:
            self._advance(cohort)

    def _choose(self, waiting: list[_Request], now: float) -> tuple[bool, _Cohort | None, float]:
        """``(start a new cohort?, else the cohort to step, seconds the chosen call is expected to take)``."""
        best = min(self._cohorts, key=_Cohort.urgency) if self._cohorts else None
        best_s = 0.0 if best is None else (best.call.next_stack_ms() or 0.0) / 1e3
        if not waiting:
            return False, best, best_s
        first = self.predictor.first_stack()
        batch = min(self.max_batch, sum(len(r.x) for r in waiting))
        first_s = ((self.predictor.stack_ms(first, batch) if first else None) or 0.0) / 1e3
        earliest = min(request.deadline for request in waiting)  # type: ignore[type-var]
        if best is None or earliest < best.urgency() or earliest - now - first_s < best_s:
            return True, None, first_s
        return False, best, best_s

    def _leave(self, now: float, chosen: _Cohort | None, expected_s: float) -> None:
        """Answer every open request that could not get another stack before its deadline, given that the chosen
        call (``expected_s``) runs first; close cohorts with no open request left."""
        for cohort in list(self._cohorts):
            estimate = cohort.call.next_stack_ms()
            has_next = cohort.call.next_stack is not None
            start = now if cohort is chosen else now + expected_s
            leaving = [r for r in cohort.open
                       if not has_next or not may_start(start, r.deadline, estimate, True)]  # type: ignore[arg-type]
            if not leaving:
                continue
            error = None
            if cohort.prediction is None:
                try:
                    cohort.prediction = cohort.call.prediction()
                except Exception as err:  # noqa: BLE001  (no member answered: the callers get the error)
                    error = err
            for request in leaving:
                self._deliver(request, cohort.prediction, error)
            cohort.open = [r for r in cohort.open if r not in leaving]
            self._close_if_done(cohort)

    def _close_if_done(self, cohort: _Cohort) -> None:
        if not cohort.open:
            cohort.call.close()
            self._cohorts.remove(cohort)

    def _start_cohort(self) -> None:
        """Merge the waiting deadline requests (earliest deadline first, up to ``max_batch`` examples) into a new
        cohort and run its first stack."""
        with self._cond:
            ordered = sorted(self._deadline_queue, key=lambda r: r.deadline)  # type: ignore[arg-type,return-value]
            taken, examples = [], 0
            for request in ordered:
                if examples + len(request.x) > self.max_batch:
                    break
                taken.append(request)
                examples += len(request.x)
            started = time.perf_counter()
            for request in taken:
                self._deadline_queue.remove(request)
                request.started = started
            self._in_flight += len(taken)
        x, taken = self._merge(taken)
        if not taken:
            return
        try:
            call = self.predictor.stepwise(x)
        except Exception as err:  # noqa: BLE001  (e.g. no stack available)
            for request in taken:
                self._deliver(request, error=err)
            return
        cohort = _Cohort(call, taken)
        self._cohorts.append(cohort)
        # the first answer must come before the earliest deadline: the largest prefix stack that fits it, if any
        self._advance(cohort, (cohort.urgency() - time.perf_counter()) * 1e3)

    def _advance(self, cohort: _Cohort, within_ms: float | None = None) -> None:
        if self.on_batch is not None:
            self.on_batch(len(cohort.call), len(cohort.open))
        cohort.call.step(within_ms)
        cohort.prediction = None

    def _merge(self, requests: list[_Request]) -> tuple[PreparedInput, list[_Request]]:
        """The requests' inputs, normalised and merged into one batch, and the requests in it: one whose values
        the predictor refuses (NaN, out of range) is answered with that error, the others go on."""
        inputs = self.predictor.inputs
        raw = [request.x for request in requests]
        dtype = getattr(raw[0], "dtype", None) if raw else None
        if len(raw) > 1 and dtype is not None and inputs.values_need_no_check(dtype) and all(
                isinstance(x, np.ndarray) and x.dtype == dtype for x in raw):
            # Values that need no check (uint8 images): merged raw and normalised once, 10x cheaper than one by one
            # at 64 requests of one image.
            start = 0
            for request in requests:
                request.rows = slice(start, start + len(request.x))
                start += len(request.x)
            same = all(x.shape[1:] == raw[0].shape[1:] for x in raw)  # type: ignore[union-attr]
            merged = np.concatenate(raw if same else [x.reshape(len(x), *inputs.shape) for x in raw])  # type: ignore
            return PreparedInput(inputs.normalise(merged)), requests
        parts, kept, start = [], [], 0
        for request in requests:
            try:
                prepared = self.predictor.prepare(request.x)
            except InputError as err:
                self._deliver(request, error=err)
                continue
            request.rows = slice(start, start + len(prepared))
            start += len(prepared)
            parts.append(prepared)
            kept.append(request)
        return (PreparedInput.concatenate(parts) if parts else PreparedInput(np.empty(0))), kept

    def _deliver(self, request: _Request, prediction: Prediction | None = None,
                 error: BaseException | None = None) -> None:
        self._in_flight -= 1
        if error is not None:
            request.future.set_exception(error)
            return
        assert prediction is not None
        elapsed_ms = (time.perf_counter() - request.arrival) * 1e3
        queued_ms = (request.started - request.arrival) * 1e3 if request.started is not None else None
        request.future.set_result(prediction.select(
            request.rows, elapsed_ms=elapsed_ms, budget=str(request.budget), queued_ms=queued_ms,
            deadline_ms=request.budget.value if request.deadline is not None else None))

    def _fail_all(self, err: BaseException) -> None:
        """After an unexpected error in the worker: fail the requests it holds, so that no caller waits forever."""
        for cohort in self._cohorts:
            for request in cohort.open:
                if not request.future.done():
                    self._deliver(request, error=err)
            cohort.call.close()
        self._cohorts.clear()
