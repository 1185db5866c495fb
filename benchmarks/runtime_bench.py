"""On-device runtime benchmark (issue 4): latency, overhead, budgets, deadlines, early exit and faults on a bundle.

    python benchmarks/runtime_bench.py BUNDLE [--data fashion-mnist:test] [--val fashion-mnist:val]
        [--out bench-out/runtime] [--repeats 200] [--backend auto] [--threads N] [--quick]

Measures, with the runtime (``edgens.runtime``) on this machine:

1. latency vs number of members (the first k of the anytime order, at every stack boundary), batch 1 and 64, next
   to bare onnxruntime sessions running the same graphs the runtime ran (a prefix stack where it used one) on
   pre-normalised input (same session options): the runtime's own cost per call. The runtime and bare calls are
   interleaved so machine noise hits both alike;
2. test accuracy vs ``latency_ms`` budget (profiling the bundle first if it has no table for this device) and vs
   ``deadline_ms``, with how often and by how much deadlines were overrun;
3. early exit: accuracy vs mean members used with ``confidence=p`` (p fitted on validation data for target mean
   members) next to the fixed-k curve;
4. faults: accuracy when a random 10/25/50% of the general stacks fail (raise; every prefix stack failing too, so
   that calls fall back to the general stacks), over several random draws, next to the same stacks simply left out
   (computed offline from the stacks' outputs; must agree) and to dropping the same
   number of random members.

Writes ``runtime_bench.json``, ``runtime_bench.md`` and, with matplotlib, ``*.png`` plots to ``--out``. ``--data``
and ``--val`` take ``FILE.npz`` (arrays x, y) or ``DATASET:SPLIT``; without ``--val``, ``DATASET:test`` pairs with
``DATASET:val``; otherwise the bundle's calibration examples fit p, or without them an npz file is split in halves
(fit on one, evaluate on the other).
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(ROOT))

from edgens.data.inputs import load_input  # noqa: E402
from edgens.fileio import atomic_write, atomic_write_json, atomic_write_text  # noqa: E402
from edgens.runtime import (Predictor, fit_confidence, inject_faults, load_manifest, profile_stacks,  # noqa: E402
                            read_calibration, save_latency_table)
from edgens.ensemble import inverse_link  # noqa: E402
from edgens.runtime.faults import random_faults  # noqa: E402
from edgens.runtime.checksums import members_view  # noqa: E402

FAULT_FRACTIONS = (0.1, 0.25, 0.5)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


# ------------------------------------------------------------------------------------------------ bare sessions


class BareSessions:
    """The runtime's own onnxruntime sessions, called directly on pre-normalised input.

    Like for like: the baseline for a budget runs exactly the graphs the runtime ran for it (e.g. the prefix stack of
    all members for an all-members call), on the very sessions the runtime runs (same threads, same spinning; a
    second set of spinning sessions would steal the cores from the first), so the difference is the runtime's own
    work: input checks and normalisation, planning, the tally, the bookkeeping.
    """

    def __init__(self, predictor: Predictor):
        m = predictor.manifest
        self.general = m.general_stacks
        self.runners = predictor.runners
        for runner in self.runners.values():
            runner.activate()
        shape = (-1,) + (1,) * (len(m.input.shape) - 1)
        self.mean = np.asarray(m.preprocessing.mean, np.float32).reshape(shape)
        self.std = np.asarray(m.preprocessing.std, np.float32).reshape(shape)
        self.shape = m.input.shape
        self.k = m.n_outputs

    def normalise(self, raw: np.ndarray) -> np.ndarray:
        return ((raw.reshape(len(raw), *self.shape).astype(np.float32) - self.mean) / self.std).astype(np.float32)

    def run(self, x: np.ndarray, names: list[str]) -> list[np.ndarray]:
        return [members_view(self.runners[name].run(x), len(self.runners[name].stack.members), self.k)
                for name in names]


# ------------------------------------------------------------------------------------------------------ sections


def timed_blocks(variants: list[tuple[str, Any]], repeats: int, rounds: int = 10) -> dict[str, list[float]]:
    """Time each variant ``repeats`` times (ms), in ``rounds`` alternating blocks of back-to-back calls.

    Back-to-back calls measure the steady state a device loop sees; alternating blocks (each round starting with
    another variant) spread slow phases of a shared machine over all variants alike.
    """
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    per_block = max(1, repeats // rounds)
    for round_ in range(rounds):
        for name, fn in variants[round_ % len(variants):] + variants[:round_ % len(variants)]:
            for _ in range(max(2, per_block // 5)):  # warm-up: caches and allocators settle on this variant
                fn()
            for _ in range(per_block):
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def latency_vs_members(predictor: Predictor, bare: BareSessions, x: np.ndarray, repeats: int) -> list[dict]:
    """Runtime vs bare sessions for the first k members at (up to 8) general-stack boundaries, batch 1 and 64.

    The bare sessions run the stacks the runtime's own call ran (``Prediction.stacks_run``): a prefix stack where
    the bundle has one for k, else the general stacks up to k.
    """
    rows = []
    boundaries = np.cumsum([len(s.members) for s in bare.general])
    chosen = np.unique(np.linspace(1, len(boundaries), min(8, len(boundaries))).round().astype(int))  # stacks run
    for batch in (1, 64):
        raw = np.resize(x, (batch, *x.shape[1:]))
        normalised = bare.normalise(raw)
        for n_stacks in chosen.tolist():
            k = int(boundaries[n_stacks - 1])
            names = predictor.predict(raw, members=k).stacks_run

            def runtime() -> None:
                predictor.predict(raw, members=k)  # noqa: B023

            def bare_only() -> None:
                bare.run(normalised, names)  # noqa: B023

            def bare_full() -> None:  # what a caller writes by hand: normalise, run, combine
                etas = bare.run(bare.normalise(raw), names)  # noqa: B023
                inverse_link(predictor.manifest.family, np.concatenate(etas).mean(axis=0))

            variants = [("runtime", runtime), ("bare", bare_only), ("bare_full", bare_full)]
            times = timed_blocks(variants, repeats)
            med = {name: statistics.median(values) for name, values in times.items()}
            rows.append({"batch": batch, "members": k, "stacks": len(names), "graphs": names,
                         "runtime_median_ms": med["runtime"], "runtime_p90_ms": percentile(times["runtime"], 90),
                         "bare_median_ms": med["bare"], "bare_p90_ms": percentile(times["bare"], 90),
                         "bare_full_median_ms": med["bare_full"],
                         "overhead_ms": med["runtime"] - med["bare"],
                         "overhead_pct": 100 * (med["runtime"] - med["bare"]) / med["bare"],
                         "overhead_vs_full_ms": med["runtime"] - med["bare_full"]})
            log(f"  batch {batch:3d}, {k:3d} members ({len(names)} graphs): runtime {med['runtime']:.3f} ms, bare "
                f"{med['bare']:.3f} ms ({rows[-1]['overhead_pct']:+.1f}%)")
    return rows


def evaluate(predictor: Predictor, x: np.ndarray, y: np.ndarray, batch_size: int, **budget: Any) -> dict:
    """Accuracy, latency per batch, members and deadline overruns of one budget over a data set."""
    predictions = [predictor.predict(x[i:i + batch_size], **budget) for i in range(0, len(x), batch_size)]
    labels = np.concatenate([p.labels for p in predictions])
    latency = [p.elapsed_ms for p in predictions]
    overruns = [p.overrun_ms for p in predictions if p.overrun_ms > 0]
    return {"accuracy": float((labels == y).mean()), "latency_median_ms": statistics.median(latency),
            "latency_p90_ms": percentile(latency, 90), "latency_max_ms": max(latency),
            "members_mean": float(np.concatenate([p.members_used for p in predictions]).mean()),
            "overrun_fraction": len(overruns) / len(predictions),
            "overrun_median_ms": statistics.median(overruns) if overruns else 0.0,
            "overrun_max_ms": max(overruns, default=0.0),
            "failures": sum(len(p.failures) for p in predictions)}


def ensure_latency_table(predictor: Predictor, quick: bool) -> bool:
    """Profile the bundle on this device if it has no table for this backend; returns whether it profiled."""
    if predictor.latency_table is not None:
        return False
    log("  no latency table for this device: profiling (as `edgens profile` would) ...")
    table = profile_stacks(predictor, (1, 8, 64), warmup=3 if quick else 5, repeats=10 if quick else 50)
    save_latency_table(predictor.bundle_dir, table)
    predictor.reload_latency()
    return True


def budget_grid(predictor: Predictor, batch: int, points: int) -> list[float]:
    """Latencies from a little under the first stack's to a little over all general stacks', by the table."""
    table = predictor.latency_table
    assert table is not None
    per_stack = [table.estimate(s.name, batch) or 0.0 for s in predictor.manifest.general_stacks]
    total = float(sum(per_stack))
    return [float(v) for v in np.linspace(0.8 * per_stack[0], 1.15 * total, points)]


def accuracy_vs_latency(predictor: Predictor, x: np.ndarray, y: np.ndarray, batch_size: int, points: int
                        ) -> tuple[list[dict], list[dict]]:
    """Accuracy vs latency_ms budgets and vs deadline_ms, on the same grid of milliseconds."""
    budget_rows, deadline_rows = [], []
    for ms in budget_grid(predictor, batch_size, points):
        try:
            row = evaluate(predictor, x, y, batch_size, latency_ms=ms)
        except Exception as err:  # noqa: BLE001  (a budget below the first stack is refused; record why)
            row = {"refused": str(err)}
        budget_rows.append({"latency_ms": ms, **row})
        deadline_rows.append({"deadline_ms": ms, **evaluate(predictor, x, y, batch_size, deadline_ms=ms)})
        log(f"  {ms:7.3f} ms: budget acc {budget_rows[-1].get('accuracy', float('nan')):.4f}, deadline acc "
            f"{deadline_rows[-1]['accuracy']:.4f} (overrun in {deadline_rows[-1]['overrun_fraction']:.0%})")
    return budget_rows, deadline_rows


def early_exit(predictor: Predictor, x: np.ndarray, y: np.ndarray, val_x: np.ndarray, batch_size: int
               ) -> tuple[list[dict], list[dict]]:
    """The fixed-k curve and the early-exit curve (p fitted on validation data per target mean members)."""
    total = len(predictor.manifest.members)
    first = len(predictor.manifest.general_stacks[0].members)
    fixed = []
    for k in np.unique(np.linspace(1, total, min(total, 24)).round().astype(int)).tolist():
        fixed.append({"members": k, **evaluate(predictor, x, y, batch_size, members=k)})
    exits = []
    for target in np.unique(np.linspace(first, total, min(8, total - first + 1))):
        p = fit_confidence(predictor, val_x, float(target), batch_size=max(batch_size, 256))
        exits.append({"target_members": float(target), "p": p, **evaluate(predictor, x, y, batch_size, confidence=p)})
        log(f"  target {target:5.2f} members: p = {p:.4f}, mean {exits[-1]['members_mean']:.2f} members, acc "
            f"{exits[-1]['accuracy']:.4f}")
    return fixed, exits


def faults(predictor: Predictor, x: np.ndarray, y: np.ndarray, batch_size: int, draws: int) -> list[dict]:
    """Accuracy with random stacks failing, vs the same stacks left out, vs as many random members dropped."""
    outputs = predictor.stack_outputs(x, batch_size=max(batch_size, 256))
    names = [s.name for s in predictor.manifest.general_stacks]
    family = predictor.manifest.family

    def accuracy_of(etas: list[np.ndarray]) -> float:
        eta = np.concatenate(etas).mean(axis=0)
        return float((inverse_link(family, eta).argmax(axis=1) == y).mean())

    all_members = np.concatenate([outputs[n] for n in names])
    rows = [{"fraction": 0.0, "runtime_accuracy": accuracy_of([outputs[n] for n in names]),
             "left_out_accuracy": accuracy_of([outputs[n] for n in names]),
             "random_members_accuracy": accuracy_of([all_members]), "members_mean": float(len(all_members))}]
    rng = np.random.default_rng(0)
    for fraction in FAULT_FRACTIONS:
        runtime_acc, left_out_acc, random_acc, members, reported = [], [], [], [], 0
        for draw in range(draws):
            failing = random_faults(names, fraction, seed=rng)
            if len(failing) == len(names):
                continue
            # The prefix stacks fail too: otherwise an all-members call runs the prefix stack of every member, a
            # separate file that the general stacks' faults do not touch, and nothing would be measured. With them
            # failing, each call takes the fallback to the general stacks.
            failing.update({stack.name: "raise" for stack in predictor.manifest.prefix_stacks})
            with inject_faults(predictor, failing):
                result = evaluate(predictor, x, y, batch_size)
            predictor.retry()  # end any quarantine before the next draw
            reported += result["failures"]
            runtime_acc.append(result["accuracy"])
            members.append(result["members_mean"])
            survivors = [outputs[n] for n in names if n not in failing]
            left_out_acc.append(accuracy_of(survivors))
            kept = rng.choice(len(all_members), size=sum(len(s) for s in survivors), replace=False)
            random_acc.append(accuracy_of([all_members[kept]]))
        rows.append({"fraction": fraction, "stacks_failing": int(round(fraction * len(names))),
                     "draws": len(runtime_acc), "runtime_accuracy": statistics.fmean(runtime_acc),
                     "runtime_accuracy_min": min(runtime_acc), "left_out_accuracy": statistics.fmean(left_out_acc),
                     "random_members_accuracy": statistics.fmean(random_acc),
                     "members_mean": statistics.fmean(members), "failures_reported": reported})
        log(f"  {fraction:.0%} of stacks failing: accuracy {rows[-1]['runtime_accuracy']:.4f} (left out "
            f"{rows[-1]['left_out_accuracy']:.4f}, random members {rows[-1]['random_members_accuracy']:.4f})")
    return rows


# ------------------------------------------------------------------------------------------------------- reports


def shown(cell: Any) -> str:
    """A table cell; a list of graph names as its count and its ends."""
    if isinstance(cell, list):
        return ", ".join(cell) if len(cell) <= 2 else f"{len(cell)}: {cell[0]} .. {cell[-1]}"
    return str(cell)


def markdown(results: dict) -> str:
    def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> list[str]:
        lines = ["| " + " | ".join(title for title, _, _ in columns) + " |",
                 "|" + "---|" * len(columns)]
        for row in rows:
            cells = [format(row[key], fmt) if isinstance(row.get(key), int | float) else shown(row.get(key, ""))
                     for _, key, fmt in columns]
            lines.append("| " + " | ".join(cells) + " |")
        return lines

    meta = results["meta"]
    out = [f"# Runtime benchmark: {meta['bundle']}", "",
           f"{meta['backend']} [{', '.join(meta['providers'])}] on {meta['device']}; data {meta['data']} "
           f"({meta['examples']} examples), batch size {meta['batch_size']}; {meta['command']}", "",
           "## Latency vs members (runtime vs bare onnxruntime sessions on pre-normalised input)", ""]
    out += table(results["latency_vs_members"], [
        ("batch", "batch", "d"), ("members", "members", "d"), ("graphs run", "graphs", ""),
        ("runtime median ms", "runtime_median_ms", ".4f"), ("runtime p90 ms", "runtime_p90_ms", ".4f"),
        ("bare median ms", "bare_median_ms", ".4f"), ("overhead ms", "overhead_ms", ".4f"),
        ("overhead %", "overhead_pct", ".1f"), ("bare + numpy pre/post ms", "bare_full_median_ms", ".4f")])
    o = results["overhead"]
    out += ["", f"Overhead with all members, over bare sessions on the same graphs: batch 64 "
                f"{o['batch_64_pct']:+.1f}% ({o['batch_64_ms']:+.4f} ms), batch 1 {o['batch_1_ms']:+.4f} ms. One run "
                "of interleaved blocks: a measurement, not a goal verdict (goals need three runs; "
                "`benchmarks/single_graph.py` checks the speed goals).", "",
            "## Accuracy vs latency budget (`latency_ms`)", ""]
    out += table(results["latency_budget"], [
        ("budget ms", "latency_ms", ".3f"), ("accuracy", "accuracy", ".4f"), ("members", "members_mean", ".2f"),
        ("median ms", "latency_median_ms", ".3f"), ("p90 ms", "latency_p90_ms", ".3f"), ("refused", "refused", "")])
    out += ["", "## Accuracy vs deadline (`deadline_ms`)", ""]
    out += table(results["deadline"], [
        ("deadline ms", "deadline_ms", ".3f"), ("accuracy", "accuracy", ".4f"), ("members", "members_mean", ".2f"),
        ("median ms", "latency_median_ms", ".3f"), ("overrun batches", "overrun_fraction", ".1%"),
        ("median overrun ms", "overrun_median_ms", ".3f"), ("max overrun ms", "overrun_max_ms", ".3f")])
    out += ["", f"## Early exit (`confidence=p`, p fitted on {meta['validation']}) vs fixed k", ""]
    out += table(results["early_exit"], [
        ("target members", "target_members", ".2f"), ("p", "p", ".4f"), ("mean members", "members_mean", ".2f"),
        ("accuracy", "accuracy", ".4f"), ("median ms", "latency_median_ms", ".3f")])
    out += [""]
    out += table(results["fixed_k"], [("k", "members", "d"), ("accuracy", "accuracy", ".4f"),
                                      ("median ms", "latency_median_ms", ".3f")])
    out += ["", "## Faults: random stacks failing (raise) vs left out vs random members dropped", ""]
    out += table(results["faults"], [
        ("fraction", "fraction", ".0%"), ("stacks failing", "stacks_failing", "d"), ("draws", "draws", "d"),
        ("runtime accuracy", "runtime_accuracy", ".4f"), ("worst draw", "runtime_accuracy_min", ".4f"),
        ("left out", "left_out_accuracy", ".4f"), ("random members", "random_members_accuracy", ".4f"),
        ("mean members", "members_mean", ".2f"), ("failures reported", "failures_reported", "d")])
    return "\n".join(out) + "\n"


def plots(results: dict, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, batch in zip(axes, (1, 64), strict=True):
        rows = [r for r in results["latency_vs_members"] if r["batch"] == batch]
        ax.plot([r["members"] for r in rows], [r["runtime_median_ms"] for r in rows], "o-", label="runtime")
        ax.plot([r["members"] for r in rows], [r["bare_median_ms"] for r in rows], "s--", label="bare onnxruntime")
        ax.set(title=f"batch {batch}", xlabel="members", ylabel="median latency (ms)")
        ax.legend()
    written.append(_save(fig, out / "latency_vs_members.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    budget = [r for r in results["latency_budget"] if "accuracy" in r]
    ax.plot([r["latency_median_ms"] for r in budget], [r["accuracy"] for r in budget], "o-", label="latency budget")
    ax.plot([r["latency_median_ms"] for r in results["deadline"]], [r["accuracy"] for r in results["deadline"]],
            "s-", label="deadline")
    ax.set(xlabel="measured median latency per batch (ms)", ylabel="test accuracy")
    ax.legend()
    written.append(_save(fig, out / "accuracy_vs_latency.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["members"] for r in results["fixed_k"]], [r["accuracy"] for r in results["fixed_k"]], "o-",
            label="first k members")
    ax.plot([r["members_mean"] for r in results["early_exit"]], [r["accuracy"] for r in results["early_exit"]],
            "s-", label="early exit (confidence)")
    ax.set(xlabel="mean members used", ylabel="test accuracy")
    ax.legend()
    written.append(_save(fig, out / "early_exit.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = results["faults"]
    for key, label in (("runtime_accuracy", "stacks failing (runtime)"), ("left_out_accuracy", "stacks left out"),
                       ("random_members_accuracy", "random members dropped")):
        ax.plot([100 * r["fraction"] for r in rows], [r[key] for r in rows], "o-", label=label)
    ax.set(xlabel="% of stacks failing", ylabel="test accuracy")
    ax.legend()
    written.append(_save(fig, out / "faults.png"))
    return written


def _save(fig: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        atomic_write(path, lambda file: fig.savefig(file, format="png", dpi=120))
    finally:
        plt.close(fig)
    return path.name


# ---------------------------------------------------------------------------------------------------------- main


def load_split(spec: str, val_spec: str | None, bundle: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, str, str]:
    """(test x, test y, validation x, test description, validation description)."""
    x, y, described = load_input(spec)
    if y is None:
        raise SystemExit(f"--data {spec}: labels are needed (an npz with y, or DATASET:SPLIT)")
    if val_spec is None and ":" in spec and not spec.endswith(".npz"):
        val_spec = spec.rsplit(":", 1)[0] + ":val"
    if val_spec is not None:
        val_x, _, val_described = load_input(val_spec)
        return x, y, val_x, described, val_described
    calibration = read_calibration(bundle, load_manifest(bundle))
    if calibration is not None:
        return x, y, calibration[0], described, f"the bundle's calibration examples ({len(calibration[0])})"
    half = len(x) // 2  # fit on the first half, evaluate on the second
    return x[half:], y[half:], x[:half], described + " (second half)", f"first half of {spec}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--data", default="fashion-mnist:test")
    parser.add_argument("--val")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "runtime")
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per latency point")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size of the accuracy runs")
    parser.add_argument("--limit", type=int, help="use only the first N test examples")
    parser.add_argument("--points", type=int, default=8, help="latency budgets / deadlines to try")
    parser.add_argument("--draws", type=int, default=10, help="random draws per fault fraction")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--quick", action="store_true", help="few repeats and points (a smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.points, args.draws = min(args.repeats, 20), min(args.points, 3), min(args.draws, 2)
    args.out.mkdir(parents=True, exist_ok=True)
    x, y, val_x, described, val_described = load_split(args.data, args.val, args.bundle)
    if args.limit:
        x, y = x[:args.limit], y[:args.limit]
    options = {"threads": args.threads} if args.threads else {}
    with Predictor.load(args.bundle, args.backend, **options) as predictor:
        if predictor.manifest.family != "categorical":
            raise SystemExit("this benchmark measures accuracy: it needs a categorical bundle")
        info = predictor.backend.describe()
        log(f"{args.bundle}: {info}")
        bare = BareSessions(predictor)
        log("latency vs members (runtime vs bare sessions):")
        latency_rows = latency_vs_members(predictor, bare, x, args.repeats)
        profiled = ensure_latency_table(predictor, args.quick)
        log("accuracy vs latency budget and deadline:")
        budget_rows, deadline_rows = accuracy_vs_latency(predictor, x, y, args.batch_size, args.points)
        log("early exit:")
        fixed_rows, exit_rows = early_exit(predictor, x, y, val_x, args.batch_size)
        log("faults:")
        # Injected failures and the quarantines they cause are counted in the results; their log lines are noise.
        logging.getLogger("edgens.runtime").setLevel(logging.ERROR)
        fault_rows = faults(predictor, x, y, args.batch_size, args.draws)
    total = max(r["members"] for r in latency_rows)
    full = {r["batch"]: r for r in latency_rows if r["members"] == total}
    results = {
        "meta": {"bundle": str(args.bundle), "data": described, "validation": val_described,
                 "examples": int(len(x)), "batch_size": args.batch_size,
                 "command": "python benchmarks/runtime_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
                 "python": platform.python_version(), "profiled_now": profiled, **info},
        "overhead": {"batch_64_pct": full[64]["overhead_pct"], "batch_64_ms": full[64]["overhead_ms"],
                     "batch_1_ms": full[1]["overhead_ms"]},
        "latency_vs_members": latency_rows, "latency_budget": budget_rows, "deadline": deadline_rows,
        "fixed_k": fixed_rows, "early_exit": exit_rows, "faults": fault_rows,
    }
    atomic_write_json(args.out / "runtime_bench.json", results)
    atomic_write_text(args.out / "runtime_bench.md", markdown(results))
    results["plots"] = plots(results, args.out)
    log(f"wrote {args.out / 'runtime_bench.json'}, {args.out / 'runtime_bench.md'}"
        + (f" and {', '.join(results['plots'])}" if results["plots"] else ""))
    return results


if __name__ == "__main__":
    main()
