"""Parallel lanes: worker threads that run one call's stacks concurrently, so that every core (or several GPU
streams) is busy when a call has more than one stack to run.

A call hands its planned stacks to the lanes as one :class:`LaneWork`. Each lane takes the next stack in order,
asks the call whether it may still start it (a deadline that the stack's estimated latency would overrun stops the
whole call, as in the sequential path), runs it and posts a :class:`~edgens.runtime.pool.StackResult`. The calling
thread only collects results: it can return at the deadline itself, with exactly the members that finished before
it, while a stack that is still running finishes in its lane and is thrown away (it cannot be preempted; at most one
stack per lane is late). onnxruntime and TensorRT release the GIL while they compute, so lanes run in parallel in one
process.

A stack that fails and has a fallback (a prefix stack's general stacks) has the fallback put at the front of the
queue by the lane that saw it fail, which then takes it up itself: a lane that found the queue empty has left, so
no lane ever waits for another.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from edgens.runtime.policies import Step

MAX_DEFAULT_LANES = 4
# A call uses the lanes only when its stacks take at least this long each (by the latency table or what the predictor
# observed): handing a stack to a lane and its result back costs tens of microseconds, which small stacks at small
# batches do not repay (2 cores: 16 stacks of 16 members at batch 1, ~0.02 ms each, took 1.6 ms on 2 lanes and 0.8 ms
# in order; at batch 64, ~0.1 ms each, 2.0 ms on 2 lanes and 2.5-3.0 ms in order).
LANE_MIN_MS = 0.1
# Where `edgens profile` measured the lanes (LatencyTable.lanes), that decides instead: lanes are used at a batch size
# only if they ran the general stacks at least this much faster there. On a shared 2-vCPU VM they often do not (the
# second core is not always there); on a dedicated device they should.
LANE_MIN_SPEEDUP = 1.1


def default_lanes() -> int:
    """Lanes per predictor: one per core, at most 4 (beyond that, each lane's session gets more threads instead)."""
    return max(1, min(MAX_DEFAULT_LANES, os.cpu_count() or 1))


class LaneResult(Protocol):
    """What a lane posts for a stack it ran (a :class:`edgens.runtime.pool.StackResult`): the lanes only need to know
    whether it failed, to run a failed stack's fallback."""

    failure: Any


R = TypeVar("R", bound=LaneResult)


class LaneWork(Generic[R]):
    """One call's stacks, shared by the lanes that run them.

    Args:
        steps: the planned stacks, in order.
        run: runs one step (in a lane's thread).
        may_start: ``(step, is_fallback, answered) -> bool``: whether the call still wants this step started;
            False ends the call's work (nothing later is started either).
        fallback: the steps stand in for a stack that failed (for ``may_start``).
    """

    def __init__(self, steps: list[Step], run: Callable[[Step], R],
                 may_start: Callable[[Step, bool, bool], bool], fallback: bool = False):
        self._queue: deque[tuple[Step, bool]] = deque((step, fallback) for step in steps)
        self._run = run
        self._may_start = may_start
        self._lock = threading.Lock()
        self._stopped = False
        self._answered = False
        self.results: queue.SimpleQueue[R | None] = queue.SimpleQueue()
        """Results as they finish, and one None per lane when that lane is done with the call."""

    def stop(self) -> None:
        """Start no more stacks (the call has returned or has enough)."""
        with self._lock:
            self._stopped = True
            self._queue.clear()

    def _take(self) -> tuple[Step, bool] | None:
        with self._lock:
            while self._queue and not self._stopped:
                step, is_fallback = self._queue.popleft()
                if self._may_start(step, is_fallback, self._answered):
                    return step, is_fallback
                self._queue.clear()  # what comes later would not fit either
            return None

    def serve(self) -> None:
        """Run stacks until the call has none left for this lane (called in each lane's thread)."""
        try:
            while (taken := self._take()) is not None:
                step, _ = taken
                result = self._run(step)
                with self._lock:
                    if result.failure is None:
                        self._answered = True
                    elif step.fallback and not self._stopped:
                        self._queue.extendleft((fallback, True) for fallback in reversed(step.fallback))
                self.results.put(result)
        finally:
            self.results.put(None)


class Lanes:
    """A fixed set of worker threads that serve calls' :class:`LaneWork` in the order the calls came."""

    def __init__(self, count: int, name: str = "edgens-lane"):
        self.count = count
        self._name = name
        self._inbox: queue.SimpleQueue[LaneWork[Any] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def submit(self, work: LaneWork[Any], lanes: int) -> None:
        """Let ``lanes`` (at most :attr:`count`) lanes work on ``work``; each posts None to its results when done."""
        with self._lock:
            while len(self._threads) < self.count:  # started on first use: a predictor that never needs them has none
                thread = threading.Thread(target=self._loop, name=f"{self._name}-{len(self._threads)}", daemon=True)
                thread.start()
                self._threads.append(thread)
        for _ in range(min(lanes, self.count)):
            self._inbox.put(work)

    def _loop(self) -> None:
        while (work := self._inbox.get()) is not None:
            work.serve()

    def close(self) -> None:
        """Stop the threads once they finish what they run (does not wait)."""
        with self._lock:
            for _ in self._threads:
                self._inbox.put(None)
            self._threads.clear()
