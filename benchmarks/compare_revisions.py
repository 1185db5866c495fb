"""The runtime of this checkout against an older revision, in interleaved processes on the same bundles: the speed of
the full-budget and small-budget calls (``benchmarks/single_graph.py``, as ratios to a bare onnxruntime session
timed in the same process) and deadline overruns (``benchmarks/deadline_overruns.py``).

    python benchmarks/compare_revisions.py BASE_REV DEFAULT_BUNDLE SINGLE_BUNDLE [--rounds 3]
        [--out benchmarks/results/runtime_split]

BASE_REV is checked out in a temporary git worktree. Each round runs both revisions, their order alternating by
round; each revision runs its own ``single_graph.py`` (the same graphs and session options; only the runtime under
test differs) and this checkout's ``deadline_overruns.py`` (copied into the worktree if it lacks one: it uses only
``Predictor.load`` and ``predict(x, deadline_ms=...)``). A goal holds only if it holds in every round. Writes
``compare.json`` and ``compare.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(ROOT))

from edgens.fileio import atomic_write_json, atomic_write_text  # noqa: E402

KEY_VARIANTS = ("Predictor, default bundle (all members)", "Predictor, single-graph bundle",
                "Predictor, members=0.1", "Predictor, members=0.25")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def run_revision(tree: Path, out: Path, args: argparse.Namespace) -> dict:
    """One round of one revision: its single-graph figures and its deadline overruns."""
    out.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    subprocess.run([python, str(tree / "benchmarks" / "single_graph.py"), str(args.default_bundle),
                    str(args.single_bundle), "--rounds", str(args.sg_rounds), "--calls", str(args.calls),
                    "--out", str(out)], cwd=tree, check=True, capture_output=True)
    subprocess.run([python, str(tree / "benchmarks" / "deadline_overruns.py"), str(args.default_bundle),
                    "--calls", str(args.deadline_calls), "--deadlines", args.deadlines,
                    "--out", str(out / "deadline_overruns.json")],
                   cwd=tree, check=True, capture_output=True)
    return {"single_graph": json.loads((out / "single_graph.json").read_text()),
            "deadlines": json.loads((out / "deadline_overruns.json").read_text())["results"]}


def summarise(rounds: list[dict[str, dict]]) -> dict:
    """Per round: each key variant's ratio to the bare session, head / base; and the deadline figures of both."""
    speed: dict = {}
    deadlines: dict = {}
    for number, by_rev in enumerate(rounds):
        for batch, row in by_rev["head"]["single_graph"]["batches"].items():
            base_row = by_rev["base"]["single_graph"]["batches"][batch]
            for name in KEY_VARIANTS:
                head, base = row["variants"][name]["vs_baseline"], base_row["variants"][name]["vs_baseline"]
                speed.setdefault(f"batch {batch}: {name}", []).append(
                    {"round": number, "base_vs_bare": round(base, 3), "head_vs_bare": round(head, 3),
                     "head_over_base": round(head / base, 3)})
        for batch, by_deadline in by_rev["head"]["deadlines"].items():
            for deadline, head in by_deadline.items():
                base = by_rev["base"]["deadlines"][batch][deadline]
                row = {"round": number, **{f"{rev}_{key}": round(value[key], 4) for rev, value in
                                           (("base", base), ("head", head))
                                           for key in ("overran", "overrun_p99_ms", "members_mean", "elapsed_p50_ms")}}
                if head.get("promise_p50_ms") is not None:  # what the head reports of its promise (one stack)
                    row.update(head_promise_p50_ms=round(head["promise_p50_ms"], 4),
                               head_beyond_promise=round(head["beyond_promise"], 4))
                deadlines.setdefault(f"batch {batch}, deadline_ms={deadline}", []).append(row)
    return {"speed": speed, "deadlines": deadlines}


def markdown(result: dict) -> str:
    lines = [f"Base {result['base']}, head {result['head']}; {result['rounds']} rounds, the revisions' order "
             f"alternating; {result['seconds']:.0f} s.", "",
             "Speed: each variant's time over a bare onnxruntime session timed in the same process (lower is "
             "better), per round base -> head, and head/base.", "",
             "| variant | " + " | ".join(f"round {i + 1}" for i in range(result["rounds"])) + " | head/base max |",
             "| --- |" + " --- |" * (result["rounds"] + 1)]
    for name, rows in result["summary"]["speed"].items():
        cells = [f"{r['base_vs_bare']:.2f}x -> {r['head_vs_bare']:.2f}x ({r['head_over_base']:.2f})" for r in rows]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {max(r['head_over_base'] for r in rows):.2f} |")
    lines += ["", "Deadlines: calls that overran, p99 overrun (ms), mean members; base -> head per round (and, where "
              "the head reports it, its promise: one stack's p90 and own work, median ms, and calls beyond it).", "",
              "| budget | " + " | ".join(f"round {i + 1}" for i in range(result["rounds"])) + " |",
              "| --- |" + " --- |" * result["rounds"]]
    for name, rows in result["summary"]["deadlines"].items():
        cells = [f"{100 * r['base_overran']:.0f}% / {r['base_overrun_p99_ms']:.2f} / {r['base_members_mean']:.0f} -> "
                 f"{100 * r['head_overran']:.0f}% / {r['head_overrun_p99_ms']:.2f} / {r['head_members_mean']:.0f}"
                 + (f" (promise {r['head_promise_p50_ms']:.2f}, {100 * r['head_beyond_promise']:.1f}% beyond)"
                    if "head_promise_p50_ms" in r else "") for r in rows]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("base")
    parser.add_argument("default_bundle", type=Path)
    parser.add_argument("single_bundle", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sg-rounds", type=int, default=5, help="rounds inside each single_graph.py run")
    parser.add_argument("--calls", type=int, default=200, help="timed calls per variant in single_graph.py")
    parser.add_argument("--deadline-calls", type=int, default=300)
    parser.add_argument("--deadlines", default="0.2,0.5,1,2", help="deadlines (ms) for deadline_overruns.py")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "compare_revisions")
    args = parser.parse_args(argv)
    args.default_bundle, args.single_bundle = args.default_bundle.resolve(), args.single_bundle.resolve()
    start = time.perf_counter()
    base_commit, head_commit = git("rev-parse", args.base), git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    if dirty:
        log("warning: this checkout has uncommitted changes: 'head' is them, not the commit named")
    work = Path(tempfile.mkdtemp(prefix="edgens-compare-"))
    tree = work / "base"
    git("worktree", "add", "--detach", str(tree), base_commit)
    try:
        script = tree / "benchmarks" / "deadline_overruns.py"
        if not script.exists():
            shutil.copy(ROOT / "benchmarks" / "deadline_overruns.py", script)
        rounds = []
        for number in range(args.rounds):
            order = [("base", tree), ("head", ROOT)]
            by_rev = {}
            for rev, path in (order if number % 2 == 0 else order[::-1]):
                log(f"round {number + 1}/{args.rounds}: {rev}")
                by_rev[rev] = run_revision(path, work / "out" / f"{rev}-{number}", args)
            rounds.append(by_rev)
    finally:
        git("worktree", "remove", "--force", str(tree))
        shutil.rmtree(work, ignore_errors=True)
    result = {"base": base_commit, "head": head_commit, "head_dirty": dirty, "rounds": args.rounds,
              "sg_rounds": args.sg_rounds, "calls": args.calls, "deadline_calls": args.deadline_calls,
              "seconds": time.perf_counter() - start, "summary": summarise(rounds), "raw": rounds}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "compare.json", result)
    atomic_write_text(args.out / "compare.md", markdown(result))
    log(markdown(result))
    return result


if __name__ == "__main__":
    main()
