"""The runs of a lam sweep: naming, training (reusing finished runs, resuming interrupted ones) and collecting.

A sweep over presets, lam values, methods and trials lives in one directory::

    DIR/runs/<preset>-lam<lam>-<method>-t<trial>/     one edgens run directory each (see edgens.rundir)

Trial ``t`` trains with seed ``base_seed + t``; every trial shares the validation split (its own seed), so runs
differ only in initialisation and data order. A finished run (summary.json present) is reused as it is, after
checking that its settings are the ones asked for; an interrupted one is resumed from its last checkpoint
(:func:`edgens.train.resume`), so stopping and re-running a sweep costs at most the unfinished epoch.

Methods that train: ``modular`` (the modular loss at each lam) and ``bagging`` (independent members on bootstrap
samples, lam 0 only). ``stacking`` trains nothing: it fits a combiner on the modular runs' validation outputs
(:func:`edgens.bench.analysis.fit_stacking`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgens.config import TrainConfig
from edgens.errors import ConfigError, RunDirectoryError, unknown_choice
from edgens.rundir import RunDir

log = logging.getLogger(__name__)

TRAINED_METHODS = ("modular", "bagging")
METHODS = ("modular", "bagging", "stacking")
# Settings that may differ between a stored run and the sweep asking for it without changing the result's meaning.
_IGNORED_SETTINGS = {"device", "data_dir", "extra", "eval_batch_size"}


@dataclass(frozen=True)
class SweepRun:
    """One training run of a sweep."""

    preset: str
    lam: float
    method: str
    trial: int

    @property
    def name(self) -> str:
        """Directory name ``<preset>-lam<lam>-<method>-t<trial>`` (lam written with ``%g``)."""
        return f"{self.preset}-lam{self.lam:g}-{self.method}-t{self.trial}"


def parse_lams(text: str) -> list[float]:
    """Parse ``"0,0.5,0.99,1"`` into sorted unique floats in [0, 1].

    Raises:
        ConfigError: not numbers, empty, or a value outside [0, 1].
    """
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--lams expects comma-separated numbers in [0, 1] like 0,0.5,0.99,1; got {text!r}") from None
    if not values:
        raise ConfigError(f"--lams expects at least one value in [0, 1]; got {text!r}")
    bad = [v for v in values if not 0.0 <= v <= 1.0]
    if bad:
        raise ConfigError(f"lam values must be in [0, 1] (lam > 1 makes the loss unbounded below); got {bad}")
    return sorted(set(values))


def parse_methods(text: str) -> list[str]:
    """Parse ``"modular,bagging,stacking"``.

    Raises:
        ConfigError: an unknown method (the message lists the valid ones).
    """
    methods = [part.strip() for part in text.split(",") if part.strip()]
    for method in methods:
        if method not in METHODS:
            raise unknown_choice("bench method", method, METHODS)
    if not methods:
        raise ConfigError(f"--methods expects some of {', '.join(METHODS)}; got {text!r}")
    return list(dict.fromkeys(methods))


def plan_runs(presets: Sequence[str], lams: Sequence[float], methods: Sequence[str],
              trials: int) -> list[SweepRun]:
    """The training runs a sweep needs, trial-major (all lam values of trial 0 first, so partial sweeps are useful).

    ``stacking`` needs the ``modular`` runs; ``bagging`` is trained at lam 0 only (it needs independent members).

    Raises:
        ConfigError: ``trials`` < 1.
    """
    if trials < 1:
        raise ConfigError(f"trials must be >= 1, got {trials}")
    runs: list[SweepRun] = []
    for trial in range(trials):
        for preset in presets:
            if "modular" in methods or "stacking" in methods:
                runs += [SweepRun(preset, lam, "modular", trial) for lam in lams]
            if "bagging" in methods:
                runs.append(SweepRun(preset, 0.0, "bagging", trial))
    return runs


def run_config(run: SweepRun, epochs: int, base_seed: int = 0, **settings: Any) -> TrainConfig:
    """The :class:`TrainConfig` of one sweep run (``settings``: other TrainConfig fields, e.g. ``train_limit``)."""
    return TrainConfig(preset=run.preset, lam=run.lam, method=run.method, epochs=epochs, seed=base_seed + run.trial,
                       extra={"sweep_run": run.name}, **settings).validate()


def check_matches(run_dir: RunDir, config: TrainConfig) -> None:
    """Check that a stored run was trained with ``config``'s settings (apart from device and data location).

    Raises:
        RunDirectoryError: a setting differs (the message lists stored and expected values).
    """
    stored = run_dir.config()["config"]
    wanted = config.to_dict()
    differ = {key: (stored.get(key), value) for key, value in wanted.items()
              if key not in _IGNORED_SETTINGS and stored.get(key) != value}
    if differ:
        details = ", ".join(f"{key}={got!r} (expected {want!r})" for key, (got, want) in sorted(differ.items()))
        raise RunDirectoryError(f"{run_dir.path} holds a run with other settings: {details}; use another runs "
                                f"directory (--out or --runs) or remove that run")


def ensure_run(path: str | Path, config: TrainConfig, callbacks: Any = None) -> tuple[dict, str]:
    """Make sure the run at ``path`` exists and is finished: reuse it, resume it, or train it.

    Returns:
        ``(summary, status)`` with status ``reused``, ``resumed`` or ``trained``.

    Raises:
        RunDirectoryError: ``path`` holds a run with other settings, or unrelated files.
        ConfigError, DataNotFoundError, TrainingDivergedError: from training.
    """
    run_dir = RunDir(path)
    if run_dir.config_path.is_file():
        check_matches(run_dir, config)
        if run_dir.is_finished():
            run_dir.require_finished()
            return run_dir.summary(), "reused"
        from edgens.train import resume  # torch: only when something must be trained

        log.info("resuming %s", run_dir.path)
        return resume(run_dir.path, callbacks, None if config.device == "auto" else config.device), "resumed"
    from edgens.train import train

    log.info("training %s", run_dir.path)
    return train(config, run_dir.path, callbacks), "trained"


def run_sweep(runs_dir: str | Path, runs: Sequence[SweepRun], epochs: int, base_seed: int = 0,
              callbacks_for: Callable[[SweepRun], Any] | None = None,
              on_run: Callable[[int, int, SweepRun, str], None] | None = None, **settings: Any) -> dict[str, str]:
    """Train (or reuse, or resume) every run under ``runs_dir`` (``runs_dir/<run name>/``).

    Args:
        runs_dir: the directory holding the sweep's run directories (``DIR/runs`` by convention).
        runs: from :func:`plan_runs`.
        epochs, base_seed, settings: training settings (see :func:`run_config`).
        callbacks_for: progress callbacks (:class:`edgens.train.Callbacks`) for a run that trains or resumes.
        on_run: called as ``on_run(done, total, run, status)`` after each run.

    Returns:
        ``{run name: status}``.

    Raises:
        Whatever :func:`ensure_run` raises; runs finished before the error stay finished.
    """
    statuses: dict[str, str] = {}
    for number, run in enumerate(runs, 1):
        config = run_config(run, epochs, base_seed, **settings)
        path = Path(runs_dir) / run.name
        # progress callbacks only for runs that will train (a reused run draws nothing)
        will_train = callbacks_for is not None and not RunDir(path).is_finished()
        _, status = ensure_run(path, config, callbacks_for(run) if will_train else None)
        statuses[run.name] = status
        if on_run is not None:
            on_run(number, len(runs), run, status)
    return statuses
