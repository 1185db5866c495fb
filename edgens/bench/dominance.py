"""``edgens bench dominance``: does one member take over? (the paper's Figure 7 and Table 6)

Per run: each member's validation error over the epochs (from metrics.jsonl), the dominance ratio (best / median
member error; edgens flags <= 0.5), the members' predictive-entropy statistics per epoch and on the test set (a
large spread means some members are confident and others near uniform), confusion matrices of the ensemble and of
its best, median and worst members (chosen by validation error), and the first-layer filters of a few members as
images (members' rows of the first layer's weight: see :mod:`edgens.stacks.base`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgens.bench import analysis
from edgens.bench.analysis import Progress, no_progress
from edgens.bench.report import load_finished, markdown_table, pct, run_label
from edgens.diagnostics import DOMINANCE_RATIO
from edgens.errors import RunDirectoryError
from edgens.rundir import RunDir

log = logging.getLogger(__name__)


def first_layer_filters(run_dir: RunDir, members: Sequence[int]) -> np.ndarray:
    """First-layer weights of ``members`` as images: (len(members), units, C, H, W) float32.

    The first layer is the first parameter with two or more axes in the best checkpoint; its rows are member-blocked
    (member j owns rows [j*c, (j+1)*c)). MLP rows are reshaped to the input's shape, convolution filters kept as
    (C, kh, kw).

    Raises:
        RunDirectoryError: the checkpoint holds no such weight, or its rows do not split into members.
    """
    checkpoint = run_dir.checkpoint("best")  # torch: only when filters are asked for
    spec = checkpoint["spec"]
    weight = next((t for t in checkpoint["model"].values() if t.dim() >= 2), None)
    m = int(spec["n_members"])
    if weight is None or weight.shape[0] % m:
        raise RunDirectoryError(f"{run_dir.best_checkpoint}: no first-layer weight with rows for {m} members")
    blocked = weight.detach().float().cpu().numpy().reshape(m, weight.shape[0] // m, *weight.shape[1:])
    if blocked.ndim == 3:  # fully connected: (M, units, inputs) -> images of the input's shape
        shape = tuple(spec["input_shape"])
        if len(shape) != 3 or math.prod(shape) != blocked.shape[2]:
            raise RunDirectoryError(f"cannot show first-layer weights of input shape {shape} as images")
        blocked = blocked.reshape(m, blocked.shape[1], *shape)
    return blocked[np.asarray(members, dtype=int)]


def dominance_run(run: str | Path, filters: bool = True, filter_members: int = 8,
                  progress: Progress = no_progress) -> dict:
    """The dominance measures of one run.

    Raises:
        DataNotFoundError / RunDirectoryError: not a finished classification run, or metrics without per-member
        errors.
    """
    run_dir, config = load_finished(run)
    records = run_dir.metrics()
    if not records or "member_errors" not in records[0]["val"]:
        raise RunDirectoryError(f"{run_dir.metrics_path} has no per-member validation errors (val.member_errors)")
    settings = config["config"]
    member_errors = np.array([r["val"]["member_errors"] for r in records])  # (epochs, M)
    ratios = [r["val"]["dominance_ratio"] for r in records]
    flagged = [r["epoch"] for r in records if r.get("dominance")]
    test_eta, test_y = run_dir.outputs("test")
    val_eta, val_y = run_dir.outputs("val")
    m, _, k = analysis.check_outputs(test_eta, test_y)
    val_member_errors = analysis.member_metrics(val_eta, val_y)["error"]
    ranked = np.argsort(val_member_errors, kind="stable")
    picks = {"best": int(ranked[0]), "median": int(ranked[(m - 1) // 2]), "worst": int(ranked[-1])}
    confusions = analysis.member_confusions(test_eta, test_y)
    test_member_errors = analysis.member_metrics(test_eta, test_y)["error"]
    progress("dominance", 1, 2)
    result = {
        "run": str(run_dir.path), "label": run_label(config), "preset": settings["preset"], "lam": settings["lam"],
        "method": settings.get("method", "modular"), "seed": settings["seed"], "n_members": m,
        "class_names": config.get("data", {}).get("class_names") or [str(c) for c in range(k)],
        "epochs": [r["epoch"] for r in records], "best_epoch": run_dir.summary()["best_epoch"],
        "val_ensemble_error": [r["val"]["ensemble_error"] for r in records],
        "val_member_errors": member_errors.tolist(),
        "dominance_ratio": ratios, "dominance_threshold": DOMINANCE_RATIO,
        "first_flagged_epoch": flagged[0] if flagged else None,
        "entropy_by_epoch": {key: [r["val"].get(f"entropy_{key}") for r in records]
                             for key in ("min", "max", "mean", "std")},
        "test": {**analysis.ensemble_metrics(test_eta, test_y),
                 "best_member_error": float(test_member_errors.min()),
                 "median_member_error": float(np.median(test_member_errors)),
                 "worst_member_error": float(test_member_errors.max()),
                 "entropy": analysis.entropy_stats(test_eta)},
        "confusion": {"ensemble": analysis.confusion_matrix(test_eta.mean(0).argmax(-1), test_y, k).tolist(),
                      **{name: {"member": j, "test_error": float(test_member_errors[j]),
                                "matrix": confusions[j].tolist()} for name, j in picks.items()}},
    }
    if filters:
        shown = [int(j) for j in ranked[:filter_members]]  # the best members by validation error
        images = first_layer_filters(run_dir, shown)
        result["filters"] = {"members": shown, "shape": list(images.shape), "_images": images}
    progress("dominance", 2, 2)
    return result


def dominance_bench(runs: Sequence[str | Path], filters: bool = True, filter_members: int = 8,
                    progress: Progress = no_progress) -> dict:
    """:func:`dominance_run` for each run.

    Raises:
        See :func:`dominance_run`.
    """
    return {"bench": "dominance", "runs": [dominance_run(run, filters, filter_members, progress) for run in runs]}


def dominance_markdown(data: dict) -> str:
    """Per run: test errors of the ensemble and its best / median / worst member, dominance, entropy statistics."""
    headers = ["run", "members", "test error", "best / median / worst member", "final dominance ratio",
               "first flagged epoch", "member entropy min / max / mean / std (nats)"]
    rows = []
    for r in data["runs"]:
        t, e = r["test"], r["test"]["entropy"]
        rows.append([r["label"], r["n_members"], pct(t["error"]),
                     f"{pct(t['best_member_error'], digits=1)} / {pct(t['median_member_error'], digits=1)} / "
                     f"{pct(t['worst_member_error'], digits=1)}", f"{r['dominance_ratio'][-1]:.3f}",
                     r["first_flagged_epoch"] if r["first_flagged_epoch"] is not None else "never",
                     f"{e['min']:.3f} / {e['max']:.3f} / {e['mean']:.3f} / {e['std']:.4f}"])
    return ("Module dominance (test set; the ratio is best / median member validation error, flagged at <= "
            f"{DOMINANCE_RATIO:g}; entropies are each member's mean predictive entropy)\n\n"
            + markdown_table(headers, rows))
