"""Plots of the benches (matplotlib, an optional extra: ``pip install 'edgens[plots]'``).

matplotlib is imported inside each function, with the non-interactive Agg backend (these functions only write PNG
files), so importing this module costs nothing and the benches' JSON and tables work without matplotlib. Each
function takes the bench's result dict and a PNG path and returns the files it wrote.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from edgens.bench.specialists import COLUMNS
from edgens.errors import BackendUnavailableError
from edgens.fileio import atomic_write

log = logging.getLogger(__name__)

DPI = 90


def _pyplot() -> Any:
    """matplotlib.pyplot with the Agg backend.

    Raises:
        BackendUnavailableError: matplotlib is not installed.
    """
    try:
        import matplotlib
    except ImportError:
        raise BackendUnavailableError("matplotlib is not installed, so no PNG plots were written (JSON and markdown "
                                      "were); install it with: pip install 'edgens[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path, dpi: int = DPI, rect: tuple[float, float, float, float] | None = None) -> Path:
    """Write ``fig`` as a PNG atomically (an interrupted bench never leaves half an image) and close it.

    ``rect``: the part of the figure the panels fill (the rest holds a figure legend).
    """
    import matplotlib.pyplot as plt

    fig.tight_layout(rect=rect)
    try:
        atomic_write(path, lambda file: fig.savefig(file, format="png", dpi=dpi))
    finally:
        plt.close(fig)
    return path


def _legend(ax: Any, **options: Any) -> None:
    """A legend when the axes hold labelled artists (an empty sweep table still gets its plot)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**options)


def _band(ax: Any, x: np.ndarray, mean: list[float], se: list[float | None], color: Any, label: str) -> None:
    mean_a = 100 * np.asarray(mean, dtype=float)
    se_a = 100 * np.asarray([np.nan if s is None else s for s in se], dtype=float)
    ax.plot(x, mean_a, color=color, label=label)
    if np.isfinite(se_a).any():
        ax.fill_between(x, mean_a - 2 * se_a, mean_a + 2 * se_a, color=color, alpha=0.2, linewidth=0)


def _short_labels(runs: list[dict]) -> list[str]:
    """Labels that name only what differs between runs (preset, lam, method, seed)."""
    def varies(key: str) -> bool:
        return len({str(r.get(key)) for r in runs}) > 1

    labels = []
    for r in runs:
        parts = [r["preset"]] if varies("preset") else []
        parts.append(f"lam={r['lam']:g}")
        if r.get("method", "modular") != "modular":
            parts.append(r["method"])
        parts += [f"{name}={r[key]:g}" for key, name in (("anytime_weight", "mu"), ("fault_weight", "nu"))
                  if r.get(key)]
        if varies("seed"):
            parts.append(f"seed {r['seed']}")
        labels.append("\n".join(parts))
    return labels


def _trial_groups(runs: list[dict]) -> list[tuple[str, list[dict]]]:
    """Runs grouped by setting (preset, lam, method, anytime and random-subset weights), in first-seen order, each
    with a label that names only what differs between the groups and how many trials (seeds) it holds."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        key = (run["preset"], run["lam"], run.get("method", "modular"), run.get("anytime_weight", 0.0),
               run.get("fault_weight", 0.0))
        groups.setdefault(key, []).append(run)
    firsts = [members[0] for members in groups.values()]
    labels = [label.replace("\n", " ") for label in _short_labels([{**r, "seed": 0} for r in firsts])]
    return [(f"{label} ({len(members)} seeds)" if len(members) > 1 else label, members)
            for label, members in zip(labels, groups.values(), strict=True)]


def _mean_curve(curves: list[list[float]], ses: list[list[float | None]] | None) -> tuple[np.ndarray, np.ndarray]:
    """Mean over trials of equally long curves, and its standard error: across the trials when there are several,
    else the single trial's own (over its repeats; NaN where none)."""
    values = np.asarray(curves, dtype=float)
    if len(values) > 1:
        return values.mean(0), values.std(0, ddof=1) / np.sqrt(len(values))
    own = [np.nan if s is None else s for s in (ses[0] if ses else [None] * values.shape[1])]
    return values[0], np.asarray(own, dtype=float)


def plot_drop(data: dict, path: str | Path) -> list[Path]:
    """Test error and NLL vs members kept (dropped at random per example, and the first k of the deployed order),
    and error vs the Bernoulli keep probability. One colour per setting; trials of a setting (seeds) are averaged,
    with a band of +- 2 standard errors across trials (for a single trial, over its random repeats). The legend sits
    below the panels, off the curves.

    Raises:
        BackendUnavailableError: no matplotlib.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.2))
    colors = plt.get_cmap("tab10").colors
    groups = _trial_groups(data["runs"])
    for index, (label, runs) in enumerate(groups):
        color = colors[index % len(colors)]
        m = runs[0]["n_members"]
        kept = m - np.asarray(runs[0]["random_drop"]["dropped"])  # few members kept matters most: log scale
        error, error_se = _mean_curve([r["random_drop"]["error_mean"] for r in runs],
                                      [r["random_drop"]["error_se"] for r in runs])
        _band(axes[0], kept, error.tolist(), error_se.tolist(), color, label)
        # the order a run is deployed in (greedy, or its trained order); results before it have the greedy one
        deployed = [r.get("deployed", r.get("greedy")) for r in runs]
        if all(d is not None for d in deployed):
            curve, _ = _mean_curve([d["test_error"] for d in deployed], None)
            axes[0].plot(np.arange(1, m + 1), 100 * curve, color=color, linestyle="--")
        nll, nll_se = _mean_curve([r["random_drop"]["nll_mean"] for r in runs],
                                  [r["random_drop"]["nll_se"] for r in runs])
        axes[1].plot(kept, nll, color=color)
        if np.isfinite(nll_se).any():
            axes[1].fill_between(kept, nll - 2 * nll_se, nll + 2 * nll_se, color=color, alpha=0.2, linewidth=0)
        keep = runs[0]["bernoulli"]["keep_prob"]
        bern, bern_se = _mean_curve([r["bernoulli"]["error_mean"] for r in runs],
                                    [r["bernoulli"]["error_se"] for r in runs])
        axes[2].errorbar(keep, 100 * bern, yerr=200 * np.nan_to_num(bern_se), color=color, marker="o", markersize=3,
                         capsize=2)
    sizes = sorted({r["n_members"] for r in data["runs"]})
    if len(sizes) == 1 and sizes[0] >= 10:  # mark the "90% dropped" point the targets talk about
        for ax in axes[:2]:
            ax.axvline(sizes[0] - round(0.9 * sizes[0]), color="grey", linestyle=":", linewidth=1)
        axes[0].text(sizes[0] - round(0.9 * sizes[0]), 1, " 90% dropped", color="grey", fontsize=8)
    kept_label = f"members kept per test example (of {', '.join(map(str, sizes))})"
    axes[0].set(xlabel=kept_label, ylabel="test error (%)", xscale="log",
                title=f"Members dropped at random per example ({data['repeats']} repeats)")
    top = max(100 * max(r["random_drop"]["error_mean"]) for r in data["runs"])
    axes[0].set_ylim(0, min(100, top * 1.05 + 1))
    axes[1].set(xlabel=kept_label, ylabel="test NLL", title="Test NLL, members dropped at random", xscale="log",
                yscale="log")
    axes[2].set(xlabel="keep probability p per member", ylabel="test error (%)", xscale="log",
                title="Each member kept with probability p")
    for ax in axes:
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colors[i % len(colors)], linewidth=2) for i in range(len(groups))]
    labels = [label for label, _ in groups]
    handles.append(plt.Line2D([], [], color="black"))
    labels.append("dropped at random (band: +- 2 s.e.)")
    if any("greedy" in r or "deployed" in r for r in data["runs"]):
        handles.append(plt.Line2D([], [], color="black", linestyle="--"))
        labels.append("first k members of the deployed order (greedy; anytime-trained: trained)")
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=9, frameon=False)
    return [_save(fig, Path(path), rect=(0, 0.08, 1, 1))]


def plot_lambda(data: dict, path: str | Path) -> list[Path]:
    """Per preset: test error vs lam (mean +- standard error over trials) for each method, and the ensemble's test
    NLL vs the members' mean test NLL (the paper's Figures 2 and 3).

    Raises:
        BackendUnavailableError: no matplotlib.
    """
    plt = _pyplot()
    presets = data["presets"]
    fig, axes = plt.subplots(len(presets), 2, figsize=(12, 4.2 * len(presets)), squeeze=False)
    lams = sorted(data["lams"])
    position = {lam: i for i, lam in enumerate(lams)}
    styles = {"modular": ("C0", "o"), "stacking": ("C1", "s"), "bagging": ("C2", "^")}
    for row_axes, preset in zip(axes, presets):
        rows = [r for r in data["rows"] if r["preset"] == preset and r["test_error"]["n"]]
        for method, (color, marker) in styles.items():
            chosen = sorted((r for r in rows if r["method"] == method and r["lam"] in position),
                            key=lambda r: r["lam"])
            if not chosen:
                continue
            xs = [position[r["lam"]] + {"modular": 0, "stacking": 0.08, "bagging": -0.08}[method] for r in chosen]
            ys = [100 * r["test_error"]["mean"] for r in chosen]
            es = [100 * (r["test_error"]["se"] or 0) for r in chosen]
            row_axes[0].errorbar(xs, ys, yerr=es, color=color, marker=marker, capsize=3,
                                 linestyle="-" if len(chosen) > 1 else "none", label=method)
        modular = sorted((r for r in rows if r["method"] == "modular" and r["lam"] in position),
                         key=lambda r: r["lam"])
        if modular:
            xs = [position[r["lam"]] for r in modular]
            for key, label, color in (("test_nll", "ensemble", "C0"), ("member_nll", "mean member", "C3")):
                row_axes[1].errorbar(xs, [r[key]["mean"] for r in modular], yerr=[r[key]["se"] or 0 for r in modular],
                                     color=color, marker="o", capsize=3, label=label)
        for ax, title, ylabel in ((row_axes[0], f"{preset}: test error", "test error (%)"),
                                  (row_axes[1], f"{preset}: test NLL (modular)", "test NLL")):
            ax.set_xticks(range(len(lams)), [f"{lam:g}" for lam in lams])
            ax.set(xlabel="lam", ylabel=ylabel, title=title)
            ax.grid(alpha=0.3)
            _legend(ax, fontsize=8)
        row_axes[1].set_yscale("log")
    return [_save(fig, Path(path))]


def plot_specialists(data: dict, path: str | Path) -> list[Path]:
    """Mean test F1 of each selection per run (bars), and the specialists' gap over random subsets.

    Raises:
        BackendUnavailableError: no matplotlib.
    """

    plt = _pyplot()
    runs = data["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.6), gridspec_kw={"width_ratios": [2.2, 1]})
    width = 0.8 / len(COLUMNS)
    for index, (key, title) in enumerate(COLUMNS):
        xs = np.arange(len(runs)) + (index - (len(COLUMNS) - 1) / 2) * width
        axes[0].bar(xs, [r["mean"][key] for r in runs], width, label=title)
    labels = _short_labels(runs)
    axes[0].set_xticks(range(len(runs)), labels, fontsize=8)
    low = min(min(r["mean"].values()) for r in runs)
    axes[0].set_ylim(max(0.0, low - 0.05), 1.12)  # room above the bars for the legend
    presets = sorted({r["preset"] for r in runs})
    axes[0].set(ylabel="mean test F1 (one-vs-rest)",
                title=f"{', '.join(presets)}: specialists of {data['size']} members (selected on validation)")
    _legend(axes[0], fontsize=7, ncol=3, loc="upper center")
    xs = np.arange(len(runs))
    axes[1].plot(xs, [r["gap_greedy"] for r in runs], marker="o", label="greedy - random")
    axes[1].plot(xs, [r["gap_best_of_random"] for r in runs], marker="s",
                 label=f"best of {data['candidates']} random - random")
    axes[1].axhline(0, color="grey", linewidth=0.8)
    axes[1].set_xticks(xs, labels, fontsize=8)
    axes[1].set(ylabel="F1 gap over random subsets", title="Specialists' gain over random subsets")
    _legend(axes[1], fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
    return [_save(fig, Path(path))]


def plot_dominance(data: dict, path: str | Path) -> list[Path]:
    """Three files: members' validation error over epochs (``path``, the paper's Figure 7), confusion matrices
    (``*_confusion.png``) and first-layer filters (``*_filters.png``, when the data holds them).

    Raises:
        BackendUnavailableError: no matplotlib.
    """
    plt = _pyplot()
    path = Path(path)
    runs = data["runs"]
    written = []
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4.6), squeeze=False)
    for ax, run in zip(axes[0], runs):
        epochs = np.asarray(run["epochs"])
        errors = 100 * np.asarray(run["val_member_errors"])
        ax.plot(epochs, errors, color="grey", alpha=max(0.03, min(0.5, 8 / errors.shape[1])), linewidth=0.7)
        ax.plot(epochs, np.median(errors, axis=1), color="C3", linestyle="--")
        ax.plot(epochs, errors.min(1), color="C2")
        ax.plot(epochs, 100 * np.asarray(run["val_ensemble_error"]), color="C0", linewidth=2)
        ax.set(xlabel="epoch", ylabel="validation error (%)", title=run["label"], ylim=(0, 100))
        ax.grid(alpha=0.3)
    # one legend for all panels, below them: member curves fill any corner of a panel
    handles = [plt.Line2D([], [], color="grey", linewidth=0.7), plt.Line2D([], [], color="C3", linestyle="--"),
               plt.Line2D([], [], color="C2"), plt.Line2D([], [], color="C0", linewidth=2)]
    fig.legend(handles, ["each member", "median member", "best member", "ensemble"], loc="lower center", ncol=4,
               fontsize=9, frameon=False)
    written.append(_save(fig, path, rect=(0, 0.07, 1, 1)))

    picks = ("ensemble", "best", "median", "worst")
    fig, axes = plt.subplots(len(runs), 4, figsize=(14, 4.0 * len(runs)), squeeze=False)
    for row_axes, run in zip(axes, runs):
        for ax, pick in zip(row_axes, picks):
            entry = run["confusion"][pick]
            matrix = np.asarray(entry if pick == "ensemble" else entry["matrix"], dtype=float)
            rates = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
            ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
            title = (f"ensemble, error {100 * run['test']['error']:.1f}%" if pick == "ensemble" else
                     f"{pick} member #{entry['member']}, error {100 * entry['test_error']:.1f}%")
            ax.set_title(f"{run['label']}\n{title}", fontsize=8)
            k = len(matrix)
            names = [n[:8] for n in run["class_names"]]
            ax.set_xticks(range(k), names, rotation=90, fontsize=6)
            ax.set_yticks(range(k), names, fontsize=6)
            ax.set_xlabel("predicted", fontsize=7)
            ax.set_ylabel("true", fontsize=7)
    written.append(_save(fig, path.with_name(f"{path.stem}_confusion.png")))

    with_filters = [r for r in runs if "filters" in r and "_images" in r["filters"]]
    if with_filters:
        columns = 8
        blocks = []  # (run, tiles, member of each tile)
        for run in with_filters:
            images = np.asarray(run["filters"]["_images"])
            blocks.append((run, images.reshape(-1, *images.shape[2:]),
                           np.repeat(run["filters"]["members"], images.shape[1])))
        heights = [-(-len(tiles) // columns) for _, tiles, _ in blocks]
        fig, axes = plt.subplots(sum(heights), columns, figsize=(1.1 * columns + 1, 1.25 * sum(heights) + 0.5),
                                 squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        first_row = 0
        for (run, tiles, members), height in zip(blocks, heights):
            for index, tile in enumerate(tiles):
                ax = axes[first_row + index // columns, index % columns]
                limit = float(np.abs(tile).max()) or 1.0
                if tile.shape[0] == 3:  # RGB filters: map [-limit, limit] to [0, 1]
                    ax.imshow((tile.transpose(1, 2, 0) / limit + 1) / 2, interpolation="nearest")
                else:
                    ax.imshow(tile.mean(0), cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
                ax.set_title(f"member {members[index]}", fontsize=7, pad=2)
            axes[first_row, 0].text(-0.15, 0.5, run["label"].replace(" seed", "\nseed"),
                                    transform=axes[first_row, 0].transAxes, ha="right", va="center", fontsize=7)
            first_row += height
        fig.suptitle("First-layer weights of the best members by validation error, one image per unit (red +, blue -)",
                     fontsize=9)
        # weight images are noise-like and compress badly: a lower resolution keeps the file small
        written.append(_save(fig, path.with_name(f"{path.stem}_filters.png"), dpi=72))
    return written


def plot_faults(data: dict, path: str | Path) -> list[Path]:
    """Per bundle: silent data corruption by flipped bit for each combiner, detection off (dashed) and on (solid);
    and, for one harmful flip per draw, the accuracy against leaving the corrupted group out.

    Raises:
        BackendUnavailableError: no matplotlib.
    """
    plt = _pyplot()
    bundles = data["bundles"]
    fig, axes = plt.subplots(len(bundles), 2, figsize=(14, 4.2 * len(bundles)), squeeze=False,
                             gridspec_kw={"width_ratios": [1.6, 1]})
    colors = {"mean": "C0", "median": "C1", "trimmed": "C2"}
    for row, bundle in zip(axes, bundles, strict=True):
        sweep = bundle["sweep"]
        bits = [int(b) for b in sweep["by_bit"]]
        for label in sweep["clean_accuracy"]:
            combiner, detection = label.split(", detection ")
            values = [100 * sweep["by_bit"][str(b)][label]["sdc"] for b in bits]
            row[0].plot(bits, values, color=colors.get(combiner, "C3"), linestyle="-" if detection == "on" else "--",
                        marker="o" if detection == "on" else None, markersize=3, label=label)
        row[0].set_yscale("symlog", linthresh=0.01)
        row[0].axvspan(22.5, 30.5, color="grey", alpha=0.1, linewidth=0)
        row[0].set(xlabel="flipped bit of one weight (23-30: exponent, shaded; 31: sign)",
                   ylabel="silent data corruption (% of predictions)",
                   title=f"{Path(bundle['bundle']).name} (lam {bundle['lam']:g}): one random flip per draw")
        row[0].set_xticks(range(0, 32, 2))
        _legend(row[0], fontsize=7, loc="upper left")
        for budget, style in (("all", "-"), ("deadline", ":")):
            draws = bundle["harmful"].get(budget, {}).get("draws", [])
            for label, color in (("mean, detection off", "C3"), ("mean, detection on", "C0")):
                gaps = np.sort([100 * (d[label]["accuracy"] - d["left_out_accuracy"]) for d in draws
                                if d["left_out_accuracy"] is not None])
                if len(gaps):
                    row[1].plot(gaps, np.arange(1, len(gaps) + 1) / len(gaps), color=color, linestyle=style,
                                label=f"{label.replace('mean, ', '')} ({budget})")
        row[1].axvline(-0.2, color="grey", linewidth=0.8, linestyle="--")
        row[1].set_xscale("symlog", linthresh=0.2)
        row[1].set(xlabel="accuracy minus accuracy with the group left out (points)", ylabel="fraction of draws",
                   title="One harmful exponent flip (0 -> 1, bits 23-30)")
        _legend(row[1], fontsize=7, loc="upper left")
        for ax in row:
            ax.grid(alpha=0.3)
    return [_save(fig, Path(path))]
