"""What every member stack is: M members of one architecture computed as one batched model.

Layout rule that makes subsets generic: every parameter and buffer with at least one axis is *member-blocked along
axis 0*: its first axis has size M * c and member j owns rows ``[j*c, (j+1)*c)`` (``c`` = 1 for tensors shaped
(M, ...)). Fused first layers (one matmul or convolution over all members' units), grouped convolutions (groups = M)
and per-member batch-norm channels all follow it, so a subset of members is a row slice of every tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from edgens.errors import ConfigError, InputError
from edgens.stack_spec import StackSpec


class MemberStack(nn.Module):
    """Base class: ``forward(x)`` maps a batch (B, *input_shape) to natural parameters (M, B, K)."""

    kind: ClassVar[str] = ""

    def __init__(self, spec: StackSpec) -> None:
        super().__init__()
        if spec.n_members < 1:
            raise ConfigError(f"a stack needs at least one member, got n_members={spec.n_members}")
        if spec.n_outputs < 1:
            raise ConfigError(f"a stack needs at least one output, got n_outputs={spec.n_outputs}")
        self.spec = spec

    @property
    def n_members(self) -> int:
        """M, the number of members."""
        return self.spec.n_members

    def check_input(self, x: torch.Tensor) -> None:
        """Raise InputError unless ``x`` has shape (B, *input_shape) with B >= 1."""
        if tuple(x.shape[1:]) != tuple(self.spec.input_shape) or x.shape[0] < 1:
            shape = ", ".join(map(str, self.spec.input_shape))
            raise InputError(f"{self.kind} stack expects input of shape (batch, {shape}) with batch >= 1; got "
                             f"{tuple(x.shape)}")

    def subset(self, member_ids: Sequence[int]) -> MemberStack:
        """A new stack holding only ``member_ids`` (in that order); its outputs equal ``self(x)[member_ids]``.

        Raises:
            InputError: an id out of range or repeated, or an empty list.
        """
        ids = [int(i) for i in member_ids]
        if not ids or len(set(ids)) != len(ids) or min(ids) < 0 or max(ids) >= self.n_members:
            raise InputError(f"member ids must be distinct integers in [0, {self.n_members - 1}], got {ids}")
        from edgens.stacks import build_stack  # the registry imports this module

        sub = build_stack(self.spec.with_members(len(ids)))
        index = torch.tensor(ids)
        state = {}
        for name, tensor in self.state_dict().items():
            if tensor.dim() == 0:  # e.g. batch norm's num_batches_tracked
                state[name] = tensor.clone()
                continue
            blocked = tensor.reshape(self.n_members, -1, *tensor.shape[1:])
            state[name] = blocked.index_select(0, index.to(tensor.device)).reshape(-1, *tensor.shape[1:]).clone()
        sub.load_state_dict(state)
        sub.train(self.training)
        return sub.to(next(self.parameters()).device)

    def params_per_member(self) -> int:
        """Trainable parameters of one member (the fused first layer split evenly)."""
        return sum(p.numel() for p in self.parameters()) // self.n_members

    @torch.no_grad()
    def flops_per_member(self) -> int:
        """FLOPs of one member for one example: 2 per multiply-add of matrix products and convolutions.

        Batch norm, activations, pooling and the final combination are not counted (they are a few percent).
        """
        from torch.utils.flop_counter import FlopCounterMode

        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        counter = FlopCounterMode(display=False)
        with counter:
            self(torch.zeros(1, *self.spec.input_shape, device=device))
        self.train(was_training)
        return int(counter.get_total_flops()) // self.n_members


def uniform_fan_in_(tensor: torch.Tensor, fan_in: int) -> torch.Tensor:
    """PyTorch's default Linear/Conv initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for any layout."""
    bound = 1.0 / max(fan_in, 1) ** 0.5
    return nn.init.uniform_(tensor, -bound, bound)
