"""Which members each rank owns, and moving model and optimiser state between whole-ensemble and per-rank form.

Every parameter and buffer of a stack is member-blocked along axis 0 (see :mod:`edgens.stacks.base`): its first axis
has M * c rows and member j owns rows [j*c, (j+1)*c). Ranks own contiguous, ordered member slices, so a rank's
tensors are one row range of the whole ensemble's, and the whole ensemble's are the ranks' concatenated in rank
order along axis 0. SGD momentum buffers have their parameter's shape, so they split and join the same way; 0-d
tensors (batch norm's num_batches_tracked, an optimiser's step count) are the same on every rank and are not split.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from edgens.errors import ConfigError, RunDirectoryError


def member_slices(n_members: int, world_size: int) -> list[range]:
    """Contiguous member ranges, one per rank, as even as possible (the first ``M % W`` ranks get one more).

    Raises:
        ConfigError: more ranks than members (a rank without members has nothing to train).
    """
    if world_size < 1 or world_size > n_members:
        raise ConfigError(f"{world_size} processes for an ensemble of {n_members} members: every process needs at "
                          f"least one member; start between 1 and {n_members} processes")
    base, extra = divmod(n_members, world_size)
    bounds = [0]
    for rank in range(world_size):
        bounds.append(bounds[-1] + base + (rank < extra))
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def take_members(tensor: torch.Tensor, n_members: int, members: range, name: str = "tensor") -> torch.Tensor:
    """The rows of ``members`` of a member-blocked tensor (a copy); 0-d tensors are returned as they are.

    Raises:
        RunDirectoryError: the first axis is not a multiple of ``n_members`` (state of another ensemble).
    """
    if tensor.dim() == 0:
        return tensor
    if tensor.shape[0] % n_members:
        raise RunDirectoryError(f"{name} has {tensor.shape[0]} rows, expected a multiple of the {n_members} members; "
                                f"the checkpoint belongs to another ensemble")
    rows = tensor.shape[0] // n_members
    return tensor[members.start * rows:members.stop * rows].clone()


def concat_members(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Join the ranks' pieces of one member-blocked tensor (rank order); 0-d tensors: rank 0's."""
    return tensors[0] if tensors[0].dim() == 0 else torch.cat(list(tensors), 0)


def take_model_members(state: Mapping[str, torch.Tensor], n_members: int, members: range) -> dict[str, torch.Tensor]:
    """A rank's slice of a whole-ensemble model state dict.

    Raises:
        RunDirectoryError: a tensor is not member-blocked for ``n_members``.
    """
    return {name: take_members(tensor, n_members, members, name) for name, tensor in state.items()}


def concat_model_members(states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The whole ensemble's model state dict from the ranks' state dicts (rank order)."""
    return {name: concat_members([state[name] for state in states]) for name in states[0]}


def take_optimizer_members(state: Mapping[str, Any], n_members: int, members: range) -> dict[str, Any]:
    """A rank's slice of a whole-ensemble optimiser state dict (``{"state": ..., "param_groups": ...}``).

    Parameters are numbered the same way on every rank (the same architecture), so only the per-parameter tensors
    (momentum buffers) are sliced; hyper-parameters are copied.

    Raises:
        RunDirectoryError: a tensor is not member-blocked for ``n_members``.
    """
    per_param = {
        index: {key: take_members(value, n_members, members, f"optimizer state {key} of parameter {index}")
                if isinstance(value, torch.Tensor) else copy.deepcopy(value) for key, value in entries.items()}
        for index, entries in state["state"].items()}
    return {"state": per_param, "param_groups": copy.deepcopy(state["param_groups"])}


def concat_optimizer_members(states: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The whole ensemble's optimiser state dict from the ranks' (rank order)."""
    per_param = {}
    for index, entries in states[0]["state"].items():
        per_param[index] = {key: concat_members([s["state"][index][key] for s in states])
                            if isinstance(value, torch.Tensor) else value for key, value in entries.items()}
    return {"state": per_param, "param_groups": copy.deepcopy(states[0]["param_groups"])}


def to_cpu(value: Any) -> Any:
    """``value`` with every tensor in it (nested dicts, lists, tuples) on the CPU, for pickling between ranks.

    Why: a pickled CUDA tensor is restored on the same device index on the receiving rank, i.e. on another
    rank's GPU.
    """
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(item) for item in value)
    return value
