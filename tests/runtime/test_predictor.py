"""Predictions equal the mean of the selected members' natural parameters, computed independently in numpy from
the weights the ONNX stacks were built from; each budget selects what it says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from bundle_factory import SyntheticBundle, make_bundle, make_data

from edgens.errors import ConfigError, InputError
from edgens.runtime import LatencyTable, Predictor, save_latency_table
from edgens.runtime.faults import inject_faults
from edgens.runtime.latency import StackLatency

ATOL = 2e-5  # float32 graphs against float64 numpy


def _check(prediction, bundle: SyntheticBundle, x: np.ndarray, ids: list[int]) -> None:
    expected = bundle.expected(x, ids)
    np.testing.assert_allclose(prediction.mean, expected, atol=ATOL, rtol=1e-5)
    np.testing.assert_allclose(prediction.eta, bundle.expected_eta(x, ids), atol=ATOL, rtol=1e-5)
    if bundle.family == "categorical":
        np.testing.assert_array_equal(prediction.labels, expected.argmax(axis=1))
    assert (prediction.members_used == len(ids)).all()


def test_all_members_by_default(predictor: Predictor, bundle: SyntheticBundle, data) -> None:
    x, _ = data
    prediction = predictor.predict(x)
    _check(prediction, bundle, x, [0, 1, 2, 3, 4, 5])
    np.testing.assert_allclose(prediction.probabilities.sum(axis=1), 1.0, rtol=1e-6)
    assert prediction.stacks_run == ["general-000", "general-001", "general-002"]
    assert prediction.failures == [] and prediction.elapsed_ms > 0
    assert set(prediction.stack_ms) == set(prediction.stacks_run)


def test_the_ensemble_is_not_just_one_member(bundle: SyntheticBundle, data) -> None:
    # Guards the other tests: if members agreed exactly, a wrong member selection could go unnoticed.
    x, _ = data
    assert np.abs(bundle.expected(x, [0]) - bundle.expected(x, [0, 1, 2, 3, 4, 5])).max() > 1e-2
    assert np.abs(bundle.expected(x, [0, 1]) - bundle.expected(x, [0, 1, 2])).max() > 1e-2


@pytest.mark.parametrize(("k", "ids"), [(1, [0]), (2, [0, 1]), (3, [0, 1, 2]), (5, [0, 1, 2, 3, 4]),
                                        (6, [0, 1, 2, 3, 4, 5]), (0.5, [0, 1, 2]), (1.0, [0, 1, 2, 3, 4, 5])])
def test_members_budget_takes_the_first_k_of_the_order(predictor: Predictor, bundle: SyntheticBundle, data,
                                                       k: int | float, ids: list[int]) -> None:
    x, _ = data
    prediction = predictor.predict(x, members=k)
    _check(prediction, bundle, x, ids)
    assert len(prediction.stacks_run) == -(-len(ids) // 2)  # a stack cut by k still runs once


def test_members_follow_the_bundles_order_not_ids(tmp_path: Path, data) -> None:
    bundle = make_bundle(tmp_path / "b", n_members=5, per_stack=[2, 3], hidden=0, order=[3, 1, 4, 0, 2],
                         specialists={})
    x, _ = data
    with Predictor.load(bundle.path, "onnxruntime") as predictor:
        _check(predictor.predict(x, members=3), bundle, x, [3, 1, 4])
        _check(predictor.predict(x), bundle, x, [3, 1, 4, 0, 2])
        assert predictor.predict(x, members=2).stacks_run == ["general-000"]


def test_flops_budget_runs_the_stacks_that_fit(predictor: Predictor, bundle: SyntheticBundle, data) -> None:
    x, _ = data
    per_stack = bundle.manifest.stacks[0].flops
    _check(predictor.predict(x, flops=per_stack), bundle, x, [0, 1])
    _check(predictor.predict(x, flops=2.5 * per_stack), bundle, x, [0, 1, 2, 3])
    _check(predictor.predict(x, flops=100 * per_stack), bundle, x, [0, 1, 2, 3, 4, 5])
    with pytest.raises(ConfigError, match=r"flops=10 fits no stack: the first available stack, general-000, needs"):
        predictor.predict(x, flops=10)


def test_latency_budget_uses_the_profiled_table(predictor: Predictor, bundle: SyntheticBundle, data) -> None:
    x, _ = data
    with pytest.raises(ConfigError, match=r"run `edgens profile BUNDLE` first"):
        predictor.predict(x, latency_ms=5)
    # A made-up table for this device: stack i costs (i + 1) ms at batch 32 (per example 1/32 of that at batch 1).
    table = LatencyTable(**predictor.backend.describe())
    for i, name in enumerate(["general-000", "general-001", "general-002", "specialist-3"]):
        table.stacks[name] = {1: StackLatency((i + 1) / 32, 0.0), 32: StackLatency(i + 1.0, 0.0)}
    save_latency_table(bundle.path, table)
    predictor.reload_latency()
    _check(predictor.predict(x, latency_ms=1.5), bundle, x, [0, 1])  # 1 ms fits, 1 + 2 ms does not
    _check(predictor.predict(x, latency_ms=3.0), bundle, x, [0, 1, 2, 3])
    _check(predictor.predict(x, latency_ms=6.0), bundle, x, [0, 1, 2, 3, 4, 5])
    # Batch 1 is 1/32 of the cost: all three stacks (6/32 ms) fit in 0.2 ms.
    _check(predictor.predict(x[:1], latency_ms=0.2), bundle, x[:1], [0, 1, 2, 3, 4, 5])
    with pytest.raises(ConfigError, match="latency_ms=0.5 fits no stack"):
        predictor.predict(x, latency_ms=0.5)


def test_a_table_of_another_device_is_not_used(predictor: Predictor, bundle: SyntheticBundle, data) -> None:
    table = LatencyTable(backend="onnxruntime", providers=["CPUExecutionProvider"], device="some other board",
                         stacks={"general-000": {1: StackLatency(0.1, 0.1)}})
    save_latency_table(bundle.path, table)
    predictor.reload_latency()
    assert predictor.latency_table is None
    with pytest.raises(ConfigError, match="edgens profile"):
        predictor.predict(data[0], latency_ms=5)


@pytest.mark.parametrize("task", ["class-3", 3, "3", "Dress"])
def test_task_budget_runs_the_specialist(predictor: Predictor, bundle: SyntheticBundle, data, task) -> None:
    x, _ = data
    prediction = predictor.predict(x, task=task)
    _check(prediction, bundle, x, [4, 5])
    assert prediction.stacks_run == ["specialist-3"] and prediction.task == "class-3"


def test_unknown_task_lists_the_tasks(predictor: Predictor, data) -> None:
    with pytest.raises(ConfigError, match=r"unknown task 'class-9'; this bundle's specialists: class-3 \(Dress\)"):
        predictor.predict(data[0], task="class-9")


def test_task_falls_back_to_general_stacks_when_its_stack_is_lost(bundle: SyntheticBundle, data) -> None:
    (bundle.path / "stacks" / "specialist-3.onnx").unlink()
    x, _ = data
    with Predictor.load(bundle.path, "onnxruntime") as predictor:
        prediction = predictor.predict(x, task="class-3")
    _check(prediction, bundle, x, [4, 5])
    assert prediction.stacks_run == ["general-002"]


@pytest.mark.parametrize("family", ["gaussian", "poisson"])
def test_gaussian_and_poisson_bundles(tmp_path: Path, family: str, data) -> None:
    bundle = make_bundle(tmp_path / family, n_members=4, per_stack=2, hidden=4, family=family)
    x, _ = data
    with Predictor.load(bundle.path, "onnxruntime") as predictor:
        prediction = predictor.predict(x)
        _check(prediction, bundle, x, [0, 1, 2, 3])
        assert prediction.labels is None and prediction.mean.shape == (len(x), 1)
        with pytest.raises(ConfigError, match="predicts means, not probabilities"):
            prediction.probabilities  # noqa: B018
        with pytest.raises(ConfigError, match=f"confidence budgets need a categorical bundle, this one is {family}"):
            predictor.predict(x, confidence=0.9)
    if family == "poisson":
        assert (prediction.mean > 0).all()


def test_multi_channel_input_is_normalised_per_channel(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "rgb", n_members=2, per_stack=2, hidden=4, input_shape=(3, 4, 4),
                         specialists={})
    assert bundle.mean[0] != bundle.mean[2]
    x = np.random.default_rng(0).integers(0, 256, size=(5, 3, 4, 4)).astype(np.uint8)
    with Predictor.load(bundle.path, "onnxruntime") as predictor:
        _check(predictor.predict(x), bundle, x, [0, 1])
        with pytest.raises(InputError, match=r"input: received shape \(5, 4, 4\), expected \(B, 3, 4, 4\)$"):
            predictor.predict(x[:, 0])  # no implicit channel axis for 3-channel input


def test_input_forms_give_the_same_prediction(predictor: Predictor, bundle: SyntheticBundle, data) -> None:
    x, _ = data
    reference = bundle.expected(x, [0, 1, 2, 3, 4, 5])
    for form in (x, x[:, 0], x.astype(np.float32), x.astype(np.float64)[:, 0], x.astype(np.int64),
                 np.asfortranarray(x[:, 0]), x.tolist()):
        np.testing.assert_allclose(predictor.predict(form).mean, reference, atol=ATOL)


def test_caller_array_is_not_modified(predictor: Predictor, data) -> None:
    x = data[0].astype(np.float32)
    before = x.copy()
    predictor.predict(x)
    np.testing.assert_array_equal(x, before)


def test_one_budget_at_a_time(predictor: Predictor, data) -> None:
    with pytest.raises(ConfigError, match=r"give one budget at a time, got members=2 and deadline_ms=5"):
        predictor.predict(data[0], members=2, deadline_ms=5)


@pytest.mark.parametrize(("budget", "message"), [
    ({"members": 0}, "members: expected a count >= 1"),
    ({"members": 7}, "members: the bundle has 6 members, got members=7"),
    ({"members": 1.5}, r"members: expected a fraction in \(0, 1\]"),
    ({"members": True}, "members: expected a finite number, got True"),
    ({"flops": -1}, "flops: expected a number > 0, got -1"),
    ({"deadline_ms": 0}, "deadline_ms: expected a number > 0, got 0"),
    ({"latency_ms": float("nan")}, "latency_ms: expected a finite number, got nan"),
    ({"confidence": 1.2}, r"confidence: expected a probability in \(0, 1\], got 1.2"),
    ({"task": 2.5}, "task: expected a task name, class index or class name, got 2.5"),
])
def test_bad_budgets_are_refused_before_any_stack_runs(predictor: Predictor, data, budget, message) -> None:
    with inject_faults(predictor, {name: "raise" for name in predictor.runners}) as faulty:
        with pytest.raises(ConfigError, match=message):
            predictor.predict(data[0], **budget)
    assert all(runner.calls == 0 for runner in faulty.values())


def test_larger_batches_than_the_synthetic_default(predictor: Predictor, bundle: SyntheticBundle) -> None:
    x, _ = make_data(300, seed=3)
    _check(predictor.predict(x, members=4), bundle, x, [0, 1, 2, 3])
    _check(predictor.predict(x[:1]), bundle, x[:1], [0, 1, 2, 3, 4, 5])


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_row_sum_is_the_sum_over_rows_for_every_layout(dtype) -> None:
    from edgens.runtime.tally import row_sum

    rng = np.random.default_rng(3)
    rows = rng.normal(size=(257, 5, 12)).astype(dtype)
    want = rows.astype(np.float64).sum(axis=0)
    tolerance = {np.float16: 0.5, np.float32: 1e-4, np.float64: 1e-10}[dtype]
    for view in (rows, rows[::2], rows[:, :, :10]):  # contiguous, strided rows, strided columns
        got = row_sum(view)
        assert got.shape == view.shape[1:] and got.dtype == dtype
        np.testing.assert_allclose(got, view.astype(np.float64).sum(axis=0), atol=tolerance)
    assert np.abs(row_sum(rows) - want).max() < tolerance
    rows[3, 2, 4] = np.inf
    assert np.isinf(row_sum(rows)[2, 4])
