"""Silent faults: weight bit flips injected into deployed ONNX stacks, detection of outlier groups, robust
combiners and the self-test, checked against numpy re-computations from the bundle's own weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from bundle_factory import Member, SyntheticBundle, make_bundle, make_data
from onnx import numpy_helper

from edgens.errors import BundleError, ConfigError
from edgens.fileio import sha256_file
from edgens.runtime import Predictor, load_manifest
from edgens.runtime.faults import (EXPONENT_BITS, BitFault, Fault, apply_bit_faults, bit_faults_at_rate,
                                   inject_bit_faults, inject_faults, random_bit_faults, weight_row)
from edgens.runtime.bundle import Manifest
from edgens.runtime.onnx_weights import weight_tensors
from edgens.runtime import selftest
from edgens.runtime.outliers import find_outliers, fit_thresholds

GENERAL = ["general-000", "general-001", "general-002", "general-003"]


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> SyntheticBundle:
    """16 members in 4 general stacks of 4, prefix stacks of 8 and 16, outlier thresholds and self-test data."""
    return make_bundle(tmp_path_factory.mktemp("guarded") / "bundle", n_members=16, per_stack=4, hidden=8,
                       prefixes=[8, 16], outliers=True, self_test=True)


@pytest.fixture(scope="module")
def test_x() -> np.ndarray:
    return make_data(64, seed=17)[0]


def _initializers(model: bytes) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load_from_string(model).graph.initializer}


def _boost(tensor: str, index: int) -> list[BitFault]:
    """Exponent bit 30 stuck at 1 and bit 29 at 0: a weight of magnitude in [2**-63, 2) grows by exactly 2**64
    (huge but finite outputs, as the harmful flips make)."""
    return [BitFault(tensor, index, 30, "stuck-1"), BitFault(tensor, index, 29, "stuck-0")]


def _corrupted(bundle: SyntheticBundle, member: int, hidden_unit: int, output: int) -> dict[int, Member]:
    """The bundle's members with one member's output weight times 2**64 (see :func:`_boost`), in numpy."""
    members = dict(bundle.members)
    old = members[member]
    w2 = old.w2.copy()
    w2[hidden_unit, output] *= np.float32(2.0 ** 64)
    members[member] = Member(old.w1, old.b1, w2, old.b2)
    return members


def _softmax(eta: np.ndarray) -> np.ndarray:
    e = np.exp(eta - eta.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ------------------------------------------------------------------------------------------------ fault injection


def test_bit_faults_change_exactly_the_chosen_bits(guarded: SyntheticBundle) -> None:
    model = (guarded.path / "stacks/general-001.onnx").read_bytes()
    faults = [BitFault("w2", 5, 28), BitFault("w1", 1000, 31), BitFault("w1", 7, 0, "stuck-1"),
              BitFault("b2", 3, 30, "stuck-0")]
    corrupted = apply_bit_faults(model, faults)
    assert len(corrupted) == len(model)
    before, after = _initializers(model), _initializers(corrupted)  # read back by the onnx package itself
    assert before.keys() == after.keys()
    expected = {name: value.copy() for name, value in before.items()}
    words = {name: value.view(np.uint32).reshape(-1) for name, value in expected.items() if value.dtype == np.float32}
    words["w2"][5] ^= np.uint32(1 << 28)
    words["w1"][1000] ^= np.uint32(1 << 31)
    words["w1"][7] |= np.uint32(1)
    words["b2"][3] &= ~np.uint32(1 << 30)
    for name in before:
        np.testing.assert_array_equal(after[name].view(np.uint8), expected[name].view(np.uint8), err_msg=name)
    # only the bytes of the changed words differ
    diff = np.flatnonzero(np.frombuffer(model, np.uint8) != np.frombuffer(corrupted, np.uint8))
    tensors = {t.name: t for t in weight_tensors(model)}
    allowed = {tensors[f.tensor].offset + 4 * f.index + byte for f in faults for byte in range(4)}
    assert set(diff.tolist()) <= allowed and len(diff) >= 2


def test_weight_tensors_read_like_the_onnx_package(guarded: SyntheticBundle) -> None:
    model = (guarded.path / "stacks/prefix-0016.onnx").read_bytes()
    reference = _initializers(model)
    found = weight_tensors(model)
    assert [t.name for t in found] == ["w1", "b1", "w2", "b2"]  # the int64 shape constant is not a weight
    for tensor in found:
        np.testing.assert_array_equal(tensor.values(model), reference[tensor.name])
    with pytest.raises(BundleError, match="well-formed"):
        weight_tensors(model[: len(model) // 2])


def test_random_bit_faults_are_reproducible_and_grow_only(guarded: SyntheticBundle) -> None:
    model = (guarded.path / "stacks/general-000.onnx").read_bytes()
    first = random_bit_faults(model, 20, EXPONENT_BITS, seed=3, grow_only=True)
    assert first == random_bit_faults(model, 20, EXPONENT_BITS, seed=3, grow_only=True)
    assert first != random_bit_faults(model, 20, EXPONENT_BITS, seed=4, grow_only=True)
    values = _initializers(model)
    assert len({(f.tensor, f.index) for f in first}) == 20  # distinct weights
    for fault in first:
        assert fault.bit in EXPONENT_BITS
        word = int(values[fault.tensor].reshape(-1)[fault.index:fault.index + 1].view(np.uint32)[0])
        assert not word >> fault.bit & 1  # a 0 bit: the weight grows
    with pytest.raises(ConfigError, match="weight tensor"):
        random_bit_faults(model, 1, tensors=["nope"])


def test_bit_faults_at_rate_flip_each_bit_with_that_probability(guarded: SyntheticBundle) -> None:
    model = (guarded.path / "stacks/general-000.onnx").read_bytes()
    total = sum(t.size for t in weight_tensors(model))
    assert bit_faults_at_rate(model, 0.0) == []
    every = bit_faults_at_rate(model, 1.0, bits=[30])
    assert len(every) == total and {f.bit for f in every} == {30}
    rate = 1e-3
    counts = [len(bit_faults_at_rate(model, rate, seed=s)) for s in range(5)]
    expected, sd = 32 * total * rate, math.sqrt(32 * total * rate)
    assert abs(np.mean(counts) - expected) < 5 * sd / math.sqrt(5)


def test_weight_row_follows_the_exporters_layout() -> None:
    from edgens.runtime.onnx_weights import WeightTensor

    first = WeightTensor("first.weight", (12, 784), np.dtype("<f4"), 0)  # 3 members x 4 hidden units
    assert [weight_row(first, i * 784, 3) for i in range(12)] == [0] * 4 + [1] * 4 + [2] * 4
    batched = WeightTensor("rest.0.weight", (3, 4, 10), np.dtype("<f4"), 0)
    assert weight_row(batched, 45, 3) == 1
    assert weight_row(WeightTensor("odd", (7,), np.dtype("<f4"), 0), 0, 3) is None


def test_injected_weights_run_in_memory_and_the_file_stays_intact(guarded: SyntheticBundle,
                                                                   test_x: np.ndarray) -> None:
    digest = sha256_file(guarded.path / "stacks/general-002.onnx")
    member = guarded.manifest.stack("general-002").members[1]
    members = _corrupted(guarded, member, 3, 5)
    with Predictor.load(guarded.path, "onnxruntime", lanes=1, detect_outliers=False) as predictor:
        with inject_bit_faults(predictor, {"general-002": _boost("w2", 1 * 8 * 10 + 3 * 10 + 5)}):
            got = predictor.stack_outputs(test_x, ["general-002"])["general-002"]
        restored = predictor.stack_outputs(test_x, ["general-002"])["general-002"]
    x = guarded.normalise(test_x)
    want = np.stack([members[m].eta(x) for m in guarded.manifest.stack("general-002").members])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(restored, guarded.member_etas(test_x, guarded.manifest.stack("general-002").members),
                               rtol=1e-4, atol=1e-4)
    assert sha256_file(guarded.path / "stacks/general-002.onnx") == digest


# ------------------------------------------------------------------------------------------------------ detection


def _loo_deviations(sums: np.ndarray, sizes: list[int], centered: bool) -> np.ndarray:
    """max over examples of || c(mean of group g - mean of the other groups' members) ||, the slow way."""
    out = []
    for g in range(len(sums)):
        others = [h for h in range(len(sums)) if h != g]
        d = sums[g] / sizes[g] - sums[others].sum(0) / sum(sizes[h] for h in others)
        if centered:
            d = d - d.mean(axis=-1, keepdims=True)
        out.append(np.sqrt((d ** 2).sum(-1)).max())
    return np.array(out)


def test_find_outliers_matches_the_leave_one_out_definition() -> None:
    rng = np.random.default_rng(0)
    sizes = [4, 4, 8, 8, 16]
    sums = np.stack([rng.normal(0, 1, (20, 10)) * n + 3.0 * n for n in sizes]).astype(np.float32)
    d = _loo_deviations(sums.astype(np.float64), sizes, centered=True)
    thresholds = d / 1.2  # every group 1.2x its threshold: with margin 1.25 none is an outlier, 1.15 the worst is
    assert find_outliers(sums, sizes, thresholds, True, margin=1.25) == []
    found = find_outliers(sums, sizes, thresholds, True, margin=1.15, min_groups=5)
    assert len(found) == 1 and found[0][1] == pytest.approx(1.2, rel=1e-4)
    # a per-example constant shift of one group changes nothing for categorical outputs, but does otherwise
    shifted = sums.copy()
    shifted[2] += 1000.0
    assert find_outliers(shifted, sizes, thresholds, True, margin=1.25) == []
    assert find_outliers(shifted, sizes, _loo_deviations(sums.astype(np.float64), sizes, False), False,
                         margin=1.25)[0][0] == 2


def test_one_huge_outlier_does_not_take_the_others_with_it() -> None:
    rng = np.random.default_rng(1)
    sizes = [4] * 6
    sums = rng.normal(0, 1, (6, 16, 10)).astype(np.float32) * 4
    thresholds = _loo_deviations(sums.astype(np.float64), sizes, True)
    for scale in (1e6, 1e35):  # 1e35: squares overflow float32, making every deviation inf unless redone in float64
        huge = sums.copy()
        huge[3] *= scale  # its pull on every reference inflates the others' deviations far past their thresholds
        assert np.isfinite(huge).all()
        assert [g for g, _ in find_outliers(huge, sizes, thresholds, True)] == [3]
    assert find_outliers(sums[:2], sizes[:2], thresholds[:2], True) == []  # two groups: nothing to outvote


def test_thresholds_round_trip_through_the_manifest(guarded: SyntheticBundle) -> None:
    data = json.loads((guarded.path / "manifest.json").read_text())
    manifest = load_manifest(guarded.path)
    assert manifest.outliers == guarded.manifest.outliers
    assert sorted(data["outliers"]["thresholds"]) == GENERAL and data["outliers"]["margin"] == 1.5
    del data["outliers"]["thresholds"]["general-003"]
    with pytest.raises(BundleError, match="outliers.thresholds"):
        Manifest.from_dict(data)
    data["outliers"]["thresholds"]["general-003"] = -1.0
    with pytest.raises(BundleError, match="outliers"):
        Manifest.from_dict(data)


def test_fit_thresholds_is_the_largest_deviation_over_prefixes() -> None:
    rng = np.random.default_rng(2)
    eta = rng.normal(0, 3, (12, 50, 10))
    groups = {f"g{i}": list(range(3 * i, 3 * i + 3)) for i in range(4)}
    info = fit_thresholds(eta, groups, "categorical")
    sums = np.stack([eta[m].sum(0) for m in groups.values()])
    want = np.zeros(4)
    for n in (3, 4):
        want[:n] = np.maximum(want[:n], _loo_deviations(sums[:n], [3] * n, True))
    np.testing.assert_allclose([info.thresholds[g] for g in groups], want, rtol=1e-6)
    assert fit_thresholds(eta, dict(list(groups.items())[:2]), "categorical") is None


@pytest.mark.parametrize("budget", [{}, {"deadline_ms": 10_000}, {"members": 16}])
def test_detection_leaves_out_exactly_the_corrupted_stacks_members(guarded: SyntheticBundle, test_x: np.ndarray,
                                                                   budget: dict) -> None:
    stack = guarded.manifest.stack("general-002")
    member, row = stack.members[1], 1
    prefix_row = guarded.manifest.stack("prefix-0016").members.index(member)
    faults = {"general-002": _boost("w2", row * 8 * 10 + 3 * 10 + 5),
              "prefix-0016": _boost("w2", prefix_row * 8 * 10 + 3 * 10 + 5)}
    others = [m for m in guarded.order if m not in stack.members]
    with Predictor.load(guarded.path, "onnxruntime", lanes=1) as predictor:
        clean = predictor.predict(test_x, **budget)
        with inject_bit_faults(predictor, faults):
            prediction = predictor.predict(test_x, **budget)
        with Predictor.load(guarded.path, "onnxruntime", lanes=1, detect_outliers=False) as plain:
            with inject_bit_faults(plain, faults):
                undetected = plain.predict(test_x, **budget)
    assert clean.outliers_checked and not clean.failures
    np.testing.assert_allclose(clean.mean, guarded.expected(test_x, guarded.order), atol=2e-5)
    assert prediction.outliers_checked
    ran = "general-002" if "deadline_ms" in budget else "prefix-0016"  # the prefix stack holds every member
    assert [(f.stack, f.kind) for f in prediction.failures] == [(ran, "outlier")]
    assert "general-002" in prediction.failures[0].message
    assert (prediction.members_used == 12).all()
    np.testing.assert_allclose(prediction.mean, guarded.expected(test_x, others), atol=2e-5)
    # without detection the corrupted member drags the mean: a different, wrong prediction
    corrupted = _corrupted(guarded, member, 3, 5)
    eta = np.stack([corrupted[m].eta(guarded.normalise(test_x)) for m in guarded.order]).mean(0)
    np.testing.assert_allclose(undetected.mean, _softmax(eta), atol=2e-5)
    assert (undetected.labels != clean.labels).any()


def test_an_outlier_its_self_test_confirms_quarantines_the_stack_at_once(guarded: SyntheticBundle,
                                                                         test_x: np.ndarray) -> None:
    # issue 28: quarantine on evidence about the stack; a corrupted weight fails the self-test on the stored inputs
    with Predictor.load(guarded.path, "onnxruntime", lanes=1, quarantine_after=2) as predictor:
        with inject_bit_faults(predictor, {"general-001": _boost("w2", 0)}):
            assert predictor.predict(test_x, deadline_ms=10_000).failures[0].kind == "outlier"
            health = predictor.health()["general-001"]
            assert health.status == "quarantined" and health.reason.startswith("self-test confirmed the outlier")
            after = predictor.predict(test_x, deadline_ms=10_000)
        assert "general-001" not in after.stacks_run and not after.failures
        assert predictor.retry() == ["general-001"]  # reloaded from its file, and its self-test passes


def test_without_quarantine_a_confirmed_outlier_is_only_left_out(guarded: SyntheticBundle,
                                                                   test_x: np.ndarray) -> None:
    # quarantine_after=None means never: the corrupted stack is left out of every call that meets it, and stays
    # available (bench faults measures each call on its own this way)
    with Predictor.load(guarded.path, "onnxruntime", lanes=1, quarantine_after=None) as predictor:
        with inject_bit_faults(predictor, {"general-001": _boost("w2", 0)}):
            calls = [predictor.predict(test_x, deadline_ms=10_000) for _ in range(5)]
        assert all([f.stack for f in call.failures] == ["general-001"] and f.kind == "outlier"
                   for call in calls for f in call.failures)
        assert all(len(call.failures) == 1 for call in calls)
        assert predictor.health()["general-001"].status == "ok"
        clean = predictor.predict(test_x, deadline_ms=10_000)
    assert "general-001" in clean.stacks_run and not clean.failures


def test_outliers_a_self_test_does_not_confirm_never_quarantine(guarded: SyntheticBundle, test_x: np.ndarray,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # A margin this small makes healthy groups outliers in every call (as odd inputs would): each call still leaves
    # them out, but the stacks pass their self-test, so none is quarantined, and each is tested once here.
    monkeypatch.setattr(selftest, "CONFIRM_EVERY_S", 1e9)
    with Predictor.load(guarded.path, "onnxruntime", lanes=1, quarantine_after=2, outlier_margin=1e-6) as predictor:
        counting = {name: Fault("sleep", sleep_ms=0.0) for name in predictor.runners}  # zero sleeps count runs
        with inject_faults(predictor, counting) as runners:
            calls = [predictor.predict(test_x[:4], deadline_ms=10_000) for _ in range(20)]
        assert all(call.failures for call in calls)
        health = predictor.health()
        assert all(h.status == "ok" for h in health.values())
        cleared = {name: h.cleared for name, h in health.items() if h.cleared}
        assert sum(cleared.values()) == sum(len({f.stack for f in call.failures}) for call in calls)
        ran = {name: sum(name in call.stacks_run for call in calls) for name in runners}
        per_test = math.ceil(guarded.manifest.self_test.examples / 256)  # its runs in one self-test
        for name, runner in runners.items():  # each stack that was left out ran its self-test once
            assert runner.calls == ran[name] + (per_test if name in cleared else 0), name


def test_without_self_test_data_repeated_outliers_still_quarantine(tmp_path: Path, test_x: np.ndarray) -> None:
    plain = make_bundle(tmp_path / "plain", n_members=16, per_stack=4, hidden=8, prefixes=[8, 16], outliers=True)
    with Predictor.load(plain.path, "onnxruntime", lanes=1, quarantine_after=2) as predictor:
        with inject_bit_faults(predictor, {"general-001": _boost("w2", 0)}):
            for _ in range(2):
                assert predictor.predict(test_x, deadline_ms=10_000).failures[0].kind == "outlier"
            assert predictor.health()["general-001"].status == "quarantined"


def test_too_few_groups_are_not_checked(guarded: SyntheticBundle, test_x: np.ndarray) -> None:
    with Predictor.load(guarded.path, "onnxruntime", lanes=1) as predictor:
        assert not predictor.predict(test_x, members=8).outliers_checked  # prefix-0008: two groups
        assert not predictor.predict(test_x, task="class-3").outliers_checked  # a specialist alone
        assert not predictor.predict(test_x, confidence=0.99).outliers_checked  # early exit: not checked
        assert predictor.predict(test_x, members=12).outliers_checked


def test_corrupted_activations_are_outvoted(guarded: SyntheticBundle, test_x: np.ndarray) -> None:
    stack = guarded.manifest.stack("general-003")
    with Predictor.load(guarded.path, "onnxruntime", lanes=1) as predictor:
        with inject_faults(predictor, {"general-003": Fault("flip", bit=28, row=2)}):
            prediction = predictor.predict(test_x, deadline_ms=10_000)
    assert [(f.stack, f.kind) for f in prediction.failures] == [("general-003", "outlier")]
    others = [m for m in guarded.order if m not in stack.members]
    np.testing.assert_allclose(prediction.mean, guarded.expected(test_x, others), atol=2e-5)


def test_a_bundle_without_thresholds_is_not_checked(bundle: SyntheticBundle, data) -> None:
    x, _ = data
    with Predictor.load(bundle.path, "onnxruntime", lanes=1) as predictor:
        assert predictor.outliers is None and not predictor.predict(x).outliers_checked


# ------------------------------------------------------------------------------------------------------ combiners


@pytest.mark.parametrize("combiner", ["median", "trimmed"])
def test_robust_combiners_match_numpy(guarded: SyntheticBundle, test_x: np.ndarray, combiner: str) -> None:
    etas = guarded.member_etas(test_x, guarded.order)
    if combiner == "median":
        want = np.median(etas, axis=0)
    else:  # 10% of 16 members: the smallest and the largest value per example and class are dropped
        want = np.sort(etas, axis=0)[1:-1].mean(axis=0)
    with Predictor.load(guarded.path, "onnxruntime", lanes=1, combiner=combiner) as predictor:
        for budget in ({}, {"deadline_ms": 10_000}):
            prediction = predictor.predict(test_x, **budget)
            np.testing.assert_allclose(prediction.eta, want, atol=1e-4)
        with pytest.raises(ConfigError, match="confidence"):
            predictor.predict(test_x, confidence=0.9)
    with pytest.raises(ConfigError, match="combiner"):
        Predictor.load(guarded.path, "onnxruntime", combiner="mode")


def test_robust_combiner_leaves_out_outliers_too(guarded: SyntheticBundle, test_x: np.ndarray) -> None:
    stack = guarded.manifest.stack("general-003")
    with Predictor.load(guarded.path, "onnxruntime", lanes=1, combiner="median") as predictor:
        with inject_faults(predictor, {"general-003": Fault("flip", bit=28, row=0)}):
            prediction = predictor.predict(test_x, deadline_ms=10_000)
    others = [m for m in guarded.order if m not in stack.members]
    np.testing.assert_allclose(prediction.eta, np.median(guarded.member_etas(test_x, others), axis=0), atol=1e-4)


# ------------------------------------------------------------------------------------------------------ self-test


def test_self_test_passes_clean_stacks_and_quarantines_a_corrupted_one(guarded: SyntheticBundle) -> None:
    with Predictor.load(guarded.path, "onnxruntime", lanes=1) as predictor:
        results = predictor.self_test()
        assert set(results) == {s.name for s in guarded.manifest.stacks} and all(r.ok for r in results.values())
        # the smallest exponent change there is: bit 23 flipped, the weight doubles or halves
        with inject_bit_faults(predictor, {"general-000": [BitFault("w2", 2 * 80 + 1 * 10 + 1, 23)]}):
            report = predictor.self_test()
            assert [name for name, r in report.items() if not r.ok] == ["general-000"]
            assert predictor.health()["general-000"].status == "quarantined"
            assert "self-test" in predictor.health()["general-000"].reason
            assert predictor.retry() == ["general-000"]  # reloaded from its (intact) file: clean again
            assert predictor.self_test(["general-000"])["general-000"].ok


def test_periodic_self_test_runs_in_the_background(guarded: SyntheticBundle) -> None:
    import time

    with Predictor.load(guarded.path, "onnxruntime", lanes=1, self_test_interval_s=0.05) as predictor:
        with inject_faults(predictor, {"general-001": Fault("flip", bit=22, row=0)}):
            deadline = time.monotonic() + 10
            while predictor.health()["general-001"].status == "ok" and time.monotonic() < deadline:
                time.sleep(0.02)
            assert predictor.health()["general-001"].status == "quarantined"


def test_self_test_sees_a_change_on_inputs_beyond_the_stored_outputs(guarded: SyntheticBundle) -> None:
    """A corrupted weight of a hidden unit that the first 8 self-test inputs leave off changes only the other
    inputs' outputs: the members' sums over all 64 catch it."""
    x = np.load(guarded.path / "selftest.npz")["x"]
    xn = guarded.normalise(x)
    stack = guarded.manifest.stack("general-001")
    found = None
    for row, member in enumerate(stack.members):
        weights = guarded.members[member]
        active = xn @ weights.w1.astype(np.float64) + weights.b1 > 0  # (64, hidden)
        for unit in range(active.shape[1]):
            if not active[:8, unit].any() and active[8:, unit].any():
                found = (row, unit)
                break
        if found:
            break
    assert found is not None, "the synthetic members should have such a unit"
    row, unit = found
    fault = _boost("w2", row * 8 * 10 + unit * 10 + 3)
    with Predictor.load(guarded.path, "onnxruntime", lanes=1) as predictor:
        with inject_bit_faults(predictor, {"general-001": fault}) as runners:
            first = runners["general-001"].run(predictor.prepare(x[:8]).array)
            np.testing.assert_allclose(first, guarded.member_etas(x[:8], stack.members), rtol=1e-4, atol=1e-4)
            result = predictor.self_test(["general-001"], quarantine=False)["general-001"]
    assert not result.ok and "sums" in result.message
