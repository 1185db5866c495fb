"""``edgens bench lambda`` results: test error per (preset, lam, method) over trials, and losses (numpy only).

Reads the runs :mod:`edgens.bench.sweep` trained. Per (preset, lam, method) it reports the mean and standard error
over trials of the test error (the paper's Figure 2 / Table 2) and of the ensemble's test NLL next to the members'
mean test NLL (their Figure 3: joint training lowers the ensemble loss while the members' own losses rise).

``stacking`` rows use the modular runs of the same lam: a linear combiner (a weight per member and a bias per class,
:func:`edgens.bench.analysis.fit_stacking`) is fitted on each run's validation outputs and scored on its test outputs.
``bagging`` has one row, at lam 0.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from edgens.bench import analysis
from edgens.bench.analysis import Progress, no_progress
from edgens.bench.report import markdown_table, num, pct
from edgens.bench.sweep import SweepRun, check_matches
from edgens.config import TrainConfig
from edgens.rundir import RunDir

log = logging.getLogger(__name__)

_SUMMARY_KEYS = ("ensemble_error", "ensemble_loss", "member_loss", "member_error", "ambiguity")


def _stat(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "se": None, "n": 0}
    mean, se = analysis.mean_and_se(values)
    return {"mean": float(mean), "se": None if not np.isfinite(se) else float(se), "n": len(values)}


PREFIX_FRACTIONS = (0.1, 0.25)  # the index-order prefixes each trial reports (the order anytime-trained runs deploy)


def _modular_trial(run_dir: RunDir) -> dict:
    summary = run_dir.summary()
    trial = {key: summary["test"][key] for key in _SUMMARY_KEYS}
    trial.update(run=str(run_dir.path), best_epoch=summary["best_epoch"], train_time_s=summary["train_time_s"],
                 val_error=summary["val"]["ensemble_error"])
    test_eta, test_y = run_dir.outputs("test")
    m = test_eta.shape[0]
    trial["index_prefix_error"] = {f"{f:g}": analysis.ensemble_metrics(test_eta[:max(1, round(f * m))], test_y)["error"]
                                   for f in PREFIX_FRACTIONS}
    return trial


def _stacking_trial(run_dir: RunDir, l2: float) -> dict:
    val_eta, val_y = run_dir.outputs("val")
    combiner = analysis.fit_stacking(val_eta, val_y, l2=l2)  # validation outputs only
    test_eta, test_y = run_dir.outputs("test")
    scored = combiner.evaluate(test_eta, test_y)
    relative = combiner.weights * len(combiner.weights)  # 1 = the plain mean's weight
    summary = run_dir.summary()
    return {"run": str(run_dir.path), "ensemble_error": scored["error"], "ensemble_loss": scored["nll"],
            "member_loss": summary["test"]["member_loss"], "member_error": summary["test"]["member_error"],
            "ambiguity": None, "val_error": combiner.evaluate(val_eta, val_y)["error"],
            "combiner": {"l2": l2, "newton_steps": combiner.iterations,
                         "relative_weight_min": float(relative.min()), "relative_weight_max": float(relative.max()),
                         "relative_weight_std": float(relative.std())}}


def collect_sweep(runs_dir: str | Path, presets: Sequence[str], lams: Sequence[float], methods: Sequence[str],
                  trials: int, stacking_l2: float = 1e-3, progress: Progress = no_progress,
                  expected: Callable[[SweepRun], TrainConfig] | None = None) -> dict:
    """Tabulate the finished runs of a sweep under ``runs_dir`` (missing or unfinished runs are listed, not fatal).

    ``expected(run)`` gives the settings each run must have been trained with (checked when given, so a table never
    mixes runs of other settings, e.g. fewer epochs).

    Returns:
        ``{"bench": "lambda", "rows": [...], "missing": [run names], ...}``; each row has ``preset``, ``lam``,
        ``method``, ``trials`` (per-trial values) and mean/SE dicts ``test_error``, ``test_nll``, ``member_nll``,
        ``member_error``, ``ambiguity``.

    Raises:
        RunDirectoryError: a finished run is incomplete, or was trained with settings other than ``expected``'s.
    """
    runs_dir = Path(runs_dir)
    rows, missing = [], []
    keys = []
    for preset in presets:
        for lam in lams:
            keys += [(preset, lam, method) for method in ("modular", "stacking") if method in methods]
        if "bagging" in methods:
            keys.append((preset, 0.0, "bagging"))
    for number, (preset, lam, method) in enumerate(keys, 1):
        trained = "modular" if method == "stacking" else method
        per_trial = []
        for trial in range(trials):
            run = SweepRun(preset, lam, trained, trial)
            run_dir = RunDir(runs_dir / run.name)
            if not run_dir.is_finished():
                if method != "stacking":
                    missing.append(run_dir.path.name)
                continue
            run_dir.require_finished()
            if expected is not None:
                check_matches(run_dir, expected(run))
            per_trial.append(_stacking_trial(run_dir, stacking_l2) if method == "stacking" else _modular_trial(run_dir))
        row = {"preset": preset, "lam": lam, "method": method, "trials": per_trial,
               "test_error": _stat([t["ensemble_error"] for t in per_trial]),
               "test_nll": _stat([t["ensemble_loss"] for t in per_trial]),
               "member_nll": _stat([t["member_loss"] for t in per_trial]),
               "member_error": _stat([t["member_error"] for t in per_trial]),
               "ambiguity": _stat([t["ambiguity"] for t in per_trial if t["ambiguity"] is not None]),
               "index_prefix_error": {f"{f:g}": _stat([t["index_prefix_error"][f"{f:g}"] for t in per_trial
                                                        if "index_prefix_error" in t]) for f in PREFIX_FRACTIONS}}
        rows.append(row)
        progress("tabulating", number, len(keys))
    return {"bench": "lambda", "runs_dir": str(runs_dir), "presets": list(presets), "lams": list(lams),
            "methods": list(methods), "trials": trials, "stacking_l2": stacking_l2, "rows": rows, "missing": missing}


def lambda_markdown(data: dict) -> str:
    """One markdown table: test error and losses per (preset, lam, method), mean ± standard error over trials."""
    headers = ["preset", "lam", "method", "trials", "test error", "ensemble test NLL", "mean member test NLL",
               "mean member test error"] + [f"first {100 * f:g}% by index" for f in PREFIX_FRACTIONS]
    rows = []
    for row in data["rows"]:
        def cell(key: str, as_pct: bool = False) -> str:
            stat = row[key]
            return (pct if as_pct else num)(stat["mean"], stat["se"])
        prefixes = [row.get("index_prefix_error", {}).get(f"{f:g}") for f in PREFIX_FRACTIONS]
        rows.append([row["preset"], f"{row['lam']:g}", row["method"], row["test_error"]["n"],
                     cell("test_error", True), cell("test_nll"), cell("member_nll"), cell("member_error", True)]
                    + [pct(p["mean"], p["se"]) if p and p["n"] else "" for p in prefixes])
    text = (f"Test error and NLL, mean ± standard error over trials (seeds 0..{data['trials'] - 1}); stacking: a "
            f"weight per member and a bias per class fitted on validation outputs (l2 {data['stacking_l2']:g})\n\n"
            + markdown_table(headers, rows))
    if data["missing"]:
        text += f"\nNot finished yet ({len(data['missing'])}): {', '.join(data['missing'])}\n"
    return text
