"""What the checksums inside a checked bundle catch, on its own: the checksum protocol of ``edgens bench faults``
(issue 24) without the outlier-test protocols around it, for bundles whose stacks are slow to run many times
(a CNN bundle: the outlier protocols' thousands of full test-set calls would take hours on a CPU).

    python benchmarks/checksum_catch.py BUNDLE [--draws 40] [--sweep-draws 1] [--examples 128] [--batch 64]
        [--out benchmarks/results/checksums/cnn_catch]

One harmful exponent flip per draw (a 0 among bits 23-30 set to 1) in a weight of a stack the budget runs, at every
budget (all members, ``members=0.1``, a task, early exit, an anytime caller's deadline call), then a sweep over the
32 bit positions; what "harmful", "caught" and "within 0.2 points" mean is in edgens/bench/checksum_faults.py.
Writes NAME.json (every draw) and NAME.md (the tables).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(ROOT))

from edgens.bench.checksum_faults import checksum_markdown, checksum_protocol  # noqa: E402
from edgens.data.inputs import load_input  # noqa: E402
from edgens.fileio import atomic_write_json, atomic_write_text  # noqa: E402
from edgens.runtime import load_manifest  # noqa: E402
from edgens.runtime.device_info import cpu_name  # noqa: E402


def _progress(stage: str, done: int, total: int) -> None:
    if done == total or done % 10 == 0:
        print(f"{stage}: {done}/{total}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--draws", type=int, default=40, help="harmful flips per budget")
    parser.add_argument("--sweep-draws", type=int, default=1, help="flips per bit position")
    parser.add_argument("--examples", type=int, default=128, help="test examples per call set")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "checksums" / "cnn_catch")
    args = parser.parse_args(argv)
    manifest = load_manifest(args.bundle)
    if not any(stack.checksum is not None for stack in manifest.stacks):
        raise SystemExit(f"{args.bundle}: no stack has checksums; expected a bundle exported with them")
    x, y, _ = load_input(f"{manifest.training.dataset}:test")
    data = checksum_protocol(args.bundle, x, y, args.draws, args.sweep_draws, args.batch,
                             np.random.default_rng(args.seed), _progress, examples=args.examples)
    schemes = sorted({stack.checksum.scheme for stack in manifest.stacks if stack.checksum is not None})
    result = {"command": "python benchmarks/checksum_catch.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": cpu_name(), "bundle": str(args.bundle), "preset": manifest.training.preset,
              "members": len(manifest.members), "schemes": schemes, "checksums": data}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out.with_suffix(".json"), result)
    lines = [f"# Checksums of {manifest.training.preset} ({len(manifest.members)} members; schemes "
             f"{', '.join(schemes)})", "", f"`{result['command']}` on {result['machine']}", "",
             *checksum_markdown(args.bundle.name, data)]
    atomic_write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
