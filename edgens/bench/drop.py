"""``edgens bench drop``: test accuracy and NLL when members are dropped, for one or more finished runs.

Three protocols per run (all on the test set; the greedy order is chosen on the validation set):

- random drop (the paper's): for each test example independently, d members chosen at random are dropped, for
  every d = 0 .. M-1, over 20 repeats (mean and standard error);
- Bernoulli keep probability: each member kept independently with probability p per example (see
  :func:`edgens.bench.analysis.bernoulli_keep_curve` for the case where none is kept);
- greedy anytime order: the first k members of the greedy order (forward selection on validation);
- index order: the first k members by id;
- deployed order: the first k members of the order ``edgens export`` deploys the run in (greedy for the paper's
  loss; for a run trained with the anytime term, ``--anytime-weight``, its trained order, refined inside each trained
  prefix when that measures better on validation).

Runs of different objectives (lam, method, ``--anytime-weight``, ``--fault-weight``) are told apart in the labels
and plotted as groups of their own; seeds of one objective are averaged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from edgens.bench import analysis
from edgens.bench.analysis import Progress, no_progress
from edgens.bench.report import load_finished, markdown_table, num, pct, run_label
from edgens.selection import greedy_order, trained_order

log = logging.getLogger(__name__)

KEEP_PROBS = (1.0, 0.9, 0.75, 0.5, 0.25, 0.1, 0.05, 0.02, 0.01)
HIGHLIGHT_FRACTIONS = (0.5, 0.75, 0.9)  # fractions of members dropped shown in the table


def drop_run(run: str | Path, repeats: int = 20, seed: int = 0, keep_probs: Sequence[float] = KEEP_PROBS,
             greedy: bool = True, progress: Progress = no_progress) -> dict:
    """All three protocols for one run.

    Raises:
        DataNotFoundError / RunDirectoryError: not a finished classification run.
        InputError: bad settings (repeats < 1, p outside [0, 1]).
    """
    run_dir, config = load_finished(run)
    test_eta, test_y = run_dir.outputs("test")
    settings = config["config"]
    m = test_eta.shape[0]
    result = {"run": str(run_dir.path), "label": run_label(config), "preset": settings["preset"],
              "lam": settings["lam"], "method": settings.get("method", "modular"), "seed": settings["seed"],
              "anytime_weight": settings.get("anytime_weight", 0.0), "fault_weight": settings.get("fault_weight", 0.0),
              "n_members": m, "full": analysis.ensemble_metrics(test_eta, test_y),
              "mean_member_error": float(analysis.member_metrics(test_eta, test_y)["error"].mean())}
    curve = analysis.random_drop_curve(test_eta, test_y, repeats, seed, progress)
    result["random_drop"] = curve.to_dict()
    result["random_drop_at"] = {f"{f:g}": curve.at_fraction(f) for f in HIGHLIGHT_FRACTIONS}
    result["bernoulli"] = analysis.bernoulli_keep_curve(test_eta, test_y, keep_probs, repeats, seed, progress)
    index_curve = analysis.prefix_curve(test_eta, test_y, range(m))
    result["index_order"] = {"anytime_weight": settings.get("anytime_weight", 0.0),
                             "test_error": index_curve["error"], "test_nll": index_curve["nll"],
                             "at": {f"{f:g}": _greedy_at(index_curve, m, f) for f in HIGHLIGHT_FRACTIONS}}
    if greedy:
        progress("greedy order (validation)", 0, 1)
        val_eta, val_y = run_dir.outputs("val")
        order, val_errors = greedy_order(val_eta, val_y)
        progress("greedy order (validation)", 1, 1)
        curve_test = analysis.prefix_curve(test_eta, test_y, order)
        result["greedy"] = {"order": order, "val_error": val_errors, "test_error": curve_test["error"],
                            "test_nll": curve_test["nll"],
                            "at": {f"{f:g}": _greedy_at(curve_test, m, f) for f in HIGHLIGHT_FRACTIONS}}
        prefixes = run_dir.train_config(config).resolved_prefixes(m)
        if prefixes:  # deployed in its trained order, as edgens export does
            order, _, method = trained_order(val_eta, val_y, prefixes)
            curve_test = analysis.prefix_curve(test_eta, test_y, order)
        else:
            method = "greedy"
        result["deployed"] = {"method": method, "order": list(order), "test_error": curve_test["error"],
                              "test_nll": curve_test["nll"],
                              "at": {f"{f:g}": _greedy_at(curve_test, m, f) for f in HIGHLIGHT_FRACTIONS}}
    return result


def _greedy_at(curve: dict, m: int, fraction: float) -> dict:
    dropped = min(int(round(fraction * m)), m - 1)
    kept = m - dropped
    return {"dropped": dropped, "kept": kept, "error": curve["error"][kept - 1], "nll": curve["nll"][kept - 1]}


def drop_bench(runs: Sequence[str | Path], repeats: int = 20, seed: int = 0,
               keep_probs: Sequence[float] = KEEP_PROBS, greedy: bool = True,
               progress: Progress = no_progress) -> dict:
    """:func:`drop_run` for each run (the same seed for all: every run sees the same random draws).

    Raises:
        See :func:`drop_run`.
    """
    results = []
    for run in runs:
        log.info("drop bench: %s", run)
        results.append(drop_run(run, repeats, seed, keep_probs, greedy, progress))
    return {"bench": "drop", "repeats": repeats, "seed": seed, "keep_probs": list(keep_probs), "runs": results}


def drop_markdown(data: dict) -> str:
    """The drop bench's markdown tables: errors at a few drop fractions, and the Bernoulli protocol."""
    headers = ["run", "members", "all members"] + [f"{100 * f:g}% dropped at random" for f in HIGHLIGHT_FRACTIONS]
    has_greedy = all("greedy" in r for r in data["runs"])
    if has_greedy:
        headers += [f"greedy order, {100 * (1 - f):g}% kept" for f in HIGHLIGHT_FRACTIONS[-1:]]
        headers += [f"deployed order, {100 * (1 - f):g}% kept" for f in HIGHLIGHT_FRACTIONS[-1:]]
    headers += [f"index order, {100 * (1 - f):g}% kept" for f in HIGHLIGHT_FRACTIONS[-1:]]
    rows = []
    for r in data["runs"]:
        row = [r["label"], r["n_members"], pct(r["full"]["error"])]
        row += [pct(r["random_drop_at"][f"{f:g}"]["error"], r["random_drop_at"][f"{f:g}"]["error_se"])
                for f in HIGHLIGHT_FRACTIONS]
        if has_greedy:
            at = r["greedy"]["at"][f"{HIGHLIGHT_FRACTIONS[-1]:g}"]
            row.append(f"{pct(at['error'])} ({at['kept']} members)")
            deployed = r.get("deployed", {"at": r["greedy"]["at"], "method": "greedy"})
            at = deployed["at"][f"{HIGHLIGHT_FRACTIONS[-1]:g}"]
            row.append(f"{pct(at['error'])} ({deployed['method']})")
        at = r["index_order"]["at"][f"{HIGHLIGHT_FRACTIONS[-1]:g}"]
        row.append(f"{pct(at['error'])} ({at['kept']} members)")
        rows.append(row)
    text = (f"Test error (mean ± standard error over {data['repeats']} repeats; members dropped independently per "
            f"test example; the greedy order is chosen on validation data; the deployed order is the one edgens "
            f"export uses: greedy, or an anytime-trained run's trained order)\n\n" + markdown_table(headers, rows))
    headers = ["run"] + [f"p = {p:g}" for p in data["keep_probs"]]
    rows = [[r["label"]] + [pct(e, s) for e, s in zip(r["bernoulli"]["error_mean"], r["bernoulli"]["error_se"])]
            for r in data["runs"]]
    text += ("\nTest error when each member is kept independently with probability p per example (an example with "
             "no member left counts as an error)\n\n" + markdown_table(headers, rows))
    headers = ["run", "all members"] + [f"{100 * f:g}% dropped" for f in HIGHLIGHT_FRACTIONS]
    rows = [[r["label"], num(r["full"]["nll"])] + [num(r["random_drop_at"][f"{f:g}"]["nll"],
                                                       r["random_drop_at"][f"{f:g}"]["nll_se"])
                                                   for f in HIGHLIGHT_FRACTIONS] for r in data["runs"]]
    text += "\nTest NLL with members dropped at random\n\n" + markdown_table(headers, rows)
    return text
