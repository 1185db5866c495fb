"""Budgets: which members to run for a call, and when to stop.

One budget per call (none: every member):

- ``members=k``: the first k members of the anytime order (an int >= 1), or a fraction of all members (a float in
  (0, 1], rounded to the nearest count, at least 1). A stack cut by k runs whole; only its first rows are used.
- ``flops=F``: as many whole stacks, in order, as fit F flops per example.
- ``latency_ms=T``: as many whole stacks as fit T by the profiled latency table of this device (``edgens profile``).
- ``deadline_ms=T``: anytime. Stacks run in order until the wall-clock deadline, counted from the call's start
  (first the largest prefix stack expected to fit in T, if any: :func:`prefix_within`); a stack is not started
  when the latency table (or, without one, the times this predictor observed at this batch size:
  :class:`~edgens.runtime.latency.ObservedLatency`, robust to a slow call and re-measured when it keeps a stack
  out) says it cannot finish in time, so the deadline is overrun by at most one stack's latency. The first
  stack that answers is always waited for: a prediction needs at least one member.
- ``confidence=p``: per example, stop adding stacks once the largest class probability of the running ensemble
  reaches p (categorical bundles only); later stacks run only on the examples still below p.
  :func:`edgens.runtime.early_exit.fit_confidence` picks p on validation data for a target mean number of members.
- ``task=...``: the specialist sub-ensemble of a task, named by task (``class-3``), class index (3) or class name.

Planning uses the stacks that are available when the call starts (not excluded, not quarantined): a budget counts
members, flops and latency over those, so a stack lost at load is replaced by the next ones. A stack that fails
during the call is dropped without replacement (retrying would break the latency a budget promises), except a
prefix stack: its general stacks run instead (for ``latency_ms``, only those that still fit the budget).

Prefix stacks (a bundle may hold some, docs/bundle-format.md) serve the budgets known before the call: when the
general stacks a plan starts with are exactly a prefix stack's members, the prefix stack runs instead, as one call
(``members``, ``flops``, all members; ``latency_ms`` takes the plan with more members). Deadline and confidence
budgets run the general stacks one at a time, since they may stop after any of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgens.checks import finite, shown
from edgens.errors import ConfigError
from edgens.ensemble import confidence as max_probability
from edgens.runtime.bundle import Manifest, SpecialistInfo, StackInfo

BUDGETS = ("members", "flops", "latency_ms", "deadline_ms", "confidence", "task")
_BUDGET_NAMES = frozenset(BUDGETS)


@dataclass(frozen=True)
class Budget:
    """One call's budget: ``kind`` is one of :data:`BUDGETS`, or None for all members."""

    kind: str | None = None
    value: Any = None

    @classmethod
    def parse(cls, members: int | float | None = None, flops: float | None = None, latency_ms: float | None = None,
              deadline_ms: float | None = None, confidence: float | None = None,
              task: str | int | None = None) -> Budget:
        """Check the budget keyword arguments of a call; at most one may be given.

        Raises:
            ConfigError: more than one budget, or a value out of range (the message says the valid range).
        """
        if members is None and flops is None and latency_ms is None and deadline_ms is None and confidence is None \
                and task is None:
            return _ALL_MEMBERS  # the common call: no budget, no work
        given = {key: value for key, value in (("members", members), ("flops", flops), ("latency_ms", latency_ms),
                                               ("deadline_ms", deadline_ms), ("confidence", confidence),
                                               ("task", task)) if value is not None}
        if len(given) > 1:
            listed = " and ".join(f"{key}={shown(value)}" for key, value in given.items())
            raise ConfigError(f"give one budget at a time, got {listed}")
        if not given:
            return cls()
        kind, value = next(iter(given.items()))
        if kind == "task":
            if isinstance(value, bool) or not isinstance(value, str | int | np.integer):
                raise ConfigError(f"task: expected a task name, class index or class name, got {shown(value)}")
            return cls(kind, value if isinstance(value, str) else int(value))
        if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating) \
                or not finite(value):
            raise ConfigError(f"{kind}: expected a finite number, got {shown(value)}")
        if kind == "members":
            if isinstance(value, int | np.integer):
                if value < 1:
                    raise ConfigError(f"members: expected a count >= 1 or a fraction in (0, 1], got {shown(value)}")
                return cls(kind, int(value))
            if not 0.0 < value <= 1.0:
                raise ConfigError(f"members: expected a fraction in (0, 1] (or an int count), got {shown(value)}")
            return cls(kind, float(value))
        if kind == "confidence" and not 0.0 < value <= 1.0:
            raise ConfigError(f"confidence: expected a probability in (0, 1], got {shown(value)}")
        if value <= 0:
            raise ConfigError(f"{kind}: expected a number > 0, got {shown(value)}")
        return cls(kind, float(value))

    @classmethod
    def of(cls, budget: Budget | None = None, **kwargs: Any) -> Budget:
        """The budget of a call given either as a :class:`Budget` (parsed where it entered) or as keyword arguments
        (:meth:`parse`), not both.

        Raises:
            ConfigError: an unknown keyword, both forms, or what :meth:`parse` raises.
        """
        if not kwargs.keys() <= _BUDGET_NAMES:
            unknown = sorted(set(kwargs) - _BUDGET_NAMES)[0]
            raise ConfigError(f"unknown budget {unknown!r}; expected one of {', '.join(BUDGETS)}")
        if budget is None:
            return cls.parse(**kwargs) if kwargs else _ALL_MEMBERS
        if not isinstance(budget, Budget):
            raise ConfigError(f"budget: expected a Budget (e.g. Budget.parse(deadline_ms=5)) or keyword arguments "
                              f"such as deadline_ms=5, got {budget!r:.60}")
        given = [f"{key}={shown(value)}" for key, value in kwargs.items() if value is not None]
        if given:
            raise ConfigError(f"give one budget at a time, got budget={shown(budget)} and {' and '.join(given)}")
        return budget

    def __str__(self) -> str:
        return "all members" if self.kind is None else f"{self.kind}={self.value}"


_ALL_MEMBERS = Budget()


@dataclass(frozen=True)
class Step:
    """Run one stack and use some of its output rows.

    Attributes:
        stack: the stack's name.
        rows: indices of the output rows (members) to use; None for all.
        members: the member ids those rows hold.
    """

    stack: str
    rows: tuple[int, ...] | None
    members: tuple[int, ...]
    fallback: tuple[Step, ...] = ()
    """What runs instead when this stack fails in a call: the general stacks a prefix stack stands for."""


def _whole(stack: StackInfo) -> Step:
    return Step(stack.name, None, tuple(stack.members))


def _with_prefix(steps: list[Step], manifest: Manifest, available: Callable[[str], bool]) -> list[Step]:
    """Replace the plan's leading general steps by the largest available prefix stack that holds exactly their
    members: one call instead of several, with the same members. The replaced steps become its fallback."""
    if not steps:
        return steps
    for prefix in reversed(manifest.prefix_stacks):
        if not available(prefix.name):
            continue
        covered: list[int] = []
        count = 0
        for step in steps:
            if len(covered) >= len(prefix.members):
                break
            covered.extend(manifest.stack(step.stack).members)
            count += 1
        if covered != prefix.members:
            continue  # a general stack inside the prefix is unavailable, or the plan ends inside a general stack
        used = {member for step in steps[:count] for member in step.members}
        rows = tuple(i for i, member in enumerate(prefix.members) if member in used)
        step = Step(prefix.name, None if len(rows) == len(prefix.members) else rows,
                    tuple(prefix.members[i] for i in rows), fallback=tuple(steps[:count]))
        return [step, *steps[count:]]
    return steps


def prefix_within(steps: list[Step], manifest: Manifest, available: Callable[[str], bool],
                  estimate: Callable[[str], float | None], limit_ms: float, smallest: bool = False) -> list[Step]:
    """A deadline call's steps before it starts: the largest (``smallest``: the smallest) available prefix stack that
    holds exactly the first general stacks of ``steps`` and is expected to finish within ``limit_ms`` replaces them
    (the same members in one call, several times faster than their general stacks one after another); the replaced
    steps become its fallback. ``steps`` unchanged when no prefix stack fits or has an estimate."""
    # Without a latency table, a prefix stack never run has no estimate; for the smallest that fits, a larger prefix
    # stack's estimate bounds it (fewer members, the same graph shape): so a streaming caller still starts small.
    bound: dict[str, float | None] = {}
    larger: float | None = None
    for prefix in reversed(manifest.prefix_stacks):
        own = estimate(prefix.name) if available(prefix.name) else None
        bound[prefix.name] = own if own is not None else (larger if smallest and available(prefix.name) else None)
        if own is not None:
            larger = own if larger is None else min(larger, own)
    for prefix in manifest.prefix_stacks if smallest else reversed(manifest.prefix_stacks):
        expected = bound[prefix.name]
        if expected is None or expected > limit_ms:
            continue
        count = _leading(prefix, steps)
        if count is not None:
            return [Step(prefix.name, None, tuple(prefix.members), fallback=tuple(steps[:count])), *steps[count:]]
    return steps


def progressive(steps: list[Step], manifest: Manifest, available: Callable[[str], bool]) -> list[Step]:
    """The steps of a call whose caller sees each partial prediction (the anytime iterator, ``on_update``): a plan
    that starts with a prefix stack starts instead with the smallest available prefix stack inside it, followed by
    the general stacks that extend it to the same members, so that an answer comes early and improves after each
    stack. Unchanged when the plan starts with a general stack or with the smallest prefix stack there is."""
    if not steps or not steps[0].fallback:
        return steps
    general = list(steps[0].fallback)
    shorter = prefix_within(general, manifest, available, lambda name: 0.0, math.inf, smallest=True)
    if shorter is general or shorter[0].stack == steps[0].stack:
        return steps
    return [*shorter, *steps[1:]]


def _leading(prefix: StackInfo, steps: list[Step]) -> int | None:
    """How many leading whole steps of ``steps`` hold exactly ``prefix``'s members, in order (None: no run does)."""
    covered: list[int] = []
    count = 0
    for step in steps:
        if len(covered) >= len(prefix.members) or step.rows is not None:
            break
        covered.extend(step.members)
        count += 1
    return count if covered == list(prefix.members) else None


def plan(budget: Budget, manifest: Manifest, available: Callable[[str], bool],
         estimate: Callable[[str], float | None] | None = None) -> list[Step]:
    """The stacks a call runs, in order, before any runs.

    Deadline and confidence budgets plan every available general stack; they stop early while running.

    Args:
        budget: the call's budget.
        manifest: the bundle's manifest.
        available: whether a stack may be planned (not excluded or quarantined).
        estimate: latency (ms) of a stack at this call's batch size, from this device's latency table; None when
            there is no table.

    Raises:
        ConfigError: the budget fits no stack, there is no latency table for a latency budget, or the task is
            unknown.
    """
    general = [stack for stack in manifest.general_stacks if available(stack.name)]
    if budget.kind in ("deadline_ms", "confidence"):
        return [_whole(stack) for stack in general]
    if budget.kind is None:
        steps = _with_prefix([_whole(stack) for stack in general], manifest, available)
        every = manifest.prefix_stacks[-1] if manifest.prefix_stacks else None
        if every is not None and len(every.members) == len(manifest.members) and available(every.name) \
                and (not steps or steps[0].stack != every.name):
            # a general stack is lost, but the prefix stack of every member still holds all of them
            return [Step(every.name, None, tuple(every.members), fallback=tuple(_whole(s) for s in general))]
        return steps
    if budget.kind == "members":
        return _with_prefix(_with_replacements(_plan_members(budget.value, manifest, general), general), manifest,
                            available)
    if budget.kind == "flops":
        steps = _plan_cost(general, budget.value, lambda stack: float(stack.flops), "flops", "flops per example")
        return _with_prefix(_with_replacements(steps, general), manifest, available)
    if budget.kind == "latency_ms":
        if estimate is None:
            raise ConfigError("latency_ms budgets need this device's latency table, and the bundle has none for this "
                              "backend and device; run `edgens profile BUNDLE` first (or use deadline_ms)")
        steps = _plan_cost(general, budget.value, lambda stack: _required(estimate, stack.name), "latency_ms", "ms")
        return _latency_with_prefix(steps, general, budget.value, manifest, available, estimate)
    if budget.kind == "task":
        return _plan_task(resolve_task(manifest, budget.value), manifest, available)
    raise ConfigError(f"unknown budget {budget.kind!r}; expected one of {', '.join(BUDGETS)}")


def _with_replacements(steps: list[Step], general: list[StackInfo]) -> list[Step]:
    """Give each general step of a members or flops plan a replacement: as many members of the general stack as
    many places after the plan as the step is from its start. A call whose stack fails (a checksum, an error) then
    answers from as many members, as if that stack had been left out of the bundle (exactly so for a plan of one
    stack), and two failed steps never take the same replacement."""
    planned = {step.stack for step in steps}
    spare = [stack for stack in general if stack.name not in planned]
    out = []
    for step, stack in zip(steps, spare + [None] * len(steps)):
        if stack is not None and not step.fallback:
            n = min(len(step.members), len(stack.members))
            step = Step(step.stack, step.rows, step.members, fallback=(
                Step(stack.name, None if n == len(stack.members) else tuple(range(n)), tuple(stack.members[:n])),))
        out.append(step)
    return out


def _required(estimate: Callable[[str], float | None], name: str) -> float:
    value = estimate(name)
    if value is None:
        raise ConfigError(f"the latency table has no entry for stack {name}; run `edgens profile BUNDLE` again")
    return value


def _plan_members(value: int | float, manifest: Manifest, general: list[StackInfo]) -> list[Step]:
    total = len(manifest.members)
    if isinstance(value, float):
        k = max(1, round(value * total))
    else:
        if value > total:
            raise ConfigError(f"members: the bundle has {total} members, got members={shown(value)}")
        k = value
    steps, left = [], k
    for stack in general:
        if left <= 0:
            break
        if len(stack.members) <= left:
            steps.append(_whole(stack))
        else:  # the whole stack runs; its first `left` rows are the next members of the order
            steps.append(Step(stack.name, tuple(range(left)), tuple(stack.members[:left])))
        left -= len(stack.members)
    return steps


def _plan_cost(general: list[StackInfo], limit: float, cost: Callable[[StackInfo], float], kind: str,
               unit: str) -> list[Step]:
    steps, spent = [], 0.0
    for stack in general:
        spent += cost(stack)
        if spent > limit:
            break
        steps.append(_whole(stack))
    if not steps and general:
        raise ConfigError(f"{kind}={limit:g} fits no stack: the first available stack, {general[0].name}, needs "
                          f"{cost(general[0]):.4g} {unit}")
    return steps


def _latency_with_prefix(steps: list[Step], general: list[StackInfo], limit: float, manifest: Manifest,
                         available: Callable[[str], bool], estimate: Callable[[str], float | None]) -> list[Step]:
    """The latency plan with the most members: the general stacks alone (``steps``), or an available prefix stack
    that fits, followed by the general stacks after it while they fit (a prefix runs with more threads, so it can
    fit more members in the same time). Ties go to the cheaper plan."""
    def cost(plan: list[Step]) -> float:
        return sum(estimate(step.stack) or 0.0 for step in plan)

    best, best_key = steps, (sum(len(step.members) for step in steps), -cost(steps))
    for prefix in manifest.prefix_stacks:
        spent = estimate(prefix.name)
        if not available(prefix.name) or spent is None or spent > limit:
            continue  # an old table may lack the prefix stacks: then they are not planned
        covered = set(prefix.members)
        plan = [Step(prefix.name, None, tuple(prefix.members), fallback=tuple(
            _whole(stack) for stack in general if covered.issuperset(stack.members)))]
        for stack in general:
            if covered.issuperset(stack.members):
                continue
            spent += _required(estimate, stack.name)
            if spent > limit:
                break
            plan.append(_whole(stack))
        key = (sum(len(step.members) for step in plan), -cost(plan))
        if key > best_key:
            best, best_key = plan, key
    return best


def resolve_task(manifest: Manifest, task: str | int) -> SpecialistInfo:
    """The specialist named by ``task``: a task name (``class-3``), a class index (3, or ``"3"``) or a class name.

    Raises:
        ConfigError: no specialist matches (the message lists the tasks the bundle has).
    """
    names = manifest.class_names or []
    for specialist in manifest.specialists:
        index = specialist.class_index
        if task == specialist.task or (isinstance(task, int) and task == index) \
                or (isinstance(task, str) and (task == str(index) or (index < len(names) and task == names[index]))):
            return specialist
    listed = ", ".join(f"{s.task} ({names[s.class_index] if s.class_index < len(names) else s.class_index})"
                       for s in manifest.specialists) or "none"
    raise ConfigError(f"unknown task {shown(task)}; this bundle's specialists: {listed}")


def _plan_task(specialist: SpecialistInfo, manifest: Manifest, available: Callable[[str], bool]) -> list[Step]:
    # The specialist's members also live in general stacks: their rows run instead when its own stack is lost, or
    # fails in a call (its fallback).
    wanted = set(specialist.members)
    steps = []
    for stack in manifest.general_stacks:
        rows = tuple(i for i, member in enumerate(stack.members) if member in wanted)
        if rows and available(stack.name):
            steps.append(Step(stack.name, rows, tuple(stack.members[i] for i in rows)))
    if available(specialist.stack):
        own = manifest.stack(specialist.stack)
        return [Step(own.name, None, tuple(own.members), fallback=tuple(steps))]
    return steps


def may_start(now: float, deadline: float, estimate_ms: float | None, answered: bool) -> bool:
    """Whether a deadline call may start its next stack (times in seconds from ``time.perf_counter``).

    Until a member has answered, always (a prediction needs one); after that, only if the stack is expected to
    finish before the deadline (its estimated latency, or without an estimate, if the deadline has not passed).
    """
    if not answered:
        return True
    remaining = deadline - now
    return remaining > 0 and (estimate_ms is None or estimate_ms / 1e3 <= remaining)


def still_unsure(eta_sum: np.ndarray, counts: np.ndarray, p: float) -> np.ndarray:
    """Boolean mask of the examples whose running ensemble's largest class probability is still below ``p``."""
    return max_probability(eta_sum / counts[:, None]) < p
