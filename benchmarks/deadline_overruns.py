"""Deadline calls and how far past their deadline they finish, on real test images.

    python benchmarks/deadline_overruns.py BUNDLE [--data fashion-mnist:test] [--deadlines 0.2,0.5,1,2]
        [--batches 1,64] [--calls 300] [--out bench-out/deadline_overruns.json]

For each batch size, the deadlines take turns call by call (so that machine noise hits them alike), each call on
the next examples of the test split, ``--calls`` calls per deadline. Reported per (batch, deadline): the fraction of
calls that overran, the median and p99 overrun (ms, over all calls, 0 for calls in time), the largest, the mean
members used, the median call time, the runtime's own work (call time outside stacks, median and p99), and against
the deadline's promise (``Prediction.promise_ms``: one stack's p90 and the runtime's own work) its median and the
fraction of calls beyond it. Uses only ``Predictor.load`` and ``predict(x, deadline_ms=...)``, so that
``benchmarks/compare_revisions.py`` can run it against an older revision of the runtime.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(ROOT))

from edgens.data.inputs import load_input  # noqa: E402
from edgens.fileio import atomic_write_json  # noqa: E402
from edgens.runtime import Predictor  # noqa: E402


def measure(predictor: Predictor, x: np.ndarray, deadlines: list[float], batches: list[int], calls: int) -> dict:
    """``{batch: {deadline: figures}}`` (see the module docstring)."""
    results: dict = {}
    for batch in batches:
        chunks = [np.ascontiguousarray(x[i:i + batch]) for i in range(0, len(x) - batch + 1, batch)]
        for chunk in chunks[:3]:  # first calls of a size are slow (allocation): not measured
            predictor.predict(chunk, deadline_ms=max(deadlines))
        records: dict[float, list[tuple]] = {d: [] for d in deadlines}
        for i in range(calls):
            chunk = chunks[i % len(chunks)]
            for deadline in (deadlines if i % 2 else deadlines[::-1]):
                p = predictor.predict(chunk, deadline_ms=deadline)
                # promise_ms (one stack's p90 and the runtime's own work) is what older revisions do not report
                records[deadline].append((p.overrun_ms, p.elapsed_ms, int(p.members_used.min()),
                                          getattr(p, "promise_ms", None), p.elapsed_ms - sum(p.stack_ms.values())))
        results[str(batch)] = {}
        for deadline, rows in records.items():
            overrun = np.array([r[0] for r in rows])
            promises = [r[3] for r in rows if r[3] is not None]
            own = np.array([r[4] for r in rows])
            results[str(batch)][str(deadline)] = {
                "calls": len(rows), "overran": float((overrun > 0).mean()),
                "overrun_p50_ms": float(np.percentile(overrun, 50)),
                "overrun_p99_ms": float(np.percentile(overrun, 99)),
                "overrun_max_ms": float(overrun.max()), "members_mean": float(np.mean([r[2] for r in rows])),
                "elapsed_p50_ms": statistics.median(r[1] for r in rows),
                "own_work_p50_ms": float(np.percentile(own, 50)), "own_work_p99_ms": float(np.percentile(own, 99)),
                "promise_p50_ms": statistics.median(promises) if promises else None,
                "beyond_promise": (float(np.mean([r[0] > r[3] for r in rows if r[3] is not None]))
                                   if promises else None)}
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--data", default="fashion-mnist:test")
    parser.add_argument("--deadlines", default="0.2,0.5,1,2")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "deadline_overruns.json")
    args = parser.parse_args(argv)
    x, _, _ = load_input(args.data)
    with Predictor.load(args.bundle, backend="onnxruntime") as predictor:
        results = {"bundle": str(args.bundle), "calls": args.calls,
                   "results": measure(predictor, x, [float(d) for d in args.deadlines.split(",")],
                                      [int(b) for b in args.batches.split(",")], args.calls)}
    atomic_write_json(args.out, results)
    return results


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
