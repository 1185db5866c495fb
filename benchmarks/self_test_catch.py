"""Which exponent-bit flips the self-test catches (issue 13).

    python benchmarks/self_test_catch.py BUNDLE [--draws 2000] [--seed 0] [--out DIR]

Each draw flips one exponent bit (23-30, either direction) of one weight drawn uniformly over a stack drawn
uniformly from the bundle's stacks, injects it in memory (the file stays intact), runs ``Predictor.self_test`` on
that stack, and measures independently how far the stack's outputs on the whole test set moved from the fault-free
ones. A flip "changes the stack's outputs" when that largest difference exceeds the self-test's value tolerance.
Writes ``self_test_catch.json`` to ``--out`` and prints the counts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from edgens.fileio import atomic_write_json
from edgens.data.inputs import load_input
from edgens.runtime import Predictor
from edgens.runtime.checksums import members_view
from edgens.runtime.faults import EXPONENT_BITS, inject_bit_faults, random_bit_faults
from edgens.runtime.selftest import tolerance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default="fashion-mnist:test")
    parser.add_argument("--out", default="benchmarks/results/faults")
    args = parser.parse_args()
    x, _, _ = load_input(args.data)
    rng = np.random.default_rng(args.seed)
    rows = []
    with Predictor.load(args.bundle, "onnxruntime", lanes=1, quarantine_after=None) as predictor:
        xn = predictor.prepare(x).array
        names = [s.name for s in predictor.manifest.stacks]
        clean = predictor.stack_outputs(x, names, batch_size=1000)
        models = {n: (Path(args.bundle) / predictor.manifest.stack(n).file).read_bytes() for n in names}
        for _ in range(args.draws):
            name = names[int(rng.integers(len(names)))]
            fault = random_bit_faults(models[name], 1, EXPONENT_BITS, rng)
            with inject_bit_faults(predictor, {name: fault}) as runners:
                result = predictor.self_test([name], quarantine=False)[name]
                with np.errstate(invalid="ignore", over="ignore"):
                    members, k = clean[name].shape[0], clean[name].shape[2]  # a checked stack's extra row/columns aside
                    diff = max(float(np.nan_to_num(np.abs(
                        members_view(runners[name].run(xn[i:i + 1000]), members, k).astype(np.float64)
                        - clean[name][:, i:i + 1000]), nan=np.inf).max()) for i in range(0, len(xn), 1000))
            allowed = tolerance(clean[name][:, :32], predictor.manifest.stack(name).precision)
            rows.append({"stack": name, "tensor": fault[0].tensor, "index": fault[0].index, "bit": fault[0].bit,
                         "caught": not result.ok, "test_diff": diff, "changed": diff > allowed})
    changed = [r for r in rows if r["changed"]]
    missed = [r for r in changed if not r["caught"]]
    summary = {"bundle": args.bundle, "draws": len(rows), "changed_on_test_set": len(changed),
               "caught_of_changed": len(changed) - len(missed), "missed": missed,
               "false_alarms": sum(r["caught"] and not r["changed"] for r in rows),
               "unchanged": len(rows) - len(changed)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "self_test_catch.json", {"summary": summary, "draws": rows})
    print(json.dumps({k: v for k, v in summary.items() if k != "missed"}, indent=1))
    for r in missed:
        print("missed:", r)


if __name__ == "__main__":
    main()
