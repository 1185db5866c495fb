"""The test results of finished training runs, side by side (the runs benchmarks/regenerate.py trains).

    python benchmarks/run_summaries.py RUN... [--out benchmarks/results/runs.json]

Per run: preset, lam, seed, epochs, best epoch, training time, test error and NLL of all members, the members'
median and best error, and the collusion diagnostic of the best weights (edgens.collusion). Writes JSON and a
markdown table next to it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edgens.collusion import run_collusion  # noqa: E402
from edgens.fileio import atomic_write_json, atomic_write_text  # noqa: E402
from edgens.rundir import RunDir  # noqa: E402


def summary(path: Path) -> dict:
    run = RunDir(path)
    config, result = run.config()["config"], run.summary()
    test = result["test"]
    return {"run": str(path), "preset": config["preset"], "lam": config["lam"], "seed": config["seed"],
            "anytime_weight": config.get("anytime_weight", 0.0), "fault_weight": config.get("fault_weight", 0.0),
            "epochs": result["epochs_run"], "best_epoch": result["best_epoch"], "train_time_s": result["train_time_s"],
            "test_error": test["ensemble_error"], "test_nll": test["ensemble_loss"],
            "median_member_error": test["median_member_error"], "best_member_error": test["best_member_error"],
            "collusion": run_collusion(path)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "runs.json")
    args = parser.parse_args(argv)
    rows = [summary(path) for path in args.runs]
    lines = ["| run | lam | test error | NLL | median / best member error | diversity / member loss (val) | "
             "offsets' share of the spread (val) | training s |", "|" + " --- |" * 8]
    for r in rows:
        c = r["collusion"]
        lines.append(f"| {r['run']} | {r['lam']:g} | {100 * r['test_error']:.2f}% | {r['test_nll']:.4f} | "
                     f"{100 * r['median_member_error']:.1f} / {100 * r['best_member_error']:.1f}% | "
                     f"{c['val_diversity_ratio']:.3f} | {100 * c['val_debiased_fraction']:.1f}% | "
                     f"{r['train_time_s']:.0f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, rows)
    atomic_write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
