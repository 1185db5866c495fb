"""Plain one-network-per-member implementations: the obvious way, kept as a reference.

They use only standard layers (``nn.Linear``, ``nn.Conv2d`` without groups, ``nn.BatchNorm2d``, channel ``torch.cat``)
and a Python loop over members (:class:`LoopEnsemble`), which is what the paper's code and most libraries do. Tests
check that the fused stacks compute exactly this; the training-speed benchmark compares against it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edgens.errors import ConfigError
from edgens.stacks.base import MemberStack, StackSpec
from edgens.stacks.layers import BatchedLinear, SharedInputLinear


class ReferenceMLP(nn.Module):
    """One MLP member."""

    def __init__(self, in_features: int, hidden: tuple[int, ...], n_outputs: int) -> None:
        super().__init__()
        sizes = (in_features, *hidden, n_outputs)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        for index, layer in enumerate(self.layers):
            h = layer(h if index == 0 else F.relu(h))
        return h


class ReferenceCNN(nn.Module):
    """One small CNN member."""

    def __init__(self, in_channels: int, channels: tuple[int, ...], strides: tuple[int, ...], batch_norm: bool,
                 n_outputs: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for out, stride in zip(channels, strides):
            layers.append(nn.Conv2d(in_channels, out, 3, stride, 1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU())
            in_channels = out
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(in_channels, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).mean(dim=(2, 3)))


class _Bottleneck(nn.Module):
    def __init__(self, in_channels: int, growth: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(in_channels), nn.Conv2d(in_channels, 4 * growth, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(4 * growth), nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))], dim=1)


class ReferenceDenseNet(nn.Module):
    """One DenseNet-BC member."""

    def __init__(self, in_channels: int, depth: int, growth: int, compression: float, n_outputs: int) -> None:
        super().__init__()
        channels = 2 * growth
        modules: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)]
        for block in range(3):
            for _ in range((depth - 4) // 6):
                modules.append(_Bottleneck(channels, growth))
                channels += growth
            if block < 2:
                out = int(channels * compression)
                modules += [nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, out, 1, bias=False),
                            nn.AvgPool2d(2)]
                channels = out
        modules += [nn.BatchNorm2d(channels), nn.ReLU()]
        self.body = nn.Sequential(*modules)
        self.fc = nn.Linear(channels, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).mean(dim=(2, 3)))


def reference_member(spec: StackSpec) -> nn.Module:
    """A freshly initialised plain network for one member of ``spec``."""
    o, k = spec.options, spec.n_outputs
    if spec.kind == "mlp":
        return ReferenceMLP(math.prod(spec.input_shape), tuple(o["hidden"]), k)
    if spec.kind == "cnn":
        channels = tuple(o["channels"])
        return ReferenceCNN(spec.input_shape[0], channels, tuple(o.get("strides", (1,) * len(channels))),
                            bool(o.get("batch_norm", True)), k)
    if spec.kind == "densenet":
        return ReferenceDenseNet(spec.input_shape[0], int(o["depth"]), int(o["growth"]),
                                 float(o.get("compression", 0.5)), k)
    raise ConfigError(f"no reference implementation for stack kind {spec.kind!r}")


_FUSED = (SharedInputLinear, BatchedLinear, nn.Conv2d, nn.BatchNorm2d)
_PLAIN = (nn.Linear, nn.Conv2d, nn.BatchNorm2d)


@torch.no_grad()
def copy_member(stack: MemberStack, j: int, member: nn.Module) -> nn.Module:
    """Copy member ``j``'s weights from ``stack`` into a plain network (layers matched in forward order).

    Raises:
        ConfigError: the layers do not correspond (different architectures).
    """
    fused = [mod for mod in stack.modules() if isinstance(mod, _FUSED)]
    plain = [mod for mod in member.modules() if isinstance(mod, _PLAIN)]
    if len(fused) != len(plain):
        raise ConfigError(f"architectures differ: the stack has {len(fused)} layers, the member {len(plain)}")
    m = stack.n_members
    for src, dst in zip(fused, plain):
        if isinstance(src, BatchedLinear):  # weight (M, in, out), bias (M, 1, out)
            dst.weight.copy_(src.weight[j].T)
            dst.bias.copy_(src.bias[j, 0])
            continue
        # Every other fused tensor is member-blocked along axis 0 (see edgens.stacks.base).
        for name, tensor in list(src.named_parameters(recurse=False)) + list(src.named_buffers(recurse=False)):
            target = getattr(dst, name)
            if tensor.dim() == 0:
                target.copy_(tensor)
                continue
            block = tensor.reshape(m, -1, *tensor.shape[1:])[j].reshape(target.shape)
            target.copy_(block)
    return member


class LoopEnsemble(nn.Module):
    """M separate networks called one after another: ``forward(x) -> (M, B, K)``."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(x) for member in self.members])


def reference_ensemble(stack: MemberStack) -> LoopEnsemble:
    """A :class:`LoopEnsemble` of plain networks holding the same weights as ``stack``."""
    members = [copy_member(stack, j, reference_member(stack.spec)) for j in range(stack.n_members)]
    ensemble = LoopEnsemble(members).to(next(stack.parameters()).device)
    return ensemble.train(stack.training)
