"""The modular loss against the formulas of Webb et al., "Joint Training of Neural Network Ensembles" (arXiv
1902.04422), computed independently in numpy:

    L = lam * NLL(eta_bar) + (1 - lam) * (1/M) sum_j NLL(eta_j),    eta_bar = (1/M) sum_j eta_j      (convex form)
      = (1/M) sum_j NLL(eta_j) - lam * (1/M) sum_j KL(q_bar || q_j)                                 (ambiguity form)
    dL / d eta_j = (1/M) * (yhat_j - y - lam * (yhat_j - ybar))                                    (the gradient)

with yhat_j, ybar the means (inverse links) of member j and of the ensemble, and the families' NLLs up to
eta-free constants: categorical cross-entropy, gaussian (eta - y)^2 / 2, poisson exp(eta) - y eta.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgens.errors import ConfigError, InputError
from edgens.losses import kl_to_members, modular_loss

FAMILIES = ["categorical", "gaussian", "poisson"]
LAMS = [0.0, 0.3, 0.95, 1.0]


def _softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _random_problem(family: str, m: int = 5, b: int = 7, k: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    if family == "categorical":
        eta = rng.normal(0, 2, (m, b, k))
        y = rng.integers(0, k, b)
    else:
        eta = rng.normal(0, 0.7, (m, b, 1))
        y = rng.normal(1, 1, b) if family == "gaussian" else rng.poisson(2.0, b).astype(float)
    return eta, y


def _means(eta: np.ndarray, family: str) -> np.ndarray:
    """The inverse link (yhat) of natural parameters, computed in numpy."""
    if family == "categorical":
        return _softmax(eta)
    return np.exp(eta) if family == "poisson" else eta


def _target_vector(y: np.ndarray, family: str, k: int) -> np.ndarray:
    return np.eye(k)[y] if family == "categorical" else y[:, None]


def _nll(eta: np.ndarray, y: np.ndarray, family: str) -> np.ndarray:
    """Per-example NLL (up to eta-free constants), by the families' table in the module docstring."""
    if family == "categorical":
        log_p = eta - np.log(np.exp(eta).sum(-1, keepdims=True))
        return -np.take_along_axis(log_p, np.broadcast_to(y[:, None], log_p.shape[:-1] + (1,)), -1)[..., 0]
    value = eta[..., 0]
    return 0.5 * (value - y) ** 2 if family == "gaussian" else np.exp(value) - y * value


def _kl(eta_bar: np.ndarray, eta_j: np.ndarray, family: str) -> np.ndarray:
    """KL(q_bar || q_j) from the distributions' definitions (not the exponential-family shortcut)."""
    if family == "categorical":
        q, p = _softmax(eta_bar), _softmax(eta_j)
        return (q * (np.log(q) - np.log(p))).sum(-1)
    if family == "gaussian":  # unit-variance normals: (mu_bar - mu_j)^2 / 2
        return 0.5 * (eta_bar[..., 0] - eta_j[..., 0]) ** 2
    rate_bar, rate_j = np.exp(eta_bar[..., 0]), np.exp(eta_j[..., 0])  # Poisson KL
    return rate_bar * np.log(rate_bar / rate_j) - rate_bar + rate_j


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lam", LAMS)
def test_gradient_matches_paper_formula(family: str, lam: float) -> None:
    # dL/deta_j = (1/M) (yhat_j - y - lam (yhat_j - ybar)), per example; the loss is a batch mean, hence 1/B.
    eta_np, y_np = _random_problem(family)
    m, b, k = eta_np.shape
    eta = torch.tensor(eta_np, requires_grad=True)
    target = torch.tensor(y_np)
    modular_loss(eta, target, lam, family).total.backward()
    yhat = _means(eta_np, family)
    ybar = _means(eta_np.mean(0), family)[None]
    expected = (yhat - _target_vector(y_np, family, k)[None] - lam * (yhat - ybar)) / m / b
    np.testing.assert_allclose(eta.grad.numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lam", LAMS)
def test_parts_match_definitions_and_ambiguity_form(family: str, lam: float) -> None:
    eta_np, y_np = _random_problem(family, seed=1)
    eta_bar = eta_np.mean(0)
    ensemble = _nll(eta_bar, y_np, family).mean()
    members = _nll(eta_np, y_np, family).mean()
    ambiguity = np.mean([_kl(eta_bar, eta_np[j], family).mean() for j in range(len(eta_np))])
    result = modular_loss(torch.tensor(eta_np), torch.tensor(y_np), lam, family)
    np.testing.assert_allclose(float(result.ensemble_nll), ensemble, rtol=1e-10)
    np.testing.assert_allclose(float(result.member_nll), members, rtol=1e-10)
    np.testing.assert_allclose(float(result.ambiguity), ambiguity, rtol=1e-9)
    # convex form (what total is) == ambiguity form
    np.testing.assert_allclose(float(result.total), lam * ensemble + (1 - lam) * members, rtol=1e-10)
    np.testing.assert_allclose(float(result.total), members - lam * ambiguity, rtol=1e-9)
    # the library's own KL helper agrees with the definition
    np.testing.assert_allclose(kl_to_members(torch.tensor(eta_bar), torch.tensor(eta_np), family).numpy(),
                               np.stack([_kl(eta_bar, eta_np[j], family) for j in range(len(eta_np))]), rtol=1e-9)


@pytest.mark.parametrize("family", FAMILIES)
def test_lam_zero_is_independent_training_scaled_by_one_over_m(family: str) -> None:
    eta_np, y_np = _random_problem(family, seed=2)
    m = len(eta_np)
    eta = torch.tensor(eta_np, requires_grad=True)
    modular_loss(eta, torch.tensor(y_np), 0.0, family).total.backward()
    for j in range(m):  # each member trained alone on its own NLL
        alone = torch.tensor(eta_np[j][None], requires_grad=True)
        modular_loss(alone, torch.tensor(y_np), 0.0, family).total.backward()
        np.testing.assert_allclose(eta.grad[j].numpy(), alone.grad[0].numpy() / m, rtol=1e-10, atol=1e-14)


def test_dutt_ll_and_sm_losses_equal_independent_training() -> None:
    eta_np, y_np = _random_problem("categorical", m=6, b=9, k=5, seed=3)
    target = torch.tensor(y_np)
    grads, values = {}, {}
    for name in ("modular", "LL", "SM"):
        eta = torch.tensor(eta_np, requires_grad=True)
        log_p = torch.log_softmax(eta, -1)
        if name == "modular":
            loss = modular_loss(eta, target, 0.0).total
        elif name == "LL":  # mean of the members' cross-entropies
            loss = torch.stack([torch.nn.functional.nll_loss(log_p[j], target) for j in range(len(eta_np))]).mean()
        else:  # cross-entropy of the unnormalised mean of the log-probabilities
            mean_log_p = log_p.mean(0)
            loss = -mean_log_p[torch.arange(len(y_np)), target].mean()
        loss.backward()
        grads[name], values[name] = eta.grad.numpy(), float(loss.detach())
    for name in ("LL", "SM"):
        np.testing.assert_allclose(values[name], values["modular"], rtol=1e-12)
        np.testing.assert_allclose(grads[name], grads["modular"], rtol=1e-10, atol=1e-14)


def test_bagging_weights_scale_member_terms_only() -> None:
    eta_np, y_np = _random_problem("categorical", seed=4)
    weights = np.random.default_rng(0).integers(0, 3, eta_np.shape[:2]).astype(float)
    result = modular_loss(torch.tensor(eta_np), torch.tensor(y_np), 0.0, member_weights=torch.tensor(weights))
    np.testing.assert_allclose(float(result.total), (weights * _nll(eta_np, y_np, "categorical")).mean(), rtol=1e-10)


@pytest.mark.parametrize("lam", [-0.1, 1.01, 2.0, float("nan"), float("inf")])
def test_lam_outside_unit_interval_is_refused(lam: float) -> None:
    eta, y = torch.zeros(2, 3, 4), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ConfigError, match=r"lam must be in \[0, 1\]"):
        modular_loss(eta, y, lam)


def test_lam_above_one_says_why() -> None:
    with pytest.raises(ConfigError, match="unbounded below"):
        modular_loss(torch.zeros(2, 3, 4), torch.zeros(3, dtype=torch.long), 1.5)


@pytest.mark.parametrize(("eta", "target", "family", "message"), [
    (torch.zeros(2, 3, 4), torch.tensor([0, 4, 1]), "categorical", r"class labels must be in \[0, 3\]"),
    (torch.zeros(2, 3, 4), torch.tensor([0, -1, 1]), "categorical", r"class labels must be in \[0, 3\]"),
    (torch.zeros(2, 3, 4), torch.tensor([0.0, 1.0, 1.0]), "categorical", "integer class indices"),
    (torch.zeros(3, 4), torch.tensor([0, 1, 1]), "categorical", r"shape \(members, batch, outputs\)"),
    (torch.zeros(2, 3, 4), torch.tensor([0, 1]), "categorical", r"target must have shape \(3,\)"),
    (torch.zeros(2, 3, 2), torch.tensor([0.0, 1.0, 1.0]), "gaussian", "one output"),
    (torch.full((2, 3, 4), float("nan")), torch.tensor([0, 1, 1]), "categorical", "NaN"),
    (torch.zeros(2, 3, 1), torch.tensor([0.0, float("inf"), 1.0]), "gaussian", "NaN or infinite"),
    (torch.zeros(2, 3, 1), torch.tensor([0.0, -1.0, 1.0]), "poisson", "counts >= 0"),
    (torch.zeros(2, 0, 4), torch.zeros(0, dtype=torch.long), "categorical", "batch >= 1"),
])
def test_bad_inputs_get_clear_errors(eta, target, family, message) -> None:
    with pytest.raises(InputError, match=message):
        modular_loss(eta, target, 0.5, family)


def test_unknown_family_lists_valid_ones() -> None:
    with pytest.raises(ConfigError, match="categorical, gaussian, poisson"):
        modular_loss(torch.zeros(2, 3, 1), torch.zeros(3), 0.5, "binomial")


@pytest.mark.parametrize("family", ["categorical", "gaussian", "poisson"])
def test_anytime_term_value_and_gradient_against_independent_maths(family: str) -> None:
    from edgens.losses import modular_loss

    rng = np.random.default_rng(3)
    m, b, k = 7, 5, (4 if family == "categorical" else 1)
    eta_np = rng.normal(size=(m, b, k))
    y_np = rng.integers(0, k, b) if family == "categorical" else rng.poisson(2.0, b).astype(np.float64)
    prefixes, mu, lam = (1, 3, 6), 0.7, 0.9

    def mean_of(z: np.ndarray) -> np.ndarray:  # the family's predictive mean of natural parameters z (B, K)
        if family == "categorical":
            e = np.exp(z - z.max(-1, keepdims=True))
            return e / e.sum(-1, keepdims=True)
        return np.exp(z) if family == "poisson" else z

    def nll_of(z: np.ndarray) -> float:  # batch-mean NLL of natural parameters z (B, K), constants dropped
        if family == "categorical":
            return float(-(z[np.arange(b), y_np] - np.log(np.exp(z).sum(-1))).mean())
        if family == "gaussian":
            return float((0.5 * (z[:, 0] - y_np) ** 2).mean())
        return float((np.exp(z[:, 0]) - y_np * z[:, 0]).mean())

    expected_term = sum(kk / m * nll_of(eta_np[:kk].mean(0)) for kk in prefixes)
    target_np = np.eye(k)[y_np] if family == "categorical" else y_np[:, None]
    expected_grad = np.zeros_like(eta_np)  # d (mu * term) / d eta_j = (mu / M) sum_{k > j} (mean_k - y) / B
    for kk in prefixes:
        expected_grad[:kk] += mu / m * (mean_of(eta_np[:kk].mean(0)) - target_np) / b

    eta = torch.tensor(eta_np, requires_grad=True)
    y = torch.tensor(y_np)
    with_term = modular_loss(eta, y, lam, family, anytime_weight=mu, prefixes=prefixes)
    without = modular_loss(eta.detach().requires_grad_(), y, lam, family)
    assert float(with_term.anytime.detach()) == pytest.approx(expected_term, rel=1e-10)
    assert float(with_term.total.detach()) == pytest.approx(float(without.total.detach()) + mu * expected_term,
                                                            rel=1e-10)
    grad_with, = torch.autograd.grad(with_term.total, eta)
    eta2 = torch.tensor(eta_np, requires_grad=True)
    grad_without, = torch.autograd.grad(modular_loss(eta2, y, lam, family).total, eta2)
    np.testing.assert_allclose((grad_with - grad_without).numpy(), expected_grad, rtol=1e-10, atol=1e-14)
    assert without.anytime is None


def test_anytime_settings_are_checked() -> None:
    from edgens.config import TrainConfig, check_prefixes, default_prefixes
    from edgens.errors import ConfigError

    assert default_prefixes(256) == (16, 26, 32, 64, 128) and default_prefixes(12) == (1, 2, 3, 6)
    assert default_prefixes(1) == () and check_prefixes((8, 2), 10) == (2, 8)
    for bad, message in (((0,), r"in \[1, 10\)"), ((10,), r"in \[1, 10\)"), ((3, 3), "distinct")):
        with pytest.raises(ConfigError, match=message):
            check_prefixes(bad, 10)
    assert TrainConfig().resolved_prefixes(256) == ()  # no term, no prefixes
    with pytest.raises(ConfigError, match=r"in \[1, 4\)"):
        modular_loss(torch.zeros(4, 2, 3), torch.tensor([0, 1]), 0.9, anytime_weight=1.0, prefixes=(2, 4))
    assert TrainConfig(anytime_weight=1.0).resolved_prefixes(256) == (16, 26, 32, 64, 128)
    with pytest.raises(ConfigError, match="anytime_weight"):
        TrainConfig(anytime_weight=-1.0).validate()
    with pytest.raises(ConfigError, match="bagging"):
        TrainConfig(method="bagging", lam=0.0, anytime_weight=1.0).validate()
    config = TrainConfig(anytime_weight=0.5, prefixes=(4, 8))
    assert TrainConfig.from_dict(config.to_dict()) == config  # stored in the run's config.json and read back


def test_greedy_order_inside_trained_prefixes_keeps_them() -> None:
    from edgens.selection import greedy_order

    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, 200)
    eta = rng.normal(size=(9, 200, 3))
    eta[8, np.arange(200), y] += 5.0  # the best member is in the last block: free greedy takes it first
    free, _ = greedy_order(eta, y)
    assert free[0] == 8
    order, errors = greedy_order(eta, y, blocks=(3, 6))
    assert sorted(order[:3]) == [0, 1, 2] and sorted(order[:6]) == list(range(6)) and sorted(order) == list(range(9))
    assert order[6] == 8  # first of its block
    assert len(errors) == 9


def test_a_run_records_the_prefixes_it_trains() -> None:
    from edgens.config import TrainConfig
    from edgens.train import with_resolved_prefixes

    assert with_resolved_prefixes(TrainConfig(anytime_weight=1.0), 256).prefixes == (16, 26, 32, 64, 128)
    assert with_resolved_prefixes(TrainConfig(anytime_weight=1.0, prefixes=(8,)), 256).prefixes == (8,)
    assert with_resolved_prefixes(TrainConfig(), 256).prefixes is None  # the paper's loss: nothing to record


def test_random_subset_masks_and_term_against_numpy() -> None:
    from edgens.config import TrainConfig
    from edgens.losses import subset_masks, subset_term

    masks = subset_masks(np.random.default_rng(5), 400, 64)
    again = subset_masks(np.random.default_rng(5), 400, 64)
    assert torch.equal(masks, again) and masks.shape == (400, 64)  # a function of the generator's seed
    nobody = subset_masks(np.random.default_rng(2), 50, 64, keep=(1e-6, 2e-6))  # would keep none: keeps one
    assert bool((nobody.sum(1) == 1).all())
    assert set(masks.unique().tolist()) <= {0.0, 1.0} and bool((masks.sum(1) >= 1).all())  # nobody keeps nothing
    kept = masks.mean(1).numpy()  # each draw's keep fraction: log-uniform in [0.05, 0.5], binomial around it
    assert kept.min() < 0.07 and 0.4 < kept.max() < 0.7 and 0.1 < np.median(kept) < 0.22
    # the term: mean over draws of (k/M) NLL(mean of the kept members), averaged over examples, against numpy
    rng = np.random.default_rng(3)
    eta = rng.normal(size=(6, 20, 4))
    y = rng.integers(0, 4, 20)
    small = subset_masks(np.random.default_rng(1), 3, 6)
    sums = torch.einsum("rm,mbk->rbk", small.double(), torch.tensor(eta))  # written out independently
    got = float(subset_term(sums, small.sum(1).double(), torch.tensor(y), 6))
    expected = []
    for mask in small.numpy():
        members = eta[mask == 1]
        for n in range(20):
            logits = members[:, n].mean(0)
            nll = np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[y[n]]
            expected.append(len(members) / 6 * nll)
    assert got == pytest.approx(np.mean(expected), rel=1e-9)
    # in the loss: total = modular loss + nu * term; the term needs its masks
    base = modular_loss(torch.tensor(eta), torch.tensor(y), 0.99)
    with_term = modular_loss(torch.tensor(eta), torch.tensor(y), 0.99, fault_weight=0.5, fault_masks=small)
    assert float(with_term.total) == pytest.approx(float(base.total) + 0.5 * got, rel=1e-9)
    assert float(with_term.faults) == pytest.approx(got, rel=1e-9)
    with pytest.raises(ConfigError, match="fault_masks"):
        modular_loss(torch.tensor(eta), torch.tensor(y), 0.99, fault_weight=0.5)
    for bad, message in (({"fault_weight": -1.0}, "fault_weight"), ({"fault_draws": 0}, "fault_draws"),
                         ({"method": "bagging", "lam": 0.0, "fault_weight": 1.0}, "bagging")):
        with pytest.raises(ConfigError, match=message):
            TrainConfig(**bad).validate()
