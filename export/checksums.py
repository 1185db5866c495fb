"""Checked stack graphs: the torch modules ``edgens export`` writes when a stack's graph carries its own checksums.

:class:`CheckedMLP` computes the same outputs as an :class:`~edgens.stacks.mlp.MLPStack` of one hidden layer plus
the checksums of ``edgens.runtime.checksums`` (scheme ``mlp-abft``): a check member in the hidden layer (its first
unit the negated sum of all the others), two extra output columns, and the hidden pre-activations' sum as a second
output. The class columns are computed by the
same matrix products over the same terms as the plain graph's; the extra rows and columns only widen them.
Other stack kinds (grouped CNN, DenseNet) and deeper MLPs have no checked form yet: :func:`checked_module` returns
None for them and export writes them unchecked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgens.runtime.bundle import ChecksumInfo
from edgens.runtime.checksums import CHECK_OUTPUT
from edgens.stacks import MemberStack
from edgens.stacks.mlp import MLPStack

UNIT_ROUNDOFF = {"fp32": 2.0 ** -24, "fp16": 2.0 ** -11}


class CheckedMLP(nn.Module):
    """An MLP stack of one hidden layer with checksums: ``x -> (eta (M + 1, B, K + 2), checks (B, 1))``.

    Built in float64 from the stack's weights, then cast to ``dtype``: the extra rows and columns are sums of the
    weights as the graph will hold them (cast first, summed after), so the checksums hold up to the graph's own
    rounding.
    """

    def __init__(self, stack: MLPStack, dtype: torch.dtype = torch.float32):
        super().__init__()
        m, h = stack.first.n_members, stack.first.out_features
        self.m, self.h = m, h
        w1 = stack.first.weight.detach().to(dtype).double()  # (M h, n)
        b1 = stack.first.bias.detach().to(dtype).double()
        check_row = torch.zeros(h, w1.shape[1], dtype=torch.float64)
        check_row[0] = -w1.sum(0)  # the check member's first unit; its other units are zero
        check_bias = torch.zeros(h, dtype=torch.float64)
        check_bias[0] = -b1.sum()
        self.hidden_weight = nn.Parameter(torch.cat([w1, check_row]).to(dtype), requires_grad=False)
        self.hidden_bias = nn.Parameter(torch.cat([b1, check_bias]).to(dtype), requires_grad=False)
        last = stack.rest[0]
        w2 = last.weight.detach().to(dtype).double()  # (M, h, K)
        b2 = last.bias.detach().to(dtype).double()  # (M, 1, K)
        w2 = torch.cat([w2, -w2.sum(-1, keepdim=True)], -1)  # the check column: each member's outputs sum to 0
        b2 = torch.cat([b2, -b2.sum(-1, keepdim=True)], -1)
        w2 = torch.cat([w2, w2.abs().sum(-1, keepdim=True)], -1)  # the magnitude column
        b2 = torch.cat([b2, b2.abs().sum(-1, keepdim=True)], -1)
        k2 = w2.shape[-1]
        # The check member's output weights are zero: its row is exactly zero but for the hidden residual the
        # runner writes there.
        self.output_weight = nn.Parameter(torch.cat([w2, torch.zeros(1, h, k2, dtype=torch.float64)]).to(dtype),
                                          requires_grad=False)
        self.output_bias = nn.Parameter(torch.cat([b2, torch.zeros(1, 1, k2, dtype=torch.float64)]).to(dtype),
                                        requires_grad=False)
        self.info = ChecksumInfo(
            scheme="mlp-abft", output=CHECK_OUTPUT, layers=["first", "rest.0"],
            hidden_terms=int(w1.shape[1]) + 1, hidden_units=(m + 1) * h,
            hidden_weight_abs=float(self.hidden_weight.double().abs().sum()),
            hidden_bias_abs=float(self.hidden_bias.double().abs().sum()),
            output_terms=h + 1, unit_roundoff=UNIT_ROUNDOFF["fp16" if dtype == torch.float16 else "fp32"])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = F.linear(x.flatten(1), self.hidden_weight, self.hidden_bias)  # (B, (M + 1) h)
        hidden = torch.relu(z).view(x.shape[0], self.m + 1, self.h).transpose(0, 1)
        eta = torch.baddbmm(self.output_bias, hidden, self.output_weight)
        return eta, z.sum(1, keepdim=True)


class _Float16Checked(nn.Module):
    """A float16 checked graph with float32 input and outputs (as ``onnx_export._Float16Graph`` for plain stacks)."""

    def __init__(self, checked: CheckedMLP):
        super().__init__()
        self.checked = checked

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eta, checks = self.checked(x.half())
        return eta.float(), checks.float()


def checked_module(stack: MemberStack, float16: bool = False) -> nn.Module | None:
    """The checked graph's module of ``stack`` (CPU, eval mode), or None for stack kinds without one; its
    ``ChecksumInfo`` is :func:`checksum_info` of it."""
    if not isinstance(stack, MLPStack) or len(stack.rest) != 1:  # a deeper MLP needs a residual per hidden layer
        return None
    copy = MLPStack(stack.spec)
    copy.load_state_dict({k: v.detach().cpu() for k, v in stack.state_dict().items()})
    checked = CheckedMLP(copy, torch.float16 if float16 else torch.float32).eval()
    return _Float16Checked(checked).eval() if float16 else checked


def checksum_info(module: nn.Module) -> ChecksumInfo:
    """The manifest's description of a module from :func:`checked_module`."""
    inner = module.checked if isinstance(module, _Float16Checked) else module
    assert isinstance(inner, CheckedMLP)
    return inner.info

