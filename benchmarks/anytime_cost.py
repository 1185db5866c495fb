"""What an anytime caller pays for early, improving answers (issue 28, item 1), against the one-graph call.

    python benchmarks/anytime_cost.py BUNDLE [--rounds 5] [--calls 200] [--batches 1,64]
        [--out benchmarks/results/anytime_cost.json]

On a bundle as export writes it (general stacks and prefix stacks of 10/25/50/100%), interleaved in every round
(each variant's median of ``--calls`` back-to-back calls; the result is the median over rounds, and each round's
ratio is kept so that a goal can be checked in every round):

- ``predict(x)``: all members, the prefix stack of all (one graph; what ``predict`` runs without a caller who looks);
- ``anytime(x)``, every answer consumed: the smallest prefix stack, then each general stack after it;
- ``anytime(x)``, first answer only: the smallest prefix stack, then the iterator is closed;
- ``predict(x, on_update=...)`` that stops at the first answer (the same work as the previous one, the other API).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(ROOT))

from edgens.fileio import atomic_write_json  # noqa: E402
from edgens.runtime import Predictor, read_calibration  # noqa: E402


def first_answer(predictor: Predictor, x: np.ndarray) -> None:
    answers = predictor.anytime(x)
    next(answers)
    answers.close()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "anytime_cost.json")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results: dict = {"bundle": str(args.bundle), "rounds": args.rounds, "calls": args.calls, "batches": {}}
    with Predictor.load(args.bundle, backend="onnxruntime") as predictor:
        raw = read_calibration(args.bundle, predictor.manifest)
        assert raw is not None, "the bundle has no calibration examples to time with"
        for batch in (int(b) for b in args.batches.split(",")):
            x = np.ascontiguousarray(raw[0][:batch])
            answers = [int(p.members_used[0]) for p in predictor.anytime(x)]
            variants: dict[str, Callable[[], object]] = {
                "predict, all members (one graph)": lambda: predictor.predict(x),
                "anytime, every answer": lambda: list(predictor.anytime(x)),
                "anytime, first answer": lambda: first_answer(predictor, x),
                "predict with on_update, stop at the first": lambda: predictor.predict(x, on_update=lambda p: True),
            }
            medians: dict[str, list[float]] = {name: [] for name in variants}
            names = list(variants)
            for number in range(args.rounds):
                for name in names[number % len(names):] + names[:number % len(names)]:
                    for _ in range(max(5, args.calls // 10)):
                        variants[name]()
                    times = []
                    for _ in range(args.calls):
                        begin = time.perf_counter()
                        variants[name]()
                        times.append(time.perf_counter() - begin)
                    medians[name].append(statistics.median(times) * 1e3)
            base = medians[names[0]]
            results["batches"][str(batch)] = {
                "answers_members": answers,
                "variants": {name: {"median_ms": statistics.median(values),
                                    "ratio_per_round": [round(v / b, 3) for v, b in zip(values, base, strict=True)]}
                             for name, values in medians.items()}}
            for name, row in results["batches"][str(batch)]["variants"].items():
                print(f"batch {batch}: {name:45s} {row['median_ms']:.3f} ms  x{row['ratio_per_round']}",
                      file=sys.stderr)
    results["seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_json(args.out, results)
    return results


if __name__ == "__main__":
    json.dumps(main())
