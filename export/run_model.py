"""Load a finished training run for export: its config, best weights, data and stored outputs, all cross-checked."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from edgens.config import TrainConfig
from edgens.data import Dataset, load_dataset
from edgens.errors import RunDirectoryError
from edgens.rundir import RunDir
from edgens.stacks import MemberStack, build_stack

CONSISTENCY_EXAMPLES = 256  # validation examples re-run through the checkpoint to confirm it made the stored outputs
CONSISTENCY_TOLERANCE = 1e-3


@dataclass
class LoadedRun:
    """Everything export needs from a run."""

    run: RunDir
    config: dict
    train_config: TrainConfig
    stack: MemberStack
    dataset: Dataset
    val_eta: np.ndarray
    val_y: np.ndarray
    test_eta: np.ndarray
    test_y: np.ndarray


def load_run(run_dir: str | os.PathLike[str]) -> LoadedRun:
    """Load and check a finished run.

    Checks: training finished and every needed file exists; the checkpoint's stack equals config.json's, which is
    the preset config.json names; the weights load; the data set gives the same validation labels; and the weights
    reproduce the stored validation outputs.

    Raises:
        DataNotFoundError: the run or its data is missing.
        RunDirectoryError: missing files or any inconsistency (the message says which).
    """
    run = RunDir(run_dir)
    config = run.require_finished()
    train_config = run.train_config(config)
    spec = run.stack_spec(config, check_preset=True)
    best = run.checkpoint("best", "cpu", config)
    stack = build_stack(spec)
    try:
        stack.load_state_dict(best["model"])
    except RuntimeError as err:
        raise RunDirectoryError(f"{run.best_checkpoint} does not fit the {train_config.preset} stack: {err}") from None
    stack.eval()
    # The same call as training: with train_limit the normalisation statistics come from the smaller training part.
    dataset = load_dataset(train_config.dataset, train_config.data_dir, train_config.val_size,
                           train_config.split_seed, train_config.family, train_config.train_limit)
    val_eta, val_y = run.outputs("val")
    test_eta, test_y = run.outputs("test")
    if not np.array_equal(dataset.val_y, val_y) or not np.array_equal(dataset.test_y, test_y):
        raise RunDirectoryError(f"the {dataset.name} validation/test labels found now differ from the ones {run.path} "
                                f"was evaluated on; point --data-dir at the same data the run used")
    n = min(CONSISTENCY_EXAMPLES, len(val_y))
    with torch.no_grad():
        recomputed = stack(torch.from_numpy(dataset.normalize(dataset.val_x[:n]))).numpy()
    difference = float(np.abs(recomputed - val_eta[:, :n]).max())
    if difference > CONSISTENCY_TOLERANCE:
        raise RunDirectoryError(f"{run.best_checkpoint} does not reproduce the stored validation outputs (max "
                                f"difference {difference:.3g}); the run directory is inconsistent")
    return LoadedRun(run, config, train_config, stack, dataset, val_eta, val_y, test_eta, test_y)
