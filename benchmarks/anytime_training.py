"""Anytime-aware training against the paper's loss (issue 16): test error of the prefixes of the order each run is
deployed in, and of members dropped at random.

    python benchmarks/anytime_training.py --base RUN... --anytime RUN... [--faults RUN...] [--out DIR] [--repeats 5]

``--base`` runs were trained with the paper's loss and are deployed in the greedy order (forward selection on their
validation outputs, as ``edgens export`` does); ``--anytime`` runs were trained with ``--anytime-weight`` and are
deployed as ``edgens export`` orders them: the trained (index) order, refined by greedy selection inside each
trained prefix when that measures better on validation. Per run: test error of all members, of the first 10% and
25% of the deployed order, of every prefix (to check that each prefix beats the base's prefix of the same size),
and with 90% of the members dropped at random per example. Means and standard errors over the runs of each
group. ``--faults`` runs (trained with ``--fault-weight`` too, issue 27) are deployed like the anytime runs and
reported as a third group, with their own prefix comparison against the base. Writes ``anytime_training.json``
and ``anytime_training.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(ROOT))

from edgens.bench import analysis  # noqa: E402
from edgens.fileio import atomic_write_json, atomic_write_text  # noqa: E402
from edgens.rundir import RunDir  # noqa: E402
from edgens.config import TrainConfig  # noqa: E402
from edgens import selection  # noqa: E402

FRACTIONS = (0.1, 0.25, 0.5, 1.0)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def one_run(path: Path, trained_order: bool, repeats: int) -> dict:
    run = RunDir(path)
    config = run.config()["config"]
    test_eta, test_y = run.outputs("test")
    m = test_eta.shape[0]
    val_eta, val_y = run.outputs("val")
    if trained_order:  # as `edgens export` orders such a run
        order, _, method = selection.trained_order(val_eta, val_y, TrainConfig.from_dict(config).resolved_prefixes(m))
    else:
        (order, _), method = selection.greedy_order(val_eta, val_y), "greedy"
    curve = analysis.prefix_curve(test_eta, test_y, order)["error"]
    dropped = analysis.random_drop_curve(test_eta, test_y, repeats, seed=0).at_fraction(0.9)
    result = {"run": str(path), "seed": config["seed"], "anytime_weight": config.get("anytime_weight", 0.0),
              "fault_weight": config.get("fault_weight", 0.0),
              "order": method, "prefix_error": curve,
              "at": {f"{f:g}": curve[max(1, round(f * m)) - 1] for f in FRACTIONS},
              "random_90pct_dropped": dropped["error"]}
    log(f"{path}: " + ", ".join(f"{100 * f:g}% {100 * e:.2f}%" for f, e in zip(FRACTIONS, result["at"].values()))
        + f", 90% dropped at random {100 * dropped['error']:.2f}%")
    return result


def summarise(runs: list[dict]) -> dict:
    def stat(values: list[float]) -> dict:
        mean, se = analysis.mean_and_se(values)
        return {"mean": float(mean), "se": float(se) if np.isfinite(se) else None, "n": len(values)}

    return {"at": {key: stat([r["at"][key] for r in runs]) for key in runs[0]["at"]},
            "random_90pct_dropped": stat([r["random_90pct_dropped"] for r in runs]),
            "prefix_error_mean": np.mean([r["prefix_error"] for r in runs], axis=0).tolist()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, nargs="+", required=True)
    parser.add_argument("--anytime", type=Path, nargs="+", required=True)
    parser.add_argument("--faults", type=Path, nargs="+", default=[],
                        help="runs trained with --fault-weight as well (deployed like --anytime runs)")
    parser.add_argument("--repeats", type=int, default=5, help="random-drop repeats per run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "anytime_training")
    args = parser.parse_args(argv)
    base = [one_run(path, False, args.repeats) for path in args.base]
    results = {"base": {"runs": base, **summarise(base)}}
    for name, paths in (("anytime", args.anytime), ("faults", args.faults)):
        if not paths:
            continue
        runs = [one_run(path, True, args.repeats) for path in paths]
        results[name] = {"runs": runs, **summarise(runs)}
        # Every prefix of the deployed order against the base's prefix of the same size, on the mean curves.
        b, a = np.asarray(results["base"]["prefix_error_mean"]), np.asarray(results[name]["prefix_error_mean"])
        results[name]["prefixes_better"] = int((a < b).sum())
        results[name]["prefixes_worse"] = [int(k) for k in np.flatnonzero(a > b) + 1]
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "anytime_training.json", results)
    atomic_write_text(args.out / "anytime_training.md", markdown(results))
    return results


def markdown(results: dict) -> str:
    def cell(stat: dict) -> str:
        se = f" ± {100 * stat['se']:.2f}" if stat["se"] is not None else ""
        return f"{100 * stat['mean']:.2f}{se}%"

    lines = ["| test error (deployed order) | " + " | ".join(f"first {100 * f:g}%" if f < 1 else "all members"
                                                            for f in FRACTIONS) + " | 90% dropped at random |",
             "| --- |" + " --- |" * (len(FRACTIONS) + 1)]
    labels = (("base", "paper's loss, greedy order"), ("anytime", "anytime term, trained order"),
              ("faults", "anytime and random-subset terms, trained order"))
    for name, label in labels:
        if name not in results:
            continue
        group = results[name]
        mu = sorted({r["anytime_weight"] for r in group["runs"]})
        nu = sorted({r.get("fault_weight", 0.0) for r in group["runs"]})
        weights = f"mu {', '.join(f'{v:g}' for v in mu)}" + (f", nu {', '.join(f'{v:g}' for v in nu)}" if any(nu)
                                                                else "")
        lines.append(f"| {label} ({weights}; {len(group['runs'])} seeds) | "
                     + " | ".join(cell(group["at"][f"{f:g}"]) for f in FRACTIONS)
                     + f" | {cell(group['random_90pct_dropped'])} |")
    m = len(results["base"]["prefix_error_mean"])
    lines.append("")
    for name, label in labels[1:]:
        if name not in results:
            continue
        worse = results[name]["prefixes_worse"]
        lines.append(f"{label}: prefixes of the deployed order better than the base's prefix of the same size (mean "
                     f"over seeds): {results[name]['prefixes_better']} of {m}"
                     + (f"; worse at k = {', '.join(map(str, worse[:20]))}{' ...' if len(worse) > 20 else ''}"
                        if worse else "") + ".")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
