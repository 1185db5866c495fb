"""What the checksums inside the stacks cost, per budget (issue 24).

    python benchmarks/checksum_cost.py --checked BUNDLE --plain BUNDLE [--batch-sizes 1,64] [--rounds 15]
        [--out benchmarks/results/checksums/checksum_cost.json]

``--checked`` and ``--plain`` are the same run exported with and without checksums (``edgens export`` and
``edgens export --no-checksums``). Two comparisons, per budget and batch size, every variant interleaved in every
round (their order alternating), each ratio the median over rounds of the per-round ratios:

- **whole cost**: the checked bundle with its checks on against the plain bundle (what a user pays for the
  checksums: the graphs' extra rows, columns and operator, and the runtime's check);
- **runtime check**: the checked bundle's predictor with its checks on against the same predictor with them off
  (the runtime's share alone, on the same sessions).

Outlier detection is off in every variant, so that the checksums' cost is measured alone. Budgets: all members,
``members=0.1`` and ``members=0.25`` (one prefix stack each), an anytime caller's deadline call that sees every
answer (the smallest prefix stack, then the general stacks one by one), and a task (one specialist stack). Goals:
all members at most 1.03x (batch 64) and 1.10x (batch 1), every other budget 1.10x and 1.25x.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(ROOT))

from edgens.data.inputs import load_input  # noqa: E402
from edgens.fileio import atomic_write_json  # noqa: E402
from edgens.runtime import Predictor  # noqa: E402
from edgens.runtime.device_info import cpu_name  # noqa: E402

GOALS = {"all members": {"64": 1.03, "1": 1.10}, "other": {"64": 1.10, "1": 1.25}}


def _keep_going(prediction: object) -> bool:
    """An anytime caller that looks at every answer and never stops early."""
    return False


def budgets(predictor: Predictor) -> dict[str, dict]:
    task = predictor.manifest.specialists[0].task if predictor.manifest.specialists else None
    out = {"all members": {}, "members=0.1": {"members": 0.1}, "members=0.25": {"members": 0.25},
           "deadline (anytime caller)": {"deadline_ms": 1000.0, "on_update": _keep_going}}
    if task is not None:
        out[f"task {task}"] = {"task": task}
    return out


def _time(predictor: Predictor, xb: object, kwargs: dict, calls: int) -> float:
    for _ in range(3):  # settle the threads into this call
        predictor.predict(xb, **kwargs)
    start = time.perf_counter()
    for _ in range(calls):
        predictor.predict(xb, **kwargs)
    return (time.perf_counter() - start) * 1e3 / calls


def one_round(bundle: str, x: np.ndarray, batches: list[int], variants: list[bool]) -> dict:
    """ms per call of every budget and batch size on a predictor of ``bundle`` loaded for this round only (two live
    predictors' spinning threads steal each other's cores), for each checks setting in ``variants``."""
    out: dict = {}
    with Predictor.load(bundle, "onnxruntime", lanes=1, detect_outliers=False) as predictor:
        for name, kwargs in budgets(predictor).items():
            for batch in batches:
                xb = predictor.prepare(x[:batch])
                calls = max(8, 512 // batch)
                for checks in variants:
                    predictor.set_combining(checksums=checks)
                    out[(name, batch, checks)] = _time(predictor, xb, kwargs, calls)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checked", required=True)
    parser.add_argument("--plain", required=True)
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--data", default="fashion-mnist:test")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "checksums" / "checksum_cost.json")
    args = parser.parse_args(argv)
    x, _, _ = load_input(args.data)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    result: dict = {"command": "python benchmarks/checksum_cost.py " + " ".join(sys.argv[1:] if argv is None else argv),
                    "machine": cpu_name(), "rounds": args.rounds, "checked": args.checked, "plain": args.plain,
                    "budgets": {}}
    for bundle, checked in ((args.checked, True), (args.plain, False)):
        with Predictor.load(bundle, "onnxruntime") as predictor:
            if bool(predictor.pool.checksums) != checked:
                raise SystemExit("--checked must be a bundle with checksums and --plain one without")
    plain_times: list[dict] = []
    checked_times: list[dict] = []
    for r in range(args.rounds):  # whole predictors interleaved, their order alternating
        order = [("plain", args.plain), ("checked", args.checked)]
        for kind, bundle in order if r % 2 == 0 else reversed(order):
            if kind == "plain":
                plain_times.append(one_round(bundle, x, batches, [True]))
            else:  # the checked predictor with its checks off and on, alternating too
                checked_times.append(one_round(bundle, x, batches, [False, True] if r % 2 == 0 else [True, False]))
        print(f"round {r + 1} of {args.rounds}", file=sys.stderr, flush=True)
    with Predictor.load(args.checked, "onnxruntime") as predictor:
        names = list(budgets(predictor))
    for name in names:
        result["budgets"][name] = {}
        for batch in batches:
            plain = np.array([t[(name, batch, True)] for t in plain_times])
            on = np.array([t[(name, batch, True)] for t in checked_times])
            off = np.array([t[(name, batch, False)] for t in checked_times])
            goal = GOALS["all members" if name == "all members" else "other"].get(str(batch))
            row = {"ms_per_call": {"plain bundle": float(np.median(plain)),
                                   "checked, checks off": float(np.median(off)),
                                   "checked, checks on": float(np.median(on))},
                   "whole_cost": float(np.median(on / plain)), "runtime_check": float(np.median(on / off)),
                   "whole_cost_per_round": (on / plain).round(4).tolist(),
                   "runtime_check_per_round": (on / off).round(4).tolist(), "goal_at_most": goal,
                   "met_every_round": None if goal is None else bool((on / plain).max() <= goal)}
            result["budgets"][name][str(batch)] = row
            print(f"{name}, batch {batch}: plain {row['ms_per_call']['plain bundle']:.3f} ms, checked "
                  f"{row['ms_per_call']['checked, checks on']:.3f} ms: whole cost {row['whole_cost']:.3f}x "
                  f"(rounds {(on / plain).min():.3f}-{(on / plain).max():.3f}), runtime check "
                  f"{row['runtime_check']:.3f}x (rounds {(on / off).min():.3f}-{(on / off).max():.3f})", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
