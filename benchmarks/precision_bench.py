"""int8 (and fp16) stacks against fp32 on this machine (issue 12): latency and test accuracy at 10%, 50% and 100%
of the members.

    python benchmarks/precision_bench.py FP32_BUNDLE OTHER_BUNDLE... [--data fashion-mnist:test] [--rounds 5]
        [--calls 200] [--out DIR]

The bundles are exports of the same run (``edgens export RUN -o B`` and ``edgens export RUN -o B8 --precision
int8``). Latency: ``Predictor.predict`` with ``members=f`` at batch 1 and 64, the bundles interleaved in every round
(median of ``--calls`` back-to-back calls per round, median over rounds). Accuracy: the whole test split at batch
256 with the same budgets. Writes ``precision.json`` and ``precision.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(ROOT))

from edgens.data.inputs import load_input  # noqa: E402
from edgens.fileio import atomic_write_json, atomic_write_text  # noqa: E402
from edgens.runtime import Predictor  # noqa: E402

FRACTIONS = (0.1, 0.5, 1.0)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def accuracy(predictor: Predictor, x: np.ndarray, y: np.ndarray, fraction: float) -> float:
    labels = np.concatenate([predictor.predict(x[i:i + 256], members=fraction).labels
                             for i in range(0, len(x), 256)])
    return float((labels == y).mean())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundles", type=Path, nargs="+")
    parser.add_argument("--data", default="fashion-mnist:test")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "precision")
    args = parser.parse_args(argv)
    x, y, _ = load_input(args.data)
    assert y is not None, f"{args.data} has no labels"
    predictors = {str(path): Predictor.load(path, backend="onnxruntime") for path in args.bundles}
    precisions = {name: sorted({s.precision for s in p.manifest.stacks}) for name, p in predictors.items()}
    results: dict = {"bundles": {name: {"precisions": precisions[name], "accuracy": {}, "latency_ms": {}}
                                 for name in predictors}, "rounds": args.rounds, "calls": args.calls}
    for name, predictor in predictors.items():
        for fraction in FRACTIONS:
            results["bundles"][name]["accuracy"][str(fraction)] = accuracy(predictor, x, y, fraction)
        log(f"{name} {precisions[name]}: accuracy {results['bundles'][name]['accuracy']}")
    for batch in (1, 64):
        xb = np.ascontiguousarray(x[:batch])
        for fraction in FRACTIONS:
            medians: dict[str, list[float]] = {name: [] for name in predictors}
            for round_ in range(args.rounds):
                names = list(predictors)
                for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                    predictor = predictors[name]
                    for _ in range(max(5, args.calls // 10)):
                        predictor.predict(xb, members=fraction)
                    times = []
                    for _ in range(args.calls):
                        start = time.perf_counter()
                        predictor.predict(xb, members=fraction)
                        times.append(time.perf_counter() - start)
                    medians[name].append(statistics.median(times) * 1e3)
            for name, values in medians.items():
                results["bundles"][name]["latency_ms"][f"{batch}/{fraction}"] = statistics.median(values)
            log(f"batch {batch}, members={fraction}: " + ", ".join(
                f"{name} {statistics.median(v):.3f} ms" for name, v in medians.items()))
    for predictor in predictors.values():
        predictor.close()
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "precision.json", results)
    atomic_write_text(args.out / "precision.md", markdown(results))
    return results


def markdown(results: dict) -> str:
    lines = ["| bundle | precision | " + " | ".join(f"test acc. {int(100 * f)}%" for f in FRACTIONS) + " | "
             + " | ".join(f"batch {b}, {int(100 * f)}%" for b in (1, 64) for f in FRACTIONS) + " |",
             "| --- | --- |" + " --- |" * (3 * len(FRACTIONS))]
    for name, row in results["bundles"].items():
        lines.append(f"| {name} | {'/'.join(row['precisions'])} | "
                     + " | ".join(f"{100 * row['accuracy'][str(f)]:.2f}%" for f in FRACTIONS) + " | "
                     + " | ".join(f"{row['latency_ms'][f'{b}/{f}']:.3f} ms" for b in (1, 64) for f in FRACTIONS)
                     + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
