"""``edgens infer``: run a bundle on a data file or data set split within a budget, and report how it went.

Only click and the standard library are imported here; numpy, the runtime and the input loader
(:mod:`edgens.data.inputs`) are imported when the command runs (none of them imports torch).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import click

# Kept in step with edgens.runtime.backends.CHOICES and edgens.ensemble.COMBINERS (a test checks); importing them
# here would import numpy.
BACKEND_CHOICES = ("auto", "onnxruntime", "tensorrt")
COMBINER_CHOICES = ("mean", "median", "trimmed")


def parse_members(text: str | None) -> int | float | None:
    """``"3"`` -> 3 members, ``"0.5"`` or ``"50%"`` -> half of them.

    Raises:
        click.BadParameter: not a count, fraction or percentage.
    """
    if text is None:
        return None
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100.0
        return int(text) if text.strip().lstrip("+").isdigit() else float(text)
    except ValueError:
        raise click.BadParameter(f"expected a count (3), a fraction (0.5) or a percentage (50%), got {text!r}",
                                 param_hint="--members") from None


def summarise(predictions: list[Any], y: Any, family: str, class_index: int | None) -> dict[str, Any]:
    """Accuracy (or error for gaussian/poisson), latency, members used and failures over a run's batches."""
    import numpy as np

    latencies = [p.elapsed_ms for p in predictions]
    members = np.concatenate([p.members_used for p in predictions])
    failures: dict[str, dict[str, int]] = {}
    for p in predictions:
        for failure in p.failures:
            failures.setdefault(failure.stack, {}).setdefault(failure.kind, 0)
            failures[failure.stack][failure.kind] += 1
    summary: dict[str, Any] = {
        "batches": len(predictions), "examples": int(len(members)),
        "latency_ms": {"median": statistics.median(latencies), "p90": float(np.percentile(latencies, 90)),
                       "mean": statistics.fmean(latencies), "max": max(latencies)},
        "members_used": {"mean": float(members.mean()), "min": int(members.min()), "max": int(members.max())},
        "failures": failures,
        "outliers_checked_batches": sum(p.outliers_checked for p in predictions),
    }
    deadline = predictions[0].deadline_ms
    if deadline is not None:
        # The promise of a deadline is an overrun of at most one stack (the slowest stack a call started, at its
        # p90): report against that, not against zero.
        overruns = np.array([p.overrun_ms for p in predictions])
        promises = [p.promise_ms for p in predictions if p.promise_ms is not None]
        summary["deadline"] = {"deadline_ms": deadline, "overrun_batches": int((overruns > 0).sum()),
                               "beyond_one_stack_batches": sum(not p.within_promise for p in predictions),
                               "p99_overrun_ms": float(np.percentile(overruns, 99)),
                               "max_overrun_ms": float(overruns.max()), "one_stack_ms": max(promises, default=None)}
    if y is not None:
        y = np.asarray(y)
        if family == "categorical":
            labels = np.concatenate([p.labels for p in predictions])
            summary["accuracy"] = float((labels == y).mean())
            if class_index is not None:
                predicted, actual = labels == class_index, y == class_index
                tp = float((predicted & actual).sum())
                summary["task_f1"] = 2 * tp / max(1.0, float(predicted.sum() + actual.sum()))
        else:
            mean = np.concatenate([p.mean for p in predictions])[:, 0]
            summary["mse"] = float(((mean - y.astype(np.float64)) ** 2).mean())
    return summary


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--input", "input_spec", required=True, metavar="FILE.npy|FILE.npz|DATASET:SPLIT",
              help="Raw inputs (as the data set stores them): a .npy array, a .npz with x (and y), or e.g. "
                   "fashion-mnist:test.")
@click.option("--members", "members_text", metavar="K|FRACTION", help="Budget: the first K members (or 0.5, 50%).")
@click.option("--flops", type=float, help="Budget: as many stacks as fit this many flops per example.")
@click.option("--latency-ms", type=float, help="Budget: as many stacks as fit this latency (needs `edgens profile`).")
@click.option("--deadline-ms", type=float, help="Budget: anytime, stop starting stacks at this deadline per batch.")
@click.option("--confidence", type=float, help="Budget: per example, stop at this class probability.")
@click.option("--task", help="Budget: a specialist, by task name (class-3), class index or class name.")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--limit", type=click.IntRange(min=1), help="Use only the first N examples.")
@click.option("--stack-timeout-ms", type=float, help="Drop a stack from a batch when it takes longer than this.")
@click.option("--threads", type=click.IntRange(min=1),
              help="onnxruntime threads per general stack's session (default: the cores per lane).")
@click.option("--lanes", type=click.IntRange(min=1),
              help="Stacks a call may run side by side (default: one per core; given, deadline calls use them too).")
@click.option("--accelerators", metavar="gpu,dla0,dla1",
              help="tensorrt backend: run the general stacks in turn on these (a Jetson's GPU and DLA cores).")
@click.option("--strict", is_flag=True, help="Fail on a missing or corrupt stack file instead of excluding it.")
@click.option("--outliers/--no-outliers", "detect_outliers", default=None,
              help="Leave out groups of members whose outputs deviate beyond the bundle's thresholds (silent "
                   "faults such as corrupted weights). Default: on, unless every stack has checksums inside.")
@click.option("--combiner", type=click.Choice(COMBINER_CHOICES), default="mean", show_default=True,
              help="How members are combined: the paper's mean, or the robust median or trimmed mean.")
@click.option("--self-test", "self_test", is_flag=True,
              help="First rerun every stack on the inputs stored at export; quarantine those whose outputs changed.")
@click.option("--data-dir", help="Where to look for built-in data sets.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def infer(bundle: Path, input_spec: str, members_text: str | None, flops: float | None, latency_ms: float | None,
          deadline_ms: float | None, confidence: float | None, task: str | None, backend: str, batch_size: int,
          limit: int | None, stack_timeout_ms: float | None, threads: int | None, lanes: int | None,
          accelerators: str | None, strict: bool,
          detect_outliers: bool | None, combiner: str, self_test: bool, data_dir: str | None, as_json: bool) -> None:
    """Predict with BUNDLE on raw inputs within one budget; print accuracy, latency, members used and failures."""
    from edgens.data.inputs import load_input
    from edgens.runtime import Predictor
    from edgens.runtime.policies import Budget, resolve_task

    task_value: str | int | None = int(task) if task is not None and task.isdigit() else task
    budget = Budget.parse(parse_members(members_text), flops, latency_ms, deadline_ms, confidence, task_value)
    options = {key: value for key, value in (("threads", threads), ("accelerators", accelerators)) if value}
    x, y, described = load_input(input_spec, data_dir)
    if limit is not None:
        x, y = x[:limit], (y[:limit] if y is not None else None)
    with Predictor.load(bundle, backend, strict=strict, stack_timeout_ms=stack_timeout_ms, lanes=lanes,
                        detect_outliers=detect_outliers, combiner=combiner, **options) as predictor:
        tested = predictor.self_test() if self_test else {}
        # A session's first run at a batch size allocates (several ms): not what a deadline or latency figure
        # should show. Warm up at the sizes the run uses (the last batch may be smaller).
        predictor.warm_up(sorted({min(batch_size, len(x)), len(x) % batch_size or batch_size}), repeats=1)
        class_index = resolve_task(predictor.manifest, budget.value).class_index if budget.kind == "task" else None
        predictions = [predictor.predict(x[i:i + batch_size], budget) for i in range(0, len(x), batch_size)]
        summary = summarise(predictions, y, predictor.manifest.family, class_index)
        info = predictor.describe()
        detecting = predictor.outliers is not None
        checked = len(predictor.pool.checksums)
    report = {"bundle": str(bundle), "input": described, "budget": str(budget), "batch_size": batch_size,
              "backend": info["backend"], "providers": info["providers"], "device": info["device"],
              "unavailable_stacks": {name: status for name, status in info["stacks"].items() if status != "ok"},
              "combiner": combiner, **summary}
    if self_test:
        report["self_test"] = {name: {"ok": r.ok, "max_diff": r.max_diff, "tolerance": r.tolerance}
                               for name, r in tested.items()}
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"bundle:   {bundle} on {info['backend']} [{', '.join(info['providers'])}], {info['device']}")
    click.echo(f"input:    {described}; batch size {batch_size}; budget: {budget}")
    if "accuracy" in summary:
        click.echo(f"accuracy: {summary['accuracy']:.2%} ({summary['examples']} examples)")
    if "task_f1" in summary:
        click.echo(f"task F1:  {summary['task_f1']:.4f} (class {class_index})")
    if "mse" in summary:
        click.echo(f"mse:      {summary['mse']:.4g}")
    lat = summary["latency_ms"]
    click.echo(f"latency:  median {lat['median']:.3f} ms, p90 {lat['p90']:.3f} ms per batch "
               f"({summary['batches']} batches)")
    used = summary["members_used"]
    click.echo(f"members:  mean {used['mean']:.2f} per example (min {used['min']}, max {used['max']}) of "
               f"{info['members']}")
    if "deadline" in summary:
        d = summary["deadline"]
        stack = "unknown" if d["one_stack_ms"] is None else f"up to {d['one_stack_ms']:.3f} ms"
        click.echo(f"deadline: {d['deadline_ms']:g} ms kept within one stack ({stack}, p90) in "
                   f"{summary['batches'] - d['beyond_one_stack_batches']}/{summary['batches']} batches; past the "
                   f"deadline in {d['overrun_batches']}, p99 overrun {d['p99_overrun_ms']:.3f} ms, max "
                   f"{d['max_overrun_ms']:.3f} ms")
    if self_test:
        failed = [name for name, r in tested.items() if not r.ok]
        click.echo(f"self-test: {len(tested) - len(failed)}/{len(tested)} stacks unchanged"
                   + (f"; quarantined: {', '.join(failed)}" if failed else "")
                   + ("" if tested else " (the bundle has no self-test data)"))
    click.echo(f"checksums: inside {checked}/{len(info['stacks'])} stacks, checked in every call")
    click.echo(f"outliers: checked in {summary['outliers_checked_batches']}/{summary['batches']} batches"
               + ("" if detecting else " (detection off" + ("" if detect_outliers is False else
                                                            ": every stack has checksums") + ")"))
    failures = "; ".join(f"{stack}: " + ", ".join(f"{n} {kind}" for kind, n in kinds.items())
                         for stack, kinds in summary["failures"].items())
    click.echo(f"failures: {failures or 'none'}")
    if report["unavailable_stacks"]:
        click.echo("unavailable stacks: " + ", ".join(f"{k} ({v})" for k, v in report["unavailable_stacks"].items()))
