"""DenseNet-BC members (Huang et al. 2017), as in the paper's CIFAR-100 ensembles (e.g. DN-100-12 x 4).

Per member: a 3x3 stem of 2k channels, three dense blocks of (depth - 4) / 6 bottleneck layers each
(BN-ReLU-conv1x1 to 4k, BN-ReLU-conv3x3 to k, concatenated to the features), transitions with compression 0.5
(BN-ReLU-conv1x1, 2x2 average pool), then BN-ReLU, global average pooling and a linear head. All members run as one
model: grouped convolutions (groups = M), per-member batch-norm channels, and member-wise concatenation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgens.errors import ConfigError
from edgens.stacks.base import MemberStack, StackSpec
from edgens.stacks.layers import BatchedLinear, grouped_to_members, member_concat


class _DenseLayer(nn.Module):
    def __init__(self, m: int, in_channels: int, growth: int) -> None:
        super().__init__()
        self.m = m
        self.norm1 = nn.BatchNorm2d(m * in_channels)
        self.conv1 = nn.Conv2d(m * in_channels, m * 4 * growth, 1, bias=False, groups=m)
        self.norm2 = nn.BatchNorm2d(m * 4 * growth)
        self.conv2 = nn.Conv2d(m * 4 * growth, m * growth, 3, padding=1, bias=False, groups=m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new = self.conv2(F.relu(self.norm2(self.conv1(F.relu(self.norm1(x))))))
        return member_concat(x, new, self.m)


class _Transition(nn.Module):
    def __init__(self, m: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(m * in_channels)
        self.conv = nn.Conv2d(m * in_channels, m * out_channels, 1, bias=False, groups=m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.norm(x))), 2)


class DenseNetStack(MemberStack):
    """M DenseNet-BC members; options: ``depth`` (4 + 6n), ``growth`` (k), ``compression`` (default 0.5)."""

    kind = "densenet"

    def __init__(self, spec: StackSpec) -> None:
        super().__init__(spec)
        depth = int(spec.options.get("depth", 0))
        growth = int(spec.options.get("growth", 0))
        compression = float(spec.options.get("compression", 0.5))
        if depth < 10 or (depth - 4) % 6 != 0 or growth < 1 or not 0 < compression <= 1:
            raise ConfigError(f"densenet needs depth = 4 + 6n (n >= 1), growth >= 1 and 0 < compression <= 1; got "
                              f"depth={depth}, growth={growth}, compression={compression}")
        if len(spec.input_shape) != 3:
            raise ConfigError(f"densenet members take images (channels, height, width); input shape is "
                              f"{spec.input_shape}")
        m, n_layers = spec.n_members, (depth - 4) // 6
        channels = 2 * growth
        blocks: list[nn.Module] = [nn.Conv2d(spec.input_shape[0], m * channels, 3, padding=1, bias=False)]
        for block in range(3):
            for _ in range(n_layers):
                blocks.append(_DenseLayer(m, channels, growth))
                channels += growth
            if block < 2:
                out = int(channels * compression)
                blocks.append(_Transition(m, channels, out))
                channels = out
        self.features = nn.Sequential(*blocks)
        self.final_norm = nn.BatchNorm2d(m * channels)
        self.head = BatchedLinear(m, channels, spec.n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = F.relu(self.final_norm(self.features(x)))
        pooled = F.adaptive_avg_pool2d(features, 1).flatten(1)
        return self.head(grouped_to_members(pooled, self.n_members))
