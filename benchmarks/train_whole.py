"""Training as a whole (issue 12): whole ``edgens train`` processes of ``mlp-256x4`` against ``mlp-1x1024``.

    python benchmarks/train_whole.py [--epochs 3] [--rounds 3] [--out benchmarks/results/train_whole_3.json]

The training step of the fused 256-member stack is close to a same-size single network's, but a whole run also pays
for what grows with the member count: the per-epoch validation diagnostics over every member, and the end of the
run (each member's outputs on the validation and test splits, written for export). This times whole processes,
from start to exit (imports, data loading and the end of the run included), the two presets alternating in every
round, each in a fresh run directory, and reports the median wall time of each and their ratio, with each run's
own split of the time (training epochs, as ``metrics.jsonl`` records them, and everything else).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("mlp-256x4", "mlp-1x1024")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def one_run(preset: str, epochs: int, directory: Path) -> dict:
    out = directory / preset
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "edgens", "train", "--preset", preset, "--epochs", str(epochs), "--out",
                    str(out), "--quiet"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    epochs_s = sum(json.loads(line)["time_s"] for line in (out / "metrics.jsonl").read_text().splitlines())
    return {"wall_s": wall, "epochs_s": epochs_s, "rest_s": wall - epochs_s}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "train_whole.json")
    args = parser.parse_args(argv)
    runs: dict[str, list[dict]] = {preset: [] for preset in PRESETS}
    with tempfile.TemporaryDirectory(prefix="edgens-train-whole-") as scratch:
        for round_ in range(args.rounds):
            for preset in PRESETS[round_ % 2:] + PRESETS[:round_ % 2]:
                result = one_run(preset, args.epochs, Path(scratch))
                runs[preset].append(result)
                log(f"round {round_ + 1}: {preset}: {result['wall_s']:.1f} s (epochs {result['epochs_s']:.1f} s)")
    summary = {preset: {key: statistics.median(r[key] for r in rows) for key in ("wall_s", "epochs_s", "rest_s")}
               for preset, rows in runs.items()}
    ratio = summary["mlp-256x4"]["wall_s"] / summary["mlp-1x1024"]["wall_s"]
    results = {"epochs": args.epochs, "rounds": args.rounds, "machine": platform.processor() or platform.machine(),
               "runs": runs, "median": summary, "ratio_256x4_to_1x1024": ratio}
    log(f"median wall time: 256x4 {summary['mlp-256x4']['wall_s']:.1f} s, 1x1024 {summary['mlp-1x1024']['wall_s']:.1f}"
        f" s: {ratio:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
