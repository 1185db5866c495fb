"""edgens.ensemble against the definitions written out element by element (python floats and math), for each
family, and its stability for logits far beyond exp's range."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgens import ensemble
from edgens.errors import ConfigError


def _nll_by_hand(row: list[float], target: float, family: str) -> float:
    if family == "categorical":
        return math.log(sum(math.exp(v) for v in row)) - row[int(target)]
    if family == "gaussian":
        return 0.5 * (row[0] - target) ** 2
    return math.exp(row[0]) - target * row[0]  # poisson, without log(y!)


def _mean_by_hand(row: list[float], family: str) -> list[float]:
    if family == "categorical":
        total = sum(math.exp(v) for v in row)
        return [math.exp(v) / total for v in row]
    return [row[0]] if family == "gaussian" else [math.exp(row[0])]


@pytest.mark.parametrize("family", ensemble.FAMILIES)
def test_nll_error_and_mean_follow_the_definitions(family: str) -> None:
    rng = np.random.default_rng(3)
    k = 4 if family == "categorical" else 1
    eta = rng.normal(size=(3, 7, k))  # 3 candidate combinations of 7 examples
    y = rng.integers(0, 4, size=7).astype(np.float64) if family != "gaussian" else rng.normal(size=7)
    if family == "categorical":
        y = y.astype(np.int64)
    nll = ensemble.nll_per_example(eta, y, family)
    mean = ensemble.inverse_link(family, eta)
    for c in range(3):
        for i in range(7):
            row = [float(v) for v in eta[c, i]]
            assert nll[c, i] == pytest.approx(_nll_by_hand(row, float(y[i]), family), rel=1e-12, abs=1e-12)
            assert mean[c, i] == pytest.approx(_mean_by_hand(row, family), rel=1e-12)
    np.testing.assert_allclose(ensemble.mean_nll(eta, y, family), nll.mean(axis=1), rtol=1e-15)
    errors = ensemble.error_rate(eta, y, family)
    for c in range(3):
        if family == "categorical":
            wrong = sum(max(range(k), key=lambda j: eta[c, i, j]) != y[i] for i in range(7))
            assert errors[c] == pytest.approx(wrong / 7)
        else:
            squared = [(_mean_by_hand([float(eta[c, i, 0])], family)[0] - y[i]) ** 2 for i in range(7)]
            assert errors[c] == pytest.approx(sum(squared) / 7, rel=1e-12)


def test_large_logits_stay_finite_and_exact() -> None:
    eta = np.array([[1000.0, 1000.0 + math.log(3.0), -1000.0]])
    np.testing.assert_allclose(ensemble.softmax(eta), [[0.25, 0.75, 0.0]], atol=1e-15)
    np.testing.assert_allclose(ensemble.log_softmax(eta)[0, :2], [math.log(0.25), math.log(0.75)], rtol=1e-12)
    assert ensemble.nll_per_example(eta, np.array([0]))[0] == pytest.approx(-math.log(0.25), rel=1e-12)
    assert ensemble.confidence(eta)[0] == pytest.approx(0.75)
    assert ensemble.softmax(eta.astype(np.float32)).dtype == np.float32  # dtype kept: the runtime's hot path


def test_unknown_family() -> None:
    with pytest.raises(ConfigError, match="unknown target family 'binomial'"):
        ensemble.inverse_link("binomial", np.zeros((1, 1)))
    with pytest.raises(ConfigError, match="unknown target family"):
        ensemble.nll_per_example(np.zeros((1, 1)), np.zeros(1), "binomial")


def test_one_list_of_families() -> None:
    from edgens import config

    assert config.FAMILIES == ensemble.FAMILIES  # config keeps a copy so that `edgens --help` imports no numpy
