"""The run directory a training run writes, and the one way to read it (numpy and stdlib; torch only to load a
checkpoint).

::

    RUN/
      config.json            every setting, the resolved learning rate and device, data source, seed, versions
      metrics.jsonl          one JSON object per finished epoch (see edgens.diagnostics)
      checkpoints/last.pt    everything needed to resume (written atomically every epoch)
      checkpoints/best.pt    the weights of the best validation epoch
      outputs/{val,test}_eta.npy   members' natural parameters (M, N, K) float32 at the best epoch
      outputs/{val,test}_y.npy     the matching targets
      summary.json           final validation and test metrics (written last: its presence means "finished")
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgens.arrays import load_array
from edgens.config import TrainConfig
from edgens.errors import ConfigError, DataNotFoundError, RunDirectoryError
from edgens.fileio import (atomic_write, atomic_write_json, atomic_write_text, check_can_create,
                           remove_stale_temporaries)
from edgens.presets import preset_spec
from edgens.stack_spec import StackSpec

if TYPE_CHECKING:
    import torch

SPLITS = ("val", "test")


class RunDir:
    """Paths and small file operations of one run directory."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    config_path = property(lambda self: self.path / "config.json")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    summary_path = property(lambda self: self.path / "summary.json")
    last_checkpoint = property(lambda self: self.path / "checkpoints" / "last.pt")
    best_checkpoint = property(lambda self: self.path / "checkpoints" / "best.pt")

    def output_path(self, split: str, what: str) -> Path:
        """Path of ``outputs/{split}_{what}.npy`` (``what``: ``eta`` or ``y``)."""
        return self.path / "outputs" / f"{split}_{what}.npy"

    # --- creation -------------------------------------------------------------------------------------------
    def check_new(self) -> None:
        """Check that a new run can start here: the path is absent or an empty directory.

        Raises:
            RunDirectoryError: the path already holds files (resume it with --resume, or pick another).
            NotWritableError: it cannot be created there.
        """
        if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            raise RunDirectoryError(f"{self.path} already exists and is not empty; resume it with "
                                    f"`edgens train --resume {self.path}` or choose another --out")
        if not self.path.exists():
            check_can_create(self.path)

    def create(self, config: dict) -> None:
        """Start a new run by writing its config.json (see :meth:`check_new`)."""
        self.check_new()
        made = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            atomic_write_json(self.config_path, config)
        except BaseException:
            if made:  # nothing half-made: a run directory without its config.json is no run
                self.path.rmdir()
            raise

    # --- reading --------------------------------------------------------------------------------------------
    def _read_json(self, path: Path) -> dict:
        if not path.is_file():
            raise DataNotFoundError(f"{path} is missing; is {self.path} an edgens run directory?")
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RunDirectoryError(f"{path} is not valid JSON ({err})") from None
        except OSError as err:
            raise RunDirectoryError(f"{path} cannot be read ({err.strerror or err})") from None

    def config(self) -> dict:
        """The run's config.json."""
        return self._read_json(self.config_path)

    def train_config(self, config: dict | None = None) -> TrainConfig:
        """The training settings in config.json (or in ``config``, a config.json already read), checked.

        Raises:
            DataNotFoundError: config.json is missing.
            RunDirectoryError: config.json lacks the settings or holds invalid ones.
        """
        config = self.config() if config is None else config
        try:
            return TrainConfig.from_dict(config["config"]).validate()
        except (KeyError, TypeError, ValueError) as err:  # ConfigError is a ValueError
            raise RunDirectoryError(f"{self.config_path}: the training settings are unreadable ({err}); is this a "
                                    f"run directory of this edgens version?") from None

    def stack_spec(self, config: dict | None = None, check_preset: bool = False) -> StackSpec:
        """The stack described in config.json (or in ``config``).

        Args:
            config: config.json already read, to avoid reading it again.
            check_preset: also require the stack to be the preset the settings name (export does: it rebuilds
                the stack from the preset's code).

        Raises:
            DataNotFoundError: config.json is missing.
            RunDirectoryError: config.json has no readable stack, or (``check_preset``) not its preset's.
        """
        config = self.config() if config is None else config
        try:
            spec = StackSpec.from_dict(config["stack"])
        except (KeyError, TypeError, ValueError) as err:
            raise RunDirectoryError(f"{self.config_path}: the stack description is unreadable ({err})") from None
        if check_preset:
            preset = self.train_config(config).preset
            try:
                expected = preset_spec(preset, spec.input_shape, spec.n_outputs, spec.n_members)
            except ConfigError as err:
                raise RunDirectoryError(f"{self.config_path}: {err}") from None
            if (spec.kind, spec.options) != (expected.kind, expected.options):
                raise RunDirectoryError(f"{self.config_path}: the stack ({spec.kind}, {spec.options}) is not preset "
                                        f"{preset!r} ({expected.kind}, {expected.options})")
        return spec

    def checkpoint(self, which: str = "last", device: torch.device | str = "cpu",
                   config: dict | None = None) -> dict[str, Any]:
        """Load ``checkpoints/{which}.pt`` (``last`` or ``best``) and check that it holds config.json's stack.

        Raises:
            DataNotFoundError: the checkpoint or config.json is missing.
            RunDirectoryError: the file is unreadable, or it holds another stack than config.json describes.
        """
        from edgens.checkpoint import load_checkpoint  # torch: only here

        path = {"last": self.last_checkpoint, "best": self.best_checkpoint}[which]
        spec = self.stack_spec(config)
        state = load_checkpoint(path, device)
        try:
            held = StackSpec.from_dict(state["spec"])
        except (KeyError, TypeError, ValueError) as err:
            raise RunDirectoryError(f"{path} has no readable stack description ({err})") from None
        if held != spec:
            raise RunDirectoryError(f"{path} holds a {held.kind} stack of {held.n_members} members that differs from "
                                    f"config.json's ({spec.kind}, {spec.n_members} members); the run directory is "
                                    f"inconsistent")
        return state

    def summary(self) -> dict:
        """The run's summary.json (present once training finished)."""
        return self._read_json(self.summary_path)

    def is_finished(self) -> bool:
        """True once training wrote summary.json."""
        return self.summary_path.is_file()

    def metrics(self) -> list[dict]:
        """All epoch records of metrics.jsonl (empty if none yet)."""
        if not self.metrics_path.is_file():
            return []
        records = []
        for number, line in enumerate(self.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise RunDirectoryError(f"{self.metrics_path}, line {number}: not valid JSON ({err}); an "
                                            f"unfinished run rewrites it when resumed") from None
        return records

    def outputs(self, split: str, mmap: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Members' natural parameters (M, N, K) and targets (N,) of ``split`` (``val`` or ``test``).

        Raises:
            DataNotFoundError: a file is missing.
            RunDirectoryError: a file is truncated, corrupt, or of the wrong shape.
        """
        mode = "r" if mmap else None
        fix = (f"to write the outputs again from the best checkpoint, delete {self.summary_path} and run `edgens train "
               f"--resume {self.path}`")
        eta, y = (load_array(self.output_path(split, what), RunDirectoryError, fix, mode) for what in ("eta", "y"))
        if eta.ndim != 3 or y.ndim != 1 or eta.shape[1] != len(y):
            raise RunDirectoryError(f"{self.output_path(split, 'eta')}: shape {eta.shape} does not match the "
                                    f"{y.shape} targets of {self.output_path(split, 'y').name}; expected (M, N, K) and "
                                    f"(N,); {fix}")
        return eta, y

    def require_finished(self) -> dict:
        """Check that training finished and every file later steps need is there; return the config.

        Raises:
            DataNotFoundError: the directory or its config is missing.
            RunDirectoryError: files are missing (the message lists them) or training has not finished.
        """
        if not self.path.is_dir():
            raise DataNotFoundError(f"run directory {self.path} does not exist")
        config = self.config()
        needed = [self.summary_path, self.best_checkpoint] + [self.output_path(s, w) for s in SPLITS
                                                               for w in ("eta", "y")]
        missing = [str(p.relative_to(self.path)) for p in needed if not p.is_file()]
        if missing:
            hint = (f"; training has not finished: `edgens train --resume {self.path}`"
                    if not self.is_finished() else "")
            raise RunDirectoryError(f"{self.path} is missing {', '.join(missing)}{hint}")
        return config

    def remove_stale_temporaries(self) -> list[Path]:
        """Remove what killed writers left in the run (temporary checkpoint, metrics and output files; see
        :func:`edgens.fileio.remove_stale_temporaries`); a live process's are kept. Resuming does this first."""
        targets = [self.config_path, self.metrics_path, self.summary_path, self.last_checkpoint,
                   self.best_checkpoint] + [self.output_path(s, w) for s in SPLITS for w in ("eta", "y")]
        return [removed for target in targets for removed in remove_stale_temporaries(target)]

    # --- writing --------------------------------------------------------------------------------------------
    def write_metrics(self, history: list[dict]) -> None:
        """Rewrite metrics.jsonl from the full history (atomically, so it always matches the last checkpoint)."""
        atomic_write_text(self.metrics_path, "".join(json.dumps(record) + "\n" for record in history))

    def write_outputs(self, split: str, eta: np.ndarray, y: np.ndarray) -> None:
        """Save a split's member outputs and targets as .npy files (atomically)."""
        atomic_write(self.output_path(split, "eta"), lambda h: np.save(h, np.ascontiguousarray(eta, np.float32)))
        atomic_write(self.output_path(split, "y"), lambda h: np.save(h, np.ascontiguousarray(y)))

    def write_summary(self, summary: dict) -> None:
        """Write summary.json (last, atomically)."""
        atomic_write_json(self.summary_path, summary)
