"""Training time of the objectives (issue 27): whole `edgens train` processes, interleaved, the new objective for
budgets and faults at once against today's anytime term (and the paper's loss for scale).

    python benchmarks/train_objectives.py [--epochs 3] [--rounds 3] [--fault-weight 2]
        [--out benchmarks/results/train_objectives.json]

Each round runs every variant once, their order rotating from round to round, each a fresh process on the default
preset (mlp-256x4, lam 0.99, seed 0); the wall time of each process is measured from outside and the per-round ratio
of the new objective to the anytime term kept, so the goal (at most 1.1x) is judged in every round.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edgens.fileio import atomic_write_json  # noqa: E402

PREFIXES = "1,2,4,8,16,26,32,64,128"


def variants(fault_weight: float) -> dict[str, list[str]]:
    return {"paper": [],
            "anytime": ["--anytime-weight", "1"],
            "budgets+faults": ["--anytime-weight", "1", "--prefixes", PREFIXES, "--fault-weight", f"{fault_weight:g}"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fault-weight", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train_objectives.json")
    args = parser.parse_args(argv)
    runs = variants(args.fault_weight)
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        for number in range(args.rounds):
            for name in names[number % len(names):] + names[:number % len(names)]:
                out = Path(tmp) / f"{name}-{number}"
                command = [sys.executable, "-m", "edgens", "train", "--preset", "mlp-256x4", "--lam", "0.99",
                           "--epochs", str(args.epochs), "--seed", "0", "--out", str(out), "--quiet", *runs[name]]
                start = time.perf_counter()
                subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
                times[name].append(time.perf_counter() - start)
                print(f"round {number + 1}, {name}: {times[name][-1]:.1f} s", file=sys.stderr, flush=True)
    ratios = [new / old for new, old in zip(times["budgets+faults"], times["anytime"], strict=True)]
    result = {"epochs": args.epochs, "rounds": args.rounds, "fault_weight": args.fault_weight, "prefixes": PREFIXES,
              "command": "python benchmarks/train_objectives.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "seconds": times, "median_s": {name: statistics.median(v) for name, v in times.items()},
              "budgets_faults_over_anytime": ratios, "goal_at_most": 1.1, "met": max(ratios) <= 1.1}
    atomic_write_json(args.out, result)
    print(f"budgets+faults / anytime per round: {', '.join(f'{r:.3f}' for r in ratios)} "
          f"({'met' if result['met'] else 'not met'} in every round: <= 1.1)")
    return result


if __name__ == "__main__":
    main()
