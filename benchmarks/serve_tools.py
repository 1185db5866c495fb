"""`edgens serve` measured by Triton's own load generator, perf_analyzer (issue 25): HTTP (JSON and binary tensors)
and gRPC, inline and in system shared memory, at several concurrencies, against one real server on loopback with a
default 5 ms deadline (perf_analyzer cannot send parameters over HTTP).

    python benchmarks/serve_tools.py BUNDLE [--rounds 3] [--concurrency 1,4,16] [--window-ms 2000]
        [--out benchmarks/results/serve_tools.json]

The variants take turns within every round (their order rotating), each a perf_analyzer run of its own; each
round's ratio of gRPC with shared memory to JSON over HTTP at concurrency 1 is kept, so that the goal (at least
1.5x the throughput) is judged in every round. perf_analyzer comes from scripts/install_perf_analyzer.sh (or
EDGENS_PERF_ANALYZER). Server and clients share this machine's cores: the numbers are for both together.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "serve"))

from edgens.fileio import atomic_write_json, atomic_write_text  # noqa: E402
from edgens.runtime.device_info import cpu_name  # noqa: E402
from server_process import Server  # noqa: E402

DEFAULT_PA = Path(os.environ.get("EDGENS_PERF_VENV", "/opt/edgens-perf-analyzer")) / "bin" / "perf_analyzer"
# name -> (transport, perf_analyzer's extra options)
VARIANTS = {
    "http-json": ("http", ["--input-tensor-format", "json", "--output-tensor-format", "json"]),
    "http-binary": ("http", []),
    "http-shm": ("http", ["--shared-memory", "system"]),
    "grpc": ("grpc", []),
    "grpc-shm": ("grpc", ["--shared-memory", "system"]),
}
GOAL = ("grpc-shm", "http-json", 1, 1.5)  # variant / baseline at concurrency 1: at least this ratio


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def rotated(items: list, number: int) -> list:
    """``items`` in round ``number``'s order: each round starts one later, so that no variant always goes first."""
    return items[number % len(items):] + items[:number % len(items)]


def run_perf_analyzer(pa: Path, model: str, server: Server, variant: str, concurrency: int, window_ms: int,
                      work: Path) -> dict:
    transport, extra = VARIANTS[variant]
    port = server.port if transport == "http" else server.grpc_port
    out = work / f"{variant}-{concurrency}.csv"
    command = [str(pa), "-m", model, "-u", f"127.0.0.1:{port}", "-i", transport,
               "--concurrency-range", f"{concurrency}:{concurrency}", "--measurement-interval", str(window_ms),
               "--stability-percentage", "25", "--max-trials", "8", "-f", str(out), *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"perf_analyzer {variant} at concurrency {concurrency} failed: "
                         f"{(done.stdout + done.stderr).strip().splitlines()[-1:]}")
    with open(out, newline="") as handle:
        row = next(csv.DictReader(handle))
    us = {key: float(value) for key, value in row.items() if key and value not in ("", None)
          and value.replace(".", "", 1).isdigit()}
    return {"throughput": us["Inferences/Second"], "p50_us": us["p50 latency"], "p99_us": us["p99 latency"],
            "avg_us": us.get("Avg latency"), "server_queue_us": us.get("Server Queue"),
            "server_compute_us": sum(us.get(k, 0.0) for k in ("Server Compute Input", "Server Compute Infer",
                                                             "Server Compute Output"))}


def markdown(result: dict) -> str:
    lines = [f"perf_analyzer against `edgens serve` ({result['bundle']}, --default-deadline-ms 5), "
             f"{result['rounds']} rounds, variants interleaved; {result['cpu']}; {result['seconds']:.0f} s.", "",
             "Median over rounds: throughput (answers/s), p50 / p99 latency (ms) as perf_analyzer measures them.", "",
             "| variant | " + " | ".join(f"concurrency {c}" for c in result["concurrency"]) + " |",
             "| --- |" + " --- |" * len(result["concurrency"])]
    for variant, by_c in result["median"].items():
        cells = [f"{v['throughput']:.0f}/s, {v['p50_us'] / 1e3:.2f} / {v['p99_us'] / 1e3:.2f}"
                 for v in by_c.values()]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    goal = result["goal"]
    lines += ["", f"Goal: {goal['variant']} / {goal['baseline']} throughput at concurrency {goal['concurrency']} "
                  f">= {goal['at_least']}: per round {', '.join(f'{r:.2f}' for r in goal['per_round'])} -> "
                  f"{'met in every round' if goal['met'] else 'not met in every round'}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--window-ms", type=int, default=2000, help="perf_analyzer's measurement window")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_tools.json")
    args = parser.parse_args(argv)
    pa = Path(os.environ.get("EDGENS_PERF_ANALYZER", DEFAULT_PA))
    if not pa.exists():
        raise SystemExit(f"perf_analyzer not found at {pa}: run bash scripts/install_perf_analyzer.sh")
    concurrency = [int(c) for c in args.concurrency.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    model = args.bundle.resolve().name
    start = time.perf_counter()
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server = Server(args.bundle, work, "--grpc-port", "0", "--default-deadline-ms", "5", "--no-access-log")
        try:
            for number in range(args.rounds):
                order = rotated(variants, number)
                measured: dict = {v: {} for v in variants}
                for c in concurrency:
                    for variant in order:
                        measured[variant][c] = run_perf_analyzer(pa, model, server, variant, c, args.window_ms, work)
                        log(f"round {number + 1}, {variant:12s} c={c:2d}: {measured[variant][c]['throughput']:7.0f}/s "
                            f"p50 {measured[variant][c]['p50_us'] / 1e3:.2f} ms "
                            f"p99 {measured[variant][c]['p99_us'] / 1e3:.2f} ms")
                rounds.append(measured)
        finally:
            assert server.stop() == 0
    median = {v: {c: {key: statistics.median(r[v][c][key] for r in rounds)
                      for key in ("throughput", "p50_us", "p99_us")} for c in concurrency} for v in variants}
    name, baseline, at_c, at_least = GOAL
    per_round = [r[name][at_c]["throughput"] / r[baseline][at_c]["throughput"] for r in rounds] \
        if name in variants and baseline in variants and at_c in concurrency else []
    result = {"bundle": str(args.bundle), "rounds": args.rounds, "concurrency": concurrency,
              "command": "python benchmarks/serve_tools.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "cpu": cpu_name() or platform.processor() or platform.machine(), "python": platform.python_version(),
              "seconds": time.perf_counter() - start, "median": median, "rounds_measured": rounds,
              "goal": {"variant": name, "baseline": baseline, "concurrency": at_c, "at_least": at_least,
                       "per_round": per_round, "met": bool(per_round) and min(per_round) >= at_least}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    atomic_write_text(args.out.with_suffix(".md"), markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
