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

# Learner collusion (Jeffares et al., "Joint Training of Deep Ensembles Fails Due to Learner Collusion"): members
# inflate their apparent diversity with offsets that cancel in the ensemble. We flag it when, on validation data,
# the diversity is at least COLLUSION_RATIO of the mean member loss (the members' own loss is then >= 20x what the
# diversity leaves for the ensemble), or constant offsets make up at least COLLUSION_FRACTION of the members'
# spread. Measured (benchmarks/README.md, mlp-256x4, 30 epochs): ratio 0.17 / 0.89 / 0.98 and offset fraction
# 0.24 / 0.24 / 0.37 at lam 0 / 0.99 / 1: lam 1 is flagged, lam 0.99 is not.
COLLUSION_RATIO = 0.95
COLLUSION_FRACTION = 0.5
COLLUSION_PROBE = 5000  # training examples the collusion diagnostic looks at each epoch (a fixed random subset)


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


@torch.no_grad()
def collusion_diagnostics(train_eta: torch.Tensor, train_y: torch.Tensor, val_eta: torch.Tensor,
                          val_y: torch.Tensor, family: str) -> dict:
    """The learner-collusion diagnostic from the members' outputs on training and validation data.

    Diversity is the ambiguity, mean KL(q_bar || q_j). Collusion's signatures (Jeffares et al.) are diversity that
    is large against the members' own loss, diversity that does not generalise from training to held-out data, and
    diversity made of constant offsets. The debiasing test: each member's mean offset from the ensemble, per class,
    fitted on the training outputs (``o_j = mean_n(eta_j - eta_bar)``), sums to zero over members, so subtracting
    it leaves the ensemble unchanged. What it removes is measured on the members' spread in natural-parameter space
    (for categorical members, logits centred over the classes of each example, which leaves probabilities
    unchanged): spread = mean_j,n |eta_jn - eta_bar_n|^2, of which the offsets' part is mean_j |o_j|^2 on the
    training data (an exact split, so the fraction lies in [0, 1]; for gaussian members the spread is twice the
    diversity itself). On validation data the fraction is 1 - spread after removing the training offsets / spread.

    Returns:
        ``{train,val}_diversity``, ``{train,val}_member_loss``, ``{train,val}_diversity_ratio`` (diversity /
        mean member loss), ``diversity_ratio_gap`` (train ratio - val ratio), and ``{train,val}_debiased_fraction``:
        the fraction of the members' spread that constant offsets make up.
    """
    def centred(eta: torch.Tensor) -> torch.Tensor:  # categorical logits: the per-example constant is free
        return eta - eta.mean(-1, keepdim=True) if family == "categorical" else eta

    offsets = centred(train_eta - train_eta.mean(0)).mean(1, keepdim=True)  # (M, 1, K), summing to 0 over members
    values = {}
    for split, eta, y in (("train", train_eta, train_y), ("val", val_eta, val_y)):
        y = y.long() if family == "categorical" else y.to(eta.dtype)
        eta_bar = eta.mean(0)
        diversity = kl_to_members(eta_bar, eta, family).mean()
        member_loss = member_nll(eta, y, family).mean()
        deviation = centred(eta - eta_bar)
        spread = deviation.square().sum(-1).mean()
        remaining = (deviation - offsets).square().sum(-1).mean()
        values[f"{split}_diversity"] = diversity
        values[f"{split}_member_loss"] = member_loss
        values[f"{split}_diversity_ratio"] = diversity / member_loss.clamp_min(1e-12)
        values[f"{split}_debiased_fraction"] = 1 - remaining / spread.clamp_min(1e-12)
    values["diversity_ratio_gap"] = values["train_diversity_ratio"] - values["val_diversity_ratio"]
    return dict(zip(values.keys(), torch.stack([v.float() for v in values.values()]).cpu().tolist()))


def collusion_probe(n_train: int, seed: int, size: int = COLLUSION_PROBE) -> torch.Tensor:
    """The training examples the collusion diagnostic uses: a fixed random subset (the same in every epoch, and for
    the same run afterwards), at most ``size`` of ``n_train``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_train, generator=generator)[:size].sort().values


def is_colluding(collusion: dict) -> bool:
    """True when, on validation data, diversity is at least :data:`COLLUSION_RATIO` of the mean member loss, or
    constant offsets make up at least :data:`COLLUSION_FRACTION` of the members' spread."""
    return collusion["val_diversity_ratio"] >= COLLUSION_RATIO or \
        collusion["val_debiased_fraction"] >= COLLUSION_FRACTION
