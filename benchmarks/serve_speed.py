"""`edgens serve` as fast as the model (issue 26): per-request overhead against a bare Starlette + onnxruntime app,
deadlines at 16 clients, and overload refused before it costs. Real servers on loopback, Triton's perf_analyzer
(scripts/install_perf_analyzer.sh) as the closed-loop client.

    python benchmarks/serve_speed.py BUNDLE [--rounds 3] [--window-ms 2000] [--open-seconds 10]
        [--out benchmarks/results/serve_speed]

Parts, every round taking its variants in a rotating order:

- one client, all members: perf_analyzer at concurrency 1 against `edgens serve BUNDLE` (no default budget: all
  members) with JSON tensors, binary tensors and gRPC, and against benchmarks/bare_app.py (JSON tensors, the same
  graph); each round's ratio of edgens' JSON p50 to the bare app's is kept (goal: at most 1.2 in every round).
- 16 clients, `--default-deadline-ms 5`: perf_analyzer at concurrency 16 (binary tensors, its default); p99,
  answers/s, and the members per answer from the server's own `edgens_members_used` histogram (goal: p99 <= 10 ms
  and at least 1.5x the 1,069 answers/s issue 26 started from, in every round).
- open loop at twice the answers/s the 16-client part sustained (its median): requests sent at a fixed rate on 256
  keep-alive connections by one uvloop client process, whatever the answers (perf_analyzer stops at the first
  refusal, so it cannot measure this part); admitted requests' p99 (goal: at most twice the deadline), refused ones'
  p99 (goal: 2 ms), and admitted requests not answered (goal: 0).

Server and clients share this machine's cores: the numbers are for both together. Writes ``serve_speed.json`` and
``serve_speed.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests" / "serve", ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from serve_bench import encode_requests, open_loop, summarise  # noqa: E402
from serve_tools import DEFAULT_PA, rotated, run_perf_analyzer  # noqa: E402
from server_process import Server  # noqa: E402

from edgens.data.inputs import load_input  # noqa: E402
from edgens.fileio import atomic_write_json, atomic_write_text  # noqa: E402
from edgens.runtime.device_info import cpu_name  # noqa: E402

DEADLINE_MS = 5.0
BASELINE_ANSWERS_S = 1069.0  # issue 26's 16-client throughput, before it
GOALS = {"p50_ratio": 1.2, "c16_p99_ms": 10.0, "c16_speedup": 1.5, "admitted_p99_deadlines": 2.0, "refused_p99_ms": 2.0}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def members_histogram(server: Server) -> tuple[float, float]:
    """(sum, count) of the server's edgens_members_used histogram."""
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    total = float(re.search(r"^edgens_members_used_sum (\S+)$", text, re.M).group(1))
    count = float(re.search(r"^edgens_members_used_count (\S+)$", text, re.M).group(1))
    return total, count


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window-ms", type=int, default=2000, help="perf_analyzer's measurement window")
    parser.add_argument("--open-seconds", type=float, default=10.0, help="length of each open-loop run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_speed")
    args = parser.parse_args(argv)
    pa = Path(os.environ.get("EDGENS_PERF_ANALYZER", DEFAULT_PA))
    if not pa.exists():
        raise SystemExit(f"perf_analyzer not found at {pa}: run bash scripts/install_perf_analyzer.sh")
    model = args.bundle.resolve().name
    x, _, _ = load_input("fashion-mnist:test")
    requests = encode_requests(x[:2000], model, DEADLINE_MS)
    start = time.perf_counter()
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "one").mkdir()
        (work / "deadline").mkdir()
        plain = Server(args.bundle, work / "one", "--grpc-port", "0", "--no-access-log")
        deadline = Server(args.bundle, work / "deadline", "--default-deadline-ms", str(DEADLINE_MS),
                          "--no-access-log")
        (work / "bare").mkdir()
        bare_app = [sys.executable, str(ROOT / "benchmarks" / "bare_app.py"), str(args.bundle), "--port-file"]
        bare = Server(args.bundle, work / "bare", command=[*bare_app, str(work / "bare" / "port")])
        one = {"edgens http-json": (plain, "http-json"), "bare app http-json": (bare, "http-json"),
               "edgens http-binary": (plain, "http-binary"), "edgens grpc": (plain, "grpc")}
        try:
            for number in range(args.rounds):
                measured: dict = {"one_client": {}, "c16": {}}
                for name in rotated(list(one), number):
                    server, variant = one[name]
                    measured["one_client"][name] = run_perf_analyzer(pa, model, server, variant, 1, args.window_ms,
                                                                     work)
                    log(f"round {number + 1}, {name:20s} c=1: p50 "
                        f"{measured['one_client'][name]['p50_us'] / 1e3:.3f} ms")
                before = members_histogram(deadline)
                c16 = run_perf_analyzer(pa, model, deadline, "http-binary", 16, args.window_ms, work)
                after = members_histogram(deadline)
                c16["members_mean"] = (after[0] - before[0]) / max(1.0, after[1] - before[1])
                measured["c16"] = c16
                log(f"round {number + 1}, c=16 deadline {DEADLINE_MS:g} ms: {c16['throughput']:.0f}/s, p99 "
                    f"{c16['p99_us'] / 1e3:.2f} ms, {c16['members_mean']:.1f} members")
                rate = 2 * c16["throughput"]
                run = run_open_loop(deadline.port, requests, rate, args.open_seconds)
                summary = summarise([r for r in run if "status" in r], args.open_seconds, DEADLINE_MS)
                summary.update(offered_per_s=rate, client_could_not_send=sum(r.get("client_could_not_send", 0)
                                                                              for r in run))
                measured["open_loop"] = summary
                log(f"round {number + 1}, open loop {rate:.0f}/s: admitted p99 {summary['p99_ms']:.2f} ms, refused "
                    f"{summary['refused_503']} (p99 {summary.get('refused_p99_ms', 0):.2f} ms), other "
                    f"{summary['other_status']}, not sent {summary['client_could_not_send']}")
                rounds.append(measured)
        finally:
            bare.stop()  # uvicorn re-raises SIGTERM after its shutdown: its status says nothing
            assert plain.stop() == 0 and deadline.stop() == 0
    result = {"bundle": str(args.bundle), "rounds": args.rounds, "window_ms": args.window_ms,
              "command": "python benchmarks/serve_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "cpu": cpu_name() or platform.processor(), "python": platform.python_version(),
              "seconds": time.perf_counter() - start, "rounds_measured": rounds, "goals": GOALS}
    result["verdict"] = verdict(rounds)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "serve_speed.json", result)
    atomic_write_text(args.out / "serve_speed.md", markdown(result))
    print(markdown(result))
    return result


def run_open_loop(port: int, requests: list[bytes], rate: float, seconds: float) -> list[dict]:
    try:
        import uvloop  # the serve extra has it: a client that keeps up with the rate it is asked for
    except ImportError:
        return asyncio.run(open_loop(port, requests, rate, seconds))
    return uvloop.run(open_loop(port, requests, rate, seconds))


def verdict(rounds: list[dict]) -> dict:
    """Each goal per round, and whether every round met it."""
    per_round = {
        "p50_ratio": [r["one_client"]["edgens http-json"]["p50_us"] / r["one_client"]["bare app http-json"]["p50_us"]
                      for r in rounds],
        "binary_p50_ratio": [r["one_client"]["edgens http-binary"]["p50_us"]
                             / r["one_client"]["edgens http-json"]["p50_us"] for r in rounds],
        "grpc_p50_ratio": [r["one_client"]["edgens grpc"]["p50_us"] / r["one_client"]["edgens http-json"]["p50_us"]
                           for r in rounds],
        "c16_p99_ms": [r["c16"]["p99_us"] / 1e3 for r in rounds],
        "c16_speedup": [r["c16"]["throughput"] / BASELINE_ANSWERS_S for r in rounds],
        "admitted_p99_deadlines": [r["open_loop"]["p99_ms"] / DEADLINE_MS for r in rounds],
        "refused_p99_ms": [r["open_loop"].get("refused_p99_ms", 0.0) for r in rounds],
        "admitted_lost": [r["open_loop"]["requests"] - r["open_loop"]["answered"] - r["open_loop"]["refused_503"]
                          for r in rounds],
    }
    limits = {**GOALS, "binary_p50_ratio": 1.0, "grpc_p50_ratio": 1.0, "admitted_lost": 0}
    return {key: {"per_round": values, "met": all(v >= limits[key] if key == "c16_speedup" else v <= limits[key]
                                                  for v in values)} for key, values in per_round.items()}


def markdown(result: dict) -> str:
    rounds = result["rounds_measured"]
    med = statistics.median
    lines = [f"`edgens serve` against a bare Starlette + onnxruntime app ({result['bundle']}), {result['rounds']} "
             f"rounds, variants interleaved; {result['cpu']}; {result['seconds']:.0f} s.", "",
             "| one client, all members | p50 ms | p99 ms | answers/s |", "| --- | --- | --- | --- |"]
    for name in rounds[0]["one_client"]:
        cells = [med(r["one_client"][name][key] for r in rounds) for key in ("p50_us", "p99_us", "throughput")]
        lines.append(f"| {name} | {cells[0] / 1e3:.3f} | {cells[1] / 1e3:.3f} | {cells[2]:.0f} |")
    c16 = [r["c16"] for r in rounds]
    answers, p50, p99 = (med(c[key] for c in c16) for key in ("throughput", "p50_us", "p99_us"))
    lines += ["", f"16 clients, default deadline {DEADLINE_MS:g} ms (binary tensors): {answers:.0f} answers/s, p50 "
              f"{p50 / 1e3:.2f} ms, p99 {p99 / 1e3:.2f} ms, {med(c['members_mean'] for c in c16):.1f} members per "
              f"answer (medians over rounds).", ""]
    ol = [r["open_loop"] for r in rounds]
    lines += [f"Open loop at twice that: {med(o['offered_per_s'] for o in ol):.0f} requests/s offered; answered "
              f"{med(o['throughput_per_s'] for o in ol):.0f}/s (p50 {med(o['p50_ms'] for o in ol):.2f}, p99 "
              f"{med(o['p99_ms'] for o in ol):.2f} ms), refused {med(o['refused_503'] for o in ol):.0f} (p99 "
              f"{med(o.get('refused_p99_ms', 0.0) for o in ol):.2f} ms), not sent (every connection busy) "
              f"{med(o['client_could_not_send'] for o in ol):.0f} (medians over rounds).", "",
              "| goal | per round | met in every round |", "| --- | --- | --- |"]
    for key, entry in result["verdict"].items():
        lines.append(f"| {key} | {', '.join(f'{v:.2f}' for v in entry['per_round'])} | "
                     f"{'yes' if entry['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
