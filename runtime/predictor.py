"""The public API of the on-device runtime: load a bundle, predict within a budget, survive failing stacks.

    predictor = Predictor.load("bundle")                 # backend="auto": TensorRT engines or onnxruntime
    prediction = predictor.predict(x_uint8, deadline_ms=5)
    prediction.probabilities, prediction.labels, prediction.members_used, prediction.failures

A call checks and normalises the input once, plans the stacks its budget allows (:mod:`edgens.runtime.policies`),
runs them and averages the natural parameters of the members that answered (:mod:`edgens.ensemble`). A plan of one
stack (a prefix stack holding every member the budget wants, a specialist) runs in the calling thread; a plan of
several runs on the predictor's parallel lanes (:mod:`edgens.runtime.lanes`), except confidence budgets, whose
later stacks depend on the earlier ones' answers, and predictors loaded with ``lanes=1``.

A stack that raises, returns NaN/Inf or the wrong shape, or (with ``stack_timeout_ms``) is too slow, is dropped for
that call and reported in ``Prediction.failures``; after ``quarantine_after`` failed calls in a row it is
quarantined until :meth:`Predictor.retry`. Only when no member at all answers does a call raise
:class:`NoMembersAvailableError`.

Silent faults (wrong but finite outputs, e.g. a weight corrupted in memory): with the bundle's outlier thresholds,
each call measures how far each group of members (one general stack's) deviates from the others and leaves out the
groups past their thresholds (:mod:`edgens.runtime.outliers`), reported as ``outlier`` failures that count toward
quarantine. :meth:`Predictor.self_test` reruns every stack on inputs stored at export and quarantines those whose
outputs changed; ``retry`` reloads them from their files. ``combiner="median"`` or ``"trimmed"`` combines the
members robustly instead of by the mean.

With ``stack_timeout_ms``, each stack runs in a worker thread of its own, so that the call can stop waiting for it;
the late stack is asked to cancel and is reported as ``busy`` until it has finished.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from edgens.checks import check_number
from edgens.errors import (BackendUnavailableError, BundleError, ConfigError, NoMembersAvailableError,
                           PredictorClosedError)
from edgens.runtime import policies
from edgens.runtime.backends import Backend, StackRunner, create_backend
from edgens.ensemble import COMBINERS, DEFAULT_TRIM, combine, inverse_link
from edgens.errors import unknown_choice
from edgens.runtime.health import StackFailure, StackHealth
from edgens.runtime.inputs import InputPreparer
from edgens.runtime.lanes import LANE_MIN_MS, LANE_MIN_SPEEDUP, Lanes, LaneWork, StackResult, default_lanes
from edgens.runtime.manifest import (Manifest, SelfTestData, check_file, check_stack_files, load_manifest,
                                     read_self_test)
from edgens.runtime.outliers import GroupCheck
from edgens.runtime.policies import Budget, Step
from edgens.runtime.selftest import SelfTestResult, compare_outputs
from edgens.runtime.device_info import power_mode_key
from edgens.runtime.latency import LatencyTable, ObservedLatency, find_table, load_latency_tables, other_modes

log = logging.getLogger(__name__)

# How often (at most) latency and deadline calls read the device's power mode, to follow `nvpmodel -m` at run time.
POWER_MODE_CHECK_S = 2.0


@dataclass
class Prediction:
    """The result of one call.

    Attributes:
        family: the bundle's target family.
        mean: ``(B, K)`` the prediction: class probabilities (categorical), the mean (gaussian), the rate (poisson).
        eta: ``(B, K)`` the mean natural parameters of the members used.
        labels: ``(B,)`` the most probable class (categorical), else None.
        members_used: ``(B,)`` members averaged for each example.
        stacks_run: stacks that answered, in the order they finished.
        failures: stacks that failed in this call.
        elapsed_ms: wall time of the call, input checks included.
        stack_ms: wall time of each stack that ran (failed ones included).
        budget: the budget, as text.
        deadline_ms: the deadline of a ``deadline_ms`` call, else None.
        task: the specialist task of a ``task`` call, else None.
        outliers_checked: whether silent-fault detection checked this call's members (it needs the bundle's
            thresholds and at least three groups answered, and does not run under confidence or task budgets).
    """

    family: str
    mean: np.ndarray
    eta: np.ndarray
    labels: np.ndarray | None
    members_used: np.ndarray
    stacks_run: list[str]
    failures: list[StackFailure]
    elapsed_ms: float
    stack_ms: dict[str, float] = field(default_factory=dict)
    budget: str = "all members"
    deadline_ms: float | None = None
    task: str | None = None
    outliers_checked: bool = False

    @property
    def probabilities(self) -> np.ndarray:
        """Class probabilities (B, K) of a categorical bundle.

        Raises:
            ConfigError: the bundle is gaussian or poisson (use ``mean``).
        """
        if self.family != "categorical":
            raise ConfigError(f"a {self.family} bundle predicts means, not probabilities; use Prediction.mean")
        return self.mean

    @property
    def overrun_ms(self) -> float:
        """How far past its deadline the call finished (0 if in time or without a deadline)."""
        return max(0.0, self.elapsed_ms - self.deadline_ms) if self.deadline_ms is not None else 0.0

    def select(self, rows: slice | np.ndarray, **changes: Any) -> Prediction:
        """The prediction of some examples only (e.g. one request's rows of a merged batch), with ``changes`` to
        its other fields (``elapsed_ms``, ``budget``...)."""
        return replace(self, mean=self.mean[rows], eta=self.eta[rows],
                       labels=None if self.labels is None else self.labels[rows],
                       members_used=self.members_used[rows], stacks_run=list(self.stacks_run),
                       failures=list(self.failures), stack_ms=dict(self.stack_ms), **changes)


@dataclass(frozen=True)
class PreparedInput:
    """A batch :meth:`Predictor.prepare` checked and normalised; ``predict``, ``anytime`` and ``stepwise`` take it
    without checking it again (the serving batcher prepares each request as it arrives, then merges them)."""

    array: np.ndarray  # (B, *input.shape) float32, normalised

    def __len__(self) -> int:
        return len(self.array)

    @staticmethod
    def concatenate(parts: Sequence[PreparedInput]) -> PreparedInput:
        """One batch of several prepared batches, in order."""
        return parts[0] if len(parts) == 1 else PreparedInput(np.concatenate([part.array for part in parts]))


@dataclass
class _Call:
    """The state of one call while its stacks run.

    Stacks that answered wait in ``pending`` until :meth:`Predictor._settle` checks their sums for NaN/Inf, adds
    them to ``eta_sum`` and checks the groups answered so far for outliers: after every stack when someone looks at
    partial results (deadlines, early exit, callbacks, the anytime iterator), otherwise once at the end, which keeps
    the per-stack work of a plain call to one sum. Stack health is recorded once, when the call ends
    (:meth:`Predictor._finish`), so that an outlier found late in a call counts as that stack's failure.
    """

    x: np.ndarray
    budget: Budget
    steps: list[Step]
    start: float
    eta_sum: np.ndarray
    eager: bool = False  # settle after every stack
    streaming: bool = False  # the caller sees each partial prediction (anytime iterator, on_update)
    members: int = 0  # members that answered for every example (all budgets but confidence)
    deadline: float | None = None
    # latency_ms budgets: fallback stacks (a failed prefix stack's general stacks) start only while they fit this
    fallback_deadline: float | None = None
    replanned: bool = False  # ``steps`` became the fallback of the one stack planned, which failed
    # Confidence budgets only: indices of the examples still running, and members answered per example.
    active: np.ndarray | None = None
    counts: np.ndarray | None = None
    todo: deque[tuple[Step, bool]] | None = None  # in-order runs: the steps still to run (and if they are fallbacks)
    pending: list[StackResult] = field(default_factory=list)
    settled: list[StackResult] = field(default_factory=list)  # those added to eta_sum
    # Outlier detection: the stacks whose rows form groups (general stacks' members), and the groups left out
    checked: list[StackResult] = field(default_factory=list)  # stacks whose groups are checked
    left_out: dict[str, str] = field(default_factory=dict)  # outlier group -> the stack that answered it
    outliers_checked: bool = False
    stacks_run: list[str] = field(default_factory=list)
    failures: list[StackFailure] = field(default_factory=list)
    stack_ms: dict[str, float] = field(default_factory=dict)
    task: str | None = None


class Predictor:
    """Runs a bundle's member stacks within a budget and combines the members that answer.

    Build one with :meth:`load`. Threads may share one (docs/runtime.md, "Threads").

    Attributes:
        bundle_dir: the bundle.
        manifest: its manifest.
        backend: what runs the stacks.
        latency_table: this device's latency table for the backend and power mode (None until ``edgens profile``
            ran in that mode).
        power_mode: the device's power mode (:attr:`~edgens.runtime.device_info.PowerMode.key`) as last read by
            :meth:`reload_latency` (at load); None where the machine has none.
    """

    def __init__(self, bundle_dir: Path, manifest: Manifest, backend: Backend, strict: bool = False,
                 stack_timeout_ms: float | None = None, quarantine_after: int | None = 3, lanes: int | None = None,
                 detect_outliers: bool = True, outlier_margin: float | None = None, combiner: str = "mean",
                 trim: float = DEFAULT_TRIM):
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.backend = backend
        self.strict = strict
        self.quarantine_after = quarantine_after
        self._timeout_s = None if stack_timeout_ms is None else stack_timeout_ms / 1e3
        self._prepare = InputPreparer(manifest.input, manifest.preprocessing)
        self._runners: dict[str, StackRunner] = {}
        self._health = {stack.name: StackHealth(stack.name) for stack in manifest.stacks}
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._pending: dict[str, Any] = {}
        self._observed = ObservedLatency()  # deadlines without a latency table
        self._plans: dict[tuple[Budget, int], list[Step]] = {}
        self.latency_table: LatencyTable | None = None
        self.power_mode: str | None = None  # the device's power mode when the latency table was picked
        self._power_check_due = 0.0  # time.monotonic() after which latency and deadline calls read the mode again
        self._latency_problem: str | None = None
        self._closed = False
        self.lanes = lanes or default_lanes()
        self._lanes_asked = lanes is not None
        self._lanes = Lanes(self.lanes) if self.lanes > 1 else None
        self.combiner, self.trim = combiner, trim
        # Silent-fault detection: each member's group (the general stack holding it) and each group's threshold.
        self.outliers = manifest.outliers if detect_outliers else None
        self.outlier_margin = outlier_margin or (self.outliers.margin if self.outliers is not None else None)
        self._group_of = {member: stack.name for stack in manifest.general_stacks for member in stack.members}
        self._group_size = {stack.name: len(stack.members) for stack in manifest.general_stacks}
        self._layouts: dict[tuple[str, tuple[int, ...] | None], _Layout | None] = {}
        self._checks: dict[tuple, GroupCheck] = {}  # per sequence of checked steps
        self._reload: set[str] = set()  # quarantined by the self-test: retry() loads them from their files again
        self._self_test_stop = threading.Event()
        self._self_test_thread: threading.Thread | None = None
        self._self_test_cache: tuple[np.ndarray, SelfTestData] | None = None  # normalised inputs, expected
        # Calls may come from several threads at once (docs/runtime.md, "Threads"): each call's state is its own;
        # what calls share (health, observed latencies, the plan cache, worker pools) changes under this lock.
        self._lock = threading.Lock()

    # ---------------------------------------------------------------------------------------------------- loading

    @classmethod
    def load(cls, bundle: str | Path, backend: str = "auto", *, strict: bool = False,
             stack_timeout_ms: float | None = None, quarantine_after: int | None = 3, lanes: int | None = None,
             detect_outliers: bool = True, outlier_margin: float | None = None, combiner: str = "mean",
             trim: float = DEFAULT_TRIM, self_test_interval_s: float | None = None,
             **backend_options: Any) -> Predictor:
        """Load a bundle and start its stacks.

        Args:
            bundle: the bundle directory.
            backend: ``auto``, ``onnxruntime`` or ``tensorrt``.
            strict: raise instead of excluding a stack whose file is missing, corrupt or unloadable.
            stack_timeout_ms: drop a stack from a call when it takes longer than this (runs each stack in a worker
                thread; None: no timeout, no threads).
            quarantine_after: consecutive failed calls after which a stack is quarantined (None: never).
            lanes: stacks a call may run at once (default: one per core, at most 4, but deadline calls in the
                calling thread only; 1: everything one after another in the calling thread; given explicitly,
                deadline calls use the lanes too). See :mod:`edgens.runtime.lanes` and docs/runtime.md.
            detect_outliers: leave out groups of members that deviate from the others beyond the thresholds
                fitted at export (silent faults); needs a bundle that has them (exported by edgens >= 0.1 with
                three or more general stacks), else nothing is checked.
            outlier_margin: how many times its threshold a group may deviate (default: the bundle's, 1.5).
            combiner: ``mean`` (the paper's), ``median`` or ``trimmed`` (see :func:`edgens.ensemble.combine`).
            trim: the fraction a ``trimmed`` combiner cuts from each end.
            self_test_interval_s: rerun :meth:`self_test` in a background thread this often (None: only when
                called).
            **backend_options: e.g. ``providers`` and ``threads`` (onnxruntime), ``precision`` (tensorrt).

        Raises:
            DataNotFoundError: the bundle or its manifest does not exist.
            BundleError: the manifest is unreadable or incompatible; in strict mode, a stack cannot be used.
            BackendUnavailableError: the backend cannot run here (the message says what to install).
            ConfigError: an unknown backend or option out of range.
            NoMembersAvailableError: no stack at all could be loaded.
        """
        if stack_timeout_ms is not None:
            check_number("stack_timeout_ms", stack_timeout_ms, low=0, low_open=True)
        if quarantine_after is not None:
            check_number("quarantine_after", quarantine_after, low=1, integer=True)
        if lanes is not None:
            check_number("lanes", lanes, low=1, integer=True)
        if outlier_margin is not None:
            check_number("outlier_margin", outlier_margin, low=0, low_open=True)
        if combiner not in COMBINERS:
            raise unknown_choice("combiner", combiner, COMBINERS)
        check_number("trim", trim, low=0, high=0.5, high_open=True)
        if self_test_interval_s is not None:
            check_number("self_test_interval_s", self_test_interval_s, low=0, low_open=True)
        bundle_dir = Path(bundle)
        manifest = load_manifest(bundle_dir)
        engine = create_backend(backend, bundle_dir, manifest, **backend_options)
        predictor = cls(bundle_dir, manifest, engine, strict, stack_timeout_ms, quarantine_after, lanes,
                        detect_outliers, outlier_margin, combiner, trim)
        problems = check_stack_files(bundle_dir, manifest)
        for stack in manifest.stacks:
            problem = problems.get(stack.name)
            if problem is None:
                problem = predictor._start(stack.name)
            if problem is not None:
                predictor._exclude(stack.name, problem)
        if not predictor._runners:
            raise NoMembersAvailableError(f"no stack of {bundle_dir} could be loaded: {predictor.describe_health()}")
        predictor.reload_latency()
        if detect_outliers and manifest.outliers is None:
            log.info("%s has no outlier thresholds (exported before silent-fault detection, or with fewer than three "
                     "general stacks): calls are not checked for outliers", bundle_dir)
        if self_test_interval_s is not None:
            predictor._start_self_tests(self_test_interval_s)
        log.info("loaded %s: %d/%d stacks on %s", bundle_dir, len(predictor._runners), len(manifest.stacks),
                 predictor.backend.describe())
        return predictor

    def _start(self, name: str) -> str | None:
        """Make and activate the runner of stack ``name``; returns the problem if it cannot run."""
        try:
            runner = self.backend.runner(self.manifest.stack(name))
            runner.activate()
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
        health = self._health[name]
        health.status, health.reason = "excluded", problem
        self._plans.clear()

    def reload_latency(self) -> None:
        """Read ``latency.json`` and the device's power mode again, and pick the table of this backend, providers,
        device and power mode. Tables of other power modes are never used (their latencies can be several times
        off); finding only those is logged as a warning, and ``latency_ms`` budgets then refuse with the fix."""
        self.latency_table, self._latency_problem = None, None
        self._plans.clear()
        self._power_check_due = time.monotonic() + POWER_MODE_CHECK_S
        self.power_mode = power_mode_key()
        description = self.backend.describe()
        try:
            tables = load_latency_tables(self.bundle_dir)
        except BundleError as err:
            self._latency_problem = str(err)
            log.warning("latency table ignored: %s", err)
            return
        self.latency_table = find_table(tables, description, self.power_mode)
        others = other_modes(tables, description, self.power_mode)
        if self.latency_table is None and others:
            self._latency_problem = (f"{self.bundle_dir}/latency.json has tables for this backend and device in power "
                                     f"mode {', '.join(others)}, none for the current mode {self.power_mode or 'none'}"
                                     f"; run `edgens profile {self.bundle_dir}` in this mode")
            log.warning("no latency table for the current power mode: %s", self._latency_problem)

    # ------------------------------------------------------------------------------------------------- properties

    @property
    def runners(self) -> dict[str, StackRunner]:
        """The loaded runners by stack name (quarantined ones included; excluded ones have none)."""
        return dict(self._runners)

    def replace_runners(self, runners: dict[str, StackRunner]) -> dict[str, StackRunner]:
        """Swap the runners of some stacks (fault injection uses this); returns the ones replaced."""
        replaced = {name: self._runners[name] for name in runners}
        self._runners.update(runners)
        return replaced

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

    def describe(self) -> dict[str, Any]:
        """What runs the bundle: backend, providers really in use, device, and stacks available."""
        return {**self.backend.describe(), "bundle": str(self.bundle_dir), "family": self.manifest.family,
                "members": len(self.manifest.members),
                "stacks": {name: h.status for name, h in self._health.items()}}

    # ----------------------------------------------------------------------------------------------------- health

    def retry(self, names: list[str] | None = None) -> list[str]:
        """Give quarantined and excluded stacks another chance.

        Quarantined stacks are planned again; excluded ones, and those the self-test quarantined (their weights in
        memory may be corrupt), have their file checked and are loaded again; the latter then rerun the self-test.

        Args:
            names: the stacks to retry (default: every quarantined or excluded stack).

        Returns:
            The stacks available again.

        Raises:
            ConfigError: an unknown stack name.
        """
        names = [h.name for h in self._health.values() if h.status != "ok"] if names is None else names
        back = []
        for name in names:
            health = self._health[self.manifest.stack(name).name]
            if health.status == "quarantined" and name not in self._reload:
                self._pending.pop(name, None)
            elif health.status == "excluded" or name in self._reload:
                stack = self.manifest.stack(name)
                old = self._runners.pop(name, None)
                if old is not None:
                    old.deactivate()
                problem = check_file(self.bundle_dir, stack.file, stack.sha256, stack.bytes) or self._start(name)
                if problem is None and name in self._reload:
                    result = self._self_test_one(name)
                    problem = None if result is None or result.ok else f"self-test: {result.message}"
                if problem is not None:
                    log.warning("stack %s still %s: %s", name, health.status, problem)
                    health.reason = problem
                    continue
                self._reload.discard(name)
            health.status, health.reason, health.consecutive_failures = "ok", None, 0
            back.append(name)
        self._plans.clear()
        return back

    # -------------------------------------------------------------------------------------------------- self-test

    def self_test(self, stacks: list[str] | None = None, quarantine: bool = True) -> dict[str, SelfTestResult]:
        """Rerun stacks on the inputs stored at export and compare with their stored outputs.

        This catches weights corrupted in memory after the load-time checksum: a stack whose outputs changed beyond
        float tolerance (:func:`edgens.runtime.selftest.compare_outputs`) is quarantined; :meth:`retry` reloads it
        from its file.

        Args:
            stacks: the stacks to test (default: every loaded stack).
            quarantine: quarantine the stacks that fail.

        Returns:
            ``{stack: result}``; empty when the bundle has no self-test data.

        Raises:
            BundleError: the self-test file is missing or corrupt.
            PredictorClosedError: the predictor was closed.
        """
        self._check_open()
        results = {}
        for name in stacks if stacks is not None else list(self._runners):
            result = self._self_test_one(self.manifest.stack(name).name)
            if result is None:
                return {}
            results[name] = result
            if not result.ok and quarantine:
                self._quarantine_changed(name, result)
        return results

    def _self_test_one(self, name: str) -> SelfTestResult | None:
        data = self._self_test_data()
        if data is None:
            return None
        x, expected = data
        runner = self._runners.get(name)
        if runner is None:
            return SelfTestResult(name, False, math.inf, 0.0, "not loaded")
        try:
            got = np.concatenate([runner.run(x[i:i + 256]) for i in range(0, len(x), 256)], axis=1)
        except Exception as err:  # noqa: BLE001  (any backend failure fails the test)
            return SelfTestResult(name, False, math.inf, 0.0, f"{type(err).__name__}: {err}")
        return compare_outputs(name, got, expected.outputs[name], self._tolerance_class(runner),
                               expected.sums[name], expected.squares[name])

    def _self_test_data(self) -> tuple[np.ndarray, SelfTestData] | None:
        cached = self._self_test_cache
        if cached is None:
            data = read_self_test(self.bundle_dir, self.manifest)
            if data is None:
                return None
            cached = self._self_test_cache = (self._prepare(data.x), data)
        return cached

    def _tolerance_class(self, runner: StackRunner) -> str:
        """What the stack computes in here, for the self-test's tolerance: the graph's precision, or ``gpu`` when a
        GPU (or TensorRT) computes it, whose kernels round differently from the CPU that made the reference."""
        on_gpu = self.backend.name == "tensorrt" or any(p != "CPUExecutionProvider" for p in runner.providers)
        return "gpu" if on_gpu else runner.stack.precision

    def _quarantine_changed(self, name: str, result: SelfTestResult) -> None:
        with self._lock:
            health = self._health[name]
            health.status, health.reason = "quarantined", f"self-test: {result.message}"
            health.failures += 1
            self._reload.add(name)
            self._plans.clear()
        log.warning("stack %s quarantined: %s; Predictor.retry() loads it from its file again", name, health.reason)

    def _start_self_tests(self, interval_s: float) -> None:
        def loop() -> None:
            while not self._self_test_stop.wait(interval_s):
                try:
                    self.self_test()
                except PredictorClosedError:
                    return
                except Exception:  # noqa: BLE001  (a background check must not die silently)
                    log.exception("periodic self-test failed")

        self._self_test_thread = threading.Thread(target=loop, name="edgens-self-test", daemon=True)
        self._self_test_thread.start()

    # ---------------------------------------------------------------------------------------------------- predict

    def predict(self, x: Any, *, members: int | float | None = None, flops: float | None = None,
                latency_ms: float | None = None, deadline_ms: float | None = None, confidence: float | None = None,
                task: str | int | None = None, on_update: Callable[[Prediction], bool | None] | None = None
                ) -> Prediction:
        """Predict for a batch of raw inputs within one budget (see :mod:`edgens.runtime.policies`).

        Args:
            x: raw inputs as the data set stores them, ``(B, *input.shape)`` (or without a single channel axis), or
                a :class:`PreparedInput` from :meth:`prepare`.
            members: the first k members of the anytime order, or a fraction of all members.
            flops: as many stacks as fit this many flops per example.
            latency_ms: as many stacks as fit this latency by the device's latency table.
            deadline_ms: anytime: run stacks until this wall-clock deadline, return the best prediction so far.
            confidence: per example, stop once the largest class probability reaches this (categorical).
            task: a specialist sub-ensemble, by task name, class index or class name.
            on_update: called with the prediction so far after each stack that answers; returning True stops.

        Returns:
            The prediction of the members that answered.

        Raises:
            InputError: bad input (shape, dtype, NaN/Inf, empty batch), before any stack runs.
            ConfigError: more than one budget, a value out of range, a budget no stack fits, a latency budget
                without a latency table, an unknown task, or confidence on a non-categorical bundle.
            NoMembersAvailableError: no member answered (every planned stack failed, or none is available).
            PredictorClosedError: the predictor was closed.
        """
        call = self._begin(x, Budget.parse(members, flops, latency_ms, deadline_ms, confidence, task),
                           eager=on_update is not None)
        if len(call.steps) == 1 and not call.eager:
            prediction = self._predict_one(call)
            if prediction is not None:
                return prediction
        for _ in self._execute(call):
            if on_update is not None and on_update(self._result(call)):
                break
        self._settle(call)
        self._finish(call)
        return self._result(call)

    def anytime(self, x: Any, **budget: Any) -> Iterator[Prediction]:
        """Yield an improving prediction after each stack that answers (anytime inference).

        Stop iterating whenever the prediction is good enough or time is up; budgets work as in :meth:`predict`
        (e.g. ``deadline_ms``). Input and budget are checked before this returns.

        Raises:
            InputError: bad input, before any stack runs.
            ConfigError: a bad budget.
            NoMembersAvailableError: (when iterating) no member answered.
        """
        call = self._begin(x, Budget.parse(**budget), eager=True)

        def iterate() -> Iterator[Prediction]:
            answered = False
            try:
                for _ in self._execute(call):
                    answered = True
                    yield self._result(call)
            finally:  # also when the caller stops iterating early
                self._finish(call)
            if not answered:
                self._result(call)  # raises NoMembersAvailableError with the reasons

        return iterate()

    def prepare(self, x: Any) -> PreparedInput:
        """Check and normalise raw inputs once, for calls that take them later (see :class:`PreparedInput`).

        Raises:
            InputError: bad input (shape, dtype, NaN/Inf, empty batch).
        """
        return x if isinstance(x, PreparedInput) else PreparedInput(self._prepare(x))

    def check_budget(self, budget: Budget, batch: int = 1) -> None:
        """Raise what a call with this budget and batch size would raise before running a stack, without running
        one (the serving batcher checks each request as it arrives, so that one bad request cannot fail a merged
        batch).

        Raises:
            ConfigError: a budget no stack fits, a latency budget without a latency table, an unknown task, or
                confidence on a non-categorical bundle or with a robust combiner.
            NoMembersAvailableError: no stack is available for it.
            PredictorClosedError: the predictor was closed.
        """
        self._check_open()
        self._steps_for(budget, batch)

    def first_stack(self) -> str | None:
        """The first available general stack of the anytime order (what a deadline call runs first)."""
        return next((s.name for s in self.manifest.general_stacks if self.available(s.name)), None)

    def stack_ms(self, name: str, batch: int) -> float | None:
        """The expected latency of stack ``name`` at this batch size: the latency table's, else what this predictor
        observed (None: neither yet)."""
        return self._estimate(name, batch)

    def warm_up(self, batch_sizes: Sequence[int] = (1,), repeats: int = 3) -> None:
        """Run every available stack a few times at each batch size (on zeros) and record how long it took: the
        first runs of a session are slow (allocation), and deadline calls without a latency table then have
        estimates from the start (a batch size not warmed up borrows the next larger one's)."""
        self._check_open()
        shape = tuple(self.manifest.input.shape)
        for batch in batch_sizes:
            x = np.zeros((batch, *shape), dtype=np.float32)
            for name, runner in list(self._runners.items()):
                if not self.available(name):
                    continue
                try:
                    runner.run(x)  # allocation, not measured
                    for _ in range(repeats):
                        start = time.perf_counter()
                        runner.run(x)
                        with self._lock:
                            self._observed.observe(name, batch, (time.perf_counter() - start) * 1e3)
                except Exception as err:  # noqa: BLE001  (a failing stack fails the calls that plan it, not this)
                    log.warning("warm-up of stack %s at batch %d failed: %s: %s", name, batch, type(err).__name__,
                                err)

    def stepwise(self, x: Any) -> StepwiseCall:
        """An anytime call over the general stacks in order, that runs one stack each time its owner says (see
        :class:`StepwiseCall`). Close it when done: that records the stacks' health.

        Raises:
            InputError: bad input, before any stack runs.
            NoMembersAvailableError: no stack is available.
            PredictorClosedError: the predictor was closed.
        """
        return StepwiseCall(self, self._begin(x, _EVERY_GENERAL, eager=True))

    def stack_outputs(self, x: Any, stacks: list[str] | None = None, batch_size: int | None = None
                      ) -> dict[str, np.ndarray]:
        """The raw natural parameters ``(members, B, K)`` of stacks, without combining (for analysis and fitting).

        Args:
            x: raw inputs.
            stacks: stack names (default: every available general stack).
            batch_size: run this many examples at a time (default: all at once).

        Returns:
            ``{stack name: eta}`` for the stacks that answered on every batch.

        Raises:
            InputError: bad input.
            PredictorClosedError: the predictor was closed.
        """
        self._check_open()
        xn = self._prepare(x)
        names = stacks if stacks is not None else [s.name for s in self.manifest.general_stacks
                                                   if self.available(s.name)]
        step = batch_size or len(xn)
        outputs = {}
        for name in names:
            runner = self._runners[self.manifest.stack(name).name]
            parts = []
            for i in range(0, len(xn), step):
                try:
                    out = runner.run(xn[i:i + step])
                    failure = self._check_output(runner, out, len(xn[i:i + step]))
                except Exception as err:  # noqa: BLE001  (any backend failure drops the stack, as in predict)
                    failure = StackFailure(name, "error", f"{type(err).__name__}: {err}")
                if failure is not None:
                    log.warning("stack %s failed: %s", name, failure)
                    break
                parts.append(out)
            else:
                outputs[name] = np.concatenate(parts, axis=1)
        return outputs

    # ------------------------------------------------------------------------------------------------- internals

    def _check_open(self) -> None:
        if self._closed:
            raise PredictorClosedError(f"this predictor of {self.bundle_dir} was closed; load the bundle again with "
                                       f"Predictor.load() to predict")

    def _begin(self, x: Any, budget: Budget, eager: bool = False) -> _Call:
        start = time.perf_counter()
        self._check_open()
        xn = x.array if isinstance(x, PreparedInput) else self._prepare(x)
        batch = len(xn)
        steps = self._steps_for(budget, batch)
        k = self.manifest.n_outputs
        call = _Call(x=xn, budget=budget, steps=steps, start=start, eta_sum=np.zeros((batch, k)), eager=eager,
                     streaming=eager)
        if budget.kind == "deadline_ms":
            call.deadline, call.eager = start + budget.value / 1e3, True
        elif budget.kind == "latency_ms":
            call.fallback_deadline = start + budget.value / 1e3
        elif budget.kind == "confidence":
            call.active, call.counts, call.eager = np.arange(batch), np.zeros(batch, dtype=np.int64), True
        elif budget.kind == "task":
            call.task = policies.resolve_task(self.manifest, budget.value).task
        return call

    def follow_power_mode(self) -> None:
        """Pick the latency table again if the device's power mode changed (``nvpmodel -m`` while running). Latency
        and deadline calls do this themselves; the mode is read at most every :data:`POWER_MODE_CHECK_S` seconds,
        so a call pays one clock read."""
        now = time.monotonic()
        if now < self._power_check_due:
            return
        self._power_check_due = now + POWER_MODE_CHECK_S
        mode = power_mode_key(query_command=False)  # files only: no process on a call's path
        if mode is not None and mode != self.power_mode:
            log.warning("power mode changed from %s to %s: picking the latency table again", self.power_mode, mode)
            self.reload_latency()

    def _steps_for(self, budget: Budget, batch: int) -> list[Step]:
        """The plan of a call with this budget and batch size, or the error the call raises before any stack runs."""
        if budget.kind in ("latency_ms", "deadline_ms"):
            self.follow_power_mode()
        if budget.kind == "confidence" and self.manifest.family != "categorical":
            raise ConfigError(f"confidence budgets need a categorical bundle, this one is {self.manifest.family}")
        if budget.kind == "confidence" and self.combiner != "mean":
            raise ConfigError(f"confidence budgets combine members by the mean; this predictor was loaded with "
                              f"combiner {self.combiner!r} (load one with combiner='mean' for early exit)")
        estimate = None
        if self.latency_table is not None:
            table = self.latency_table
            estimate = lambda name: table.estimate(name, batch)  # noqa: E731
        elif budget.kind == "latency_ms" and self._latency_problem:
            raise ConfigError(f"latency_ms budgets need this device's latency table: {self._latency_problem}")
        steps = self._plan(budget, batch, estimate)
        if not steps:
            raise NoMembersAvailableError(f"no stack is available for {budget}: {self.describe_health()}; "
                                          f"Predictor.retry() tries them again")
        return steps

    def _plan(self, budget: Budget, batch: int, estimate: Callable[[str], float | None] | None) -> list[Step]:
        """The budget's plan, cached: it changes only with the stacks' availability and, for latency budgets, the
        batch size and the latency table (``_plans`` is cleared when those change)."""
        key = (budget, batch if budget.kind == "latency_ms" else 0)
        with self._lock:
            steps = self._plans.get(key)
            if steps is None:
                if len(self._plans) > 256:
                    self._plans.clear()
                steps = self._plans[key] = policies.plan(budget, self.manifest, self.available, estimate)
        return steps

    def _predict_one(self, call: _Call) -> Prediction | None:
        """The hot path of a plan of one stack (a prefix stack, a specialist): run it and combine its rows without
        the bookkeeping of several. None if it failed: then ``call.steps`` holds what runs instead (its fallback)."""
        step = call.steps[0]
        result = self._run_stack(step, call.x)
        part = self._record(call, result)
        if part is not None and not _finite_sum(part):
            self._failed(call, StackFailure(step.stack, "non-finite", "returned NaN or infinite values"))
            part = None
        if part is None:
            call.steps, call.replanned = list(step.fallback), True
            return None
        groups = result.groups
        if result.rows is not None or (groups is not None and len(groups) >= self.outliers.min_groups  # type: ignore[union-attr]
                                       and self._one_stack_check(step, groups)):
            # a robust combiner, or outliers found: the general path leaves them out and records them
            call.pending.append(result)
            self._settle(call)
            self._finish(call)
            return self._result(call)
        call.outliers_checked = groups is not None and len(groups) >= self.outliers.min_groups  # type: ignore[union-attr]
        with self._lock:
            self._health[step.stack].succeeded()
        call.stacks_run.append(step.stack)
        call.members = len(step.members)
        call.eta_sum = np.divide(part, call.members, dtype=np.float64)
        return self._result(call, divided=True)

    def _execute(self, call: _Call) -> Iterator[None]:
        """Run the call's stacks; when eager, yields after each one that answers."""
        if self._use_lanes(call, call.steps):
            assert self._lanes is not None
            return self._execute_in_lanes(call, self._lanes, call.steps, fallback=call.replanned)
        return self._execute_in_order(call)

    def _use_lanes(self, call: _Call, steps: list[Step] | tuple[Step, ...]) -> bool:
        """Whether ``steps`` run on the lanes: more than one, not early exit, and lanes measured faster at this batch
        size by ``edgens profile`` or, without that measurement, stacks heavy enough to repay the handoff
        (:data:`~edgens.runtime.lanes.LANE_MIN_MS`; unknown until a stack ran once here: in order)."""
        if self._lanes is None or len(steps) < 2 or call.active is not None:
            return False
        if call.deadline is not None and not self._lanes_asked:
            return False  # deadlines keep to the calling thread unless lanes were asked for (docs/runtime.md, Lanes)
        batch = len(call.x)
        table = self.latency_table
        measured = None if table is None else table.lanes_pay(batch, self.lanes, LANE_MIN_SPEEDUP)
        if measured is not None:
            return measured
        first = self._estimate(steps[0].stack, batch)
        return first is not None and first >= LANE_MIN_MS

    def _estimate(self, name: str, batch: int) -> float | None:
        """A stack's expected latency at this batch size: the latency table's, else what this predictor observed."""
        table = self.latency_table
        if table is not None:
            return table.estimate(name, batch)
        with self._lock:
            return self._observed.estimate(name, batch)

    def _may_start(self, call: _Call, step: Step, is_fallback: bool, answered: bool, slowdown: float = 1.0) -> bool:
        """Whether the call still wants ``step`` started: deadlines (and, for fallbacks, latency budgets) allow it.
        ``slowdown``: how much longer a stack takes than its estimate because other lanes run beside it."""
        deadline = call.deadline if call.deadline is not None else call.fallback_deadline if is_fallback else None
        if deadline is None:
            return True
        batch = len(call.x)
        estimate = self._estimate(step.stack, batch)
        if estimate is not None:
            estimate *= slowdown
        now = time.perf_counter()
        if policies.may_start(now, deadline, estimate, answered):
            return True
        if self.latency_table is None and estimate is not None and now < deadline:
            with self._lock:  # left out for its estimate: counts toward measuring it again
                self._observed.skipped(step.stack, batch)
        return False

    def _execute_in_order(self, call: _Call) -> Iterator[None]:
        """Run the stacks one after another in the calling thread."""
        if call.todo is None:
            call.todo = deque((step, call.replanned) for step in call.steps)
            if call.deadline is not None and not call.replanned:  # a deadline call starts with what fits in it
                self._prefix_within(call, (call.deadline - time.perf_counter()) * 1e3)
        todo = call.todo
        while todo:
            step, is_fallback = todo.popleft()
            if not self._may_start(call, step, is_fallback, bool(call.stacks_run or call.pending)):
                break
            active = call.active
            x = call.x if active is None or len(active) == len(call.x) else call.x[active]
            result = self._run_stack(step, x)
            part = self._record(call, result)
            if part is None:
                if self._use_lanes(call, step.fallback):  # a failed prefix stack's general stacks, side by side
                    assert self._lanes is not None
                    yield from self._execute_in_lanes(call, self._lanes, step.fallback, fallback=True)
                else:
                    todo.extendleft((fallback, True) for fallback in reversed(step.fallback))
                continue
            call.pending.append(result)
            if not call.eager:
                continue
            if not self._settle(call):
                continue
            if active is not None:
                assert call.counts is not None
                unsure = policies.still_unsure(call.eta_sum[active], call.counts[active], call.budget.value)
                call.active = active[unsure]
            yield
            if call.active is not None and not len(call.active):
                break

    def _prefix_within(self, call: _Call, limit_ms: float) -> None:
        """Start a call that has not run a stack yet with the largest prefix stack expected to fit ``limit_ms``
        (:func:`~edgens.runtime.policies.prefix_within`)."""
        assert call.todo is not None
        if not self.manifest.prefix_stacks or not math.isfinite(limit_ms) or call.stacks_run or call.pending:
            return
        steps = [step for step, _ in call.todo]
        batch = len(call.x)
        chosen = policies.prefix_within(steps, self.manifest, self.available, lambda n: self._estimate(n, batch),
                                        limit_ms)
        if chosen is not steps:
            call.todo = deque((step, False) for step in chosen)

    def _execute_in_lanes(self, call: _Call, lanes: Lanes, steps: list[Step] | tuple[Step, ...],
                          fallback: bool = False) -> Iterator[None]:
        """Run ``steps`` on the lanes (``fallback``: in place of a failed stack); this thread collects their results
        and keeps the deadline. Members that finish after the deadline are left out (unless none finished before
        it: a prediction needs one)."""
        # The latency table timed each stack alone; beside other lanes it takes longer (what `edgens profile`
        # measured for the lanes says how much). Observed latencies were measured beside them already.
        table = self.latency_table
        slowdown = 1.0 if table is None else table.lane_slowdown(len(call.x), self.lanes)
        work = LaneWork(list(steps), lambda step: self._run_stack(step, call.x),
                        lambda step, is_fallback, answered: self._may_start(call, step, is_fallback, answered,
                                                                            slowdown), fallback=fallback)
        # Unless the caller wants each partial prediction as it comes, this thread is one of the lanes: a thread
        # that sleeps while others compute costs a wake-up per result (tens of microseconds on a small VM).
        inline = not call.streaming
        serving = min(lanes.count - inline, len(steps) - inline)
        lanes.submit(work, serving)
        try:
            if inline:
                work.serve()
                serving += 1
            past_deadline = False
            while serving:
                timeout = None
                if call.deadline is not None and (call.stacks_run or call.pending):
                    timeout = call.deadline - time.perf_counter()
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
                if call.deadline is not None and result.finished > call.deadline and (call.stacks_run or
                                                                                      call.pending):
                    continue
                part = self._record(call, result)
                if part is None:
                    continue
                call.pending.append(result)
                if call.eager and self._settle(call):
                    yield
        finally:
            work.stop()

    def _run_stack(self, step: Step, x: np.ndarray) -> StackResult:
        """Run one stack on ``x``: the sum (B, K) of the natural parameters of the step's rows, or why it failed.
        Touches no call state (lanes run it in their threads). The hot path: one shape check and one sum (NaN/Inf
        are caught when settling)."""
        name = step.stack
        runner = self._runners[name]
        start = time.perf_counter()
        part = groups = rows = None
        try:
            out = runner.run(x) if self._timeout_s is None else self._run_in_worker(runner, x)
            expected = (len(runner.stack.members), len(x), self.manifest.n_outputs)
            if getattr(out, "shape", None) == expected:
                # float32 sums take half the time of float64 ones; only absurd logits (~1e37) could overflow, and
                # are then reported as non-finite (quietly: a corrupted stack's huge outputs are no numpy error).
                with np.errstate(over="ignore", invalid="ignore"):
                    rows = out if step.rows is None else out[list(step.rows)]
                    layout = self._layout(step) if self.outliers is not None else None
                    if layout is None:
                        part = rows.sum(axis=0)
                    else:  # one pass: each group's sum, then their total
                        groups = layout.group_sums(rows)
                        part = groups.sum(axis=0) if len(groups) > 1 else groups[0]
                    finite = math.isfinite(part.sum()) if step.fallback else True
                if self.combiner == "mean":
                    rows = None
                failure = None
                if not finite:
                    # settling would find it too, but then too late for the fallback to run in this call
                    part, failure = None, StackFailure(name, "non-finite", "returned NaN or infinite values")
            else:
                failure = StackFailure(name, "shape", f"returned shape {getattr(out, 'shape', type(out))}, expected "
                                                      f"{expected}")
        except _Timeout as err:
            failure = StackFailure(name, err.kind, str(err))
        except Exception as err:  # noqa: BLE001  (a backend may raise anything; KeyboardInterrupt still propagates)
            failure = StackFailure(name, "error", f"{type(err).__name__}: {err}")
        finished = time.perf_counter()
        ms = (finished - start) * 1e3
        if failure is None:
            with self._lock:
                self._observed.observe(name, len(x), ms)
        return StackResult(step, part, failure, ms, finished, groups, rows)

    def _layout(self, step: Step) -> _Layout | None:
        """How a step's rows split into groups (general stacks) for outlier detection, cached; None for stacks that
        are not made of whole or partial general stacks in order (specialists)."""
        key = (step.stack, step.rows)
        if key in self._layouts:
            return self._layouts[key]
        layout = None
        assert self.outliers is not None
        if self.manifest.stack(step.stack).role != "specialist":
            names = [self._group_of[member] for member in step.members]
            starts = [i for i in range(len(names)) if i == 0 or names[i] != names[i - 1]]
            groups = [names[i] for i in starts]
            if len(set(groups)) == len(groups):  # each group's rows are contiguous
                sizes = np.diff([*starts, len(names)])
                # a part of a group: its mean is noisier, by the square root of full over part size
                limits = [self.outliers.thresholds[g] * math.sqrt(self._group_size[g] / n)
                          for g, n in zip(groups, sizes, strict=True)]
                layout = _Layout(np.array(starts, dtype=np.intp), tuple(groups), sizes, np.array(limits))
        with self._lock:
            self._layouts[key] = layout
        return layout

    def _record(self, call: _Call, result: StackResult) -> np.ndarray | None:
        """Note a stack's run in the call; returns its sum, or None after recording the failure."""
        call.stack_ms[result.step.stack] = result.ms
        if result.failure is not None:
            self._failed(call, result.failure)
            return None
        return result.part

    def _settle(self, call: _Call) -> bool:
        """Check the pending stacks' sums for NaN/Inf, add the good ones to the call's sums and look for outliers
        among the groups answered so far; returns whether any stack was added."""
        with np.errstate(over="ignore", invalid="ignore"):  # a corrupted stack's huge sums are no numpy error
            return self._settle_quietly(call)

    def _settle_quietly(self, call: _Call) -> bool:
        pending, call.pending = call.pending, []
        if not pending:
            return False
        # One test for all of them: NaN or Inf in any sum makes the total (in float64) NaN or Inf.
        total = _total(pending)
        if not math.isfinite(total.sum()):
            good = []
            for result in pending:
                if math.isfinite(result.part.sum()):
                    good.append(result)
                else:
                    self._failed(call, StackFailure(result.step.stack, "non-finite", "returned NaN or infinite values"))
            if not good:
                return False
            pending = good
            total = _total(pending)
        members = sum(len(result.step.members) for result in pending)
        if call.active is None:
            call.eta_sum += total
            call.members += members
        else:  # early exit settles one stack at a time, run on the active examples only
            assert call.counts is not None
            call.eta_sum[call.active] += total
            call.counts[call.active] += members
        call.settled.extend(pending)
        call.stacks_run.extend(result.step.stack for result in pending)
        if self.outliers is not None and call.active is None:
            self._check_outliers(call, pending)
        return True

    def _check_outliers(self, call: _Call, pending: list[StackResult]) -> None:
        """Add the pending stacks' groups to the call's and leave out those that deviate beyond their thresholds
        (:class:`~edgens.runtime.outliers.GroupCheck`); groups found earlier in the call stay out."""
        assert self.outliers is not None and self.outlier_margin is not None
        call.checked.extend(result for result in pending if result.groups is not None)
        checked = call.checked
        if sum(len(r.groups) for r in checked) - len(call.left_out) < self.outliers.min_groups:  # type: ignore[arg-type]
            return
        call.outliers_checked = True
        sums = checked[0].groups if len(checked) == 1 else np.concatenate([r.groups for r in checked])
        steps = [r.step for r in checked]
        groups = None  # built only when needed: this runs in every call
        if call.left_out:  # rare: groups found earlier in the call stay out
            groups = self._groups_of(steps)
            keep = [i for i, g in enumerate(groups) if call.left_out.get(g[1]) != g[0]]
            groups, sums = [groups[i] for i in keep], sums[keep]
            check = self._group_check(groups)
        else:
            check = self._cached_check(steps)
        found = check.outliers(sums)
        if not found:
            return
        if groups is None:
            groups = self._groups_of(steps)
        for index, ratio in found:
            stack, group, size, _ = groups[index]
            call.left_out[group] = stack
            where = "" if stack == group else f" in {stack}"
            call.failures.append(StackFailure(stack, "outlier", f"the {size} members of {group}{where} deviate "
                                                                f"{ratio:.3g}x their threshold from the other "
                                                                f"members; left out of this call"))
            log.info("stack %s: group %s is an outlier (%.3g x its threshold)", stack, group, ratio)
        # Sum again rather than subtract: an outlier's sums may be so large that subtracting them loses the rest.
        call.eta_sum = np.zeros_like(call.eta_sum)
        call.members = 0
        for result in call.settled:
            if result.groups is None:
                call.eta_sum += result.part
                call.members += len(result.step.members)
                continue
            layout = self._layouts[(result.step.stack, result.step.rows)]
            assert layout is not None
            for i, (group, size) in enumerate(zip(layout.names, layout.sizes, strict=True)):
                if call.left_out.get(group) != result.step.stack:
                    call.eta_sum += result.groups[i]
                    call.members += int(size)

    def _one_stack_check(self, step: Step, groups: np.ndarray) -> bool:
        """Whether a call of one stack has outlier groups (the hot path's test, before any bookkeeping)."""
        return self._cached_check([step]).any_outlier(groups)

    def _cached_check(self, steps: list[Step]) -> GroupCheck:
        """The outlier test of the groups these steps hold, built once per sequence of steps."""
        key = tuple((step.stack, step.rows) for step in steps)
        check = self._checks.get(key)
        if check is None:
            check = self._checks[key] = self._group_check(self._groups_of(steps))
        return check

    def _groups_of(self, steps: list[Step]) -> list[tuple[str, str, int, float]]:
        """``(stack, group, size, threshold)`` of every group the steps hold, in the order of their sums."""
        groups = []
        for step in steps:
            layout = self._layouts[(step.stack, step.rows)]
            assert layout is not None
            groups += [(step.stack, name, int(size), float(limit))
                       for name, size, limit in zip(layout.names, layout.sizes, layout.limits, strict=True)]
        return groups

    def _group_check(self, groups: list[tuple[str, str, int, float]]) -> GroupCheck:
        assert self.outliers is not None and self.outlier_margin is not None
        return GroupCheck([g[2] for g in groups], [g[3] for g in groups], self.manifest.family == "categorical",
                          self.outlier_margin, self.outliers.min_groups)

    def _finish(self, call: _Call) -> None:
        """Record the health of every stack that answered in the call: a success, or a failure if some of its
        members were outliers (this counts toward quarantine like any failure)."""
        outliers = {f.stack: f for f in call.failures if f.kind == "outlier"}
        quarantined = []
        with self._lock:
            for result in call.settled:
                name = result.step.stack
                health = self._health[name]
                if name in outliers:
                    if health.failed(outliers.pop(name), self.quarantine_after):
                        quarantined.append(name)
                else:
                    health.succeeded()
            if quarantined:
                self._plans.clear()
        for name in quarantined:
            log.warning("stack %s quarantined: %s; Predictor.retry() tries it again", name, self._health[name].reason)

    def _failed(self, call: _Call, failure: StackFailure) -> None:
        call.failures.append(failure)
        log.info("stack %s failed: %s", failure.stack, failure)
        health = self._health[failure.stack]
        with self._lock:
            quarantined = health.failed(failure, self.quarantine_after)
            if quarantined:
                self._plans.clear()
        if quarantined:
            log.warning("stack %s quarantined: %s; Predictor.retry() tries it again", failure.stack, health.reason)

    def _check_output(self, runner: StackRunner, out: Any, batch: int) -> StackFailure | None:
        """Shape and finiteness of a whole output (for :meth:`stack_outputs`; predict checks the sum it uses)."""
        expected = runner.expected_output_shape(batch)
        shape = getattr(out, "shape", None)
        if shape != expected:
            return StackFailure(runner.name, "shape", f"returned shape {shape}, expected {expected}")
        if not np.isfinite(out).all():
            return StackFailure(runner.name, "non-finite", "returned NaN or infinite values")
        return None

    def _run_in_worker(self, runner: StackRunner, x: np.ndarray) -> np.ndarray:
        name = runner.name
        with self._lock:
            pending = self._pending.get(name)
            if pending is not None and not pending.done():
                raise _Timeout("busy", "still running after timing out in an earlier call")
            pool = self._pools.get(name)
            if pool is None:
                pool = self._pools[name] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"edgens-{name}")
            future = pool.submit(runner.run, x)
        try:
            return future.result(timeout=self._timeout_s)
        except FutureTimeout:
            runner.cancel()
            with self._lock:
                self._pending[name] = future
            raise _Timeout("timeout", f"took longer than the stack timeout of {self._timeout_s * 1e3:g} ms") from None

    def _result(self, call: _Call, divided: bool = False) -> Prediction:
        """The prediction so far (``divided``: ``call.eta_sum`` already holds the mean)."""
        if call.counts is None:  # every example has the same members
            if not call.members:
                self._raise_no_members(call)
            if self.combiner != "mean" and call.settled:
                eta = combine(self._member_rows(call), self.combiner, self.trim)
            else:
                eta = call.eta_sum if divided else call.eta_sum / call.members
            members_used = np.full(len(call.x), call.members)
        else:
            if not call.counts.all():
                self._raise_no_members(call)
            eta = call.eta_sum / call.counts[:, None]
            members_used = call.counts.copy()
        mean = inverse_link(self.manifest.family, eta)
        return Prediction(
            family=self.manifest.family, mean=mean, eta=eta,
            labels=mean.argmax(axis=1) if self.manifest.family == "categorical" else None,
            members_used=members_used, stacks_run=list(call.stacks_run), failures=list(call.failures),
            elapsed_ms=(time.perf_counter() - call.start) * 1e3, stack_ms=dict(call.stack_ms), budget=str(call.budget),
            deadline_ms=call.budget.value if call.budget.kind == "deadline_ms" else None, task=call.task,
            outliers_checked=call.outliers_checked)

    def _member_rows(self, call: _Call) -> np.ndarray:
        """The natural parameters ``(members, B, K)`` of every member the call uses (outlier groups left out), for
        a robust combiner."""
        rows = []
        for result in call.settled:
            assert result.rows is not None
            if not call.left_out:
                rows.append(result.rows)
                continue
            layout = self._layouts.get((result.step.stack, result.step.rows))
            if layout is None:
                rows.append(result.rows)
                continue
            keep = np.ones(len(result.rows), dtype=bool)
            for start, group, size in zip(layout.starts, layout.names, layout.sizes, strict=True):
                if call.left_out.get(group) == result.step.stack:
                    keep[start:start + size] = False
            rows.append(result.rows[keep])
        return np.concatenate(rows, axis=0) if len(rows) > 1 else rows[0]

    def _raise_no_members(self, call: _Call) -> None:
        failed = "; ".join(str(f) for f in call.failures) or "none ran"
        raise NoMembersAvailableError(f"no member answered ({call.budget}): failures: {failed}; unavailable: "
                                      f"{self.describe_health()}")

    # --------------------------------------------------------------------------------------------------- cleanup

    def close(self) -> None:
        """Free every stack's resources and stop worker threads (without waiting for late stacks). Predicting
        afterwards raises :class:`~edgens.errors.PredictorClosedError`; closing again does nothing."""
        self._closed = True
        self._self_test_stop.set()
        thread = self._self_test_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)  # a self-test in progress ends before its sessions are freed
        if self._lanes is not None:
            self._lanes.close()
        for pool in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        self._pools.clear()
        for runner in self._runners.values():
            runner.deactivate()

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


class StepwiseCall:
    """An anytime call over the general stacks in the anytime order, run one stack at a time by its owner.

    Made by :meth:`Predictor.stepwise`. The owner decides when (and whether) the next stack runs; the serving
    batcher (:mod:`edgens.runtime.batching`) interleaves several such calls by their requests' deadlines. Each
    :meth:`step` runs as :meth:`Predictor.anytime` would: failed stacks are dropped, and groups of members that
    deviate are left out (silent faults).
    """

    def __init__(self, predictor: Predictor, call: _Call):
        self._predictor = predictor
        self._call = call
        call.todo = deque((step, False) for step in call.steps)
        self._steps = predictor._execute_in_order(call)
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
        return None if name is None else self._predictor.stack_ms(name, len(self._call.x))

    def step(self, within_ms: float | None = None) -> bool:
        """Run stacks until one answers (stacks that fail on the way are dropped); False if none is left.

        Args:
            within_ms: for the first step only: the time its answer must come within; the largest prefix stack
                expected to fit runs instead of the first general stacks (the same members in one call).
        """
        if self._closed:
            return False
        if within_ms is not None and not self._started:
            self._predictor._prefix_within(self._call, within_ms)
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
        return self._predictor._result(self._call)

    def close(self) -> None:
        """Stop the call and record its stacks' health (once)."""
        if not self._closed:
            self._closed = True
            self._steps.close()
            self._predictor._finish(self._call)


_EVERY_GENERAL = Budget("deadline_ms", math.inf)  # plans every available general stack, in order


def _finite_sum(part: np.ndarray) -> bool:
    """Whether a sum holds no NaN or Inf (one reduction; an overflow in it means absurd values, reported alike)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return math.isfinite(part.sum())


def _total(pending: list[StackResult]) -> np.ndarray:
    """The sum of the pending stacks' sums: float64 for several; one stack's float32 sum as it is (adding it to the
    call's float64 sums converts it on the way, without a copy)."""
    if len(pending) == 1:
        return pending[0].part
    return np.sum([result.part for result in pending], axis=0, dtype=np.float64)


@dataclass(frozen=True)
class _Layout:
    """A step's rows as groups for outlier detection: where each starts, its general stack, size and threshold."""

    starts: np.ndarray
    names: tuple[str, ...]
    sizes: np.ndarray
    limits: np.ndarray

    def group_sums(self, rows: np.ndarray) -> np.ndarray:
        """``(G, B, K)`` each group's sum of ``rows`` (members, B, K): runs of equal groups are summed through a
        reshape, several times faster than ``np.add.reduceat`` over the first axis."""
        out = np.empty((len(self.starts), *rows.shape[1:]), dtype=rows.dtype)
        g = 0
        while g < len(self.starts):
            size, start = int(self.sizes[g]), int(self.starts[g])
            run = 1
            while g + run < len(self.sizes) and self.sizes[g + run] == size:
                run += 1
            rows[start:start + run * size].reshape(run, size, *rows.shape[1:]).sum(axis=1, out=out[g:g + run])
            g += run
        return out


class _Timeout(Exception):
    """A stack was too slow (``timeout``) or still busy from an earlier timeout (``busy``)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
