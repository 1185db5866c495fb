"""Profiling: measure how long each stack of a loaded predictor takes on this device (``edgens profile``).

The result is a :class:`~edgens.runtime.latency.LatencyTable`; ``save_latency_table`` stores it in the bundle.
This module drives a :class:`~edgens.runtime.predictor.Predictor`; nothing the Predictor is built from imports it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from edgens.checks import check_number
from edgens.errors import ConfigError, NoMembersAvailableError
from edgens.runtime.device_info import power_mode_key, read_clocks
from edgens.runtime.lanes import Lanes, LaneWork
from edgens.runtime.latency import ChainLatency, LatencyTable, StackLatency
from edgens.runtime.policies import Step
from edgens.runtime.pool import StackResult
from edgens.runtime.predictor import Predictor

DEFAULT_BATCH_SIZES = (1, 8, 64)


def _summary(times: np.ndarray) -> StackLatency:
    return StackLatency(float(np.median(times) * 1e3), float(np.percentile(times, 90) * 1e3))


def profile_stacks(predictor: Predictor, batch_sizes: tuple[int, ...] | list[int] = DEFAULT_BATCH_SIZES,
                   warmup: int = 5, repeats: int = 50,
                   on_progress: Callable[[str, int], None] | None = None) -> LatencyTable:
    """Measure every loaded stack of ``predictor`` at each batch size.

    Stacks are timed the way calls run them: one after another in rounds (each round runs every stack once), so
    each stack starts with the caches the previous stack left, as in a real call. Timing one stack in a tight loop
    instead keeps its weights in cache and underestimated a 4-stack call by 10-20% on a small CPU. Input is random
    normalised data of the bundle's shape (latency does not depend on the values for these graphs). Stacks that
    deadline calls run as lean twins (one thread) are timed that way too, under ``NAME@lean``. With two or more
    lanes, each batch size also times every general stack run in order and on the lanes (``LatencyTable.lanes``).
    The table records the device's power mode (a Jetson's ``nvpmodel`` mode) and, as the measurement ends, its clocks
    and temperatures; a mode change during the measurement makes it refuse.

    Args:
        predictor: a loaded predictor; its backend and sessions are what gets measured.
        batch_sizes: batch sizes to measure.
        warmup: untimed rounds first (sessions allocate and tune on their first runs).
        repeats: timed rounds.
        on_progress: called with (stack name, batch size) after each stack is measured (for a progress bar).

    Raises:
        ConfigError: empty or non-positive batch sizes, repeats < 1 or warmup < 0.
        NoMembersAvailableError: no stack is loaded.
    """
    if not batch_sizes:
        raise ConfigError("profile: expected at least one batch size, got none")
    batch_sizes = [check_number("profile batch size", b, low=1, integer=True) for b in batch_sizes]
    check_number("profile repeats", repeats, low=1, integer=True)
    check_number("profile warmup", warmup, low=0, integer=True)
    runners = predictor.runners
    if not runners:
        raise NoMembersAvailableError(f"profile: no stack of {predictor.bundle_dir} is loaded; "
                                      f"{predictor.describe_health()}")
    # What deadline calls run: the general stacks and the prefix stacks' lean twins, timed in rounds of their own
    # (beside the other sessions' spinning threads, the twins would look as slow as what they replace).
    lean = predictor.pool.lean_runners
    deadline_runners = {**{s.name: runners[s.name] for s in predictor.manifest.general_stacks if s.name in runners},
                        **lean}
    rng = np.random.default_rng(0)
    table = LatencyTable(warmup=warmup, repeats=repeats, power_mode=power_mode_key(), **predictor.backend.describe())
    for batch in sorted({int(b) for b in batch_sizes}):
        x = rng.standard_normal((batch, *predictor.manifest.input.shape)).astype(np.float32)
        for runner in [*runners.values(), *lean.values()]:
            runner.infer(x)  # checked once: a stack that cannot run this batch fails here, not in the timing
        measured = _rounds(runners, x, warmup, repeats)
        if lean:
            measured.update({key: ms for key, ms in _rounds(deadline_runners, x, warmup, repeats).items()
                             if key in lean})
        for name, ms in measured.items():
            table.stacks.setdefault(name, {})[batch] = _summary(ms)
            if on_progress is not None:
                on_progress(name, batch)
        chain = _chain_latency(predictor, x, warmup, repeats)
        if chain is not None:
            table.lanes[batch] = chain
    clocks = read_clocks()  # as the measurement ends, while the load still holds the clocks up
    table.clocks = clocks.to_dict() if clocks.cpu_mhz or clocks.gpu_mhz is not None else None
    after = power_mode_key()
    if after != table.power_mode:
        raise ConfigError(f"profile: the power mode changed from {table.power_mode} to {after} while measuring; "
                          f"profile again in one mode")
    return table


def _rounds(runners: dict, x: np.ndarray, warmup: int, repeats: int) -> dict[str, np.ndarray]:
    """Each runner's times (s) over ``repeats`` rounds that run every runner once, in order, after ``warmup``
    untimed rounds."""
    for _ in range(warmup):
        for runner in runners.values():
            runner.run(x)
    times = np.empty((len(runners), repeats))
    for i in range(repeats):
        for j, runner in enumerate(runners.values()):
            start = time.perf_counter()
            runner.run(x)
            times[j, i] = time.perf_counter() - start
    return dict(zip(runners, times, strict=True))


def _chain_latency(predictor: Predictor, x: np.ndarray, warmup: int, repeats: int) -> ChainLatency | None:
    """Every available general stack run once, in order and on the predictor's lanes (None: fewer than 2 stacks
    or lanes). Rounds alternate the two, so machine noise hits both alike."""
    runners = predictor.runners
    steps = [Step(s.name, None, tuple(s.members)) for s in predictor.manifest.general_stacks
             if predictor.available(s.name)]
    if len(steps) < 2 or predictor.lanes < 2:
        return None

    def run(step: Step) -> StackResult:
        runners[step.stack].run(x)
        return StackResult(step, finished=time.perf_counter())

    def in_order() -> None:
        for step in steps:
            runners[step.stack].run(x)

    def on_lanes() -> None:  # as a call runs them: the calling thread is one of the lanes
        work = LaneWork(steps, run, lambda step, is_fallback, answered: True)
        helpers = min(lanes.count, len(steps) - 1)
        lanes.submit(work, helpers)
        work.serve()
        done = 0
        while done < helpers + 1:
            done += work.results.get() is None

    lanes = Lanes(predictor.lanes - 1, name="edgens-profile-lane")
    try:
        times: dict[str, list[float]] = {"in_order": [], "lanes": []}
        for i in range(warmup + repeats):
            for name, fn in (("in_order", in_order), ("lanes", on_lanes))[::1 if i % 2 else -1]:
                start = time.perf_counter()
                fn()
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
    finally:
        lanes.close()
    return ChainLatency(predictor.lanes, float(np.median(times["in_order"]) * 1e3),
                        float(np.median(times["lanes"]) * 1e3))
