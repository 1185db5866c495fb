"""Member-parallel training on torch.distributed: the distributed form of the paper's Section 3.3.

Each rank owns a contiguous slice of the members and computes their natural parameters eta_j (M_local, B, K). One
all-reduce (sum) per step of the ranks' sums over their members, B x K numbers (plus two loss sums for the
progress display), gives the ensemble's eta_bar on every rank; each rank then backpropagates through its own
members only. Communication per step is independent of the model size; data-parallel training of the same ensemble
would all-reduce every parameter gradient instead.

Launch with ``torchrun --nproc-per-node N -m edgens train ...`` or ``edgens train --nproc-per-node N ...``; rank 0
writes a run directory in exactly the single-process format.

Modules (one concept each):

- :mod:`~edgens.distributed.launch`: the torchrun environment and the launcher (no torch at import time);
- :mod:`~edgens.distributed.comm`: the process group and the collectives, whose failures become
  :class:`~edgens.errors.DistributedError` within a timeout;
- :mod:`~edgens.distributed.slices`: member slices per rank, and splitting / assembling member-blocked model and
  optimiser state;
- :mod:`~edgens.distributed.trainer`: :class:`DistributedTrainer`, :func:`train_distributed`,
  :func:`resume_distributed`.

Importing this package is light; the names below load their (torch-importing) modules on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Communicator": "edgens.distributed.comm",
    "process_group": "edgens.distributed.comm",
    "DistributedTrainer": "edgens.distributed.trainer",
    "train_distributed": "edgens.distributed.trainer",
    "resume_distributed": "edgens.distributed.trainer",
    "member_slices": "edgens.distributed.slices",
    "WorldInfo": "edgens.distributed.launch",
    "torchrun_env": "edgens.distributed.launch",
    "launch": "edgens.distributed.launch",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
