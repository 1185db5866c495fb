"""Benchmark maths (edgens.bench.analysis) on generated logits, checked against independent computations."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from edgens.bench import analysis
from edgens.errors import InputError
from edgens.selection import prefix_errors


def _logits(m: int = 6, n: int = 400, k: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Members that are right more often than chance but disagree (noisy copies of a signal)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    signal = np.eye(k)[y] * 1.5
    eta = (signal[None] + rng.normal(scale=1.5, size=(m, n, k))).astype(np.float32)
    return eta, y


def _error_nll(logits: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Error and mean cross-entropy written out directly (float64, log-sum-exp by hand)."""
    logits = logits.astype(np.float64)
    top = logits.max(-1)
    log_z = top + np.log(np.exp(logits - top[:, None]).sum(-1))
    return float((logits.argmax(-1) != y).mean()), float((log_z - logits[np.arange(len(y)), y]).mean())


def _subset_expectation(eta: np.ndarray, y: np.ndarray, kept: int) -> float:
    """Expected error when each example gets a uniformly random kept-subset: the mean over all subsets."""
    return float(np.mean([_error_nll(eta[list(s)].mean(0), y)[0]
                          for s in itertools.combinations(range(eta.shape[0]), kept)]))


def test_dropping_no_member_is_the_full_ensemble() -> None:
    eta, y = _logits()
    curve = analysis.random_drop_curve(eta, y, repeats=5, seed=1)
    error, nll = _error_nll(eta.mean(0), y)
    assert curve.error_mean[0] == pytest.approx(error, abs=1e-12)
    assert curve.nll_mean[0] == pytest.approx(nll, rel=1e-9)
    assert curve.error_se[0] == 0.0 and curve.dropped.tolist() == list(range(6))


def test_dropping_all_but_one_is_the_mean_single_member() -> None:
    eta, y = _logits(m=5, n=3000)
    repeats = 20
    curve = analysis.random_drop_curve(eta, y, repeats=repeats, seed=2)
    single = np.mean([_error_nll(eta[j], y)[0] for j in range(5)])
    # each example's member is uniform: the mean error is an unbiased estimate; bound its spread by sqrt(.25/(N R))
    assert abs(curve.error_mean[-1] - single) < 5 * math.sqrt(0.25 / (3000 * repeats))
    assert curve.error_mean[-1] > curve.error_mean[0]  # these members gain from averaging


def test_every_drop_count_matches_the_exact_expectation_over_subsets() -> None:
    eta, y = _logits(m=5, n=1000, seed=3)
    repeats = 40
    curve = analysis.random_drop_curve(eta, y, repeats=repeats, seed=4)
    for dropped in range(5):
        exact = _subset_expectation(eta, y, 5 - dropped)
        assert abs(curve.error_mean[dropped] - exact) < 5 * math.sqrt(0.25 / (1000 * repeats)) + 1e-12, dropped


def test_members_are_dropped_per_example_not_per_repeat() -> None:
    # member 0 always right, member 1 always wrong: with one member kept per example, about half the examples are
    # wrong in every repeat; dropping the same member for all examples would give 0% or 100% per repeat.
    n, k = 2000, 3
    y = np.arange(n) % k
    right, wrong = np.eye(k)[y] * 5, np.eye(k)[(y + 1) % k] * 5
    eta = np.stack([right, wrong]).astype(np.float32)
    curve = analysis.random_drop_curve(eta, y, repeats=20, seed=0)
    assert abs(curve.error_mean[1] - 0.5) < 0.03
    assert curve.error_se[1] < 0.01


def test_bernoulli_keep_all_is_the_full_ensemble_and_keep_none_is_all_wrong() -> None:
    eta, y = _logits()
    result = analysis.bernoulli_keep_curve(eta, y, [1.0, 0.0], repeats=3)
    error, nll = _error_nll(eta.mean(0), y)
    assert result["error_mean"][0] == pytest.approx(error, abs=1e-12)
    assert result["nll_mean"][0] == pytest.approx(nll, rel=1e-9)
    assert result["all_dropped_mean"] == [0.0, 1.0]
    # nobody answers: every example is an error with the uniform distribution's NLL
    assert result["error_mean"][1] == 1.0 and result["nll_mean"][1] == pytest.approx(math.log(4))


def test_bernoulli_matches_the_exact_expectation() -> None:
    eta, y = _logits(m=3, n=1500, seed=5)
    p, repeats = 0.4, 40
    result = analysis.bernoulli_keep_curve(eta, y, [p], repeats=repeats, seed=6)
    exact = (1 - p) ** 3 * 1.0  # no member kept: an error
    for size in range(1, 4):
        for subset in itertools.combinations(range(3), size):
            exact += p ** size * (1 - p) ** (3 - size) * _error_nll(eta[list(subset)].mean(0), y)[0]
    assert abs(result["error_mean"][0] - exact) < 5 * math.sqrt(0.25 / (1500 * repeats))
    assert abs(result["all_dropped_mean"][0] - (1 - p) ** 3) < 5 * math.sqrt(0.25 / (1500 * repeats))
    assert result["all_dropped_expected"][0] == pytest.approx((1 - p) ** 3)


def test_prefix_curve_matches_selection_and_direct_means() -> None:
    eta, y = _logits()
    order = [3, 0, 5, 1, 2, 4]
    curve = analysis.prefix_curve(eta, y, order)
    np.testing.assert_allclose(curve["error"], prefix_errors(eta, y, order), atol=1e-12)
    for k in (1, 3, 6):
        direct = _error_nll(eta[order[:k]].astype(np.float64).mean(0), y)[1]
        assert curve["nll"][k - 1] == pytest.approx(direct, rel=1e-9)
    with pytest.raises(InputError, match="distinct member ids"):
        analysis.prefix_curve(eta, y, [0, 0])


def _stacking_objective(weights: np.ndarray, bias: np.ndarray, eta: np.ndarray, y: np.ndarray, l2: float) -> float:
    m = len(weights)
    logits = np.einsum("m,mnk->nk", weights, eta.astype(np.float64)) + bias
    return _error_nll(logits, y)[1] + 0.5 * l2 * np.mean((m * weights - 1) ** 2) + 0.5e-6 * bias @ bias


def test_stacking_finds_the_minimum_and_trusts_the_informative_member() -> None:
    rng = np.random.default_rng(7)
    n, k = 1500, 3
    y = rng.integers(0, k, n)
    informative = np.eye(k)[y] * 2 + rng.normal(size=(n, k))
    noise = rng.normal(size=(3, n, k)) * 2
    eta = np.concatenate([informative[None], noise]).astype(np.float32)
    combiner = analysis.fit_stacking(eta, y, l2=1e-3)
    assert combiner.weights[0] > 3 * np.abs(combiner.weights[1:]).max()
    assert combiner.val_nll < _error_nll(eta.mean(0), y)[1]  # better than the plain mean on the data it saw
    # a minimum of the (independently written) objective: no small step in any coordinate lowers it
    base = _stacking_objective(combiner.weights, combiner.bias, eta, y, 1e-3)
    for index in range(4 + k):
        for step in (1e-3, -1e-3):
            w, b = combiner.weights.copy(), combiner.bias.copy()
            if index < 4:
                w[index] += step
            else:
                b[index - 4] += step
            assert _stacking_objective(w, b, eta, y, 1e-3) >= base - 1e-9
    logits = combiner.logits(eta)
    np.testing.assert_allclose(logits, np.einsum("m,mnk->nk", combiner.weights, eta.astype(np.float64))
                               + combiner.bias, atol=1e-9)
    with pytest.raises(InputError, match="fitted for 4 members"):
        combiner.logits(eta[:2])


def test_stacking_with_identical_members_stays_the_plain_mean() -> None:
    eta, y = _logits(m=1)
    copies = np.repeat(eta, 4, axis=0)
    combiner = analysis.fit_stacking(copies, y, l2=1.0)
    # symmetric problem: equal weights (the strong pull to u = 1 keeps them near the plain mean's 1/M)
    np.testing.assert_allclose(combiner.weights, combiner.weights[0], rtol=1e-6)


def test_entropy_statistics() -> None:
    k = 5
    uniform = np.zeros((2, 10, k), dtype=np.float32)
    sure = np.zeros((1, 10, k), dtype=np.float32)
    sure[..., 0] = 50.0
    stats = analysis.entropy_stats(np.concatenate([uniform, sure]))
    assert stats["max"] == pytest.approx(math.log(k)) and stats["min"] == pytest.approx(0.0, abs=1e-15)
    assert stats["mean"] == pytest.approx(2 * math.log(k) / 3)
    assert stats["std"] == pytest.approx(np.std([math.log(k), math.log(k), 0.0]))
    p = np.exp(50.0 / 3) / (np.exp(50.0 / 3) + k - 1)  # the mean logits: 50/3 on class 0
    q = (1 - p) / (k - 1)
    assert stats["ensemble"] == pytest.approx(-(p * math.log(p) + (k - 1) * q * math.log(q)), rel=1e-6)


def test_confusion_matrix_counts() -> None:
    eta, y = _logits()
    matrices = analysis.member_confusions(eta, y)
    assert matrices.shape == (6, 4, 4)
    labels = eta.argmax(-1)
    for j in (0, 5):
        expected = np.zeros((4, 4), dtype=int)
        for true, predicted in zip(y, labels[j]):
            expected[true, predicted] += 1
        np.testing.assert_array_equal(matrices[j], expected)
    assert (np.trace(matrices, axis1=1, axis2=2) == (labels == y).sum(1)).all()


def _f1(predicted: np.ndarray, y: np.ndarray, c: int) -> float:
    tp = np.sum((predicted == c) & (y == c))
    fp = np.sum((predicted == c) & (y != c))
    fn = np.sum((predicted != c) & (y == c))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def test_specialists_table_against_direct_f1_and_validation_only_selection() -> None:
    eta_val, y_val = _logits(m=12, n=600, k=3, seed=8)
    eta_test, y_test = _logits(m=12, n=600, k=3, seed=9)
    # members 0-3 are experts for class 2 on both splits (they fire on class 2 only when it is true)
    for eta, y in ((eta_val, y_val), (eta_test, y_test)):
        eta[:4, :, 2] = np.where(y == 2, 6.0, -6.0)
    table = analysis.specialists_table(eta_val, y_val, eta_test, y_test, size=4, candidates=30, seed=1)
    assert table["size"] == 4 and len(table["classes"]) == 3
    for row in table["classes"]:
        c = row["class"]
        assert row["single_mean"] == pytest.approx(np.mean([_f1(eta_test[j].argmax(-1), y_test, c)
                                                             for j in range(12)]))
        assert row["full_ensemble"] == pytest.approx(_f1(eta_test.mean(0).argmax(-1), y_test, c))
        assert row["greedy"] == pytest.approx(_f1(eta_test[row["greedy_members"]].mean(0).argmax(-1), y_test, c))
        assert len(set(row["greedy_members"])) == 4 and len(set(row["best_of_random_members"])) == 4
    expert = table["classes"][2]
    assert set(expert["greedy_members"]) == {0, 1, 2, 3}  # the planted experts
    assert expert["greedy"] == pytest.approx(1.0)
    assert table["mean"]["greedy"] == pytest.approx(np.mean([r["greedy"] for r in table["classes"]]))
    # selection sees validation only: scrambling the test outputs changes the scores, never the selected members
    scrambled = np.random.default_rng(0).normal(size=eta_test.shape).astype(np.float32)
    again = analysis.specialists_table(eta_val, y_val, scrambled, y_test, size=4, candidates=30, seed=1)
    for a, b in zip(table["classes"], again["classes"]):
        assert a["greedy_members"] == b["greedy_members"]
        assert a["best_of_random_members"] == b["best_of_random_members"]
    assert again["classes"][2]["greedy"] < 0.9


def test_mean_and_se() -> None:
    mean, se = analysis.mean_and_se([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3)
    assert se == pytest.approx(np.sqrt(np.sum((np.array([1, 2, 4]) - 7 / 3) ** 2) / 2) / np.sqrt(3))
    assert np.isnan(analysis.mean_and_se([1.0])[1])  # unknown, not zero


@pytest.mark.parametrize("eta, y, message", [
    (np.zeros((2, 5)), np.zeros(5, dtype=int), "expected member logits"),
    (np.zeros((2, 5, 3)), np.zeros(4, dtype=int), "expected member logits"),
    (np.zeros((2, 5, 3)), np.full(5, 3), r"in \[0, 2\]"),
    (np.zeros((2, 5, 3)), np.zeros(5), "integer class labels"),
    (np.full((2, 5, 3), np.nan), np.zeros(5, dtype=int), "NaN"),
    (np.zeros((2, 5, 1)), np.zeros(5, dtype=int), "K >= 2"),
])
def test_bad_outputs_are_refused(eta: np.ndarray, y: np.ndarray, message: str) -> None:
    with pytest.raises(InputError, match=message):
        analysis.random_drop_curve(eta, y, repeats=1)


def test_bad_protocol_settings() -> None:
    eta, y = _logits()
    with pytest.raises(InputError, match="repeats must be >= 1, got 0"):
        analysis.random_drop_curve(eta, y, repeats=0)
    with pytest.raises(InputError, match=r"keep probabilities must be in \[0, 1\]"):
        analysis.bernoulli_keep_curve(eta, y, [1.5])
    with pytest.raises(InputError, match="l2 must be > 0"):
        analysis.fit_stacking(eta, y, l2=0.0)


def test_drop_plot_averages_trials_of_a_setting() -> None:
    from edgens.bench.plots import _mean_curve, _trial_groups

    runs = [{"preset": "mlp-256x4", "lam": lam, "method": "modular", "seed": seed}
            for lam in (0.0, 0.99) for seed in (0, 1, 2)] + [{"preset": "mlp-256x4", "lam": 1.0, "seed": 0}]
    groups = _trial_groups(runs)
    assert [label for label, _ in groups] == ["lam=0 (3 seeds)", "lam=0.99 (3 seeds)", "lam=1"]
    assert [len(members) for _, members in groups] == [3, 3, 1]
    # objectives of the same lam are groups of their own (issue 27: the paper's loss, the anytime term, both terms)
    runs = [{"preset": "mlp-256x4", "lam": 0.99, "seed": seed, "anytime_weight": mu, "fault_weight": nu}
            for mu, nu in ((0.0, 0.0), (1.0, 0.0), (1.0, 2.0)) for seed in (0, 1)]
    assert [label for label, _ in _trial_groups(runs)] == ["lam=0.99 (2 seeds)", "lam=0.99 mu=1 (2 seeds)",
                                                          "lam=0.99 mu=1 nu=2 (2 seeds)"]
    curves = [[0.1, 0.2], [0.3, 0.2], [0.2, 0.5]]
    mean, se = _mean_curve(curves, [[0.9, 0.9]] * 3)  # several trials: the spread across them, not their own se
    np.testing.assert_allclose(mean, [0.2, 0.3])
    np.testing.assert_allclose(se, [0.1 / math.sqrt(3), math.sqrt(0.03) / math.sqrt(3)])
    mean, se = _mean_curve(curves[:1], [[0.01, None]])  # one trial: its own standard error over repeats
    np.testing.assert_allclose(mean, [0.1, 0.2])
    assert se[0] == 0.01 and math.isnan(se[1])
