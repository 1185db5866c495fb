"""What silent-fault detection and the robust combiners cost at full budget (issue 13).

    python benchmarks/detection_cost.py BUNDLE [BUNDLE...] [--batch-sizes 1,64] [--rounds 20] [--out DIR]

One predictor per bundle (onnxruntime, lanes=1), switched between plain mean, mean with outlier detection, median
and trimmed mean (both with detection), interleaved in every round (see
:func:`edgens.bench.faults.detection_cost`). Writes ``detection_cost.json`` to ``--out`` and prints a table.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

from edgens.bench.faults import detection_cost
from edgens.data.inputs import load_input
from edgens.fileio import atomic_write_json
from edgens.runtime import Predictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundles", nargs="+")
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--data", default="fashion-mnist:test")
    parser.add_argument("--out", default="benchmarks/results/faults")
    args = parser.parse_args()
    x, _, _ = load_input(args.data)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    results = {"machine": platform.processor() or platform.machine(), "bundles": {}}
    for bundle in args.bundles:
        with Predictor.load(bundle, "onnxruntime", lanes=1) as predictor:
            results["bundles"][bundle] = detection_cost(predictor, x, batches, args.rounds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "detection_cost.json", results)
    print("| bundle | batch | plain mean (ms) | detection | median | trimmed |")
    print("| --- | --- | --- | --- | --- | --- |")
    for bundle, result in results["bundles"].items():
        for batch in batches:
            ms, ratio = result[str(batch)]["ms_per_call"], result[str(batch)]["ratio_to_plain_mean"]
            print(f"| {bundle} | {batch} | {ms['mean, detection off']:.3f} | {ratio['mean, detection on']:.3f}x | "
                  f"{ratio['median, detection on']:.2f}x | {ratio['trimmed, detection on']:.2f}x |")


if __name__ == "__main__":
    main()
