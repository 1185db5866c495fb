"""Multi-layer perceptron members: the paper's Fashion-MNIST ensembles (one hidden layer of ReLU units)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edgens.errors import ConfigError
from edgens.stacks.base import MemberStack, StackSpec
from edgens.stacks.layers import BatchedLinear, SharedInputLinear


class MLPStack(MemberStack):
    """M MLPs with hidden sizes ``options["hidden"]`` (e.g. (4,) for the paper's 256 x 4).

    The first layer reads the shared (flattened) input, so all members' first layers are one matmul; later layers
    are batched matmuls over members.
    """

    kind = "mlp"

    def __init__(self, spec: StackSpec) -> None:
        super().__init__(spec)
        hidden = tuple(int(h) for h in spec.options.get("hidden", ()))
        if not hidden or min(hidden) < 1:
            raise ConfigError(f"mlp needs options['hidden'] with one or more positive sizes, got {hidden}")
        m = spec.n_members
        in_features = math.prod(spec.input_shape)
        self.first = SharedInputLinear(m, in_features, hidden[0], relu=True)
        sizes = hidden + (spec.n_outputs,)
        self.rest = nn.ModuleList(BatchedLinear(m, a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x.flatten(1))  # ReLU already applied
        for index, layer in enumerate(self.rest):
            h = layer(h if index == 0 else F.relu(h))
        return h
