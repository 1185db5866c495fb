"""The public API of the on-device runtime: load a bundle, predict within a budget, survive failing stacks.

    predictor = Predictor.load("bundle")                 # backend="auto": TensorRT engines or onnxruntime
    prediction = predictor.predict(x_uint8, deadline_ms=5)
    prediction.probabilities, prediction.labels, prediction.members_used, prediction.failures

:class:`Predictor` is a façade over the modules a call's data meets in order (docs/runtime.md, "How a call flows"):
:mod:`~edgens.runtime.inputs` (checked, normalised), :mod:`~edgens.runtime.policies` (planned, with the view of
:mod:`~edgens.runtime.latency`; plans are cached here), :mod:`~edgens.runtime.execution` (run in order or on the
lanes), :mod:`~edgens.runtime.pool` (each stack), :mod:`~edgens.runtime.tally` (combined). Failing stacks are
dropped from the call (``Prediction.failures``) and quarantined after ``quarantine_after`` failed calls in a row.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from edgens.checks import check_number
from edgens.ensemble import DEFAULT_TRIM
from edgens.errors import ConfigError, NoMembersAvailableError, PredictorClosedError
from edgens.runtime import policies
from edgens.runtime.backends import Backend, StackRunner, create_backend
from edgens.runtime.bundle import Manifest, OutlierInfo, check_stack_files, load_manifest
from edgens.runtime.execution import Call, Executor, StepwiseCall
from edgens.runtime.health import StackHealth
from edgens.runtime.inputs import InputPreparer, PreparedInput
from edgens.runtime.lanes import Lanes, default_lanes
from edgens.runtime.latency import LatencyEstimates, LatencyTable, LatencyView
from edgens.runtime.policies import Budget, Step
from edgens.runtime.pool import StackPool
from edgens.runtime.prediction import Prediction
from edgens.runtime.selftest import SelfTestResult, SelfTestSupervisor
from edgens.runtime.tally import TallyRules, check_combining

__all__ = ["Prediction", "PreparedInput", "Predictor", "StepwiseCall"]

log = logging.getLogger(__name__)

_EVERY_GENERAL = Budget("deadline_ms", math.inf)  # plans every available general stack, in order
_MAX_PLANS = 256


class Predictor:
    """Runs a bundle's member stacks within a budget and combines the members that answer.

    Build one with :meth:`load`. Threads may share one (docs/runtime.md, "Threads").

    Attributes:
        bundle_dir: the bundle.
        manifest: its manifest.
        backend: what runs the stacks.
        pool: the stacks, their health and their runs.
        latency: this device's latency estimates (the table of the current power mode, else what was observed).
        lanes: stacks a call may run at once.
        inputs: checks and normalises raw inputs (what :meth:`prepare` runs; its ``check`` alone is cheap).
    """

    def __init__(self, bundle_dir: Path, manifest: Manifest, backend: Backend, strict: bool = False,
                 stack_timeout_ms: float | None = None, quarantine_after: int | None = 3, lanes: int | None = None,
                 detect_outliers: bool | None = None, outlier_margin: float | None = None, combiner: str = "mean",
                 trim: float = DEFAULT_TRIM, checksums: bool = True):
        self.bundle_dir, self.manifest, self.backend = bundle_dir, manifest, backend
        if detect_outliers is None:  # the checksums make the outlier test redundant where every stack has them
            detect_outliers = not (checksums and all(stack.checksum is not None for stack in manifest.stacks))
        self.inputs = InputPreparer(manifest.input, manifest.preprocessing)
        self.latency = LatencyEstimates(bundle_dir, backend.describe)
        self.pool = StackPool(bundle_dir, manifest, backend, strict, stack_timeout_ms, quarantine_after,
                              observe=self.latency.observe)
        self.lanes = lanes or default_lanes()
        rules = TallyRules(manifest, combiner, trim, manifest.outliers if detect_outliers else None, outlier_margin,
                           self.pool.checksums, checksums)
        self._executor = Executor(manifest, self.pool, rules, self.latency,
                                  Lanes(self.lanes) if self.lanes > 1 else None, lanes_asked=lanes is not None)
        self._self_tests = SelfTestSupervisor(self.pool, bundle_dir, manifest, self.inputs)
        self.pool.confirm = self._self_tests.confirm  # quarantine on evidence about the stack (health.py)
        # plans by (budget, batch size for latency budgets, latency view, pool generation): a plan made before the
        # view or the stacks' availability changed is never found again
        self._plans: dict[tuple[Any, ...], list[Step]] = {}
        self._plans_lock = threading.Lock()
        self._closed = False

    @classmethod
    def load(cls, bundle: str | Path, backend: str = "auto", *, strict: bool = False,
             stack_timeout_ms: float | None = None, quarantine_after: int | None = 3, lanes: int | None = None,
             detect_outliers: bool | None = None, outlier_margin: float | None = None, combiner: str = "mean",
             trim: float = DEFAULT_TRIM, self_test_interval_s: float | None = None, checksums: bool = True,
             **backend_options: Any) -> Predictor:
        """Load a bundle and start its stacks.

        Args:
            bundle: the bundle directory.
            backend: ``auto``, ``onnxruntime`` or ``tensorrt``.
            strict: raise instead of excluding a stack whose file is missing, corrupt or unloadable.
            stack_timeout_ms: drop a stack from a call when it takes longer than this (:mod:`~edgens.runtime.pool`
                says how it is kept; None: no timeout, no threads).
            quarantine_after: consecutive failed calls after which a stack is quarantined (None: never).
            lanes: stacks a call may run at once (default: one per core, at most 4, but deadline calls in the
                calling thread only; 1: everything one after another in the calling thread; given explicitly,
                deadline calls use the lanes too). See :mod:`edgens.runtime.lanes` and docs/runtime.md.
            detect_outliers: leave out groups of members that deviate from the others beyond the thresholds
                fitted at export (silent faults; needs a bundle that has them). None: unless every stack is checked.
            outlier_margin: how many times its threshold a group may deviate (default: the bundle's, 1.5).
            combiner: ``mean`` (the paper's), ``median`` or ``trimmed`` (see :func:`edgens.ensemble.combine`).
            trim: the fraction a ``trimmed`` combiner cuts from each end.
            self_test_interval_s: rerun :meth:`self_test` in a background thread this often (None: only when
                called).
            checksums: check checked stacks' checksums in every call (False: only for timing them).
            **backend_options: e.g. ``providers`` and ``threads`` (onnxruntime), ``precision`` (tensorrt).

        Raises:
            DataNotFoundError: the bundle or its manifest does not exist.
            BundleError: the manifest is unreadable or incompatible; in strict mode, a stack cannot be used.
            BackendUnavailableError: the backend cannot run here (the message says what to install).
            ConfigError: an unknown backend or option out of range.
            NoMembersAvailableError: no stack at all could be loaded.
        """
        for name, value, count in (("stack_timeout_ms", stack_timeout_ms, False), ("quarantine_after", quarantine_after,
                                   True), ("lanes", lanes, True), ("outlier_margin", outlier_margin, False),
                                   ("self_test_interval_s", self_test_interval_s, False)):
            if value is not None:  # counts are integers >= 1, the others numbers > 0
                check_number(name, value, low=int(count), low_open=not count, integer=count)
        check_combining(combiner, trim)
        bundle_dir = Path(bundle)
        manifest = load_manifest(bundle_dir)
        engine = create_backend(backend, bundle_dir, manifest, **backend_options)
        predictor = cls(bundle_dir, manifest, engine, strict, stack_timeout_ms, quarantine_after, lanes,
                        detect_outliers, outlier_margin, combiner, trim, checksums)
        predictor.pool.load(check_stack_files(bundle_dir, manifest))
        if not predictor.pool.runners:
            raise NoMembersAvailableError(f"no stack of {bundle_dir} could be loaded: {predictor.describe_health()}")
        predictor.latency.reload()
        if predictor.outliers is None and detect_outliers:
            log.info("%s has no outlier thresholds (exported before silent-fault detection, or with fewer than three "
                     "general stacks): calls are not checked for outliers", bundle_dir)
        if self_test_interval_s is not None:
            predictor._self_tests.start(self_test_interval_s)
        log.info("loaded %s: %d/%d stacks on %s", bundle_dir, len(predictor.pool.runners), len(manifest.stacks),
                 engine.describe())
        return predictor

    # ---------------------------------------------------------------------------------------------------- predict

    def predict(self, x: Any, budget: Budget | None = None, *,
                on_update: Callable[[Prediction], bool | None] | None = None, **budget_kwargs: Any) -> Prediction:
        """Predict for a batch of raw inputs within one budget (see :mod:`edgens.runtime.policies`).

        Args:
            x: raw inputs as the data set stores them, ``(B, *input.shape)`` (or without a single channel axis), or
                a :class:`PreparedInput` from :meth:`prepare`.
            budget: the budget as a :class:`Budget`, or none here and one keyword below (none at all: all members).
            on_update: called with the prediction so far after each stack that answers; returning True stops.
            **budget_kwargs: ``members`` (the first k members of the anytime order, or a fraction of all),
                ``flops`` (per example), ``latency_ms`` (by the device's latency table), ``deadline_ms`` (anytime:
                run stacks until this wall-clock deadline), ``confidence`` (per example, stop at this class
                probability; categorical) or ``task`` (a specialist, by task name, class index or class name).

        Returns:
            The prediction of the members that answered.

        Raises:
            InputError: bad input (shape, dtype, NaN/Inf, empty batch), before any stack runs.
            ConfigError: more than one budget, a value out of range, a budget no stack fits, a latency budget
                without a latency table, an unknown task, or confidence on a non-categorical bundle.
            NoMembersAvailableError: no member answered (every planned stack failed, or none is available).
            PredictorClosedError: the predictor was closed.
        """
        call = self._begin(x, Budget.of(budget, **budget_kwargs), streaming=on_update is not None)
        return self._executor.complete(call, on_update)

    def anytime(self, x: Any, budget: Budget | None = None, **budget_kwargs: Any) -> Iterator[Prediction]:
        """Yield an improving prediction after each stack that answers (anytime inference).

        Stop iterating whenever the prediction is good enough or time is up; budgets work as in :meth:`predict`
        (e.g. ``deadline_ms``). Input and budget are checked before this returns.

        Raises:
            InputError: bad input, before any stack runs.
            ConfigError: a bad budget.
            NoMembersAvailableError: (when iterating) no member answered.
        """
        return self._executor.iterate(self._begin(x, Budget.of(budget, **budget_kwargs), streaming=True))

    def stepwise(self, x: Any) -> StepwiseCall:
        """An anytime call over the general stacks in order, that runs one stack each time its owner says (see
        :class:`StepwiseCall`). Close it when done: that records the stacks' health.

        Raises:
            InputError: bad input, before any stack runs.
            NoMembersAvailableError: no stack is available.
            PredictorClosedError: the predictor was closed.
        """
        return StepwiseCall(self._executor, self._begin(x, _EVERY_GENERAL, streaming=True))

    def prepare(self, x: Any) -> PreparedInput:
        """Check and normalise raw inputs once, for calls that take them later (see :class:`PreparedInput`).

        Raises:
            InputError: bad input (shape, dtype, NaN/Inf, empty batch).
        """
        return x if isinstance(x, PreparedInput) else PreparedInput(self.inputs(x))

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
        self._plan(budget, batch)

    def stack_outputs(self, x: Any, stacks: list[str] | None = None, batch_size: int | None = None
                      ) -> dict[str, np.ndarray]:
        """The raw natural parameters ``(members, B, K)`` of ``stacks`` (default: every available general stack)
        on raw inputs ``x``, ``batch_size`` examples at a time (default: all), without combining (for analysis
        and fitting): ``{stack name: eta}`` for the stacks that answered on every batch (checksums checked).

        Raises:
            InputError: bad input.
            PredictorClosedError: the predictor was closed.
        """
        self._check_open()
        return self.pool.stack_outputs(self.inputs(x), stacks, batch_size)

    def _check_open(self) -> None:
        if self._closed:
            raise PredictorClosedError(f"this predictor of {self.bundle_dir} was closed; load the bundle again with "
                                       f"Predictor.load() to predict")

    def _begin(self, x: Any, budget: Budget, streaming: bool) -> Call:
        start = time.perf_counter()
        self._check_open()
        xn = x.array if isinstance(x, PreparedInput) else self.inputs(x)
        steps, view = self._plan(budget, len(xn))
        return self._executor.begin(xn, budget, steps, start, view, streaming)

    def _plan(self, budget: Budget, batch: int) -> tuple[list[Step], LatencyView]:
        """The plan of a call with this budget and batch size and the latency view it was made with, or the error
        the call raises before any stack runs."""
        kind = budget.kind
        view = self.latency.follow_power_mode() if kind in ("latency_ms", "deadline_ms") else self.latency.view
        if kind == "confidence" and self.manifest.family != "categorical":
            raise ConfigError(f"confidence budgets need a categorical bundle, this one is {self.manifest.family}")
        if kind == "confidence" and self.combiner != "mean":
            raise ConfigError(f"confidence budgets combine members by the mean; this predictor was loaded with "
                              f"combiner {self.combiner!r} (load one with combiner='mean' for early exit)")
        table = view.table
        if kind == "latency_ms" and table is None and view.problem:
            raise ConfigError(f"latency_ms budgets need this device's latency table: {view.problem}")
        key = (budget, batch if kind == "latency_ms" else 0, view, self.pool.generation)
        steps = self._plans.get(key)
        if steps is None:
            estimate = None if table is None else (lambda name: table.estimate(name, batch))
            steps = policies.plan(budget, self.manifest, self.pool.available, estimate)
            with self._plans_lock:
                if len(self._plans) >= _MAX_PLANS:
                    self._plans.clear()
                self._plans[key] = steps
        if not steps:
            raise NoMembersAvailableError(f"no stack is available for {budget}: {self.describe_health()}; "
                                          f"Predictor.retry() tries them again")
        return steps, view

    # ------------------------------------------------------------------------------------------- stacks and health

    @property
    def runners(self) -> dict[str, StackRunner]:
        """The loaded runners by stack name (quarantined ones included; excluded ones have none)."""
        return self.pool.runners

    def replace_runners(self, runners: dict[str, StackRunner]) -> dict[str, StackRunner]:
        """Swap the runners of some stacks (fault injection uses this); returns the ones replaced."""
        return self.pool.replace_runners(runners)

    def health(self) -> dict[str, StackHealth]:
        """Each stack's standing: ok, excluded or quarantined, with failure counts."""
        return self.pool.health()

    def available(self, name: str) -> bool:
        """Whether budgets may plan stack ``name`` (loaded and not quarantined)."""
        return self.pool.available(name)

    def describe_health(self) -> str:
        """One line: the stacks that are not available, and why."""
        return self.pool.describe_health()

    def describe(self) -> dict[str, Any]:
        """What runs the bundle: backend, providers really in use, device, and stacks available."""
        return {**self.backend.describe(), "bundle": str(self.bundle_dir), "family": self.manifest.family,
                "members": len(self.manifest.members),
                "stacks": {name: h.status for name, h in self.pool.health().items()}}

    def retry(self, names: list[str] | None = None) -> list[str]:
        """Give quarantined and excluded stacks another chance: quarantined ones are planned again; excluded ones,
        and those the self-test quarantined (their weights in memory may be corrupt), have their file checked and
        are loaded again, the latter then rerunning the self-test. Returns the stacks available again.

        Raises:
            ConfigError: an unknown stack name.
        """
        return self.pool.retry(names, verify=self._self_tests.problem)

    def self_test(self, stacks: list[str] | None = None, quarantine: bool = True) -> dict[str, SelfTestResult]:
        """Rerun stacks (default: every loaded one) on the inputs stored at export and compare with their stored
        outputs (:mod:`edgens.runtime.selftest`); quarantine those whose outputs changed (:meth:`retry` reloads
        them from their files). Returns ``{stack: result}``, empty when the bundle has no self-test data.

        Raises:
            BundleError: the self-test file is missing or corrupt.
            PredictorClosedError: the predictor was closed.
        """
        self._check_open()
        return self._self_tests.run(stacks, quarantine)

    def warm_up(self, batch_sizes: Sequence[int] = (1,), repeats: int = 3) -> None:
        """Run every available stack at each batch size (on zeros) and record how long it took: first runs are slow
        (allocation), and deadlines without a latency table then have estimates (a batch size not warmed up borrows
        the next larger one's)."""
        self._check_open()
        self.pool.warm_up(batch_sizes, repeats)

    # ---------------------------------------------------------------------------------------------------- latency

    @property
    def latency_table(self) -> LatencyTable | None:
        """This device's latency table for the backend and power mode (None until ``edgens profile`` ran in it)."""
        return self.latency.view.table

    @property
    def power_mode(self) -> str | None:
        """The device's power mode when the latency table was picked; None where the machine has none."""
        return self.latency.view.power_mode

    def reload_latency(self) -> None:
        """Read ``latency.json`` and the device's power mode again (:meth:`LatencyEstimates.reload`)."""
        self.latency.reload()

    def follow_power_mode(self) -> None:
        """Pick the latency table again if the power mode changed (:meth:`LatencyEstimates.follow_power_mode`)."""
        self.latency.follow_power_mode()

    def stack_ms(self, name: str, batch: int) -> float | None:
        """The expected latency of stack ``name`` at this batch size (:meth:`LatencyEstimates.estimate`)."""
        return self.latency.estimate(name, batch)

    def first_stack(self) -> str | None:
        """The first available general stack of the anytime order (what a deadline call runs first)."""
        return self.pool.first_available()

    # -------------------------------------------------------------------------------------------------- combining

    @property
    def combiner(self) -> str:
        """How members are combined: ``mean``, ``median`` or ``trimmed``."""
        return self._executor.rules.combiner

    @property
    def outliers(self) -> OutlierInfo | None:
        """The outlier thresholds calls are checked with (None: no silent-fault detection)."""
        return self._executor.rules.outliers

    def set_combining(self, combiner: str | None = None, detect_outliers: bool | None = None,
                      checksums: bool | None = None) -> None:
        """Change how later calls combine members, detect outliers and check checksums (the benchmarks time the
        settings on one predictor's sessions). Raises ConfigError for an unknown combiner."""
        rules = self._executor.rules
        outliers = rules.outliers if detect_outliers is None else self.manifest.outliers if detect_outliers else None
        self._executor.rules = TallyRules(self.manifest, combiner or rules.combiner, rules.trim, outliers, rules.margin,
                                          rules.checksums, rules.verify if checksums is None else checksums)

    # --------------------------------------------------------------------------------------------------- cleanup

    def close(self) -> None:
        """Free every stack's resources and stop worker threads (without waiting for late stacks). Predicting
        afterwards raises :class:`~edgens.errors.PredictorClosedError`; closing again does nothing."""
        self._closed = True
        self._self_tests.stop()  # a self-test in progress ends before its sessions are freed
        if self._executor.lanes is not None:
            self._executor.lanes.close()
        self.pool.close()

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()
