"""``edgens bench faults``, checked bundles: what the checksums inside the stacks catch, by budget, bit position and
layer (issue 24).

Three predictors of one bundle, no quarantine, outlier detection off (the checksums alone): checksums on, checksums
off, and checksums on with the corrupted stack failing loudly instead (the answer "as if the stack were left out",
which the runtime gives by running its replacement). Per draw: one bit of one weight drawn uniformly over the
weights of one stack that the budget's clean call runs, on ``examples`` test examples in calls of ``batch``.

- **harmful flips** per budget: a 0 among the exponent bits 23-30 set to 1 (the weight grows). A flip is *harmful*
  when, unprotected, it changes any answer (SDC > 0 with the checksums off). Reported: how many of the harmful ones
  the checksums caught (a failure of kind ``checksum`` of that stack), and how often the protected answer's
  accuracy lies within 0.2 points of the left-out answer's, or of the fault-free one's, whichever is lower (a flip
  that changes nothing leaves the fault-free answer, which may score an example below the left-out call).
- **sweep by bit**: every bit position 0-31 (either direction), on the budget of one prefix stack
  (``members=0.1``): caught and harmful fractions, and the largest SDC a missed flip left.
- **by layer**: the harmful draws grouped by the part of the graph they hit (hidden or output weights and biases,
  the check row and columns).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgens.bench.analysis import Progress
from edgens.bench.report import markdown_table, percent

if TYPE_CHECKING:
    from edgens.runtime import Predictor

EXPONENT = tuple(range(23, 31))
WITHIN = 0.002  # 0.2 points of accuracy


def _keep_going(prediction: object) -> bool:
    return False


def checksum_budgets(manifest) -> dict[str, dict]:
    """The budgets measured: all members, a prefix (10%), a task, early exit and an anytime caller's deadline."""
    budgets = {"all": {}, "members=0.1": {"members": 0.1}}
    if manifest.specialists:
        budgets[f"task {manifest.specialists[0].task}"] = {"task": manifest.specialists[0].task}
    budgets["confidence=0.9"] = {"confidence": 0.9}
    budgets["deadline (anytime caller)"] = {"deadline_ms": 1000.0, "on_update": _keep_going}
    return budgets


class _Checked:
    def __init__(self, bundle: Path, x: np.ndarray, y: np.ndarray, batch: int):
        from edgens.runtime import Predictor

        self.bundle, self.x, self.y, self.batch = bundle, x, y, batch

        def load(checksums: bool) -> Predictor:
            return Predictor.load(bundle, "onnxruntime", lanes=1, detect_outliers=False, checksums=checksums,
                                  quarantine_after=None)

        self.on, self.off, self.left = load(True), load(False), load(True)
        self.manifest = self.on.manifest
        self.k = self.manifest.n_outputs
        self._weights: dict[str, tuple[bytes, dict[str, tuple[int, ...]]]] = {}  # by stack: its graph, tensor shapes

    def weights(self, stack: str) -> tuple[bytes, dict[str, tuple[int, ...]]]:
        """Stack ``stack``'s graph and its weight tensors' shapes, read once (every draw in it needs them)."""
        if stack not in self._weights:
            from edgens.runtime.onnx_weights import weight_tensors

            model = (self.bundle / self.manifest.stack(stack).file).read_bytes()
            self._weights[stack] = model, {t.name: tuple(t.shape) for t in weight_tensors(model)}
        return self._weights[stack]

    def close(self) -> None:
        for predictor in (self.on, self.off, self.left):
            predictor.close()

    def predict(self, predictor: Predictor, kwargs: dict) -> tuple[np.ndarray, set[tuple[str, str]], list[str]]:
        labels, failures, stacks = [], set(), []
        for start in range(0, len(self.x), self.batch):
            prediction = predictor.predict(self.x[start:start + self.batch], **kwargs)
            labels.append(prediction.labels)
            failures |= {(f.stack, f.kind) for f in prediction.failures}
            stacks += [s for s in prediction.stacks_run if s not in stacks]
        return np.concatenate(labels), failures, stacks

    def part(self, stack: str, tensor: str, shape: tuple[int, ...], index: int) -> str:
        """Which part of a checked graph a weight (of tensor ``tensor`` of ``shape``) is: hidden or output weights
        or biases, or a check part."""
        rows = len(self.manifest.stack(stack).members)
        layered = self.manifest.stack(stack).checksum.scheme == "layers-abft"
        if layered and not tensor.startswith("head_"):  # a hidden layer of a deeper MLP or a CNN
            if tensor.startswith(("weights.", "biases.")):  # the plain graph's own layer
                return "hidden weights" if tensor.startswith("weights.") else "hidden biases"
            if not tensor.startswith("check_"):
                return "check machinery"  # the residual's selectors, the first layer's input magnitudes
            # (M, inputs, 2) weights or (M, 1, 2) biases: each member's check and magnitude outputs; anything else
            # is the first layer's one check output
            position = index % 2 if len(shape) == 3 else 0
            return "hidden check output" if position == 0 else "hidden magnitude output"
        hidden = len(shape) <= 2
        if hidden:
            per_member = shape[0] // (rows + 1)
            row = index // (int(np.prod(shape[1:])) if len(shape) > 1 else 1)
            if row >= rows * per_member:
                return "hidden check row"
            return "hidden weights" if len(shape) == 2 else "hidden biases"
        column = index % shape[-1]
        member = index // int(np.prod(shape[1:]))
        if member >= rows:
            return "check member (zeros)"
        if column == self.k:
            return "output check column"
        if column == self.k + 1:
            return "output magnitude column"
        return "output weights" if shape[1] > 1 else "output biases"

    def draw(self, name: str, kwargs: dict, clean: tuple[np.ndarray, list[str]], bits: tuple[int, ...],
             grow_only: bool, rng: np.random.Generator) -> dict:
        from edgens.runtime.faults import inject_bit_faults, inject_faults, random_bit_faults

        clean_labels, stacks = clean
        accuracy_clean = float((clean_labels == self.y).mean())
        stack = stacks[int(rng.integers(len(stacks)))]
        model, shapes = self.weights(stack)
        fault = random_bit_faults(model, 1, bits, rng, grow_only=grow_only)[0]
        with inject_bit_faults(self.off, {stack: [fault]}):
            off, _, _ = self.predict(self.off, kwargs)
        with inject_bit_faults(self.on, {stack: [fault]}):
            on, failures, _ = self.predict(self.on, kwargs)
        with inject_faults(self.left, {stack: "raise"}):
            left, _, _ = self.predict(self.left, kwargs)
        accuracy_on, accuracy_left = float((on == self.y).mean()), float((left == self.y).mean())
        return {"budget": name, "stack": stack, "tensor": fault.tensor, "index": fault.index, "bit": fault.bit,
                "part": self.part(stack, fault.tensor, shapes[fault.tensor], fault.index),
                "caught": (stack, "checksum") in failures,
                "sdc_off": float((off != clean_labels).mean()), "sdc_on": float((on != clean_labels).mean()),
                "accuracy_on": accuracy_on, "accuracy_left_out": accuracy_left, "accuracy_clean": accuracy_clean,
                "within_0.2_of_left_out": accuracy_on >= min(accuracy_left, accuracy_clean) - WITHIN}


def checksum_protocol(bundle: str | Path, x: np.ndarray, y: np.ndarray, draws: int, sweep_draws: int, batch: int,
                      rng: np.random.Generator, progress: Progress, examples: int = 256) -> dict:
    """The checksum measurements of the module docstring for one checked bundle."""
    bench = _Checked(Path(bundle), x[:examples], y[:examples], batch)
    try:
        budgets = checksum_budgets(bench.manifest)
        clean = {}
        false_alarms = {}
        for name, kwargs in budgets.items():
            labels, failures, stacks = bench.predict(bench.on, kwargs)
            clean[name] = (labels, stacks)
            false_alarms[name] = sorted(f"{s} ({k})" for s, k in failures)
        harmful: dict[str, list[dict]] = {}
        for name, kwargs in budgets.items():
            stage = f"{Path(bundle).name}: checksums, harmful flips ({name})"
            harmful[name] = []
            for i in range(draws):
                progress(stage, i, draws)
                harmful[name].append(bench.draw(name, kwargs, clean[name], EXPONENT, True, rng))
            progress(stage, draws, draws)
        sweep_budget = "members=0.1"
        by_bit = {}
        for bit in range(32):
            progress(f"{Path(bundle).name}: checksums, sweep by bit", bit, 32)
            by_bit[str(bit)] = [bench.draw(sweep_budget, budgets[sweep_budget], clean[sweep_budget], (bit,), False,
                                           rng) for _ in range(sweep_draws)]
    finally:
        bench.close()
    return {"examples": len(bench.x), "batch": batch, "clean_false_alarms": false_alarms,
            "harmful": {name: {"summary": _summary(rows), "draws": rows} for name, rows in harmful.items()},
            "by_layer": _by_layer([r for rows in harmful.values() for r in rows]),
            "sweep": {"budget": sweep_budget, "draws": sweep_draws,
                      "by_bit": {bit: _sweep_row(rows) for bit, rows in by_bit.items()}}}


def _summary(rows: list[dict]) -> dict:
    harmful = [r for r in rows if r["sdc_off"] > 0]
    return {"draws": len(rows), "harmful": len(harmful),
            "caught_of_harmful": int(sum(r["caught"] for r in harmful)),
            "caught_fraction": float(np.mean([r["caught"] for r in harmful])) if harmful else None,
            "caught_of_all": int(sum(r["caught"] for r in rows)),
            "within_0.2_of_left_out": float(np.mean([r["within_0.2_of_left_out"] for r in rows])),
            "mean_sdc_off": float(np.mean([r["sdc_off"] for r in rows])),
            "mean_sdc_on": float(np.mean([r["sdc_on"] for r in rows])),
            "worst_sdc_missed": max((r["sdc_on"] for r in rows if not r["caught"]), default=0.0)}


def _by_layer(rows: list[dict]) -> dict:
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["part"]].append(row)
    return {part: _summary(group) for part, group in sorted(groups.items())}


def _sweep_row(rows: list[dict]) -> dict:
    return {"caught": float(np.mean([r["caught"] for r in rows])),
            "harmful": float(np.mean([r["sdc_off"] > 0 for r in rows])),
            "caught_of_harmful": (float(np.mean([r["caught"] for r in rows if r["sdc_off"] > 0]))
                                  if any(r["sdc_off"] > 0 for r in rows) else None),
            "worst_sdc_missed": max((r["sdc_on"] for r in rows if not r["caught"]), default=0.0)}


def checksum_markdown(bundle: str, data: dict) -> list[str]:
    """The checksum tables of one bundle."""
    rows = []
    for name, part in data["harmful"].items():
        s = part["summary"]
        rows.append([name, s["draws"], s["harmful"], f"{s['caught_of_harmful']}/{s['harmful']}",
                     percent(s["within_0.2_of_left_out"]), percent(s["mean_sdc_off"], 3), percent(s["mean_sdc_on"], 3),
                     percent(s["worst_sdc_missed"], 2), len(data["clean_false_alarms"][name])])
    lines = [f"## Checksums, {bundle}: one harmful exponent flip (a 0 among bits 23-30 set to 1) in a stack the "
             f"budget runs ({data['examples']} test examples, calls of {data['batch']})", "",
             markdown_table(["budget", "draws", "harmful (SDC > 0 unprotected)", "caught / harmful",
                             "within 0.2 of left out (or fault-free)", "mean SDC: off", "on",
                             "worst SDC of a missed flip",
                             "clean false alarms"], rows), ""]
    rows = [[part, s["draws"], f"{s['caught_of_harmful']}/{s['harmful']}", f"{s['caught_of_all']}/{s['draws']}",
             percent(s["worst_sdc_missed"], 2)] for part, s in data["by_layer"].items()]
    lines += ["### By the part of the graph hit (every budget's harmful-protocol draws)", "",
              markdown_table(["part", "draws", "caught / harmful", "caught / all", "worst SDC of a missed flip"], rows),
              ""]
    sweep = data["sweep"]
    rows = [[bit, percent(r["caught"]), percent(r["harmful"]), percent(r["caught_of_harmful"]),
             percent(r["worst_sdc_missed"], 2)] for bit, r in sweep["by_bit"].items()]
    lines += [f"### By flipped bit ({sweep['budget']}, {sweep['draws']} draws per bit, either direction)", "",
              markdown_table(["bit", "caught", "harmful", "caught of harmful", "worst SDC of a missed flip"], rows), ""]
    return lines

