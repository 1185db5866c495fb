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
        values, errors = _categorical(eta, y.long())
    else:
        y = y.to(eta.dtype)
        eta_bar = eta.mean(0)
        errors = member_errors(eta, y, family)
        values = {"ensemble_loss": member_nll(eta_bar, y, family).mean(),
                  "ensemble_error": member_errors(eta_bar[None], y, family)[0],
                  "member_loss": member_nll(eta, y, family).mean(), "member_error": errors.mean(),
                  "ambiguity": kl_to_members(eta_bar, eta, family).mean()}
    sorted_errors = errors.sort().values
    median = sorted_errors[(len(sorted_errors) - 1) // 2]
    values.update(best_member_error=sorted_errors[0], median_member_error=median,
                  worst_member_error=sorted_errors[-1], dominance_ratio=sorted_errors[0] / median.clamp_min(1e-12))
    stacked = torch.stack([v.float() for v in values.values()]).cpu().tolist()
    result = dict(zip(values.keys(), stacked))
    result["member_errors"] = errors.cpu().tolist()
    return result


MEMBER_CHUNK = 32  # members whose log-probabilities are held at once: (K, 32, N) floats, cache-sized pieces


def _categorical(eta: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The categorical measures from one log-softmax per member, taken a chunk of members at a time.

    Every measure needs the members' log-probabilities; computing them once (not once per measure) and in chunks
    (not as one (K, M, N) tensor with its temporaries) is what makes the per-epoch diagnostics of 256 members cheap.
    KL(q_bar || q_j) = sum_k q_bar_k log q_bar_k - sum_k q_bar_k log q_jk, so the ambiguity needs only the
    ensemble's q_bar and each member's log-probabilities.
    """
    m, n = eta.shape[0], eta.shape[1]
    log_q_bar = class_log_probs(eta.mean(0))  # (K, N)
    q_bar = log_q_bar.exp()
    errors = torch.empty(m, dtype=torch.float32, device=eta.device)
    entropy = torch.empty(m, dtype=eta.dtype, device=eta.device)
    nll_sum = eta.new_zeros(())
    cross_sum = eta.new_zeros(())  # sum over members and examples of sum_k q_bar_k log q_jk
    for start in range(0, m, MEMBER_CHUNK):
        log_p = class_log_probs(eta[start:start + MEMBER_CHUNK])  # (K, chunk, N)
        chunk = log_p.shape[1]
        nll_sum += log_p.gather(0, y.expand(1, chunk, n)).sum()
        # argmax over the contiguous class axis of eta: over log_p's leading axis it is 5x slower
        errors[start:start + chunk] = (eta[start:start + chunk].argmax(-1) != y).float().mean(-1)
        cross_sum += (q_bar[:, None] * log_p).sum()
        entropy[start:start + chunk] = -(log_p.exp() * log_p).sum(0).mean(-1)  # each member's mean entropy
    values = {
        "ensemble_loss": -log_q_bar.gather(0, y[None])[0].mean(),
        "ensemble_error": (log_q_bar.argmax(0) != y).float().mean(),
        "member_loss": -nll_sum / (m * n),
        "member_error": errors.mean(),
        "ambiguity": (q_bar * log_q_bar).sum() / n - cross_sum / (m * n),
        "entropy_min": entropy.min(), "entropy_max": entropy.max(), "entropy_mean": entropy.mean(),
        "entropy_std": entropy.std(unbiased=False),
    }
    return values, errors


def is_dominated(diagnostics: dict, n_members: int) -> bool:
    """True when one member is far better than the median (module dominance; needs at least 3 members)."""
    return n_members >= 3 and diagnostics["dominance_ratio"] <= DOMINANCE_RATIO
