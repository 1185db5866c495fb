"""What the runtime's observed-latency bookkeeping costs per call (issue 11): the estimates that let deadlines recover
after a slow call.

Interleaved in one process on one bundle: the predictor as it is ("now") against the same predictor whose latency
estimates keep a plain dict of each stack's last time ("before", what the runtime did before issue 11; since the
runtime split of issue 23 the locks are per concern and no longer swapped out here). Both run every stack on one
thread that never spins. Blocks of 40 calls alternate, 30 rounds each; medians over rounds. Then the recovery the
estimates buy: one call in which the second general stack stalls for 20 ms, followed by 200 deadline calls (batch
64, a deadline that fits every stack), members used per call, for both.

    python benchmarks/runtime_bookkeeping.py runs/default-bundle --out benchmarks/results/runtime/bookkeeping.json
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from edgens.data.inputs import load_input
from edgens.fileio import atomic_write_json
from edgens.runtime import Predictor
from edgens.runtime.faults import Fault, inject_faults
from edgens.runtime.latency import LATENCY_FILE


class LastTime:
    """The bookkeeping before: a stack's last observed time is its estimate."""

    def __init__(self) -> None:
        self.times: dict[tuple[str, int], float] = {}

    def estimate(self, stack: str, batch: int) -> float | None:
        return self.times.get((stack, batch))

    def slowest(self, stack: str, batch: int) -> float | None:  # a deadline's promise: one time is all it kept
        return self.times.get((stack, batch))

    def observe(self, stack: str, batch: int, ms: float) -> None:
        self.times[(stack, batch)] = ms

    def skipped(self, stack: str, batch: int) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--data", default="fashion-mnist:test")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    x, _, _ = load_input(args.data)
    # one thread each, never spinning: two predictors in one process must not steal each other's cores
    now, before = Predictor.load(args.bundle, solo_threads=1), Predictor.load(args.bundle, solo_threads=1)
    before.latency.observed = LastTime()  # type: ignore[assignment]
    results = {}
    for batch in (1, 64):
        for budget in ({}, {"deadline_ms": 100.0}):
            xb = x[:batch]
            times: dict[str, list[float]] = {"now": [], "before": []}
            for number in range(args.rounds):
                order = (("now", now), ("before", before)) if number % 2 else (("before", before), ("now", now))
                for name, predictor in order:
                    for _ in range(5):
                        predictor.predict(xb, **budget)
                    start = time.perf_counter()
                    for _ in range(40):
                        predictor.predict(xb, **budget)
                    times[name].append((time.perf_counter() - start) / 40 * 1e3)
            a, b = float(np.median(times["now"])), float(np.median(times["before"]))
            key = f"batch {batch}, {'deadline_ms=100' if budget else 'all members'}"
            results[key] = {"now_ms": round(a, 4), "before_ms": round(b, 4), "ratio": round(a / b, 3),
                            "added_us": round((a - b) * 1e3, 1)}
            print(key, results[key], flush=True)
    # The recovery is about bundles without a latency table (deadlines then use observed times): a copy without one.
    plain = Path(tempfile.mkdtemp()) / "bundle"
    shutil.copytree(args.bundle, plain, ignore=shutil.ignore_patterns(LATENCY_FILE))
    now, before = Predictor.load(plain, solo_threads=1), Predictor.load(plain, solo_threads=1)
    before.latency.observed = LastTime()  # type: ignore[assignment]
    recovery = {}
    for name, predictor in (("now", now), ("before", before)):
        assert predictor.latency_table is None
        xb = x[:64]
        full = predictor.predict(xb)
        deadline = 3 * full.elapsed_ms + 1.0  # room for every stack, not for a 20 ms stall
        # Issue 11's case: the second general stack stalls once. With prefix stacks (since issue 12) a deadline
        # call that fits them does not depend on one general stack's estimate, so both may keep every member.
        stalled = predictor.manifest.general_stacks[1].name
        with inject_faults(predictor, {stalled: Fault("sleep", sleep_ms=20.0)}):
            predictor.predict(xb, deadline_ms=deadline)
        used = [int(predictor.predict(xb, deadline_ms=deadline).members_used[0]) for _ in range(200)]
        recovery[name] = {"deadline_ms": round(deadline, 3), "stalled": stalled,
                          "members_all": int(full.members_used[0]),
                          "median_members_next_200": float(np.median(used)), "first_10": used[:10],
                          "calls_until_all_members": next((i + 1 for i, u in enumerate(used)
                                                           if u == full.members_used[0]), None)}
        print("after one 20 ms stall:", name, recovery[name], flush=True)
    if args.out:
        atomic_write_json(args.out, {"bundle": args.bundle, "rounds": args.rounds, "results": results,
                                     "recovery": recovery})
    shutil.rmtree(plain.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
