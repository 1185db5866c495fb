"""Two bundles' anytime curves side by side, in one process (issue 12): accuracy and deadline overruns at the same
deadlines and latency budgets, the bundles alternating batch by batch so that machine noise hits both alike.

    python benchmarks/anytime_compare.py BASE_BUNDLE NEW_BUNDLE [--data fashion-mnist:test] [--deadlines 0.1,...]
        [--repeats 3] [--out benchmarks/results/anytime_compare.json]

Used to check that a new bundle layout does not make the anytime curve worse: e.g. BASE exported with 16 equal
stacks and no prefix stacks (``--stack-size 16 --prefix-stacks none``), NEW the default layout. Both bundles need a
latency table of this device for the ``latency_ms`` budgets (``edgens profile``). Each (budget, bundle) runs the
whole test split at batch 64 ``--repeats`` times; accuracies are the mean, overrun figures pooled over all calls.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(ROOT))

from edgens.data.inputs import load_input  # noqa: E402
from edgens.errors import ConfigError  # noqa: E402
from edgens.fileio import atomic_write_json  # noqa: E402
from edgens.runtime import Predictor  # noqa: E402

BATCH = 64


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--data", default="fashion-mnist:test")
    parser.add_argument("--deadlines", default="0.1,0.2,0.35,0.5,0.75,1.0,1.5,2.0,3.0")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "anytime_compare.json")
    args = parser.parse_args(argv)
    x, y, _ = load_input(args.data)
    predictors = {"base": Predictor.load(args.base, backend="onnxruntime"),
                  "new": Predictor.load(args.new, backend="onnxruntime")}
    batches = [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, len(x), BATCH)]
    values = [float(v) for v in args.deadlines.split(",")]
    rows = []
    for kind in ("deadline_ms", "latency_ms"):
        for value in values:
            row: dict = {"budget": kind, "value_ms": value}
            for name, predictor in predictors.items():
                try:
                    predictor.predict(batches[0][0], **{kind: value})
                except ConfigError as err:
                    row[name] = {"refused": str(err)}
            stats: dict[str, dict[str, list]] = {name: {"correct": [], "members": [], "overrun": []}
                                                 for name in predictors if name not in row}
            for repeat in range(args.repeats):
                for i, (xb, yb) in enumerate(batches):
                    order = list(stats)[::1 if (i + repeat) % 2 else -1]  # who goes first alternates
                    for name in order:
                        p = predictors[name].predict(xb, **{kind: value})
                        stats[name]["correct"].append(int((p.labels == yb).sum()))
                        stats[name]["members"].append(float(p.members_used.mean()))
                        stats[name]["overrun"].append(p.overrun_ms)
            for name, s in stats.items():
                overrun = np.asarray(s["overrun"])
                late = overrun[overrun > 0]
                row[name] = {"accuracy": sum(s["correct"]) / (len(y) * args.repeats),
                             "members_mean": float(np.mean(s["members"])),
                             "overrun_fraction": float((overrun > 0).mean()),
                             "overrun_median_ms": float(np.median(late)) if len(late) else 0.0,
                             "overrun_p99_ms": float(np.percentile(overrun, 99)),
                             "overrun_max_ms": float(overrun.max())}
            rows.append(row)
            log(f"{kind}={value:g}: " + "; ".join(
                f"{name} " + (f"{100 * r['accuracy']:.2f}% ({r['members_mean']:.0f} members, overrun in "
                              f"{100 * r['overrun_fraction']:.0f}%, median {r['overrun_median_ms']:.3f} ms)"
                              if "accuracy" in r else "refused") for name, r in ((n, row[n]) for n in predictors)))
    for predictor in predictors.values():
        predictor.close()
    results = {"base": str(args.base), "new": str(args.new), "batch": BATCH, "repeats": args.repeats, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
