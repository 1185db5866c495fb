"""Per-epoch measures of an ensemble from its members' outputs on one data split.

All functions take the members' natural parameters ``eta`` (M, N, K) and targets ``y`` (N,) as torch tensors on any
device, and return plain Python numbers (one device-to-host copy per call).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgens.losses import class_log_probs, kl_to_members, member_nll

# Module dominance (the paper's CIFAR-10 failure near lam = 1): one member fits the data while the others stay near
# initialisation. We flag it when the best member's error is at most this fraction of the median member's error.
DOMINANCE_RATIO = 0.5


def member_errors(eta: torch.Tensor, y: torch.Tensor, family: str) -> torch.Tensor:
    """Error of each member (M,): misclassification rate, or mean squared error of the mean for gaussian/poisson."""
    if family == "categorical":
        return (eta.argmax(-1) != y).float().mean(-1)
    return ((mean_prediction(eta, family).squeeze(-1) - y) ** 2).mean(-1)


def mean_prediction(eta: torch.Tensor, family: str) -> torch.Tensor:
    """The inverse link: softmax probabilities, the gaussian mean, or the poisson rate."""
    if family == "categorical":
        return F.softmax(eta, dim=-1)
    return torch.exp(eta) if family == "poisson" else eta


@torch.no_grad()
def epoch_diagnostics(eta: torch.Tensor, y: torch.Tensor, family: str) -> dict:
    """Ensemble and member measures of one split.

    Returns:
        A dict with ``ensemble_loss`` and ``ensemble_error`` (of the mean of natural parameters), ``member_loss``
        and ``member_error`` (means over members), ``ambiguity`` (mean KL(q_bar || q_j)),
        ``best/median/worst_member_error``,
        ``dominance_ratio`` (best / median member error: near 1 for a healthy ensemble, small under module dominance),
        ``member_errors`` (list of M floats), and for categorical ``entropy_{min,max,mean,std}``: statistics across
        members of each member's mean predictive entropy.
    """
    if family == "categorical":
        y = y.long()
    else:
        y = y.to(eta.dtype)
    eta_bar = eta.mean(0)
    errors = member_errors(eta, y, family)
    sorted_errors = errors.sort().values
    median = sorted_errors[(len(sorted_errors) - 1) // 2]
    values = {
        "ensemble_loss": member_nll(eta_bar, y, family).mean(),
        "ensemble_error": member_errors(eta_bar[None], y, family)[0],
        "member_loss": member_nll(eta, y, family).mean(),
        "member_error": errors.mean(),
        "ambiguity": kl_to_members(eta_bar, eta, family).mean(),
        "best_member_error": sorted_errors[0],
        "median_member_error": median,
        "worst_member_error": sorted_errors[-1],
        "dominance_ratio": sorted_errors[0] / median.clamp_min(1e-12),
    }
    if family == "categorical":
        log_p = class_log_probs(eta)  # (K, M, N)
        entropy = -(log_p.exp() * log_p).sum(0).mean(-1)  # (M,): each member's mean entropy
        values.update(entropy_min=entropy.min(), entropy_max=entropy.max(), entropy_mean=entropy.mean(),
                      entropy_std=entropy.std(unbiased=False))
    stacked = torch.stack([v.float() for v in values.values()]).cpu().tolist()
    result = dict(zip(values.keys(), stacked))
    result["member_errors"] = errors.cpu().tolist()
    return result


def is_dominated(diagnostics: dict, n_members: int) -> bool:
    """True when one member is far better than the median (module dominance; needs at least 3 members)."""
    return n_members >= 3 and diagnostics["dominance_ratio"] <= DOMINANCE_RATIO
