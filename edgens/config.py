"""Training settings (stdlib only, so the CLI can build and check them without importing torch).

Learning-rate convention: ``lr`` is **per member**. The modular loss is a mean over members, so each member's
gradient is 1/M of what it would get alone; edgens multiplies the loss by M before backpropagating. With this, the
same ``lr`` works for any ensemble size, and ``lr`` equals the paper's rate divided by M: their 256 x 4 rates 5.15
and 1.536 are 0.02 and 0.006 here, and so are their 64 x 16 (1.28 / 0.384), 16 x 64 (0.32 / 0.096) and 1 x 1024
(0.02) rates. Like the paper, the default drops the rate by ~0.3 above lam = 0.95, where the loss gets
ill-conditioned (the Hessian's condition number grows as 1 / (1 - lam)).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from edgens.checks import check_number
from edgens.errors import ConfigError, unknown_choice
from edgens.presets import PRESETS, check_preset

# Per-member default learning rate by stack kind (mlp: the paper's Fashion-MNIST rate).
DEFAULT_LR = {"mlp": 0.02, "cnn": 0.05, "densenet": 0.1}
HIGH_LAM = 0.95          # above this lam the default rate is scaled by HIGH_LAM_LR_FACTOR
HIGH_LAM_LR_FACTOR = 0.3
METHODS = ("modular", "bagging")
FAMILIES = ("categorical", "gaussian", "poisson")  # = edgens.ensemble.FAMILIES (numpy-free copy for --help)
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainConfig:
    """Every setting of a training run (stored in the run's config.json)."""

    preset: str = "mlp-256x4"
    n_members: int | None = None
    """Override the preset's member count."""
    lam: float = 0.99
    epochs: int = 30
    lr: float | None = None
    """Per-member learning rate; None: the preset kind's default (see module docstring)."""
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    batch_size: int = 100
    lr_milestones: tuple[float, ...] = (0.5, 0.75)
    """Epochs (as fractions of ``epochs``) after which the rate is multiplied by ``lr_gamma``."""
    lr_gamma: float = 0.1
    patience: int | None = None
    """Stop after this many epochs without a better validation score (None: run all epochs)."""
    seed: int = 0
    device: str = "auto"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    val_size: int | None = None
    split_seed: int = 0
    family: str = "categorical"
    train_limit: int | None = None
    method: str = "modular"
    """``modular`` (the modular loss with ``lam``) or ``bagging`` (each member on its own bootstrap sample, lam 0)."""
    anytime_weight: float = 0.0
    """mu: weight of the nested-prefix term added to the modular loss (0: the paper's loss). See edgens.losses."""
    prefixes: tuple[int, ...] | None = None
    """Member counts of the nested prefixes the anytime term trains (None: M/16, 10%, M/8, M/4, M/2)."""
    fault_weight: float = 0.0
    """nu: weight of the random-subset term (the ensemble of a random subset of the members, as faults leave it)
    added to the loss (0: none). See edgens.losses.subset_term."""
    fault_draws: int = 2
    """Random member subsets per step for the random-subset term (each serves the whole batch)."""
    eval_batch_size: int = 1000
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form notes recorded with the run (e.g. which sweep started it)."""

    def validate(self) -> TrainConfig:
        """Check every setting; return self.

        Raises:
            ConfigError: the first bad setting, with what was expected.
        """
        check_preset(self.preset)
        if not (math.isfinite(self.lam) and 0.0 <= self.lam <= 1.0):
            hint = " (lam > 1 makes the loss unbounded below)" if self.lam > 1 else ""
            raise ConfigError(f"lam must be in [0, 1], got {self.lam}{hint}")
        if self.method not in METHODS:
            raise unknown_choice("training method", self.method, METHODS)
        if self.method == "bagging" and self.lam != 0.0:
            raise ConfigError(f"bagging trains members independently: lam must be 0, got {self.lam}")
        if self.family not in FAMILIES:
            raise unknown_choice("target family", self.family, FAMILIES)
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise unknown_choice("device", self.device, DEVICES)
        positive_ints = {"epochs": self.epochs, "batch_size": self.batch_size, "eval_batch_size": self.eval_batch_size}
        positive_ints.update({k: v for k, v in (("n_members", self.n_members), ("patience", self.patience),
                                                ("val_size", self.val_size), ("train_limit", self.train_limit))
                              if v is not None})
        for name, value in positive_ints.items():
            check_number(name, value, low=1, integer=True)
        check_number("seed", self.seed, low=0, integer=True)
        if self.lr is not None:
            check_number("lr", self.lr, low=0, low_open=True)
        check_number("momentum", self.momentum, low=0, high=1, high_open=True)
        check_number("weight_decay", self.weight_decay, low=0)
        check_number("lr_gamma", self.lr_gamma, low=0, high=1, low_open=True)
        for fraction in self.lr_milestones:  # fractions of the epochs
            check_number("lr_milestones", fraction, low=0, high=1, low_open=True, high_open=True)
        if self.nesterov and self.momentum == 0:
            raise ConfigError("nesterov needs momentum > 0")
        check_number("anytime_weight", self.anytime_weight, low=0)
        if self.anytime_weight and self.method == "bagging":
            raise ConfigError("the anytime term trains ensembles of members jointly; bagging trains them independently")
        check_number("fault_weight", self.fault_weight, low=0)
        check_number("fault_draws", self.fault_draws, low=1, integer=True)
        if self.fault_weight and self.method == "bagging":
            raise ConfigError("the random-subset term trains ensembles of members jointly; bagging trains them "
                              "independently")
        if self.prefixes is not None:
            for k in self.prefixes:
                check_number("prefixes", k, low=1, integer=True)
        return self

    def resolved_prefixes(self, n_members: int) -> tuple[int, ...]:
        """The prefixes the anytime term trains for an ensemble of ``n_members`` (empty without the term).

        Raises:
            ConfigError: a prefix not below the member count, or repeated.
        """
        if not self.anytime_weight:
            return ()
        return check_prefixes(tuple(self.prefixes) if self.prefixes is not None else default_prefixes(n_members),
                              n_members)

    @property
    def kind(self) -> str:
        """The stack kind of the preset (mlp, cnn, densenet)."""
        return PRESETS[check_preset(self.preset)]["kind"]

    def resolved_lr(self) -> float:
        """The per-member learning rate used: ``lr``, or the kind's default (scaled down when lam > 0.95)."""
        if self.lr is not None:
            return self.lr
        base = DEFAULT_LR[self.kind]
        return base * HIGH_LAM_LR_FACTOR if self.lam > HIGH_LAM else base

    def milestone_epochs(self) -> list[int]:
        """Epoch indices at which the learning rate drops."""
        return sorted({max(1, round(f * self.epochs)) for f in self.lr_milestones})

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        data = dataclasses.asdict(self)
        data["lr_milestones"] = list(self.lr_milestones)
        data["prefixes"] = None if self.prefixes is None else list(self.prefixes)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a typo in a config should not pass silently).

        Raises:
            ConfigError: unknown keys.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown training setting(s) {', '.join(unknown)}; expected some of: "
                              f"{', '.join(sorted(names))}")
        values = dict(data)
        if "lr_milestones" in values:
            values["lr_milestones"] = tuple(values["lr_milestones"])
        if values.get("prefixes") is not None:
            values["prefixes"] = tuple(values["prefixes"])
        return cls(**values)


DEFAULT_PREFIX_FRACTIONS = (1 / 16, 0.1, 1 / 8, 1 / 4, 1 / 2)


def default_prefixes(n_members: int) -> tuple[int, ...]:
    """The nested prefixes the anytime term trains by default: M/16, 10%, M/8, M/4 and M/2 members (rounded; those
    below 1 or not below M dropped). For 256 members: 16, 26, 32, 64, 128: the first general stack of the default
    export, the runtime's ``members=0.1`` budget, and the prefix stacks' sizes. Measured (benchmarks/README.md): adding
    the 10% prefix to M/16, M/8, M/4, M/2 took the first 10% of the members from 12.37% to 11.41% test error (mlp-256x4,
    mu 1, seed 0)."""
    sizes = {round(n_members * f) for f in DEFAULT_PREFIX_FRACTIONS}
    return tuple(sorted(k for k in sizes if 1 <= k < n_members))


def check_prefixes(prefixes: tuple[int, ...], n_members: int) -> tuple[int, ...]:
    """``prefixes`` sorted, if they are distinct member counts in [1, M).

    Raises:
        ConfigError: a prefix outside [1, M) or repeated.
    """
    for k in prefixes:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < n_members:
            raise ConfigError(f"prefixes: expected member counts in [1, {n_members}) (the whole ensemble is the "
                              f"lam term already), got {k!r}")
    if len(set(prefixes)) != len(prefixes):
        raise ConfigError(f"prefixes: expected distinct member counts, got {list(prefixes)}")
    return tuple(sorted(prefixes))
