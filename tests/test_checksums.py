"""Checksums inside the exported stacks (algorithm-based fault tolerance): the checked graphs against numpy
re-computations from the run's own weights, a flipped weight in every layer and every stack kind caught at every
budget, no false alarm on clean data, and old (unchecked) bundles still served."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from edgens.config import TrainConfig
from edgens.data import load_dataset
from edgens.export import ExportOptions, export_bundle
from edgens.runtime import Predictor
from edgens.runtime.bundle import load_manifest
from edgens.runtime.checksums import SAFETY, input_bound
from edgens.runtime.faults import BitFault, Fault, inject_bit_faults, inject_faults
from edgens.train import train

EXPONENT_TOP = 30  # a 0 -> 1 flip of bit 30 makes a weight of magnitude < 2 about 2**128 times larger


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, fashion_mnist_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    train(TrainConfig(preset="mlp-16x64", n_members=12, lam=0.95, epochs=1, train_limit=2000, val_size=1000,
                      data_dir=str(fashion_mnist_dir), seed=3), out)
    return out


@pytest.fixture(scope="module")
def checked(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("checked") / "bundle"
    export_bundle(tiny_run, out, ExportOptions(stack_size=4, specialist_size=3, random_draws=2))
    return out


@pytest.fixture(scope="module")
def data(fashion_mnist_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    dataset = load_dataset("fashion-mnist", str(fashion_mnist_dir), val_size=1000)
    return dataset.test_x[:400], dataset.test_y[:400]


def _normalised(bundle: Path, raw: np.ndarray) -> np.ndarray:
    manifest = load_manifest(bundle)
    x = (raw.astype(np.float64) - manifest.preprocessing.mean[0]) / manifest.preprocessing.std[0]
    return x.reshape(len(raw), 1, 28, 28).astype(np.float32)


def test_checked_graphs_against_numpy_from_the_runs_weights(tiny_run: Path, checked: Path,
                                                            data: tuple[np.ndarray, np.ndarray]) -> None:
    manifest = load_manifest(checked)
    weights = {k: v.double().numpy() for k, v in torch.load(tiny_run / "checkpoints" / "best.pt",
                                                              map_location="cpu", weights_only=False)["model"].items()}
    x = _normalised(checked, data[0][:64]).reshape(64, -1).astype(np.float64)
    k = manifest.n_outputs
    assert {stack.role for stack in manifest.stacks if stack.checksum is not None} == {"general", "prefix",
                                                                                      "specialist"}
    for stack in manifest.stacks:
        members, m = stack.members, len(stack.members)
        h = weights["first.weight"].shape[0] // len(manifest.members)
        w1 = np.concatenate([weights["first.weight"][j * h:(j + 1) * h] for j in members])  # (m h, n)
        b1 = np.concatenate([weights["first.bias"][j * h:(j + 1) * h] for j in members])
        w2, b2 = weights["rest.0.weight"][members], weights["rest.0.bias"][members]  # (m, h, K), (m, 1, K)
        model = onnx.load(str(checked / stack.file))
        init = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
        hidden_weight = next(v for v in init.values() if v.shape == ((m + 1) * h, w1.shape[1]))
        # the check member's first unit: minus the sum of every other unit's weights; its other units zero
        np.testing.assert_allclose(hidden_weight[:m * h], w1, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(hidden_weight[m * h], -w1.sum(0), rtol=1e-5, atol=1e-5)
        assert not hidden_weight[m * h + 1:].any()
        # numpy's own forward pass of the stack, with its checksums
        z = x @ w1.T + b1  # (B, m h)
        hid = np.maximum(z, 0).reshape(len(x), m, h).transpose(1, 0, 2)
        eta = hid @ w2 + b2  # (m, B, K)
        check_col = hid @ -w2.sum(-1, keepdims=True) - b2.sum(-1, keepdims=True)
        w2c = np.concatenate([w2, -w2.sum(-1, keepdims=True)], -1)
        b2c = np.concatenate([b2, -b2.sum(-1, keepdims=True)], -1)
        magnitude = hid @ np.abs(w2c).sum(-1, keepdims=True) + np.abs(b2c).sum(-1, keepdims=True)
        session = ort.InferenceSession(str(checked / stack.file), providers=["CPUExecutionProvider"])
        got, checks = session.run(None, {"x": x.reshape(64, 1, 28, 28).astype(np.float32)})
        assert got.shape == (m + 1, 64, k + 2) and checks.shape == (64, 1)
        np.testing.assert_allclose(got[:m, :, :k], eta, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got[:m, :, k], check_col[..., 0], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got[:m, :, k + 1], magnitude[..., 0], rtol=1e-4, atol=1e-4)
        assert not got[m].any()  # the check row: zero until the runner writes the hidden residual into it
        # the hidden residual is rounding noise next to the magnitudes it sums
        scale = np.abs(x) @ np.abs(hidden_weight).sum(0) + np.abs(np.concatenate([b1, [-b1.sum()]])).sum()
        assert (np.abs(checks[:, 0]) < 1e-5 * scale).all()
        info = stack.checksum
        assert info is not None and info.hidden_units == (m + 1) * h and info.hidden_terms == w1.shape[1] + 1
        assert info.hidden_weight_abs == pytest.approx(np.abs(hidden_weight).sum(), rel=1e-6)


def _stack_plans(manifest) -> list[tuple[str, dict]]:
    """A budget that runs each kind of stack first: a general stack, the prefix stack of all, a specialist."""
    first = manifest.general_stacks[0]
    return [(first.name, {"members": len(first.members)}), (manifest.prefix_stacks[-1].name, {}),
            (manifest.specialists[0].stack, {"task": manifest.specialists[0].task})]


@pytest.mark.parametrize("layer", ["hidden weight", "hidden bias", "output weight", "output bias",
                                   "hidden check row", "output check column"])
def test_a_flipped_weight_in_each_layer_of_each_stack_kind_is_caught(checked: Path, layer: str,
                                                                     data: tuple[np.ndarray, np.ndarray]) -> None:
    manifest = load_manifest(checked)
    k = manifest.n_outputs
    with Predictor.load(checked, quarantine_after=None, detect_outliers=False) as predictor:
        for name, budget in _stack_plans(manifest):
            stack = manifest.stack(name)
            m = len(stack.members)
            model = onnx.load(str(checked / stack.file))
            shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
            hidden_weight = next(t for t, s in shapes.items() if len(s) == 2)
            hidden_bias = next(t for t, s in shapes.items() if len(s) == 1 and s[0] == shapes[hidden_weight][0])
            output_weight = next(t for t, s in shapes.items() if len(s) == 3 and s[1] > 1)
            output_bias = next(t for t, s in shapes.items() if len(s) == 3 and s[1] == 1)
            h = shapes[output_weight][1]
            n = shapes[hidden_weight][1]
            index, tensor, expected = {
                "hidden weight": (2 * n + 100, hidden_weight, "first"),
                "hidden bias": (1, hidden_bias, "first"),
                "output weight": ((1 * h + 2) * (k + 2) + 3, output_weight, "rest.0"),
                "output bias": (k + 2 + 4, output_bias, "rest.0"),
                "hidden check row": (m * h * n + 300, hidden_weight, "first"),
                "output check column": ((1 * h + 1) * (k + 2) + k, output_weight, "rest.0"),
            }[layer]
            clean = predictor.predict(data[0], **budget)
            with inject_bit_faults(predictor, {name: [BitFault(tensor, index, EXPONENT_TOP, "stuck-1")]}):
                prediction = predictor.predict(data[0], **budget)
            failures = [f for f in prediction.failures if f.stack == name]
            assert [f.kind for f in failures] == ["checksum"], (name, layer, prediction.failures)
            assert f"layer {expected}:" in failures[0].message
            # the call still answered: without the stack, from the members that replace it
            assert name not in prediction.stacks_run and prediction.stacks_run
            if budget.get("task"):  # a specialist's members also live in the general stacks: the same answer
                np.testing.assert_allclose(prediction.probabilities, clean.probabilities, atol=1e-4)


def test_a_one_stack_budget_with_a_corrupted_stack_answers_as_if_it_were_left_out(
        checked: Path, tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    manifest = load_manifest(checked)
    first = manifest.general_stacks[0]
    budget = {"members": len(first.members)}
    # the same bundle with the stack's file damaged: excluded at load, as if left out
    without = tmp_path / "without"
    shutil.copytree(checked, without)
    (without / first.file).write_bytes(b"not a model")
    with Predictor.load(without) as predictor:
        expected = predictor.predict(data[0], **budget)
    assert first.name not in expected.stacks_run
    with Predictor.load(checked, detect_outliers=False) as predictor:
        model = onnx.load(str(checked / first.file))
        hidden_weight = next(t.name for t in model.graph.initializer if len(t.dims) == 2)
        with inject_bit_faults(predictor, {first.name: [BitFault(hidden_weight, 5, EXPONENT_TOP, "stuck-1")]}):
            got = predictor.predict(data[0], **budget)
    assert got.stacks_run == expected.stacks_run
    np.testing.assert_allclose(got.probabilities, expected.probabilities, atol=1e-6)


def test_no_false_alarm_on_clean_data_at_batch_1_and_64(checked: Path, fashion_mnist_dir: Path) -> None:
    dataset = load_dataset("fashion-mnist", str(fashion_mnist_dir), val_size=1000)
    manifest = load_manifest(checked)
    with Predictor.load(checked) as predictor:
        names = [stack.name for stack in manifest.stacks]
        # every stack on the whole validation split in batches of 64, and one at a time on 100 test examples
        outputs = predictor.stack_outputs(dataset.val_x, names, batch_size=64)
        assert sorted(outputs) == sorted(names)
        for raw in dataset.test_x[:100]:
            for budget in ({}, {"members": 0.25}, {"task": manifest.specialists[0].task}, {"deadline_ms": 1000}):
                prediction = predictor.predict(raw[None], **budget)
                assert not prediction.failures, prediction.failures
    # the bounds from numerics (recomputed here from each graph's weights) are far above clean residuals
    pool = Predictor.load(checked).pool
    x = _normalised(checked, dataset.val_x)
    for name, check in pool.checksums.items():
        out = pool.runners[name].run(x)
        total = out[:check.rows].sum(0, dtype=np.float64)
        hidden = out[check.rows, :, check.k].astype(np.float64)
        residual = total[:, :check.k + 1].sum(1)
        limit = _output_bound(manifest, name, total[:, check.k + 1]) + _hidden_bound(checked, manifest, name, x)
        assert (np.abs(residual + hidden) / limit).max() < 0.25, name
    assert input_bound(manifest.input, manifest.preprocessing) > np.abs(x).max()


def _hidden_weights(bundle: Path, stack) -> tuple[np.ndarray, np.ndarray]:
    model = onnx.load(str(bundle / stack.file))
    init = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    weight = next(v for v in init.values() if v.ndim == 2)
    return weight, next(v for v in init.values() if v.ndim == 1 and len(v) == len(weight))


def _hidden_bound(bundle: Path, manifest, name: str, x: np.ndarray) -> np.ndarray:
    """Per example: SAFETY u (sqrt(n + 1) + sqrt(units) + 1) (sum_j |x_j| sum_r |W_rj| + sum |b|)."""
    weight, bias = _hidden_weights(bundle, manifest.stack(name))
    units, n = weight.shape
    gain = SAFETY * 2.0 ** -24 * (np.sqrt(n + 1) + np.sqrt(units) + 1)
    return gain * (np.abs(x.reshape(len(x), -1)).astype(np.float64) @ np.abs(weight).sum(0) + np.abs(bias).sum())


def _output_bound(manifest, name: str, magnitude: np.ndarray) -> np.ndarray:
    """SAFETY u (sqrt(h + 1) + sqrt(rows + 1) + sqrt(K + 1)) times the graph's magnitude column."""
    stack = manifest.stack(name)
    h = stack.checksum.output_terms - 1
    k = manifest.n_outputs
    return SAFETY * 2.0 ** -24 * (np.sqrt(h + 1) + np.sqrt(len(stack.members) + 1) + np.sqrt(k + 1)) * magnitude


def test_the_hidden_bound_follows_each_examples_input(checked: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    """A flip that doubles one hidden weight moves the hidden sum by w x_j: below the bound of the worst accepted
    input (what a graph whose weights are unknown gets), above the bound of the examples' own inputs; caught."""
    manifest = load_manifest(checked)
    stack = manifest.general_stacks[0]
    weight, _ = _hidden_weights(checked, stack)
    x = _normalised(checked, data[0][:64])
    flat = x.reshape(len(x), -1).astype(np.float64)
    per_example = _hidden_bound(checked, manifest, stack.name, x)
    with Predictor.load(checked, quarantine_after=None, detect_outliers=False) as predictor:
        worst_input = predictor.pool.checksums[stack.name].worst_input_limit
        # a member weight whose doubling (exponent bit 23: 0 -> 1 doubles it) moves the sum by w x_j, which is
        # between the two bounds for some example
        rows = len(stack.members) * (weight.shape[0] // (len(stack.members) + 1))
        bits = weight[:rows].astype(np.float32).view(np.uint32)
        moved = np.abs(weight[:rows, None, :] * flat[None])  # (rows, B, n): w_rj x_bj
        between = (moved > 2 * per_example[None, :, None]).any(1) & (moved.max(1) < worst_input / 2)
        candidates = np.argwhere(between & ((bits & (1 << 23)) == 0))
        assert len(candidates), "no weight whose doubling falls between the bounds"
        row, column = candidates[np.argmax(np.abs(weight[candidates[:, 0], candidates[:, 1]]))]
        index = int(row) * weight.shape[1] + int(column)
        tensor = next(t.name for t in onnx.load(str(checked / stack.file)).graph.initializer if len(t.dims) == 2)
        with inject_bit_faults(predictor, {stack.name: [BitFault(tensor, index, 23, "stuck-1")]}):
            prediction = predictor.predict(data[0][:64], members=len(stack.members))
    failures = [f for f in prediction.failures if f.stack == stack.name]
    assert [f.kind for f in failures] == ["checksum"] and "layer first:" in failures[0].message


def test_a_checksum_failure_quarantines_only_when_the_self_test_confirms_it(
        checked: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    manifest = load_manifest(checked)
    name = manifest.prefix_stacks[-1].name
    m = len(manifest.stack(name).members)
    with Predictor.load(checked, detect_outliers=False) as predictor:
        # one corrupted activation in one call (a transient fault): left out of that call, cleared by the self-test
        with inject_faults(predictor, {name: Fault("flip", bit=EXPONENT_TOP, row=m - 1, times=1)}):
            prediction = predictor.predict(data[0])
        assert [f.kind for f in prediction.failures] == ["checksum"]
        health = predictor.health()[name]
        assert health.status == "ok" and health.cleared == 1
        # a corrupted weight (of another stack: one that passed its self-test is not rerun for a while): the
        # self-test fails too, so the stack is quarantined at once
        specialist = manifest.specialists[0]
        model = onnx.load(str(checked / manifest.stack(specialist.stack).file))
        output_weight = next(t.name for t in model.graph.initializer if len(t.dims) == 3 and t.dims[1] > 1)
        with inject_bit_faults(predictor, {specialist.stack: [BitFault(output_weight, 7, EXPONENT_TOP, "stuck-1")]}):
            prediction = predictor.predict(data[0], task=specialist.task)
            assert [f.kind for f in prediction.failures] == ["checksum"]
            assert predictor.health()[specialist.stack].status == "quarantined"


def test_unchecked_bundles_still_load_and_run(tiny_run: Path, tmp_path: Path,
                                              data: tuple[np.ndarray, np.ndarray]) -> None:
    out = tmp_path / "plain"
    export_bundle(tiny_run, out, ExportOptions(stack_size=4, specialist_size=0, random_draws=2, checksums=False))
    raw = json.loads((out / "manifest.json").read_text())
    assert all("checksum" not in stack for stack in raw["stacks"])  # what bundles before checksums look like
    manifest = load_manifest(out)
    with Predictor.load(out) as predictor:
        assert not predictor.pool.checksums
        prediction = predictor.predict(data[0])
    assert (prediction.members_used == len(manifest.members)).all() and not prediction.failures
    session = ort.InferenceSession(str(out / manifest.stacks[0].file), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["eta"]


def test_the_fault_bench_measures_the_checksums(checked: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    from edgens.bench.analysis import no_progress
    from edgens.bench.checksum_faults import checksum_markdown, checksum_protocol

    result = checksum_protocol(checked, data[0][:128], data[1][:128], draws=4, sweep_draws=1, batch=64,
                               rng=np.random.default_rng(0), progress=no_progress, examples=128)
    manifest = load_manifest(checked)
    assert set(result["harmful"]) == {"all", "members=0.1", f"task {manifest.specialists[0].task}", "confidence=0.9",
                                      "deadline (anytime caller)"}
    assert not any(result["clean_false_alarms"].values())
    for part in result["harmful"].values():
        for row in part["draws"]:  # an exponent 0 -> 1 flip: what it did unprotected and checked, from the labels
            assert row["bit"] in range(23, 31) and 0 <= row["sdc_on"] <= 1 and 0 <= row["sdc_off"] <= 1
            if row["caught"]:  # left out like a stack that raised: the same answer as the left-out call
                assert row["accuracy_on"] == pytest.approx(row["accuracy_left_out"], abs=1 / 128 + 1e-9)
        summary = part["summary"]
        assert summary["harmful"] == sum(r["sdc_off"] > 0 for r in part["draws"])
    assert sorted(result["sweep"]["by_bit"], key=int) == [str(b) for b in range(32)]
    assert "Checksums" in "\n".join(checksum_markdown("bundle", result))


def test_an_overflowed_magnitude_fails_the_check(checked: Path) -> None:
    """A hidden unit grown 2**128-fold can overflow a member's magnitude column to inf while its class outputs stay
    finite (measured: a flipped weight of a specialist, answers 92% wrong); g * inf would pass any residual."""
    manifest = load_manifest(checked)
    with Predictor.load(checked) as predictor:
        check = next(iter(predictor.pool.checksums.values()))
    k = manifest.n_outputs
    total = np.zeros((3, k + 2), dtype=np.float32)
    total[:, k + 1] = 1.0
    check_row = np.zeros_like(total)
    assert check.failure(total, check_row) is None
    total[1, 0], total[1, k + 1] = 3e37, np.inf  # a residual no rounding explains, beside an infinite magnitude
    with np.errstate(invalid="ignore", over="ignore"):  # as the tally calls it
        problem = check.failure(total, check_row)
    assert problem is not None and "overflowed" in problem


def test_with_a_stack_timeout_an_exported_bundle_runs_in_the_callers_thread_and_still_catches_flips(
        checked: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    """Export's layout (prefix stacks, specialists), every budget kind: with a stack timeout the onnxruntime stacks
    run under the watchdog, not in per-stack worker threads, answer as without a timeout, and a flipped weight in
    the stack a budget runs is still caught."""
    import threading

    x = data[0][:64]
    budgets = [{}, {"members": 0.3}, {"task": 0}, {"deadline_ms": 1000}, {"confidence": 0.9}]
    with Predictor.load(checked, detect_outliers=False) as plain:
        expected = [plain.predict(x, **budget) for budget in budgets]
    before = {thread.name for thread in threading.enumerate()}
    with Predictor.load(checked, detect_outliers=False, stack_timeout_ms=5000, lanes=1) as predictor:
        got = [predictor.predict(x, **budget) for budget in budgets]
        started = {thread.name for thread in threading.enumerate()} - before
        first = got[1].stacks_run[0]
        model = onnx.load(str(checked / load_manifest(checked).stack(first).file))
        hidden_weight = next(t.name for t in model.graph.initializer if len(t.dims) == 2)
        with inject_bit_faults(predictor, {first: [BitFault(hidden_weight, 5, EXPONENT_TOP, "stuck-1")]}):
            flipped = predictor.predict(x, **budgets[1])
    assert started <= {"edgens-watchdog"}, started  # no "edgens-<stack>" worker thread
    for want, answer in zip(expected, got, strict=True):
        assert answer.failures == [] and answer.stacks_run == want.stacks_run
        np.testing.assert_allclose(answer.probabilities, want.probabilities, atol=1e-6)
    assert [(f.stack, f.kind) for f in flipped.failures] == [(first, "checksum")]
