"""Stack timeouts without a thread handoff: runs that can be stopped are watched in the caller's thread.

A stack timeout used to run every stack in a worker thread of its own, so that the caller could stop waiting for a
hung one; that costs two thread handoffs per stack call (on the 2-core test machine about 0.1 ms of a 0.8 ms served
request). A runner whose :meth:`~edgens.runtime.backends.base.StackRunner.cancel` makes a run in progress return
promptly (onnxruntime on the CPU: ``RunOptions.terminate`` is checked between operators) is *stoppable*: it runs in
the caller's thread while one :class:`Watchdog` thread per pool stops it when it overruns. Runners that cannot be
stopped (a GPU kernel, TensorRT, a fault-injected ``hold``) keep the worker threads (:mod:`edgens.runtime.pool`).

The watchdog is woken by nothing on the hot path: registering a run is a dict insertion under a lock. It sleeps until
the earliest deadline of the runs it watches, or for one time limit when it watches none; since every run's
deadline is at least one time limit after it starts, the watchdog is awake before any deadline passes.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass

from edgens.runtime.backends.base import StackRunner


@dataclass(eq=False)
class WatchedRun:
    """One run in progress: its runner, when it must have finished, and whether the watchdog stopped it."""

    runner: StackRunner
    deadline: float  # time.perf_counter() seconds
    key: int
    stopped: bool = False


class Watchdog:
    """Stops watched runs that pass their deadline, ``limit_s`` after they start (see the module docstring)."""

    def __init__(self, limit_s: float):
        self.limit_s = limit_s
        self._runs: dict[int, WatchedRun] = {}
        self._keys = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def start(self, runner: StackRunner) -> WatchedRun:
        """Watch a run of ``runner`` that starts now; pass what this returns to :meth:`finish` when it returns."""
        run = WatchedRun(runner, time.perf_counter() + self.limit_s, next(self._keys))
        with self._cond:
            self._runs[run.key] = run
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._watch, name="edgens-watchdog", daemon=True)
                self._thread.start()
        return run

    def finish(self, run: WatchedRun) -> bool:
        """Stop watching ``run``; returns whether it overran its deadline (the watchdog stopped it, or it returned
        after its deadline before the watchdog got to it)."""
        with self._cond:
            del self._runs[run.key]
        return run.stopped or time.perf_counter() > run.deadline

    def close(self) -> None:
        """Stop the watchdog thread (runs in progress are no longer watched)."""
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _watch(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.perf_counter()
                wake = now + self.limit_s
                for run in self._runs.values():
                    if run.stopped:
                        continue
                    if run.deadline <= now:
                        # Under the lock: finish() cannot remove the run meanwhile, so a later run of the same
                        # runner is never the one stopped (each run clears the runner's stop request as it starts).
                        run.stopped = True
                        run.runner.cancel()
                    else:
                        wake = min(wake, run.deadline)
                self._cond.wait(wake - now)
