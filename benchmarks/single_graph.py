"""Anytime at the speed of one graph (issue 12): the runtime at full budget against a bare single-graph session.

    python benchmarks/single_graph.py DEFAULT_BUNDLE SINGLE_BUNDLE [--rounds 7] [--calls 200] [--out DIR]

DEFAULT_BUNDLE is ``edgens export RUN -o DEFAULT_BUNDLE`` (general stacks plus a prefix stack of all members);
SINGLE_BUNDLE is ``edgens export RUN -o SINGLE_BUNDLE --stack-size M --prefix-stacks none`` (one general stack of
every member). The baseline is what a user who does not need anytime would write: one ``onnxruntime``
``InferenceSession`` on SINGLE_BUNDLE's graph, with the runtime's session options, the fastest of 1 thread and all
intra-op threads with and without spinning (onnxruntime's default is to spin), on already normalised input, plus a
numpy mean and softmax.

Also timed: the fastest bare variant fed raw input that it normalises first (what a caller's own code has to do,
and what the runtime does), to show how much of the runtime's extra time is that.

Variants, interleaved in every round (each round's median of ``--calls`` back-to-back calls; the result is the
median over rounds):

- ``Predictor.predict(x)`` on DEFAULT_BUNDLE (the prefix stack: one call) and on SINGLE_BUNDLE;
- the anytime path at a generous deadline (``deadline_ms=1000``: every general stack), on the lanes (a predictor
  loaded with ``lanes=N`` asked for explicitly, so deadline calls use them) and with ``lanes=1``, to show what lanes
  buy on this machine (where ``edgens profile`` measured that they pay at this batch size);
- small budgets: ``members=0.1`` and ``members=0.25`` (the first 10% / 25% of the members).

Writes ``single_graph.json`` and ``single_graph.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(ROOT))

from edgens.ensemble import softmax  # noqa: E402
from edgens.fileio import atomic_write_json, atomic_write_text  # noqa: E402
from edgens.runtime import Predictor, load_manifest, read_calibration  # noqa: E402


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class BareSingleGraph:
    """The baseline: one onnxruntime session on the single graph, pre-normalised input, numpy mean and softmax."""

    def __init__(self, bundle: Path, threads: int, spin: bool):
        from edgens.runtime.backends.onnxruntime import load_session

        manifest = load_manifest(bundle)
        (stack,) = manifest.general_stacks
        self.session = load_session(bundle / stack.file, threads, spin)
        self.names = ([stack.output_name], stack.input_name)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        eta = self.session.run(self.names[0], {self.names[1]: x})[0]
        return softmax(eta.mean(axis=0))


def interleaved(variants: dict[str, Callable[[], object]], rounds: int, calls: int) -> dict[str, list[float]]:
    """Per variant, the median call time (ms) of each round; rounds rotate which variant goes first."""
    names = list(variants)
    medians: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            fn = variants[name]
            for _ in range(max(5, calls // 10)):  # warm-up: caches, allocators and lanes settle on this variant
                fn()
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            medians[name].append(statistics.median(times) * 1e3)
    return medians


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("default_bundle", type=Path)
    parser.add_argument("single_bundle", type=Path)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=200, help="timed calls per variant and round")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "single_graph")
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1

    default = Predictor.load(args.default_bundle, backend="onnxruntime")
    on_lanes = Predictor.load(args.default_bundle, backend="onnxruntime", lanes=default.lanes)  # asked: deadlines too
    one_lane = Predictor.load(args.default_bundle, backend="onnxruntime", lanes=1)
    single = Predictor.load(args.single_bundle, backend="onnxruntime")
    bare = {(threads, spin): BareSingleGraph(args.single_bundle, threads, spin)
            for threads in sorted({1, cores}) for spin in ((False, True) if threads > 1 else (False,))}
    raw = read_calibration(args.default_bundle, default.manifest)
    assert raw is not None, "the bundle has no calibration examples to time with"
    x_raw = raw[0]
    results: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": cores,
                                 "lanes": default.lanes, "platform": platform.platform()},
                     "default_bundle": str(args.default_bundle), "single_bundle": str(args.single_bundle),
                     "rounds": args.rounds, "calls": args.calls, "batches": {}}
    for batch in [int(b) for b in args.batches.split(",")]:
        xb = np.ascontiguousarray(x_raw[:batch])
        xn = default.prepare(xb).array  # the same normalisation, done once: the baseline gets it for free
        fastest_bare = bare[(cores, True)] if cores > 1 else bare[(1, False)]
        variants: dict[str, Callable[[], object]] = {
            # what a caller's own code must also do with raw data: normalise it (as the runtime does)
            "bare single graph + normalising raw input": lambda: fastest_bare(default.prepare(xb).array),
            **{f"bare single graph, {t} thread{'s' if t > 1 else ''}{', spinning' if spin else ''}": (lambda b=b: b(xn))
               for (t, spin), b in bare.items()},
            "Predictor, default bundle (all members)": lambda: default.predict(xb),
            "Predictor, single-graph bundle": lambda: single.predict(xb),
            f"Predictor, deadline_ms=1000, {default.lanes} lanes": lambda: on_lanes.predict(xb, deadline_ms=1000),
            "Predictor, deadline_ms=1000, 1 lane": lambda: one_lane.predict(xb, deadline_ms=1000),
            "Predictor, members=0.1": lambda: default.predict(xb, members=0.1),
            "Predictor, members=0.25": lambda: default.predict(xb, members=0.25),
        }
        # Same answers before timing: the runtime's all-members prediction is the single graph's.
        want = bare[(1, False)](xn)
        for name in ("Predictor, default bundle (all members)", f"Predictor, deadline_ms=1000, {default.lanes} lanes"):
            got = variants[name]().probabilities  # type: ignore[attr-defined]
            gap = np.abs(got - want).max()
            assert gap < 1e-4, f"{name}: differs from the single graph by {gap}"
        log(f"batch {batch}: timing {len(variants)} variants x {args.rounds} rounds x {args.calls} calls")
        medians = interleaved(variants, args.rounds, args.calls)
        summary = {name: statistics.median(values) for name, values in medians.items()}
        baseline = min(value for name, value in summary.items()
                       if name.startswith("bare") and "normalising" not in name)
        rows = {name: {"median_ms": value, "vs_baseline": value / baseline, "round_medians_ms": medians[name]}
                for name, value in summary.items()}
        full = summary["Predictor, default bundle (all members)"]
        results["batches"][str(batch)] = {"baseline_ms": baseline, "variants": rows,
                                          "first_10pct_of_full": summary["Predictor, members=0.1"] / full,
                                          "first_25pct_of_full": summary["Predictor, members=0.25"] / full}
        for name, row in rows.items():
            log(f"  {name:48s} {row['median_ms']:7.3f} ms  {row['vs_baseline']:5.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "single_graph.json", results)
    atomic_write_text(args.out / "single_graph.md", markdown(results))
    for predictor in (default, on_lanes, one_lane, single):
        predictor.close()
    return results


def markdown(results: dict) -> str:
    machine = results["machine"]
    lines = [f"Machine: {machine['cpu']}, {machine['cores']} cores, default lanes {machine['lanes']}; "
             f"{results['rounds']} rounds x {results['calls']} calls, median of round medians.", ""]
    batches = list(results["batches"])
    lines.append("| variant | " + " | ".join(f"batch {b}" for b in batches) + " |")
    lines.append("| --- |" + " --- |" * len(batches))
    for name in results["batches"][batches[0]]["variants"]:
        cells = [results["batches"][b]["variants"][name] for b in batches]
        lines.append(f"| {name} | " + " | ".join(f"{c['median_ms']:.3f} ms ({c['vs_baseline']:.2f}x)" for c in cells)
                     + " |")
    lines.append("")
    for b in batches:
        row = results["batches"][b]
        lines.append(f"- batch {b}: first 10% of members costs {100 * row['first_10pct_of_full']:.0f}% of the "
                     f"full-budget call, first 25% {100 * row['first_25pct_of_full']:.0f}%")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    json.dumps(main())
