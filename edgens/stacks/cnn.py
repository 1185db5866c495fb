"""Small convolutional members: the paper's CIFAR-10 network, generalised to any input shape.

Each member: 3x3 convolutions (padding 1) with the given filters and strides, each followed by batch norm and ReLU,
then global average pooling and a linear head. All members run as one model: the first convolution reads the shared
input (one convolution with M * filters outputs); later convolutions are grouped (groups = M), so member j only
sees its own channels; batch norm has per-member channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgens.errors import ConfigError
from edgens.stacks.base import MemberStack, StackSpec
from edgens.stacks.layers import BatchedLinear, grouped_to_members


class CNNStack(MemberStack):
    """M small CNNs; options: ``channels`` (filters per conv), ``strides`` (same length), ``batch_norm`` (bool)."""

    kind = "cnn"

    def __init__(self, spec: StackSpec) -> None:
        super().__init__(spec)
        channels = tuple(int(c) for c in spec.options.get("channels", ()))
        strides = tuple(int(s) for s in spec.options.get("strides", (1,) * len(channels)))
        batch_norm = bool(spec.options.get("batch_norm", True))
        if not channels or len(strides) != len(channels) or min(channels) < 1 or min(strides) < 1:
            raise ConfigError(f"cnn needs options 'channels' and 'strides' of equal length with positive values, "
                              f"got channels={channels}, strides={strides}")
        if len(spec.input_shape) != 3:
            raise ConfigError(f"cnn members take images (channels, height, width); input shape is {spec.input_shape}")
        m = spec.n_members
        layers: list[nn.Module] = []
        in_channels = spec.input_shape[0]
        for index, (out, stride) in enumerate(zip(channels, strides)):
            groups = 1 if index == 0 else m  # the first convolution reads the shared input
            conv_in = in_channels if index == 0 else m * in_channels
            layers.append(nn.Conv2d(conv_in, m * out, 3, stride, 1, groups=groups, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(m * out))
            layers.append(nn.ReLU(inplace=True))
            in_channels = out
        self.features = nn.Sequential(*layers)
        self.head = BatchedLinear(m, in_channels, spec.n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)  # (B, M * C)
        return self.head(grouped_to_members(pooled, self.n_members))
