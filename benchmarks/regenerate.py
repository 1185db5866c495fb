"""Regenerate every results file that comes from a run and its bundle, with today's code (issue 28, item 6).

    python benchmarks/regenerate.py [--runs runs/regen] [--out benchmarks/results] [--scale standard|full|quick]
        [--steps export,runtime,...] [--list]

One command for the device side of ``benchmarks/results/``: it trains what it needs when missing (the default run,
``edgens train --preset mlp-256x4 --lam 0.99 --epochs 30 --seed 0``, and the lam 0 and lam 1 runs the fault
benchmarks compare with, 30 epochs each, about 150 s each on 2 cores, and a small CNN run for the checksums of
convolutions), exports the bundles (default layout, with checksums; the same without them, ``plain``; single graph
without them; int8; lam 0; lam 1; the CNN's with and without checksums), profiles the default
bundle, then runs every benchmark below one after another
(never two at once: they time things) and writes ``regenerate.json`` to ``--out``: for each step, its command,
seconds, files, scale, commit (and whether the tree had uncommitted changes) and machine. Rerunning some steps
(``--steps``) replaces their entries and keeps the others'. Timings are only as good as the machine is quiet: run it
with nothing else on the cores.

Scales: ``full`` is what the published numbers of issue 13/14 used (1,000 harmful flips per budget; about 3 hours
in all); ``standard`` (the default, about 75 minutes) has the same steps with fewer fault draws and shorter serve
runs; ``quick`` is a smoke run (minutes) that checks every step still runs, not a measurement.

Not here, because they train their own runs for hours or compare two revisions: the training benchmarks
(``train_step.py``, ``train_whole.py``, ``edgens bench lambda/drop/specialists/dominance``,
``anytime_training.py``, ``distributed_bench.py``; their commands are in benchmarks/README.md) and the before/after
records (``compare_revisions.py``, ``anytime_compare.py``), which state the two commits they compare.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a checkout (or a worktree of another commit) without installing
    sys.path.insert(0, str(ROOT))

from edgens.fileio import atomic_write_json  # noqa: E402
from edgens.runtime.device_info import cpu_name  # noqa: E402

SCALES = ("quick", "standard", "full")


@dataclass(frozen=True)
class Step:
    """One benchmark: its command (``{run}``, ``{bundle}``... filled in) per scale, and what it writes."""

    name: str
    command: str
    scale_args: dict[str, str]
    writes: str

    def argv(self, paths: dict[str, str], scale: str) -> list[str]:
        words = (self.command + " " + self.scale_args.get(scale, "")).format(**paths).split()
        if words[0] == "edgens":  # the CLI of this tree, not whichever edgens is installed
            return [sys.executable, "-m", "edgens", *words[1:]]
        return [sys.executable, *words]


STEPS = (
    Step("runs", "benchmarks/run_summaries.py {lam0_run} {run} {lam1_run} --out {out}/runs.json", {},
         "runs.{json,md}"),
    Step("export", "benchmarks/export_bench.py {run} {bundle} --out {out}/export.json", {}, "export.json"),
    Step("runtime", "benchmarks/runtime_bench.py {bundle} --data fashion-mnist:test --out {out}/runtime",
         {"quick": "--quick --limit 2000"}, "runtime/runtime_bench.{json,md}, runtime/*.png"),
    Step("bookkeeping", "benchmarks/runtime_bookkeeping.py {bundle} --out {out}/runtime/bookkeeping.json",
         {"quick": "--rounds 3"}, "runtime/bookkeeping.json"),
    Step("single_graph", "benchmarks/single_graph.py {bundle} {single} --out {out}/single_graph",
         {"quick": "--rounds 1 --calls 20", "standard": "--rounds 11 --calls 150", "full": "--rounds 11 --calls 150"},
         "single_graph/single_graph.{json,md}"),
    Step("checksum_cost", "benchmarks/checksum_cost.py --checked {bundle} --plain {plain} "
         "--out {out}/checksums/checksum_cost.json", {"quick": "--rounds 1", "standard": "--rounds 9",
                                                      "full": "--rounds 15"}, "checksums/checksum_cost.json"),
    Step("checksum_catch_cnn", "benchmarks/checksum_catch.py {cnn} --out {out}/checksums/cnn_catch",
         {"quick": "--draws 2 --examples 32", "standard": "--draws 40", "full": "--draws 100 --sweep-draws 3"},
         "checksums/cnn_catch.{json,md}"),
    Step("checksum_cost_cnn", "benchmarks/checksum_cost.py --checked {cnn} --plain {cnn_plain} "
         "--out {out}/checksums/checksum_cost_cnn.json", {"quick": "--rounds 1", "standard": "--rounds 5",
                                                          "full": "--rounds 9"}, "checksums/checksum_cost_cnn.json"),
    Step("precision", "benchmarks/precision_bench.py {bundle} {int8} --out {out}/precision",
         {"quick": "--rounds 1 --calls 20"}, "precision/precision.{json,md}"),
    Step("anytime_cost", "benchmarks/anytime_cost.py {bundle} --out {out}/anytime_cost.json",
         {"quick": "--rounds 1 --calls 20", "standard": "--rounds 3 --calls 200", "full": "--rounds 5 --calls 200"},
         "anytime_cost.json"),
    Step("deadlines", "benchmarks/deadline_overruns.py {bundle} --out {out}/deadline_overruns.json",
         {"quick": "--calls 20"}, "deadline_overruns.json"),
    Step("faults", "edgens bench faults {bundle} --out {out}/faults --quiet",
         {"quick": "--draws 5 --sweep-draws 1 --shuffles 1 --cost-rounds 1 --sweep-examples 200",
          "standard": "--draws 200 --sweep-draws 3 --shuffles 3 --cost-rounds 5",
          "full": "--draws 1000 --sweep-draws 10 --shuffles 10"}, "faults/faults.{json,md,png}"),
    Step("faults_lam", "edgens bench faults {lam0} {lam1} --name faults-lam --out {out}/faults --quiet",
         {"quick": "--draws 5 --sweep-draws 1 --shuffles 1 --cost-rounds 1 --sweep-examples 200",
          "standard": "--draws 50 --random-draws 50 --sweep-draws 2 --shuffles 2 --cost-rounds 3",
          "full": "--draws 100 --random-draws 100 --sweep-draws 3 --shuffles 3 --cost-rounds 3"},
         "faults/faults-lam.{json,md,png}"),
    Step("detection_cost", "benchmarks/detection_cost.py {bundle} {lam0} {lam1} --out {out}/faults",
         {"quick": "--rounds 2"}, "faults/detection_cost.json"),
    Step("self_test_catch", "benchmarks/self_test_catch.py {bundle} --out {out}/faults",
         {"quick": "--draws 20", "standard": "--draws 1000", "full": "--draws 2000"}, "faults/self_test_catch.json"),
    Step("serve", "benchmarks/serve_bench.py {bundle} --out {out}/serve",
         {"quick": "--seconds 2 --concurrency 1,16", "standard": "--seconds 15", "full": "--seconds 30"},
         "serve/serve.json"),
    Step("serve_speed", "benchmarks/serve_speed.py {bundle} --out {out}/serve_speed",
         {"quick": "--rounds 1 --window-ms 1000 --open-seconds 2", "standard": "--rounds 3 --open-seconds 8",
          "full": "--rounds 5 --open-seconds 10"}, "serve_speed/serve_speed.{json,md}"),
)

# What the steps need, made when missing: (path key, command). Runs train for 30 epochs, as the README's (1 epoch at
# the quick scale, which checks that the steps run, not what they measure).
PREPARE = (
    ("run", "edgens train --preset mlp-256x4 --lam 0.99 --epochs {epochs} --seed 0 --out {run} --quiet"),
    ("lam0_run", "edgens train --preset mlp-256x4 --lam 0 --epochs {epochs} --seed 0 --out {lam0_run} --quiet"),
    ("lam1_run", "edgens train --preset mlp-256x4 --lam 1 --epochs {epochs} --seed 0 --out {lam1_run} --quiet"),
    ("bundle", "edgens export {run} -o {bundle}"),
    ("plain", "edgens export {run} -o {plain} --no-checksums"),
    ("single", "edgens export {run} -o {single} --stack-size 256 --prefix-stacks none --specialist-size 0 "
               "--no-checksums"),
    ("int8", "edgens export {run} -o {int8} --precision int8"),
    ("lam0", "edgens export {lam0_run} -o {lam0}"),
    # A small CNN ensemble for the checksums of grouped convolutions (layers-abft): cnn-10's members, 4 of them, on
    # 6,000 training images for 3 epochs (minutes on 2 cores; not an accuracy run), one member per general stack.
    ("cnn_run", "edgens train --preset cnn-10 --members 4 --lam 0.99 --epochs {cnn_epochs} --train-limit 6000 "
                "--val-size 2000 --seed 0 --out {cnn_run} --quiet"),
    ("cnn", "edgens export {cnn_run} -o {cnn} --stack-size 1 --checksum-convolutions"),
    ("cnn_plain", "edgens export {cnn_run} -o {cnn_plain} --stack-size 1 --no-checksums"),
    ("lam1", "edgens export {lam1_run} -o {lam1}"),
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def cpu_model() -> str:
    return cpu_name() or platform.processor() or platform.machine()


def paths_for(runs: Path, out: Path, run: Path | None, bundle: Path | None) -> dict[str, str]:
    return {"run": str(run or runs / "default"), "bundle": str(bundle or runs / "default-bundle"),
            "single": str(runs / "single-bundle"), "int8": str(runs / "int8-bundle"),
            "plain": str(runs / "plain-bundle"),
            "lam0_run": str(runs / "lam0"), "lam1_run": str(runs / "lam1"),
            "lam0": str(runs / "lam0-bundle"), "lam1": str(runs / "lam1-bundle"), "cnn_run": str(runs / "cnn"),
            "cnn": str(runs / "cnn-bundle"), "cnn_plain": str(runs / "cnn-plain-bundle"), "out": str(out),
            "epochs": "30", "cnn_epochs": "3"}


def run_logged(name: str, argv: list[str]) -> float:
    """Run one command from the tree's root; its output goes to the terminal; seconds taken."""
    log(f"[{name}] {' '.join(argv[1:])}")
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"regenerate: step {name} failed (exit {done.returncode}) after {seconds:.0f} s: "
                         f"{' '.join(argv[1:])}")
    log(f"[{name}] done in {seconds:.0f} s")
    return seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/regen"),
                        help="where the runs and bundles are made when missing (default: runs/regen)")
    parser.add_argument("--run", type=Path, help="the default run to use instead of RUNS/default")
    parser.add_argument("--bundle", type=Path, help="its bundle, instead of RUNS/default-bundle")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--scale", choices=SCALES, default="standard")
    parser.add_argument("--steps", help="comma-separated step names (default: all)")
    parser.add_argument("--list", action="store_true", help="print the steps' commands and exit")
    args = parser.parse_args(argv)
    names = [s.name for s in STEPS]
    chosen = names if not args.steps else [n.strip() for n in args.steps.split(",") if n.strip()]
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        parser.error(f"unknown step(s) {', '.join(unknown)}; expected some of {', '.join(names)}")
    paths = paths_for(args.runs.resolve(), args.out.resolve(), args.run and args.run.resolve(),
                      args.bundle and args.bundle.resolve())
    if args.scale == "quick":
        paths["epochs"] = paths["cnn_epochs"] = "1"
    steps = [s for s in STEPS if s.name in chosen]
    if args.list:
        for step in steps:
            print(f"{step.name}: {' '.join(step.argv(paths, args.scale)[1:])}")
        return {}

    start = time.perf_counter()
    # uncommitted changes to anything but the results themselves (which a regeneration rewrites)
    commit, dirty = git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--", ".", ":!benchmarks/results"))
    machine = {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)),
               "python": platform.python_version()}
    # A run of some steps updates their entries and keeps the others': each entry says its own commit and machine.
    previous = args.out / "regenerate.json"
    record: dict = {"steps": [], "prepare": []}
    if previous.exists():
        record = json.loads(previous.read_text())
        record.setdefault("prepare", [])
        for old in record["steps"]:  # files written before entries had their own: the run's commit and machine
            for key in ("commit", "uncommitted_changes", "cpu", "cores", "python", "scale"):
                if key not in old and key in record:
                    old[key] = record[key]
        for key in ("commit", "uncommitted_changes", "cpu", "cores", "python", "seconds"):
            record.pop(key, None)
    record.update(scale=args.scale, started=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    for key, command in PREPARE:
        if Path(paths[key]).exists():
            continue
        words = command.format(**paths).split()
        seconds = run_logged(f"prepare {key}", [sys.executable, "-m", "edgens", *words[1:]])
        record["prepare"].append({"command": command.format(**paths), "seconds": round(seconds, 1),
                                  "commit": commit})
    profiled = Path(paths["bundle"]) / "latency.json"
    if not profiled.exists():  # the latency-budget and deadline steps plan from the bundle's latency table
        seconds = run_logged("prepare profile", [sys.executable, "-m", "edgens", "profile", paths["bundle"],
                                                 "--batch-sizes", "1,8,64", "--repeats", "100"])
        record["prepare"].append({"command": f"edgens profile {paths['bundle']} --batch-sizes 1,8,64 --repeats 100",
                                  "seconds": round(seconds, 1), "commit": commit})
    for step in steps:
        step_argv = step.argv(paths, args.scale)
        seconds = run_logged(step.name, step_argv)
        entry = {"name": step.name, "command": " ".join(step_argv[1:]), "writes": step.writes,
                 "seconds": round(seconds, 1), "scale": args.scale, "commit": commit, "uncommitted_changes": dirty,
                 "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"), **machine}
        record["steps"] = [s for s in record["steps"] if s["name"] != step.name] + [entry]
        record["steps"].sort(key=lambda s: [st.name for st in STEPS].index(s["name"]))
        atomic_write_json(previous, record)  # after every step: a stopped run says how far it got
    total = time.perf_counter() - start
    log(f"regenerate: {len(steps)} steps in {total / 60:.1f} min; {previous}")
    print(json.dumps({s["name"]: s["seconds"] for s in record["steps"]}, indent=1))
    return record


if __name__ == "__main__":
    main()
