"""What export buys on the test set (issue 3's measurements): the anytime order and the specialists.

    python benchmarks/export_bench.py RUN BUNDLE [--draws 20] [--out benchmarks/results/export.json]

Reads the run's stored test outputs (members' logits) and the bundle's manifest (chosen on validation data only) and
reports: the test error of the first 10% of members in the bundle's order vs 10% chosen at random (``--draws``
draws); per class, the test F1 of the one-vs-rest problem for the greedy specialist, the paper's best-of-200-random
selection, random subsets of the same size, the best single member (chosen on validation) and the mean single
member; and the bundle's size. Export time is printed by ``edgens export`` itself.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from edgens import selection
from edgens.fileio import atomic_write_text
from edgens.rundir import RunDir
from edgens.runtime.bundle import load_manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    manifest = load_manifest(args.bundle)
    test_eta, test_y = RunDir(args.run).outputs("test")
    val_eta, val_y = RunDir(args.run).outputs("val")
    m = test_eta.shape[0]
    k = max(1, round(0.1 * m))
    rng = np.random.default_rng(args.seed)
    random_errors = [selection.ensemble_error(test_eta, test_y, rng.choice(m, k, replace=False))
                     for _ in range(args.draws)]
    result = {
        "members": m, "fraction": k / m,
        "test_error_all": selection.ensemble_error(test_eta, test_y, range(m)),
        "test_error_first_10pct_order": selection.ensemble_error(test_eta, test_y, manifest.order[:k]),
        "test_error_random_10pct_mean": float(np.mean(random_errors)),
        "test_error_random_10pct_std": float(np.std(random_errors)),
        "bundle_bytes": sum(p.stat().st_size for p in args.bundle.rglob("*") if p.is_file()),
        "specialists": {},
    }
    single_test_f1 = np.stack([selection.f1_one_vs_rest(test_eta.argmax(-1), test_y, c)
                               for c in range(manifest.n_outputs)])  # (classes, members)
    rows = []
    for spec in manifest.specialists:
        c, size = spec.class_index, len(spec.members)
        chosen = selection.best_of_random_specialists(val_eta, val_y, [c], size, seed=args.seed)[c][0]
        random_f1 = [selection.subset_f1(test_eta, test_y, rng.choice(m, size, replace=False), c)
                     for _ in range(200)]
        best_single = selection.best_single_member(val_eta, val_y, c)[0]
        rows.append({"class": c, "size": size,
                     "greedy": selection.subset_f1(test_eta, test_y, spec.members, c),
                     "best_of_200_random": selection.subset_f1(test_eta, test_y, chosen, c),
                     "random_subsets": float(np.mean(random_f1)),
                     "best_single_member": float(single_test_f1[c, best_single]),
                     "mean_single_member": float(single_test_f1[c].mean()),
                     "full_ensemble": selection.subset_f1(test_eta, test_y, range(m), c)})
    result["specialists"]["per_class"] = rows
    result["specialists"]["mean"] = {key: float(np.mean([r[key] for r in rows])) for key in rows[0] if
                                     key not in ("class", "size")} if rows else {}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        atomic_write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
