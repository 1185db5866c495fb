"""The stack pool: every stack's runner and standing, and the one place a stack runs.

A :class:`StackPool` loads the runners of a bundle's stacks (excluding those whose file is missing, corrupt or
unloadable), runs one stack on a normalised batch (:meth:`StackPool.run`: in the calling thread; with a stack
timeout, under the watchdog that stops it when it overruns (:mod:`edgens.runtime.watchdog`), or, for a runner that
cannot be stopped, in a worker thread of its own, so that a call can stop waiting for it), and keeps each stack's
health (:mod:`edgens.runtime.health`). A call hands the pool its outcomes once, when it ends
(:meth:`StackPool.record`): the stacks that answered count a success, those that failed (loudly, or silently as an
outlier) a failure, and ``quarantine_after`` failed calls in a row quarantine a stack. ``generation`` counts the
changes of what budgets may plan (exclusions, quarantines, retries), so that a plan made before a change is never
reused after it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgens.errors import BackendUnavailableError, BundleError
from edgens.runtime.backends import Backend, StackRunner
from edgens.runtime.bundle import Manifest, StackInfo, check_file
from edgens.runtime.checksums import KIND as CHECKSUM
from edgens.runtime.checksums import ChecksumError, stack_checksums
from edgens.runtime.health import SILENT_KINDS, StackFailure, StackHealth
from edgens.runtime.policies import Step
from edgens.runtime.watchdog import Watchdog

log = logging.getLogger(__name__)

# The latency key of a stack's lean twin (its runs in deadline calls): profiled and observed apart from the stack's
# own runner, since one thread is slower than several on a large stack.
LEAN = "@lean"


@dataclass
class StackResult:
    """One stack's run in one call, as it travels from the pool to the call's tally.

    Attributes:
        step: what was run.
        failure: why it failed, else None.
        ms: wall time of the run.
        finished: ``time.perf_counter()`` when it finished.
        output: the stack's natural parameters ``(members, B, K)`` as the pool returns them (the tally reduces them
            to the sums below and lets go of them).
        part: the sum ``(B, K)`` of the natural parameters of the step's rows (None until reduced, or failed).
        groups: with outlier detection, the sums ``(G, B, K)`` of each group of rows (general stack) it holds.
        rows: with a robust combiner, the rows' natural parameters ``(rows, B, K)``.
        finite: ``part`` is known to hold no NaN or Inf (its stack's checksums held: a non-finite class output
            makes their residual non-finite), so the tally need not test it again.
    """

    step: Step
    failure: StackFailure | None = None
    ms: float = 0.0
    finished: float = 0.0
    output: np.ndarray | None = None
    part: np.ndarray | None = None
    groups: np.ndarray | None = None
    rows: np.ndarray | None = None
    finite: bool = False


class StackPool:
    """The runners of a bundle's stacks, their health, and the worker threads of stack timeouts.

    Args:
        bundle_dir: the bundle.
        manifest: its manifest.
        backend: what makes the runners.
        strict: raise instead of excluding a stack that cannot be used.
        stack_timeout_ms: drop a stack from a call when it takes longer (None: no timeout, no worker threads).
        quarantine_after: failed calls in a row after which a stack is quarantined (None: never).
        observe: told ``(stack, batch, ms)`` after every successful run (the latency estimates).
    """

    def __init__(self, bundle_dir: Path, manifest: Manifest, backend: Backend, strict: bool = False,
                 stack_timeout_ms: float | None = None, quarantine_after: int | None = 3,
                 observe: Callable[[str, int, float], None] | None = None):
        self.bundle_dir, self.manifest, self.backend = bundle_dir, manifest, backend
        self.strict = strict
        self.quarantine_after = quarantine_after
        self.timeout_s = None if stack_timeout_ms is None else stack_timeout_ms / 1e3
        self.generation = 0  # changes of availability so far
        self._observe = observe
        # After a silent-fault signal about stack NAME: rerun its self-test, (passed, message), or None without
        # self-test data (then the signal counts as a failed call). The predictor sets it.
        self.confirm: Callable[[str], tuple[bool, str] | None] | None = None
        self._runners: dict[str, StackRunner] = {}
        # Deadline calls run a stack's lean twin where the backend makes one (a prefix stack whose own session takes
        # every core and spins: beside the next stacks, or on a VM whose second core comes and goes, that made
        # deadline calls overrun by 4-9 ms at p99). _twins maps each own runner to its twin, so that a runner
        # swapped in by fault injection serves lean runs too, and the twin is back when the own runner is.
        self._lean: dict[str, StackRunner] = {}
        self._twins: dict[int, StackRunner] = {}
        self._health = {stack.name: StackHealth(stack.name) for stack in manifest.stacks}
        # The checked stacks' bounds (edgens.runtime.checksums); calls check them in the tally, where the member sum
        # they need is made anyway.
        self.checksums = stack_checksums(manifest.stacks, manifest.n_outputs, manifest.input, manifest.preprocessing,
                                         backend.checksum_roundoff, self._graph)
        # Stack timeouts: runners that can be stopped run in the caller's thread under the watchdog, the others in
        # one worker thread per stack.
        self._watchdog = None if self.timeout_s is None else Watchdog(self.timeout_s)
        self._workers: dict[str, ThreadPoolExecutor] = {}
        self._late: dict[str, Future[np.ndarray]] = {}  # runs that timed out and may still be running
        self._reload: set[str] = set()  # quarantined by the self-test: retry() loads them from their files again
        self._lock = threading.Lock()  # health, generation, workers and late runs change under it

    # ----------------------------------------------------------------------------------------------------- loading

    def _graph(self, stack: StackInfo) -> bytes | None:
        """Stack ``stack``'s ONNX graph as stored (for its checksums' bounds), or None when it cannot be read (then
        loading it fails too, and says why)."""
        try:
            return (self.bundle_dir / stack.file).read_bytes()
        except OSError:
            return None

    def load(self, problems: dict[str, str]) -> None:
        """Start every stack's runner, excluding those with a known ``problem`` (their file) and those that fail
        to load.

        Raises:
            BundleError: in strict mode, a stack cannot be used.
            BackendUnavailableError: the backend cannot run here at all.
        """
        for stack in self.manifest.stacks:
            problem = problems.get(stack.name)
            if problem is None:
                problem = self._start(stack.name)
            if problem is not None:
                self._exclude(stack.name, problem)

    def _start(self, name: str) -> str | None:
        """Make and activate the runner of stack ``name``; returns the problem if it cannot run."""
        try:
            stack = self.manifest.stack(name)
            runner = self.backend.runner(stack)
            runner.activate()
            lean = self.backend.lean_runner(stack)
            if lean is not None:
                lean.activate()
                self._lean[name] = self._twins[id(runner)] = lean
        except BackendUnavailableError:
            raise  # the machine, not the stack, is the problem: every stack would fail the same way
        except Exception as err:  # noqa: BLE001  (a corrupt graph makes backends raise their own errors)
            if isinstance(err, BundleError):
                return str(err).removeprefix(f"stack {name}: ")
            return f"cannot load it ({type(err).__name__}: {err})"
        self._runners[name] = runner
        return None

    def _exclude(self, name: str, problem: str) -> None:
        if self.strict:
            raise BundleError(f"stack {name}: {problem} (strict mode; without it the stack is excluded)")
        log.warning("stack %s excluded: %s", name, problem)
        with self._lock:
            health = self._health[name]
            health.status, health.reason = "excluded", problem
            self.generation += 1

    # ---------------------------------------------------------------------------------------------------- standing

    @property
    def runners(self) -> dict[str, StackRunner]:
        """The loaded runners by stack name (quarantined ones included; excluded ones have none)."""
        return dict(self._runners)

    def replace_runners(self, runners: dict[str, StackRunner]) -> dict[str, StackRunner]:
        """Swap the runners of some stacks (fault injection uses this); returns the ones replaced."""
        replaced = {name: self._runners[name] for name in runners}
        self._runners.update(runners)
        for name, runner in runners.items():
            if name in self._lean:
                self._lean[name] = self._twins.get(id(runner), runner)
        return replaced

    @property
    def lean_runners(self) -> dict[str, StackRunner]:
        """The lean twins deadline calls run instead of some stacks' own runners, by latency key (``NAME@lean``)."""
        return {f"{name}{LEAN}": runner for name, runner in self._lean.items()}

    def latency_key(self, name: str, lean: bool) -> str:
        """Under which name stack ``name``'s latency is measured for a call that runs lean twins (``lean``) or not."""
        return f"{name}{LEAN}" if lean and name in self._lean else name

    def health(self) -> dict[str, StackHealth]:
        """Each stack's standing: ok, excluded or quarantined, with failure counts."""
        return dict(self._health)

    def available(self, name: str) -> bool:
        """Whether budgets may plan stack ``name`` (loaded and not quarantined)."""
        return name in self._runners and self._health[name].status == "ok"

    def describe_health(self) -> str:
        """One line: the stacks that are not available, and why."""
        lost = [f"{h.name} {h.status} ({h.reason})" for h in self._health.values() if h.status != "ok"]
        return "; ".join(lost) if lost else "all stacks available"

    def members_available(self) -> float:
        """The fraction of the bundle's members in available general stacks: what deadline and member budgets plan
        from (a prefix stack stands in for general stacks only while they are all available)."""
        general = self.manifest.general_stacks
        available = sum(len(stack.members) for stack in general if self.available(stack.name))
        return available / sum(len(stack.members) for stack in general)

    def first_available(self) -> str | None:
        """The first available general stack of the anytime order (what a deadline call runs first)."""
        return next((s.name for s in self.manifest.general_stacks if self.available(s.name)), None)

    # --------------------------------------------------------------------------------------------------- running

    def run(self, step: Step, x: np.ndarray, lean: bool = False) -> StackResult:
        """Run one stack on a normalised batch ``x`` (``lean``: its lean twin, if it has one): its outputs, checked
        for shape, or why it failed. Touches no call state (lanes run it in their threads)."""
        name = key = step.stack
        runner = self._lean.get(name) if lean else None
        if runner is None:
            runner = self._runners[name]
        else:
            key = f"{name}{LEAN}"  # observed under its own latency key
        start = time.perf_counter()
        out = failure = None
        try:
            if self.timeout_s is None:
                out = runner.run(x)
            elif runner.stoppable:  # watched in this thread: no handoff (edgens.runtime.watchdog)
                out = self._run_watched(runner, x)
            else:
                out = self._run_in_worker(runner, x)
            expected = runner.expected_output_shape(len(x))
            if getattr(out, "shape", None) != expected:
                failure = StackFailure(name, "shape", f"returned shape {getattr(out, 'shape', type(out))}, expected "
                                                      f"{expected}")
                out = None
        except _Timeout as err:
            failure = StackFailure(name, err.kind, str(err))
        except Exception as err:  # noqa: BLE001  (a backend may raise anything; KeyboardInterrupt still propagates)
            failure = StackFailure(name, "error", f"{type(err).__name__}: {err}")
        finished = time.perf_counter()
        ms = (finished - start) * 1e3
        if failure is None and self._observe is not None:
            self._observe(key, len(x), ms)
        return StackResult(step, failure, ms, finished, out)

    def _run_watched(self, runner: StackRunner, x: np.ndarray) -> np.ndarray:
        assert self._watchdog is not None
        run = self._watchdog.start(runner)
        try:
            out = runner.run(x)
        except Exception:
            if self._watchdog.finish(run):  # stopped: onnxruntime raises when its terminate flag is set
                raise self._timeout() from None
            raise
        if self._watchdog.finish(run):
            raise self._timeout()
        return out

    def _timeout(self) -> _Timeout:
        assert self.timeout_s is not None
        return _Timeout("timeout", f"took longer than the stack timeout of {self.timeout_s * 1e3:g} ms")

    def _run_in_worker(self, runner: StackRunner, x: np.ndarray) -> np.ndarray:
        name = runner.name
        with self._lock:
            late = self._late.get(name)
            if late is not None and not late.done():
                raise _Timeout("busy", "still running after timing out in an earlier call")
            worker = self._workers.get(name)
            if worker is None:
                worker = self._workers[name] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"edgens-{name}")
            future = worker.submit(runner.run, x)
        try:
            return future.result(timeout=self.timeout_s)
        except FutureTimeout:
            runner.cancel()
            with self._lock:
                self._late[name] = future
            raise self._timeout() from None

    def stack_outputs(self, x: np.ndarray, stacks: list[str] | None = None, batch_size: int | None = None
                      ) -> dict[str, np.ndarray]:
        """The whole outputs ``(members, B, K)`` of ``stacks`` (default: every available general stack) on the
        normalised batch ``x``, ``batch_size`` examples at a time (default: all), for those that answered on every
        batch (:meth:`outputs`)."""
        names = stacks if stacks is not None else [s.name for s in self.manifest.general_stacks
                                                   if self.available(s.name)]
        outputs = {name: self.outputs(self.manifest.stack(name).name, x, batch_size or len(x)) for name in names}
        return {name: eta for name, eta in outputs.items() if eta is not None}

    def outputs(self, name: str, x: np.ndarray, batch_size: int) -> np.ndarray | None:
        """Stack ``name``'s whole outputs ``(members, B, K)`` on ``x``, ``batch_size`` examples at a time, every
        value checked (for analysis and fitting); None after logging why it failed."""
        runner = self._runners[name]
        parts = []
        for i in range(0, len(x), batch_size):
            batch = x[i:i + batch_size]
            try:
                out = runner.run(batch)
                failure = _check_output(runner, out, len(batch))
                if failure is None:
                    out = self.verified(name, out, batch)
            except ChecksumError as err:
                failure = StackFailure(name, CHECKSUM, err.problem)
            except Exception as err:  # noqa: BLE001  (any backend failure drops the stack, as in predict)
                failure = StackFailure(name, "error", f"{type(err).__name__}: {err}")
            if failure is not None:
                log.warning("stack %s failed: %s", name, failure)
                return None
            parts.append(out)
        return np.concatenate(parts, axis=1)

    def verified(self, name: str, out: np.ndarray, x: np.ndarray) -> np.ndarray:
        """The members' outputs ``(members, B, K)`` of stack ``name``'s whole output ``out`` on the normalised inputs
        ``x``, its checksums (if it has them) checked on every row.

        Raises:
            ChecksumError: they do not hold.
        """
        check = self.checksums.get(name)
        return out if check is None else check.verified(out, x)

    def warm_up(self, batch_sizes: Sequence[int], repeats: int) -> None:
        """Run every available stack (and its lean twin) ``repeats`` times at each batch size (on zeros), after one
        run that is not timed (allocation), reporting the times like those of calls."""
        shape = tuple(self.manifest.input.shape)
        runners = [(name, name, runner) for name, runner in self._runners.items()]
        runners += [(name, f"{name}{LEAN}", runner) for name, runner in self._lean.items()]  # deadline calls' twins
        for batch in batch_sizes:
            x = np.zeros((batch, *shape), dtype=np.float32)
            for name, key, runner in runners:
                if not self.available(name):
                    continue
                try:
                    runner.run(x)
                    for _ in range(repeats):
                        start = time.perf_counter()
                        runner.run(x)
                        if self._observe is not None:
                            self._observe(key, batch, (time.perf_counter() - start) * 1e3)
                except Exception as err:  # noqa: BLE001  (a failing stack fails the calls that plan it, not this)
                    log.warning("warm-up of stack %s at batch %d failed: %s: %s", name, batch, type(err).__name__,
                                err)

    # ---------------------------------------------------------------------------------------------------- health

    def record(self, answered: Iterable[str], failures: Sequence[StackFailure]) -> None:
        """Record one call's outcomes, once, when it ends: a failure for each stack in ``failures`` (counting toward
        quarantine; a silent fault only when :attr:`confirm` confirms it, and then at once), a success for every
        other stack that ``answered``."""
        if not failures:  # the common call: one lock, one success each
            with self._lock:
                for name in answered:
                    self._health[name].succeeded()
            return
        failed: dict[str, StackFailure] = {}
        for failure in failures:  # one failed call per stack (a prefix stack may have several outlier groups)
            failed.setdefault(failure.stack, failure)
        # silent faults are judged by the stack's own self-test (outside the lock: it runs the stack); without
        # quarantine (quarantine_after None) there is nothing to judge: the stack is only left out of the call
        judge = self.confirm if self.quarantine_after is not None else None
        verdicts = {f.stack: judge(f.stack) for f in failed.values() if f.kind in SILENT_KINDS and judge}
        quarantined, confirmed = [], []
        with self._lock:
            for failure in failed.values():
                health, verdict = self._health[failure.stack], verdicts.get(failure.stack)
                if verdict is not None and verdict[0]:  # its self-test passed: the call's inputs were odd
                    health.cleared_by_self_test()
                elif verdict is not None:
                    health.calls += 1
                    confirmed.append((failure, verdict[1]))
                elif health.failed(failure, self.quarantine_after):
                    quarantined.append(failure.stack)
            for name in answered:
                if name not in failed:
                    self._health[name].succeeded()
            if quarantined:
                self.generation += 1
        for failure in failures:
            log.info("stack %s failed: %s", failure.stack, failure)
        for name in quarantined:
            log.warning("stack %s quarantined: %s; Predictor.retry() tries it again", name, self._health[name].reason)
        for failure, message in confirmed:
            self.quarantine(failure.stack, f"self-test confirmed the {failure.kind}: {message}", reload=True)

    def quarantine(self, name: str, reason: str, reload: bool = False) -> None:
        """Quarantine stack ``name`` at once (``reload``: its weights in memory may be corrupt, so :meth:`retry`
        loads it from its file again)."""
        with self._lock:
            health = self._health[name]
            health.status, health.reason = "quarantined", reason
            health.failures += 1
            if reload:
                self._reload.add(name)
            self.generation += 1
        log.warning("stack %s quarantined: %s; Predictor.retry() loads it from its file again", name, reason)

    def retry(self, names: list[str] | None = None, verify: Callable[[str], str | None] | None = None) -> list[str]:
        """Give quarantined and excluded stacks another chance.

        Quarantined stacks are planned again; excluded ones, and those quarantined to be reloaded, have their file
        checked and are loaded again, and the latter must then pass ``verify`` (which returns a problem or None).

        Returns:
            The stacks available again.

        Raises:
            ConfigError: an unknown stack name.
        """
        names = [h.name for h in self._health.values() if h.status != "ok"] if names is None else names
        back = []
        for name in names:
            health = self._health[self.manifest.stack(name).name]
            reload = name in self._reload
            if health.status == "quarantined" and not reload:
                self._late.pop(name, None)
            elif health.status == "excluded" or reload:
                problem = self._reload_from_file(name)
                if problem is None and reload and verify is not None:
                    problem = verify(name)
                if problem is not None:
                    log.warning("stack %s still %s: %s", name, health.status, problem)
                    health.reason = problem
                    continue
                self._reload.discard(name)
            with self._lock:
                health.status, health.reason, health.consecutive_failures = "ok", None, 0
            back.append(name)
        with self._lock:
            self.generation += 1
        return back

    def _reload_from_file(self, name: str) -> str | None:
        stack = self.manifest.stack(name)
        old = self._runners.pop(name, None)
        if old is not None:
            old.deactivate()
            twin = self._twins.pop(id(old), None)
            if twin is not None:
                twin.deactivate()
        self._lean.pop(name, None)
        return check_file(self.bundle_dir, stack.file, stack.sha256, stack.bytes) or self._start(name)

    def close(self) -> None:
        """Stop the watchdog and the worker threads (without waiting for late runs) and free every runner."""
        if self._watchdog is not None:
            self._watchdog.close()
        for worker in self._workers.values():
            worker.shutdown(wait=False, cancel_futures=True)
        self._workers.clear()
        for runner in [*self._runners.values(), *self._twins.values()]:
            runner.deactivate()


def _check_output(runner: StackRunner, out: np.ndarray, batch: int) -> StackFailure | None:
    """Shape and finiteness of a whole output (calls check only the sums they use)."""
    expected = runner.expected_output_shape(batch)
    shape = getattr(out, "shape", None)
    if shape != expected:
        return StackFailure(runner.name, "shape", f"returned shape {shape}, expected {expected}")
    if not np.isfinite(out).all():
        return StackFailure(runner.name, "non-finite", "returned NaN or infinite values")
    return None


class _Timeout(Exception):
    """A stack was too slow (``timeout``) or still busy from an earlier timeout (``busy``)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
