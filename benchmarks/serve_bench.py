"""`edgens serve` under load, faults and overload: a real server process on loopback, real Fashion-MNIST test images,
one example per request with ``deadline_ms`` (issue 14).

    python benchmarks/serve_bench.py BUNDLE [--seconds 30] [--concurrency 1,4,16,64] [--deadline-ms 5] [--out DIR]

Three parts, each against fresh `edgens serve` processes (``--no-access-log``):

- load: closed-loop clients (each sends its next request when the last is answered) at every concurrency, for
  ``--seconds`` each, against a server with dynamic batching (``--max-batch 64``) and one without
  (``--max-batch 1``: one request per stack call), the two interleaved concurrency by concurrency. Throughput,
  p50/p99 latency measured by the client, members used, answers past the deadline.
- faults: concurrency 16; a third of the way in, one general stack and the prefix stacks holding its members are
  made to fail (raise), hang (sleep 200 ms; the server's stack timeout is 20 ms) or corrupt their outputs silently
  (an exponent bit of one member's outputs). Every request must be answered, and each answer must be the ensemble
  of the members the server reports (recomputed here from the clean stacks' outputs: the runtime's drop curve).
- overload: open-loop arrivals at twice the throughput the load part sustained at concurrency 64: refused
  requests get 503 at once, admitted ones keep their deadlines.

The client is one asyncio process with persistent HTTP/1.1 connections and pre-encoded binary requests, so that it
takes little of the CPU the server needs (both share this machine's cores: the numbers are for server and clients
together). Writes ``serve.json`` to ``--out`` and prints markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import re
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "serve"))

from server_process import Server  # noqa: E402

from edgens.data.inputs import load_input  # noqa: E402
from edgens.runtime import Predictor  # noqa: E402

OUTPUTS = [{"name": "labels", "parameters": {"binary_data": False}}]


def encode_requests(x: np.ndarray, model: str, deadline_ms: float) -> list[bytes]:
    """One pre-encoded HTTP request per example: binary input, labels back as JSON."""
    requests = []
    for example in x:
        header = json.dumps({"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1, *example.shape],
                                         "parameters": {"binary_data_size": example.nbytes}}],
                             "parameters": {"deadline_ms": deadline_ms}, "outputs": OUTPUTS}).encode()
        body = header + example.tobytes()
        requests.append(f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(body)}\r\n"
                        f"Inference-Header-Content-Length: {len(header)}\r\n"
                        f"Content-Type: application/octet-stream\r\n\r\n".encode() + body)
    return requests


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, dict]:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
    body = json.loads(await reader.readexactly(length))
    return status, body


def _record(index: int, start: float, status: int, body: dict) -> dict:
    entry = {"i": index, "ms": (time.perf_counter() - start) * 1e3, "status": status}
    if status == 200:
        parameters = body["parameters"]
        entry.update(label=body["outputs"][0]["data"][0], members=parameters["members_used"],
                     stacks=parameters["stacks_run"], failures=parameters["failures"],
                     overrun=parameters["overrun_ms"], server_ms=parameters["elapsed_ms"])
    return entry


async def closed_loop(port: int, requests: list[bytes], concurrency: int, seconds: float,
                      at: tuple[float, object] | None = None) -> list[dict]:
    """``concurrency`` clients, each on its own connection, for ``seconds``; ``at``: (seconds in, callable) run
    once during the run (fault injection)."""
    records: list[dict] = []
    stop = time.perf_counter() + seconds
    counter = iter(range(10**9))

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.perf_counter() < stop:
            index = next(counter) % len(requests)
            start = time.perf_counter()
            status, body = await _exchange(reader, writer, requests[index])
            records.append(_record(index, start, status, body))
        writer.close()

    async def trigger() -> None:
        if at is not None:
            await asyncio.sleep(at[0])
            await asyncio.to_thread(at[1])

    await asyncio.gather(*(client() for _ in range(concurrency)), trigger())
    return records


async def open_loop(port: int, requests: list[bytes], rate: float, seconds: float, pool: int = 256) -> list[dict]:
    """Requests arriving every 1/rate seconds, each on an idle connection of ``pool``, whatever the answers."""
    records: list[dict] = []
    idle: asyncio.Queue = asyncio.Queue()
    for _ in range(pool):
        idle.put_nowait(await asyncio.open_connection("127.0.0.1", port))
    tasks, lost = [], 0

    async def one(index: int, start: float, connection) -> None:
        status, body = await _exchange(*connection, requests[index])
        records.append(_record(index, start, status, body))
        idle.put_nowait(connection)

    begin = time.perf_counter()
    n = int(rate * seconds)
    for k in range(n):
        delay = begin + k / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if idle.empty():
            lost += 1  # every connection busy: the client could not send (counted, not hidden)
            continue
        tasks.append(asyncio.create_task(one(k % len(requests), time.perf_counter(), idle.get_nowait())))
    await asyncio.gather(*tasks)
    if lost:
        records.append({"client_could_not_send": lost})
    return records


def summarise(records: list[dict], seconds: float, deadline_ms: float) -> dict:
    answered = [r for r in records if r.get("status") == 200]
    refused = [r for r in records if r.get("status") == 503]
    ms = np.array([r["ms"] for r in answered]) if answered else np.zeros(1)
    summary = {"requests": len(records), "answered": len(answered), "refused_503": len(refused),
               "other_status": sorted({r["status"] for r in records if r.get("status") not in (200, 503, None)}),
               "throughput_per_s": len(answered) / seconds,
               "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
               "max_ms": float(ms.max()),
               "members_mean": statistics.fmean(r["members"] for r in answered) if answered else 0.0,
               "past_deadline": sum(r["ms"] > deadline_ms for r in answered) / max(1, len(answered)),
               "server_overruns": sum(r["overrun"] > 0 for r in answered) / max(1, len(answered))}
    if refused:
        summary["refused_p99_ms"] = float(np.percentile([r["ms"] for r in refused], 99))
    return summary


def member_index(predictor: Predictor) -> dict[int, tuple[str, int]]:
    return {m: (stack.name, row) for stack in predictor.manifest.general_stacks for row, m in enumerate(stack.members)}


def check_answers(records: list[dict], etas: dict[str, np.ndarray], where: dict[int, tuple[str, int]],
                  y: np.ndarray, manifest) -> dict:
    """Each answer against the ensemble of the members it reports (stacks run, minus outlier groups left out),
    recomputed from the clean stacks' outputs."""
    agree = correct = expected_correct = 0
    answered = [r for r in records if r.get("status") == 200]
    for r in answered:
        left_out = set(re.findall(r"members of (general-\d+)", r["failures"]))
        members = {m for name in r["stacks"].split(",") for m in manifest.stack(name).members}
        members -= {m for g in left_out for m in manifest.stack(g).members}
        eta = np.mean([etas[where[m][0]][where[m][1], r["i"]] for m in members], axis=0)
        label = int(eta.argmax())
        agree += label == r["label"]
        correct += r["label"] == y[r["i"]]
        expected_correct += label == y[r["i"]]
    n = max(1, len(answered))
    return {"answers_equal_recomputed": agree / n, "accuracy": correct / n, "recomputed_accuracy": expected_correct / n}


def faulty_stacks(manifest, general: str, kind: str) -> list[dict]:
    """The fault specs for one general stack and every prefix stack holding its members."""
    specs = []
    target = manifest.stack(general).members
    for stack in [manifest.stack(general), *manifest.prefix_stacks]:
        if not set(target) <= set(stack.members):
            continue
        if kind == "fail":
            specs.append({"stack": stack.name, "kind": "raise"})
        elif kind == "hang":
            specs.append({"stack": stack.name, "kind": "sleep", "sleep_ms": 200})
        else:  # corrupt: the same member's outputs, bit 30 (exponent) flipped
            specs.append({"stack": stack.name, "kind": "flip", "bit": 30, "row": stack.members.index(target[1])})
    return specs


def post(port: int, path: str, body: dict) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=30).read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--deadline-ms", type=float, default=5.0)
    parser.add_argument("--parts", default="load,faults,overload")
    parser.add_argument("--sustained", type=float, help="the answers/s the overload part doubles (default: what the "
                        "load part measured at the largest concurrency; needed when the overload part runs alone)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve"))
    args = parser.parse_args()
    parts = set(args.parts.split(","))  # a set: "load" is a substring of "overload"
    x, y, _ = load_input("fashion-mnist:test")
    model = args.bundle.resolve().name
    requests = encode_requests(x, model, args.deadline_ms)
    with Predictor.load(args.bundle, "onnxruntime") as predictor:
        predictor.warm_up((1, 64), repeats=8)
        stack_ms = {s.name: predictor.stack_ms(s.name, 64) for s in predictor.manifest.stacks}
        manifest = predictor.manifest
        etas = predictor.stack_outputs(x, batch_size=1000) if "faults" in parts else {}
        where = member_index(predictor)
    general_ms = max(stack_ms[s.name] for s in manifest.general_stacks)
    results: dict = {"machine": platform.processor() or platform.machine(), "bundle": str(args.bundle),
                     "deadline_ms": args.deadline_ms, "seconds": args.seconds, "stack_ms_at_batch_64": stack_ms,
                     "slowest_general_stack_ms_at_64": general_ms}
    work = args.out / "tmp"
    work.mkdir(parents=True, exist_ok=True)
    concurrencies = [int(c) for c in args.concurrency.split(",")]

    if "load" in parts:
        results["load"] = {}
        for concurrency in concurrencies:
            for batch in (64, 1):
                server = Server(args.bundle, work, "--no-access-log", "--max-batch", str(batch), "--max-queue", "64")
                try:
                    records = asyncio.run(closed_loop(server.port, requests, concurrency, args.seconds))
                finally:
                    server.stop()
                summary = summarise(records, args.seconds, args.deadline_ms)
                results["load"][f"c{concurrency}-batch{batch}"] = summary
                print(f"load c={concurrency} max-batch={batch}: {json.dumps(summary)}", flush=True)

    if "faults" in parts:
        results["faults"] = {}
        for kind in ("fail", "hang", "corrupt"):
            server = Server(args.bundle, work, "--no-access-log", "--allow-fault-injection", "--stack-timeout-ms",
                            "20")
            specs = faulty_stacks(manifest, "general-005", kind)

            def inject(port: int = server.port, specs: list = specs) -> None:
                for spec in specs:
                    post(port, "/edgens/faults", spec)

            try:
                records = asyncio.run(closed_loop(server.port, requests, 16, args.seconds,
                                                  at=(args.seconds / 3, inject)))
            finally:
                server.stop()
            summary = summarise(records, args.seconds, args.deadline_ms)
            summary.update(check_answers(records, etas, where, y, manifest))
            summary["lost"] = summary["requests"] - summary["answered"]
            summary["faulty"] = [s["stack"] for s in specs]
            results["faults"][kind] = summary
            print(f"faults {kind}: {json.dumps(summary)}", flush=True)

    if "overload" in parts:
        sustained = args.sustained or results.get("load", {}).get(f"c{concurrencies[-1]}-batch64", {}).get(
            "throughput_per_s")
        if sustained is None:
            raise SystemExit("--parts overload without the load part needs --sustained ANSWERS_PER_S")
        server = Server(args.bundle, work, "--no-access-log", "--max-queue", "64")
        try:
            records = asyncio.run(open_loop(server.port, requests, 2 * sustained, args.seconds))
        finally:
            server.stop()
        summary = summarise([r for r in records if "status" in r], args.seconds, args.deadline_ms)
        summary["offered_per_s"] = 2 * sustained
        summary["client_could_not_send"] = sum(r.get("client_could_not_send", 0) for r in records)
        results["overload"] = summary
        print(f"overload: {json.dumps(summary)}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve.json").write_text(json.dumps(results, indent=2) + "\n")
    for path in work.iterdir():
        path.unlink()
    work.rmdir()
    print(f"wrote {args.out / 'serve.json'}")


if __name__ == "__main__":
    main()
