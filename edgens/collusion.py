"""The learner-collusion diagnostic of a finished run, recomputed from its best checkpoint (for runs trained before
the diagnostic was recorded per epoch, and for ``edgens inspect RUN --collusion``). The maths is
:func:`edgens.diagnostics.collusion_diagnostics`; the training examples are the same fixed subset training uses."""

from __future__ import annotations

import os

import torch

from edgens.diagnostics import collusion_diagnostics, collusion_probe
from edgens.rundir import RunDir
from edgens.stacks import build_stack
from edgens.train import load_data, predict_members


def run_collusion(run_dir: str | os.PathLike[str]) -> dict:
    """The collusion diagnostic of ``run_dir``'s best weights on its training subset and validation split.

    Raises:
        DataNotFoundError: the run, its checkpoint or its data is missing.
        RunDirectoryError: the checkpoint does not hold the run's stack.
    """
    run = RunDir(run_dir)
    config = run.config()
    train_config = run.train_config(config)
    stack = build_stack(run.stack_spec(config))
    stack.load_state_dict(run.checkpoint("best", "cpu", config)["model"])
    stack.eval()
    dataset = load_data(train_config)
    probe = collusion_probe(len(dataset.train_x), train_config.seed)
    target = torch.long if train_config.family == "categorical" else torch.float32

    def outputs(x) -> torch.Tensor:
        return predict_members(stack, torch.from_numpy(dataset.normalize(x)), train_config.eval_batch_size)

    return collusion_diagnostics(outputs(dataset.train_x[probe.numpy()]),
                                 torch.as_tensor(dataset.train_y[probe.numpy()], dtype=target),
                                 outputs(dataset.val_x), torch.as_tensor(dataset.val_y, dtype=target),
                                 train_config.family)
