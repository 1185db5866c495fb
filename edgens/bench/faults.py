"""``edgens bench faults``: what silent faults do to deployed bundles, and what detection, robust combiners and the
self-test do about them. Everything runs through :class:`edgens.runtime.Predictor` on real onnxruntime sessions;
faults are injected into the stacks' ONNX bytes after the files passed their checksums.

Protocols, per bundle, on the test set in calls of ``batch`` examples:

- **harmful flips** (``draws``): one exponent bit that is 0 set to 1 (bits 23-30, so the weight grows) in one
  weight drawn uniformly over every weight of a stack the budget runs: ``all`` members (the prefix stack of
  every member, or the general stacks without one) and ``deadline`` (an anytime caller's deadline call, long
  enough for every stack: it answers first from the smallest prefix stack, then runs the general stacks after it
  one by one; the flip goes into one of those general stacks). Accuracy and silent data corruption (SDC:
  predictions that differ from the fault-free ones) with detection off and on, against the accuracy with the
  corrupted weight's group of members (its general stack) simply left out.
- **random flips** (``draws``): any bit of any weight, ``all`` budget.
- **sweep**: per bit position 0-31, ``sweep_draws`` flips (either direction) on ``sweep_examples`` test examples,
  and exponent flips in 1, 4, 16 and 64 weights at once: SDC and accuracy for every combiner with detection off and
  on.
- **clean**: test calls in ``shuffles`` random orders with detection on: calls that dropped a group (false drops),
  accuracy change, and the cost of detection at full budget (calls timed with it off and on, interleaved).
- **self-test**: for every flip of the harmful and random protocols that is in the exponent, whether the stack's
  outputs changed beyond the self-test's tolerance on the stored inputs and on the whole test set, and whether
  :meth:`Predictor.self_test` caught it.
- **checksums** (checked bundles): :mod:`edgens.bench.checksum_faults`, by budget, bit and layer.

"Detection" is the outlier test and, in a checked bundle, the checksums inside its stacks: both on or both off.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgens.bench.analysis import Progress, no_progress
from edgens.bench.report import markdown_table, percent
from edgens.errors import ConfigError
from edgens.runtime.checksums import members_view
from edgens.runtime.policies import Budget

if TYPE_CHECKING:
    from edgens.runtime import Predictor

log = logging.getLogger(__name__)

EXPONENT = tuple(range(23, 31))
DEADLINE_MS = 1000.0  # long enough for every general stack: the deadline path with all members


def _keep_going(prediction: object) -> bool:
    """An anytime caller that looks at every answer and never stops early."""
    return False
BUDGETS = {"all": Budget(), "deadline": Budget.parse(deadline_ms=DEADLINE_MS)}
COMBINER_CONFIGS = (("mean", False), ("mean", True), ("median", False), ("median", True), ("trimmed", False),
                    ("trimmed", True))
MULTI_COUNTS = (1, 4, 16, 64)


def _label(combiner: str, detect: bool) -> str:
    return f"{combiner}, detection {'on' if detect else 'off'}"


class _Bench:
    """One bundle's predictors (one per combiner and detection setting), test data and clean references."""

    def __init__(self, bundle: str | Path, x: np.ndarray, y: np.ndarray, batch: int, sweep_examples: int):
        from edgens.runtime import Predictor

        self.bundle = Path(bundle)
        self.x, self.y, self.batch = x, y, batch
        # No quarantine: each call is measured on its own (quarantine would swap a corrupted prefix stack for the
        # clean general stacks after three outlier calls, which is better still but measures something else).
        # Detection on or off: the outlier test and, in a checked bundle, the checksums inside its stacks.
        self.predictors = {(c, d): Predictor.load(bundle, "onnxruntime", lanes=1, detect_outliers=d, checksums=d,
                                                  combiner=c, quarantine_after=None) for c, d in COMBINER_CONFIGS}
        reference = self.predictors[("mean", True)]
        self.manifest = reference.manifest
        if self.manifest.outliers is None:
            raise ConfigError(f"bundle {bundle} has no outlier thresholds; export it again with this edgens")
        self.general = [s.name for s in self.manifest.general_stacks]
        self.group_of = {m: s.name for s in self.manifest.general_stacks for m in s.members}
        full = [s for s in self.manifest.prefix_stacks if len(s.members) == len(self.manifest.members)]
        self.all_stack = full[0].name if full else None  # what an all-members call runs
        self.xn = reference.prepare(x).array
        # the general stacks an anytime caller's deadline call runs (after the smallest prefix stack): its targets
        streamed = reference.predict(x[:batch], BUDGETS["deadline"], on_update=_keep_going).stacks_run
        self.deadline_targets = [name for name in streamed if name in self.general] or self.general
        # the fault-free outputs on the test set of every stack a draw corrupts (for the self-test's measure, and
        # the general stacks' for the left-out baselines)
        targets = self.general + ([self.all_stack] if self.all_stack else [])
        self.clean_outputs = reference.stack_outputs(x, targets, batch_size=1000)
        group_sums = {g: self.clean_outputs[g].sum(axis=0, dtype=np.float64) for g in self.general}
        total = sum(group_sums.values())
        self.left_out_accuracy = {g: float((np.argmax(total - s, axis=1) == y).mean()) for g, s in group_sums.items()}
        self.sweep_n = min(sweep_examples, len(x))
        self.clean: dict[tuple[str, bool, str, int], np.ndarray] = {}

    def close(self) -> None:
        for predictor in self.predictors.values():
            predictor.close()

    def predict(self, config: tuple[str, bool], budget: str, n: int | None = None) -> tuple[np.ndarray, int, int]:
        """Labels over the first ``n`` test examples, calls with an outlier left out, calls with a loud failure."""
        predictor = self.predictors[config]
        x = self.x if n is None else self.x[:n]
        labels, outlier_calls, loud_calls = [], 0, 0
        for start in range(0, len(x), self.batch):
            updates = _keep_going if budget == "deadline" else None  # the anytime path: answers after each stack
            prediction = predictor.predict(x[start:start + self.batch], BUDGETS[budget], on_update=updates)
            labels.append(prediction.labels)
            kinds = {f.kind for f in prediction.failures}
            outlier_calls += "outlier" in kinds
            loud_calls += bool(kinds - {"outlier"})
        return np.concatenate(labels), outlier_calls, loud_calls

    def clean_labels(self, config: tuple[str, bool], budget: str, n: int | None) -> np.ndarray:
        key = (*config, budget, n or len(self.x))
        if key not in self.clean:
            self.clean[key] = self.predict(config, budget, n)[0]
        return self.clean[key]

    def target(self, budget: str, rng: np.random.Generator) -> str:
        if budget == "all" and self.all_stack is not None:
            return self.all_stack
        targets = self.deadline_targets if budget == "deadline" else self.general
        return targets[int(rng.integers(len(targets)))]

    def draw(self, budget: str, faults_for: str, configs: Sequence[tuple[str, bool]], rng: np.random.Generator,
             n: int | None = None, count: int = 1, self_test: bool = False) -> dict:
        """One fault draw: inject it, predict with every config, measure."""
        from edgens.runtime.faults import inject_bit_faults, random_bit_faults, weight_row
        from edgens.runtime.onnx_weights import weight_tensors

        stack = self.target(budget, rng)
        info = self.manifest.stack(stack)
        model = (self.bundle / info.file).read_bytes()
        if faults_for == "harmful":
            faults = random_bit_faults(model, count, EXPONENT, rng, grow_only=True)
        elif faults_for == "exponent":
            faults = random_bit_faults(model, count, EXPONENT, rng)
        elif faults_for == "random":
            faults = random_bit_faults(model, count, None, rng)
        else:  # one bit position
            faults = random_bit_faults(model, count, [int(faults_for)], rng)
        tensors = {t.name: t for t in weight_tensors(model)}
        first = faults[0]
        row = weight_row(tensors[first.tensor], first.index, len(info.members))
        group = self.group_of[info.members[row]] if row is not None else None
        record = {"stack": stack, "tensor": first.tensor, "index": first.index, "bit": first.bit, "flips": count,
                  "group": group, "left_out_accuracy": self.left_out_accuracy.get(group) if group else None}
        n_examples = n or len(self.x)
        for config in configs:
            clean = self.clean_labels(config, budget, n)
            with inject_bit_faults(self.predictors[config], {stack: faults}) as runners:
                labels, outlier_calls, loud_calls = self.predict(config, budget, n)
                if self_test and config == ("mean", True):
                    record.update(self._self_test(config, stack, runners[stack]))
            label = _label(*config)
            record[label] = {"accuracy": float((labels == self.y[:n_examples]).mean()),
                             "sdc": float((labels != clean).mean()), "outlier_calls": outlier_calls,
                             "loud_calls": loud_calls}
        return record

    def _self_test(self, config: tuple[str, bool], stack: str, corrupted) -> dict:
        """Whether the self-test caught the corrupted stack, and whether its outputs really changed (on the test
        set, beyond the self-test's tolerance)."""
        predictor = self.predictors[config]
        result = predictor.self_test([stack], quarantine=False)[stack]
        clean = self.clean_outputs[stack]
        diff = 0.0
        for start in range(0, len(self.xn), 1000):
            with np.errstate(invalid="ignore", over="ignore"):
                out = members_view(corrupted.run(self.xn[start:start + 1000]), len(clean), clean.shape[2])
                d = np.abs(out.astype(np.float64) - clean[:, start:start + 1000])
            diff = max(diff, float(d.max()) if np.isfinite(d).all() else float("inf"))
        return {"self_test_caught": not result.ok, "self_test_diff": result.max_diff,
                "test_diff": diff, "test_changed": diff > result.tolerance, "tolerance": result.tolerance}


def faults_bench(bundles: Sequence[str | Path], data: str | None = None, draws: int = 1000, random_draws: int | None
                 = None, sweep_draws: int = 10, sweep_examples: int = 2000, batch: int = 64, shuffles: int = 10,
                 seed: int = 0, cost_rounds: int = 15, progress: Progress = no_progress) -> dict:
    """Every protocol of the module docstring, for each bundle.

    Args:
        bundles: bundle directories (e.g. of runs with lam 0, 0.99 and 1).
        data: the test inputs (``DATASET:SPLIT`` or a file, as ``edgens infer --input``; default: the bundle's
            data set's test split).
        draws: harmful flips per budget.
        random_draws: random flips (default: ``draws``).
        sweep_draws: flips per bit position and per count in the sweep.
        sweep_examples: test examples in the sweep.
        batch: examples per call.
        shuffles: random orders of the test calls for the clean measurements.
        seed: seed of every draw.
        cost_rounds: rounds of the timing of detection and combiners (each times every setting once).
        progress: ``progress(stage, done, total)``.
    """
    from edgens.data.inputs import load_input

    results = []
    for bundle in bundles:
        from edgens.runtime import load_manifest

        manifest = load_manifest(bundle)
        spec = data or f"{manifest.training.dataset}:test"
        x, y, _ = load_input(spec)
        if y is None:
            raise ConfigError(f"--data {spec} has no labels; the fault bench measures accuracy")
        bench = _Bench(bundle, x, y, batch, sweep_examples)
        try:
            results.append(_bundle(bench, spec, draws, draws if random_draws is None else random_draws,
                                   sweep_draws, shuffles, seed, cost_rounds, progress))
        finally:
            bench.close()
    return {"bundles": results, "batch": batch, "seed": seed, "draws": draws, "deadline_ms": DEADLINE_MS}


def _bundle(bench: _Bench, spec: str, draws: int, random_draws: int, sweep_draws: int, shuffles: int, seed: int,
            cost_rounds: int, progress: Progress) -> dict:
    rng = np.random.default_rng(seed)
    detection = [("mean", False), ("mean", True)]
    training = bench.manifest.training
    out: dict = {"bundle": str(bench.bundle), "data": spec, "lam": training.lam, "preset": training.preset,
                 "members": len(bench.manifest.members), "general_stacks": len(bench.general),
                 "all_members_stack": bench.all_stack, "thresholds": bench.manifest.outliers.to_dict()}
    out["clean"] = _clean(bench, shuffles, rng, progress)
    out["clean"]["cost"] = _cost(bench, progress, cost_rounds)
    out["harmful"] = {}
    for budget in ("all", "deadline"):
        stage = f"{bench.bundle.name}: harmful flips ({budget})"
        rows = []
        for i in range(draws):
            progress(stage, i, draws)
            rows.append(bench.draw(budget, "harmful", detection, rng, self_test=True))
        progress(stage, draws, draws)
        out["harmful"][budget] = {"summary": _summary(rows), "draws": rows}
    rows = []
    for i in range(random_draws):
        progress(f"{bench.bundle.name}: random flips", i, random_draws)
        rows.append(bench.draw("all", "random", detection, rng, self_test=True))
    out["random"] = {"summary": _summary(rows), "draws": rows}
    out["self_test"] = _self_test_summary(out)
    out["sweep"] = _sweep(bench, sweep_draws, rng, progress)
    if any(stack.checksum is not None for stack in bench.manifest.stacks):
        from edgens.bench.checksum_faults import checksum_protocol

        out["checksums"] = checksum_protocol(bench.bundle, bench.x, bench.y, draws, sweep_draws, bench.batch, rng,
                                             progress)
    return out


def _clean(bench: _Bench, shuffles: int, rng: np.random.Generator, progress: Progress) -> dict:
    """False drops and accuracy change on clean data; detection's cost at full budget."""
    clean: dict = {}
    for budget in ("all", "deadline"):
        off = bench.clean_labels(("mean", False), budget, None)
        on = bench.clean_labels(("mean", True), budget, None)
        predictor = bench.predictors[("mean", True)]
        calls = dropped = 0
        for s in range(shuffles):
            progress(f"{bench.bundle.name}: clean calls ({budget})", s, shuffles)
            perm = rng.permutation(len(bench.x))
            for start in range(0, len(perm), bench.batch):
                prediction = predictor.predict(bench.x[perm[start:start + bench.batch]], BUDGETS[budget])
                calls += 1
                dropped += any(f.kind == "outlier" for f in prediction.failures)
        clean[budget] = {"calls": calls, "calls_with_drop": dropped, "drop_rate": dropped / calls,
                         "accuracy_off": float((off == bench.y).mean()), "accuracy_on": float((on == bench.y).mean()),
                         "accuracy_change": float((on == bench.y).mean() - (off == bench.y).mean())}
    return clean


def _cost(bench: _Bench, progress: Progress, rounds: int) -> dict:
    return detection_cost(bench.predictors[("mean", True)], bench.x, sorted({1, bench.batch}), rounds,
                          lambda done, total: progress(f"{bench.bundle.name}: cost", done, total))


def detection_cost(predictor: Predictor, x: np.ndarray, batch_sizes: Sequence[int], rounds: int,
                   progress: Callable[[int, int], None] | None = None) -> dict:
    """Per-call time at full budget with detection off and on and with each robust combiner, per batch size.

    One predictor is switched between the settings, so that every setting runs on the same sessions and threads
    (separate predictors' spinning threads disturb each other's timings); the settings' order alternates by round,
    and each ratio to the plain mean is the median over rounds of the per-round ratios.
    """
    detecting = predictor.outliers is not None
    configs = [("mean", False), ("mean", True), ("median", True), ("trimmed", True)]
    result: dict = {"rounds": rounds}
    step = 0
    for batch in batch_sizes:
        xb = x[:batch]
        times: dict[tuple[str, bool], list[float]] = {c: [] for c in configs}
        calls = max(16, 1024 // batch)
        for r in range(rounds):
            if progress is not None:
                progress(step, rounds * len(batch_sizes))
            step += 1
            for config in configs if r % 2 == 0 else reversed(configs):
                predictor.set_combining(config[0], detect_outliers=config[1])
                for _ in range(5):  # settle the threads into this setting
                    predictor.predict(xb)
                start = time.perf_counter()
                for _ in range(calls):
                    predictor.predict(xb)
                times[config].append((time.perf_counter() - start) * 1e3 / calls)
        base = np.array(times[("mean", False)])
        result[str(batch)] = {"ms_per_call": {_label(*c): float(np.median(v)) for c, v in times.items()},
                              "ratio_to_plain_mean": {_label(*c): float(np.median(np.array(v) / base))
                                                      for c, v in times.items()}}
    predictor.set_combining("mean", detect_outliers=detecting)
    return result


def _summary(rows: list[dict]) -> dict:
    off, on = _label("mean", False), _label("mean", True)
    with_group = [r for r in rows if r["left_out_accuracy"] is not None]
    gap_on = np.array([r[on]["accuracy"] - r["left_out_accuracy"] for r in with_group])
    gap_off = np.array([r[off]["accuracy"] - r["left_out_accuracy"] for r in with_group])
    summary = {"draws": len(rows), "with_group": len(with_group)}
    for label, gap in ((off, gap_off), (on, gap_on)):
        summary[label] = {
            "within_0.2_of_left_out": float((gap >= -0.002).mean()) if len(gap) else None,
            "below_left_out_by_more_than_0.2": int((gap < -0.002).sum()),
            "worst_gap": float(gap.min()) if len(gap) else None,
            "mean_gap_when_below": float(gap[gap < -0.002].mean()) if (gap < -0.002).any() else 0.0,
            "mean_sdc": float(np.mean([r[label]["sdc"] for r in rows])),
            "draws_with_sdc_over_1pct": int(sum(r[label]["sdc"] > 0.01 for r in rows)),
            "draws_with_outlier_drops": int(sum(r[label]["outlier_calls"] > 0 for r in rows)),
            "draws_with_loud_failures": int(sum(r[label]["loud_calls"] > 0 for r in rows))}
    sdc_off, sdc_on = summary[off]["mean_sdc"], summary[on]["mean_sdc"]
    summary["sdc_reduction"] = sdc_off / sdc_on if sdc_on > 0 else None
    by_bit: dict[int, list[float]] = {}
    for r in with_group:
        by_bit.setdefault(r["bit"], []).append(r[off]["accuracy"] - r["left_out_accuracy"])
    summary["plain_mean_by_bit"] = {str(b): {"draws": len(v), "below_by_more_than_0.2": int(sum(g < -0.002 for g in v)),
                                             "worst_gap": float(min(v))} for b, v in sorted(by_bit.items())}
    return summary


def _self_test_summary(out: dict) -> dict:
    rows = [r for part in (*out["harmful"].values(), out["random"]) for r in part["draws"]
            if "self_test_caught" in r and r["bit"] in EXPONENT]
    changed = [r for r in rows if r["self_test_diff"] > r["tolerance"]]
    on_test = [r for r in rows if r["test_changed"]]
    missed = [r for r in on_test if not r["self_test_caught"]]
    return {"exponent_flips": len(rows), "changed_on_self_test_inputs": len(changed),
            "caught_of_those": int(sum(r["self_test_caught"] for r in changed)),
            "changed_on_test_set": len(on_test), "caught_of_test_changed": len(on_test) - len(missed),
            "missed_max_test_diff": max((r["test_diff"] for r in missed), default=0.0),
            "missed_worst_sdc_off": max((r[_label("mean", False)]["sdc"] for r in missed), default=0.0),
            "false_alarms": int(sum(r["self_test_caught"] and not r["test_changed"] for r in rows))}


def _sweep(bench: _Bench, sweep_draws: int, rng: np.random.Generator, progress: Progress) -> dict:
    n = bench.sweep_n
    labels = [_label(*c) for c in COMBINER_CONFIGS]
    by_bit: dict[str, dict] = {}
    for bit in range(32):
        progress(f"{bench.bundle.name}: sweep by bit", bit, 32)
        rows = [bench.draw("all", str(bit), COMBINER_CONFIGS, rng, n=n) for _ in range(sweep_draws)]
        by_bit[str(bit)] = _sweep_row(rows, labels)
    by_count: dict[str, dict] = {}
    for i, count in enumerate(MULTI_COUNTS):
        progress(f"{bench.bundle.name}: sweep by flips", i, len(MULTI_COUNTS))
        rows = [bench.draw("all", "exponent", COMBINER_CONFIGS, rng, n=n, count=count) for _ in range(sweep_draws)]
        by_count[str(count)] = _sweep_row(rows, labels)
    clean = {label: float((bench.clean_labels(c, "all", n) == bench.y[:n]).mean())
             for c, label in zip(COMBINER_CONFIGS, labels, strict=True)}
    totals = {label: float(np.mean([row[label]["sdc"] for row in by_bit.values()])) for label in labels}
    return {"examples": n, "draws": sweep_draws, "clean_accuracy": clean, "by_bit": by_bit, "by_flips": by_count,
            "mean_sdc_over_bits": totals}


def _sweep_row(rows: list[dict], labels: list[str]) -> dict:
    return {label: {"sdc": float(np.mean([r[label]["sdc"] for r in rows])),
                    "accuracy": float(np.mean([r[label]["accuracy"] for r in rows])),
                    "worst_accuracy": float(min(r[label]["accuracy"] for r in rows))} for label in labels}


def faults_markdown(data: dict) -> str:
    """The bench's tables."""
    off, on = _label("mean", False), _label("mean", True)
    lines = [f"# Silent faults: bit flips in deployed stacks (calls of {data['batch']} examples)", ""]
    rows = []
    for b in data["bundles"]:
        for budget, part in b["harmful"].items():
            s = part["summary"]
            rows.append([b["bundle"], f"{b['lam']:g}", budget, s["draws"],
                         percent(s[off]["within_0.2_of_left_out"]), percent(s[on]["within_0.2_of_left_out"]),
                         f"{100 * (s[off]['worst_gap'] or 0):.2f}", f"{100 * (s[on]['worst_gap'] or 0):.2f}",
                         percent(s[off]["mean_sdc"], 3), percent(s[on]["mean_sdc"], 3), _ratio(s["sdc_reduction"])])
    lines += ["## One harmful exponent flip (a 0 among bits 23-30 set to 1)", "",
              markdown_table(["bundle", "lam", "budget", "draws", "within 0.2 of left out: off", "on",
                              "worst gap (points): off", "on", "mean SDC: off", "on", "SDC reduction"], rows), ""]
    rows = []
    for b in data["bundles"]:
        s = b["random"]["summary"]
        rows.append([b["bundle"], f"{b['lam']:g}", s["draws"], percent(s[off]["within_0.2_of_left_out"]),
                     percent(s[on]["within_0.2_of_left_out"]), percent(s[off]["mean_sdc"], 3),
                     percent(s[on]["mean_sdc"], 3),
                     s[off]["draws_with_sdc_over_1pct"], s[on]["draws_with_sdc_over_1pct"]])
    lines += ["## One random flip (any bit of any weight)", "",
              markdown_table(["bundle", "lam", "draws", "within 0.2: off", "on", "mean SDC: off", "on",
                              "draws SDC > 1%: off", "on"], rows), ""]
    rows = []
    for b in data["bundles"]:
        c = b["clean"]
        cost = c["cost"][str(data["batch"])]["ratio_to_plain_mean"]
        single = c["cost"]["1"]["ratio_to_plain_mean"]
        rows.append([b["bundle"], f"{b['lam']:g}", *[f"{c[k]['calls_with_drop']}/{c[k]['calls']}" for k in
                                                      ("all", "deadline")],
                     *[f"{100 * c[k]['accuracy_change']:+.2f}" for k in ("all", "deadline")],
                     f"{cost[on]:.3f} ({single[on]:.2f})", f"{cost[_label('median', True)]:.2f}",
                     f"{cost[_label('trimmed', True)]:.2f}"])
    lines += ["## Clean data", "", markdown_table(
        ["bundle", "lam", "calls with a drop: all", "deadline", "accuracy change (points): all", "deadline",
         f"time vs plain mean at batch {data['batch']} (batch 1): detection", "median", "trimmed"], rows), ""]
    rows = []
    for b in data["bundles"]:
        t = b["self_test"]
        rows.append([b["bundle"], f"{b['lam']:g}", t["exponent_flips"],
                     f"{t['caught_of_those']}/{t['changed_on_self_test_inputs']}",
                     f"{t['caught_of_test_changed']}/{t['changed_on_test_set']}", t["false_alarms"]])
    lines += ["## Self-test (exponent flips of the harmful and random draws)", "", markdown_table(
        ["bundle", "lam", "exponent flips", "caught / changed on its inputs", "caught / changed on the test set",
         "false alarms"], rows), ""]
    for b in data["bundles"]:
        sweep = b["sweep"]
        labels = list(sweep["clean_accuracy"])
        rows = [[bit, *[percent(row[label]["sdc"], 2) for label in labels]] for bit, row in sweep["by_bit"].items()]
        rows += [[f"{count} exponent flips", *[percent(row[label]["sdc"], 2) for label in labels]]
                 for count, row in sweep["by_flips"].items()]
        rows.append(["mean over bits", *[percent(sweep["mean_sdc_over_bits"][label], 3) for label in labels]])
        rows.append(["clean accuracy", *[percent(sweep["clean_accuracy"][label]) for label in labels]])
        lines += [f"## Sweep, {b['bundle']} (lam {b['lam']:g}): SDC by flipped bit ({sweep['draws']} draws each, "
                  f"{sweep['examples']} examples)", "", markdown_table(["bit", *labels], rows), ""]
    for b in data["bundles"]:
        if "checksums" in b:
            from edgens.bench.checksum_faults import checksum_markdown

            lines += checksum_markdown(b["bundle"], b["checksums"])
    return "\n".join(lines)



def _ratio(value: float | None) -> str:
    return "no SDC left" if value is None else f"{value:.1f}x"
