"""The per-call accumulation: from each stack's outputs to the call's :class:`~edgens.runtime.prediction.Prediction`.

A stack's outputs are reduced where it ran (:meth:`TallyRules.reduce`, in a lane's thread too) to what the call
needs: the sum over its rows, each group's sum for outlier detection, the rows themselves for a robust combiner.
A call's :class:`Tally` then adds the sums of the stacks that answered (:meth:`Tally.settle`): sums with NaN or Inf
fail their stack, groups of members that deviate from the others beyond their thresholds are left out
(:mod:`edgens.runtime.outliers`), and :meth:`Tally.prediction` combines what is left. Settling happens after every
stack when someone looks at partial results (deadlines, early exit, the anytime iterator), otherwise once at the
end, which keeps the per-stack work of a plain call to one sum.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgens.checks import check_number
from edgens.ensemble import COMBINERS, DEFAULT_TRIM, combine, inverse_link
from edgens.errors import unknown_choice
from edgens.runtime.bundle import Manifest, OutlierInfo
from edgens.runtime.checksums import KIND as CHECKSUM
from edgens.runtime.checksums import StackChecksum, absolute_inputs
from edgens.runtime.health import StackFailure
from edgens.runtime.outliers import GroupCheck
from edgens.runtime.policies import Budget, Step
from edgens.runtime.pool import StackResult
from edgens.runtime.prediction import Prediction

_NON_FINITE = "returned NaN or infinite values"


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


def check_combining(combiner: str, trim: float) -> None:
    """Raise unless ``combiner`` is one of :data:`~edgens.ensemble.COMBINERS` and ``trim`` in [0, 0.5).

    Raises:
        ConfigError: naming the valid choices or range.
    """
    if combiner not in COMBINERS:
        raise unknown_choice("combiner", combiner, COMBINERS)
    check_number("trim", trim, low=0, high=0.5, high_open=True)


class TallyRules:
    """How a predictor's calls combine members, with what does not change between calls worked out once.

    Args:
        manifest: the bundle's manifest.
        combiner: ``mean``, ``median`` or ``trimmed`` (:func:`edgens.ensemble.combine`).
        trim: the fraction a ``trimmed`` combiner cuts from each end.
        outliers: the bundle's outlier thresholds, or None: no silent-fault detection.
        margin: how many times its threshold a group may deviate (default: the bundle's).
        checksums: the checked stacks' bounds by name (:attr:`StackPool.checksums`); their outputs carry a check
            row and two check columns, which the tally strips.
        verify: check those checksums on every stack a call runs (False: only strip them, for timing the checks).

    Raises:
        ConfigError: an unknown combiner or a trim out of range.
    """

    def __init__(self, manifest: Manifest, combiner: str = "mean", trim: float = DEFAULT_TRIM,
                 outliers: OutlierInfo | None = None, margin: float | None = None,
                 checksums: dict[str, StackChecksum] | None = None, verify: bool = True):
        check_combining(combiner, trim)
        self.checksums, self.verify = checksums or {}, verify
        self.family, self.n_outputs = manifest.family, manifest.n_outputs
        self.combiner, self.trim = combiner, trim
        self.outliers = outliers
        self.margin = margin or (outliers.margin if outliers is not None else None)
        self._manifest = manifest
        self._group_of = {member: stack.name for stack in manifest.general_stacks for member in stack.members}
        self._group_size = {stack.name: len(stack.members) for stack in manifest.general_stacks}
        self._layouts: dict[tuple[str, tuple[int, ...] | None], _Layout | None] = {}
        self._checks: dict[tuple, GroupCheck] = {}  # per sequence of checked steps
        self._absolute_input: tuple[np.ndarray, np.ndarray] | None = None  # the last call's inputs and |inputs|
        self._lock = threading.Lock()

    def reduce(self, result: StackResult, x: np.ndarray) -> StackResult:
        """Reduce a stack's outputs on the normalised inputs ``x`` to the sums a call needs (in the thread that ran
        it). A step with a fallback (a prefix stack) whose sum is not finite fails here, so that the fallback can
        still run in the call. The hot path: one sum, or one pass over the groups."""
        out = result.output
        if out is None:
            return result
        result.output = None
        step = result.step
        groups = None
        check = self.checksums.get(step.stack)
        # float32 sums take half the time of float64 ones; only absurd logits (~1e37) could overflow, and are then
        # reported as non-finite (quietly: a corrupted stack's huge outputs are no numpy error).
        with np.errstate(over="ignore", invalid="ignore"):
            if check is None:
                rows = out if step.rows is None else out[list(step.rows)]
            else:  # a checked stack's rows keep their check columns until summed, with the check row last
                rows = out if step.rows is None else out[[*step.rows, check.rows]]
            if check is not None and self.verify:  # the per-example part of its hidden bound rides in the check row
                check.bound_inputs(rows[-1], self._absolute(x))
            layout = self.layout(step) if self.outliers is not None else None
            if layout is None:
                part = row_sum(rows)  # a checked stack's check row adds its hidden residual and bound (K, K + 1)
            else:  # one pass: each group's sum, then their total
                groups = layout.group_sums(rows if check is None else rows[:-1])
                part = groups.sum(axis=0) if len(groups) > 1 else groups[0]
                if check is not None:
                    part = part + rows[-1]
            if check is not None:
                # The member sum the call needs anyway carries the checksums (edgens.runtime.checksums).
                problem = check.failure(part, rows[-1]) if self.verify else None
                if problem is not None:
                    result.failure = StackFailure(step.stack, CHECKSUM, problem)
                    return result
                part, rows = part[:, :check.k], rows[:-1, :, :check.k]
                groups = None if groups is None else groups[..., :check.k]
                result.finite = self.verify
            if step.fallback and not result.finite and not math.isfinite(part.sum()):
                result.failure = StackFailure(step.stack, "non-finite", _NON_FINITE)
                return result
        result.part, result.groups = part, groups
        if self.combiner != "mean":
            result.rows = rows
        return result

    def _absolute(self, x: np.ndarray) -> np.ndarray:
        """``|x|`` flattened, for the checksums' per-example bounds: made once per call (every checked stack of the
        call needs it), kept for the next stack of the same inputs."""
        cached = self._absolute_input
        if cached is None or cached[0] is not x:
            cached = self._absolute_input = (x, absolute_inputs(x))  # one assignment: safe across lanes
        return cached[1]

    def layout(self, step: Step) -> _Layout | None:
        """How a step's rows split into groups (general stacks) for outlier detection, cached; None for stacks that
        are not made of whole or partial general stacks in order (specialists)."""
        key = (step.stack, step.rows)
        if key in self._layouts:
            return self._layouts[key]
        layout = None
        assert self.outliers is not None
        if self._manifest.stack(step.stack).role != "specialist":
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

    def cached_check(self, steps: list[Step]) -> GroupCheck:
        """The outlier test of the groups these steps hold, built once per sequence of steps."""
        key = tuple((step.stack, step.rows) for step in steps)
        check = self._checks.get(key)
        if check is None:
            check = self._checks[key] = self.group_check(self.groups_of(steps))
        return check

    def groups_of(self, steps: list[Step]) -> list[tuple[str, str, int, float]]:
        """``(stack, group, size, threshold)`` of every group the steps hold, in the order of their sums."""
        groups = []
        for step in steps:
            layout = self._layouts[(step.stack, step.rows)]
            assert layout is not None
            groups += [(step.stack, name, int(size), float(limit))
                       for name, size, limit in zip(layout.names, layout.sizes, layout.limits, strict=True)]
        return groups

    def group_check(self, groups: list[tuple[str, str, int, float]]) -> GroupCheck:
        assert self.outliers is not None and self.margin is not None
        return GroupCheck([g[2] for g in groups], [g[3] for g in groups], self.family == "categorical",
                          self.margin, self.outliers.min_groups)


class Tally:
    """One call's accumulation: the stacks that answered, their sums, what was left out, and what failed.

    Attributes:
        stacks_run: stacks that answered, in the order they were settled.
        failures: stacks that failed in the call (loudly, non-finite, or as outliers).
        stack_ms: wall time of each stack that ran (failed ones included).
        outliers_checked: whether silent-fault detection checked the call's members.
    """

    def __init__(self, rules: TallyRules, batch: int, per_example: bool):
        self.rules = rules
        self.eta_sum = np.zeros((batch, rules.n_outputs))
        self.members = 0  # members that answered for every example (all budgets but confidence)
        self.counts = np.zeros(batch, dtype=np.int64) if per_example else None  # per example (confidence)
        self.divided = False  # eta_sum holds the mean already (the one-stack path)
        self.pending: list[StackResult] = []  # answered, not yet added
        self.settled: list[StackResult] = []  # added to eta_sum
        self.checked: list[StackResult] = []  # stacks whose groups are checked for outliers
        self.left_out: dict[str, str] = {}  # outlier group -> the stack that answered it
        self.outliers_checked = False
        self.stacks_run: list[str] = []
        self.failures: list[StackFailure] = []
        self.stack_ms: dict[str, float] = {}

    @property
    def answered(self) -> bool:
        """Whether any stack has answered so far."""
        return bool(self.stacks_run or self.pending)

    def add(self, result: StackResult) -> bool:
        """Note a stack's run; keep its sums for settling, or its failure. Returns whether it answered."""
        self.stack_ms[result.step.stack] = result.ms
        if result.failure is not None:
            self.failures.append(result.failure)
            return False
        self.pending.append(result)
        return True

    def take_only(self, result: StackResult) -> bool:
        """The hot path of a plan of one stack: note its run and, if it answered with finite sums, settle it (its
        rows straight into the mean, unless outliers or a robust combiner need the general bookkeeping). Returns
        whether it answered."""
        self.stack_ms[result.step.stack] = result.ms
        part = result.part
        if result.failure is None and part is not None and not result.finite and not _finite_sum(part):
            result.failure = StackFailure(result.step.stack, "non-finite", _NON_FINITE)
        if result.failure is not None:
            self.failures.append(result.failure)
            return False
        groups = result.groups
        outliers = self.rules.outliers
        checked = groups is not None and outliers is not None and len(groups) >= outliers.min_groups
        if result.rows is not None or (checked and self.rules.cached_check([result.step]).any_outlier(groups)):
            self.pending.append(result)  # a robust combiner, or outliers found: left out and recorded here
            self.settle()
            return True
        self.outliers_checked = checked
        self.stacks_run.append(result.step.stack)
        self.members = len(result.step.members)
        self.eta_sum = np.divide(part, self.members, dtype=np.float64)
        self.divided = True
        return True

    def settle(self, rows: np.ndarray | None = None) -> bool:
        """Check the pending stacks' sums for NaN/Inf, add the good ones (for early exit, to the examples ``rows``
        only) and look for outliers among the groups answered so far; returns whether any stack was added."""
        if not self.pending:
            return False
        with np.errstate(over="ignore", invalid="ignore"):  # a corrupted stack's huge sums are no numpy error
            return self._settle(rows)

    def _settle(self, rows: np.ndarray | None) -> bool:
        pending, self.pending = self.pending, []
        # One test for all of them: NaN or Inf in any sum makes the total (in float64) NaN or Inf.
        total = _total(pending)
        if not math.isfinite(total.sum()):
            good = []
            for result in pending:
                if math.isfinite(result.part.sum()):  # type: ignore[union-attr]
                    good.append(result)
                else:
                    self.failures.append(StackFailure(result.step.stack, "non-finite", _NON_FINITE))
            if not good:
                return False
            pending = good
            total = _total(pending)
        members = sum(len(result.step.members) for result in pending)
        if self.counts is None:
            self.eta_sum += total
            self.members += members
        else:  # early exit settles one stack at a time, run on the examples still running only
            self.eta_sum[rows] += total
            self.counts[rows] += members
        self.settled.extend(pending)
        self.stacks_run.extend(result.step.stack for result in pending)
        if self.rules.outliers is not None and self.counts is None:
            self._check_outliers(pending)
        return True

    def _check_outliers(self, pending: list[StackResult]) -> None:
        """Add the pending stacks' groups to the call's and leave out those that deviate beyond their thresholds
        (:class:`~edgens.runtime.outliers.GroupCheck`); groups found earlier in the call stay out."""
        rules = self.rules
        assert rules.outliers is not None
        self.checked.extend(result for result in pending if result.groups is not None)
        checked = self.checked
        if sum(len(r.groups) for r in checked) - len(self.left_out) < rules.outliers.min_groups:  # type: ignore[arg-type]
            return
        self.outliers_checked = True
        sums = checked[0].groups if len(checked) == 1 else np.concatenate([r.groups for r in checked])
        steps = [r.step for r in checked]
        groups = None  # built only when needed: this runs in every call
        if self.left_out:  # rare: groups found earlier in the call stay out
            groups = rules.groups_of(steps)
            keep = [i for i, g in enumerate(groups) if self.left_out.get(g[1]) != g[0]]
            groups, sums = [groups[i] for i in keep], sums[keep]  # type: ignore[index]
            check = rules.group_check(groups)
        else:
            check = rules.cached_check(steps)
        found = check.outliers(sums)  # type: ignore[arg-type]
        if not found:
            return
        if groups is None:
            groups = rules.groups_of(steps)
        for index, ratio in found:
            stack, group, size, _ = groups[index]
            self.left_out[group] = stack
            where = "" if stack == group else f" in {stack}"
            self.failures.append(StackFailure(stack, "outlier", f"the {size} members of {group}{where} deviate "
                                                                f"{ratio:.3g}x their threshold from the other "
                                                                f"members; left out of this call"))
        # Sum again rather than subtract: an outlier's sums may be so large that subtracting them loses the rest.
        self.eta_sum = np.zeros_like(self.eta_sum)
        self.members = 0
        for result in self.settled:
            if result.groups is None:
                self.eta_sum += result.part
                self.members += len(result.step.members)
                continue
            layout = rules.layout(result.step)
            assert layout is not None
            for i, (group, size) in enumerate(zip(layout.names, layout.sizes, strict=True)):
                if self.left_out.get(group) != result.step.stack:
                    self.eta_sum += result.groups[i]
                    self.members += int(size)

    def has_answer(self) -> bool:
        """Whether every example has at least one member's answer (a prediction needs one)."""
        return bool(self.members) if self.counts is None else bool(self.counts.all())

    def prediction(self, budget: Budget, start: float, task: str | None = None,
                   promise_ms: float | None = None) -> Prediction:
        """The prediction so far (call :meth:`has_answer` first); ``promise_ms``: see :class:`Prediction`."""
        rules = self.rules
        batch = len(self.eta_sum)
        if self.counts is None:
            if rules.combiner != "mean" and self.settled:
                eta = combine(self._member_rows(), rules.combiner, rules.trim)
            else:
                eta = self.eta_sum if self.divided else self.eta_sum / self.members
            members_used = np.full(batch, self.members)
        else:
            eta = self.eta_sum / self.counts[:, None]
            members_used = self.counts.copy()
        mean = inverse_link(rules.family, eta)
        return Prediction(
            family=rules.family, mean=mean, eta=eta,
            labels=mean.argmax(axis=1) if rules.family == "categorical" else None,
            members_used=members_used, stacks_run=list(self.stacks_run), failures=list(self.failures),
            elapsed_ms=(time.perf_counter() - start) * 1e3, stack_ms=dict(self.stack_ms), budget=str(budget),
            deadline_ms=budget.value if budget.kind == "deadline_ms" else None, task=task,
            outliers_checked=self.outliers_checked, promise_ms=promise_ms)

    def _member_rows(self) -> np.ndarray:
        """The natural parameters ``(members, B, K)`` of every member the call uses (outlier groups left out), for
        a robust combiner."""
        rows = []
        for result in self.settled:
            assert result.rows is not None
            layout = self.rules.layout(result.step) if self.left_out else None
            if layout is None:
                rows.append(result.rows)
                continue
            keep = np.ones(len(result.rows), dtype=bool)
            for start, group, size in zip(layout.starts, layout.names, layout.sizes, strict=True):
                if self.left_out.get(group) == result.step.stack:
                    keep[start:start + size] = False
            rows.append(result.rows[keep])
        return np.concatenate(rows, axis=0) if len(rows) > 1 else rows[0]


def row_sum(rows: np.ndarray) -> np.ndarray:
    """The sum of ``rows`` ``(R, B, K)`` over its first axis. float32 rows are summed as one matrix-vector product:
    2-4x faster than ``ndarray.sum`` over a leading axis of a few hundred short rows (5.7 against 1.6 us at batch 1
    for 257 rows, 23 against 10 us at batch 64). The order of the additions differs, which the checksums' rounding
    bound allows for (its ``sqrt(rows + 1)`` term holds for any order)."""
    if rows.dtype != np.float32 or not rows.flags.c_contiguous:
        return rows.sum(axis=0)
    return (_ones(len(rows)) @ rows.reshape(len(rows), -1)).reshape(rows.shape[1:])


@functools.lru_cache(maxsize=64)
def _ones(n: int) -> np.ndarray:
    ones = np.ones(n, dtype=np.float32)
    ones.flags.writeable = False  # shared between calls
    return ones


def _finite_sum(part: np.ndarray) -> bool:
    """Whether a sum holds no NaN or Inf (one reduction; an overflow in it means absurd values, reported alike)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return math.isfinite(part.sum())


def _total(pending: Sequence[StackResult]) -> np.ndarray:
    """The sum of the pending stacks' sums: float64 for several; one stack's float32 sum as it is (adding it to the
    call's float64 sums converts it on the way, without a copy)."""
    if len(pending) == 1:
        return pending[0].part  # type: ignore[return-value]
    return np.sum([result.part for result in pending], axis=0, dtype=np.float64)
