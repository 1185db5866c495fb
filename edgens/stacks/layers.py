"""Batched building blocks shared by the stacks (they import nothing from the stacks that use them)."""

from __future__ import annotations

import torch
from torch import nn

from edgens.stacks.base import uniform_fan_in_


class SharedInputLinear(nn.Module):
    """M dense layers that read the same input: one matmul over all members' units.

    ``forward`` maps (B, in) to (M, B, out). The weight is (M * out, in): member j owns rows [j*out, (j+1)*out).
    With ``relu``, the activation is applied before the members axis is moved first: on the contiguous matmul output
    it is about 3x faster (forward and backward) than on the transposed view.
    """

    def __init__(self, n_members: int, in_features: int, out_features: int, relu: bool = False) -> None:
        super().__init__()
        self.n_members, self.out_features, self.relu = n_members, out_features, relu
        self.weight = nn.Parameter(uniform_fan_in_(torch.empty(n_members * out_features, in_features), in_features))
        self.bias = nn.Parameter(uniform_fan_in_(torch.empty(n_members * out_features), in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.linear(x, self.weight, self.bias)  # (B, M * out)
        if self.relu:
            y = torch.relu(y)
        return y.view(x.shape[0], self.n_members, self.out_features).transpose(0, 1)


class BatchedLinear(nn.Module):
    """M independent dense layers applied member-wise: (M, B, in) -> (M, B, out) with one batched matmul."""

    def __init__(self, n_members: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(uniform_fan_in_(torch.empty(n_members, in_features, out_features), in_features))
        self.bias = nn.Parameter(uniform_fan_in_(torch.empty(n_members, 1, out_features), in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


def grouped_to_members(features: torch.Tensor, n_members: int) -> torch.Tensor:
    """(B, M * C) member-blocked features -> (M, B, C)."""
    return features.view(features.shape[0], n_members, -1).transpose(0, 1)


def member_concat(a: torch.Tensor, b: torch.Tensor, n_members: int) -> torch.Tensor:
    """Concatenate two member-blocked feature maps (B, M*Ca, H, W) and (B, M*Cb, H, W) per member.

    A plain ``torch.cat`` along channels would put all of ``b`` after all of ``a``; grouped convolutions need each
    member's channels to stay together: the result is (B, M*(Ca+Cb), H, W) with member j's ``a`` then ``b`` channels.
    """
    batch, _, height, width = a.shape
    joined = torch.cat([a.view(batch, n_members, -1, height, width), b.view(batch, n_members, -1, height, width)], 2)
    return joined.view(batch, -1, height, width)
