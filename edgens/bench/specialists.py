"""``edgens bench specialists``: one-vs-rest specialist sub-ensembles (the paper's Figure 5), per run.

For each class c, the problem "is it c?" is answered by a sub-ensemble's argmax == c. We report the mean test F1
over the K problems of: single members (the mean member, and the best member chosen on validation), random
``size``-member subsets, the greedy specialist and the paper's best of 200 random subsets (both selected on
validation), and the full ensemble. The paper's finding: the specialists' gap over random subsets grows with lam.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from edgens.bench import analysis
from edgens.bench.analysis import Progress, no_progress
from edgens.bench.report import load_finished, markdown_table, run_label

log = logging.getLogger(__name__)

COLUMNS = (("single_mean", "mean single member"), ("single_best", "best single member"),
           ("random_subsets", "random subsets"), ("greedy", "greedy specialist"),
           ("best_of_random", "best of random subsets"), ("full_ensemble", "full ensemble"))


def specialists_run(run: str | Path, size: int = 20, candidates: int = 200, seed: int = 0,
                    progress: Progress = no_progress) -> dict:
    """The specialists table of one run (selection on validation outputs, scores on test outputs).

    Raises:
        DataNotFoundError / RunDirectoryError: not a finished classification run; InputError: bad outputs.
    """
    run_dir, config = load_finished(run)
    val_eta, val_y = run_dir.outputs("val")
    test_eta, test_y = run_dir.outputs("test")
    table = analysis.specialists_table(val_eta, val_y, test_eta, test_y, size, candidates, seed, progress)
    names = config.get("data", {}).get("class_names") or [str(c) for c in range(val_eta.shape[2])]
    for row in table["classes"]:
        row["name"] = names[row["class"]]
    settings = config["config"]
    mean = table["mean"]
    return {"run": str(run_dir.path), "label": run_label(config), "preset": settings["preset"],
            "lam": settings["lam"], "method": settings.get("method", "modular"), "seed": settings["seed"],
            "n_members": val_eta.shape[0],
            **table, "gap_greedy": mean["greedy"] - mean["random_subsets"],
            "gap_best_of_random": mean["best_of_random"] - mean["random_subsets"]}


def specialists_bench(runs: Sequence[str | Path], size: int = 20, candidates: int = 200, seed: int = 0,
                      progress: Progress = no_progress) -> dict:
    """:func:`specialists_run` for each run (same seed: the same random subsets for every run).

    Raises:
        See :func:`specialists_run`.
    """
    results = [specialists_run(run, size, candidates, seed, progress) for run in runs]
    return {"bench": "specialists", "size": size, "candidates": candidates, "seed": seed, "runs": results}


def specialists_markdown(data: dict) -> str:
    """A summary table across runs (mean F1 over classes) and a per-class table per run."""
    headers = ["run"] + [title for _, title in COLUMNS] + ["gap: greedy - random", "gap: best of random - random"]
    rows = [[r["label"]] + [f"{r['mean'][key]:.3f}" for key, _ in COLUMNS]
            + [f"{r['gap_greedy']:+.3f}", f"{r['gap_best_of_random']:+.3f}"] for r in data["runs"]]
    text = (f"Mean test F1 over the one-vs-rest problems; sub-ensembles of {data['size']} members; best of "
            f"{data['candidates']} random subsets; selection on validation data\n\n" + markdown_table(headers, rows))
    for r in data["runs"]:
        headers = ["class"] + [title for _, title in COLUMNS]
        rows = [[row["name"]] + [f"{row[key]:.3f}" for key, _ in COLUMNS] for row in r["classes"]]
        text += f"\nPer class, {r['label']}\n\n" + markdown_table(headers, rows)
    return text
