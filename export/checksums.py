"""Checked stack graphs: the torch modules ``edgens export`` writes when a stack's graph carries its own checksums.

:class:`CheckedMLP` computes the same outputs as an :class:`~edgens.stacks.mlp.MLPStack` of one hidden layer plus
the checksums of ``edgens.runtime.checksums`` (scheme ``mlp-abft``): a check member in the hidden layer (its first
unit the negated sum of all the others), two extra output columns, and the hidden pre-activations' sum as a second
output. The class columns are computed by the
same matrix products over the same terms as the plain graph's; the extra rows and columns only widen them.

:class:`CheckedLayers` (scheme ``layers-abft``) checks every layer with weights of a deeper MLP or a grouped CNN
(batch norms folded into their convolutions, which is exact up to rounding): each member's block of every hidden
layer gets two more outputs (units or channels), a *check* output (the negated sum of the block's weights and
biases, so the block's outputs sum to zero) and a *magnitude* output (the sum of their absolute values: the layer's
inputs are ReLU outputs, >= 0, so it outputs exactly the sum of the magnitudes of the terms the block adds up), which
the next layer reads with zero weights; the first layer reads the signed input, so its magnitude is ``a . |x|``
(``a``: what each input value weighs in the layer's summed outputs). The graph adds up, over the layers, each
layer's residual (the sum of all its outputs but the magnitudes) and its magnitude times the ratio of its rounding
gain to the output layer's, and returns both as its second output ``(B, 2)``, which the runner writes into the check
row's columns K and K + 1 (the check row itself is a zero row the graph appends). DenseNet stacks and float16
graphs of these kinds have no checked form yet: :func:`checked_module` returns None for them and export writes them
unchecked.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edgens.runtime.bundle import ChecksumInfo
from edgens.runtime.checksums import CHECK_OUTPUT
from edgens.stacks import MemberStack
from edgens.stacks.cnn import CNNStack
from edgens.stacks.layers import BatchedLinear
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


def _gain(terms: int, units: int) -> float:
    """A layer's rounding gain over SAFETY * u (edgens.runtime.checksums): sqrt(terms) + sqrt(units) + 1."""
    return math.sqrt(terms) + math.sqrt(units) + 1


def checked_blocks(weight: torch.Tensor, bias: torch.Tensor, magnitude: bool, zero_inputs: int) -> tuple[
        torch.Tensor, torch.Tensor]:
    """Each member's block of outputs with its check and magnitude outputs appended (float64).

    Args:
        weight: ``(M, C, inputs, *kernel)``: member j's C outputs' weights.
        bias: ``(M, C)``.
        magnitude: give the magnitude output the blocks' absolute weights and biases (its inputs are >= 0);
            otherwise zeros (the first layer, whose magnitude the graph computes from ``|x|``).
        zero_inputs: inputs appended with zero weights (the previous layer's check and magnitude outputs).

    Returns:
        ``(M, C + 2, inputs + zero_inputs, *kernel)`` and ``(M, C + 2)``.
    """
    if zero_inputs:
        weight = torch.cat([weight, weight.new_zeros(weight.shape[0], weight.shape[1], zero_inputs,
                                                     *weight.shape[3:])], 2)
    check_w, check_b = -weight.sum(1, keepdim=True), -bias.sum(1, keepdim=True)
    if magnitude:
        mag_w = weight.abs().sum(1, keepdim=True) + check_w.abs()
        mag_b = bias.abs().sum(1, keepdim=True) + check_b.abs()
    else:
        mag_w, mag_b = torch.zeros_like(check_w), torch.zeros_like(check_b)
    return torch.cat([weight, check_w, mag_w], 1), torch.cat([bias, check_b, mag_b], 1)


def _folded_convolutions(stack: CNNStack) -> list[tuple[torch.Tensor, torch.Tensor, nn.Conv2d]]:
    """Each convolution's weights and biases with its batch norm folded in (float64), and the convolution."""
    layers, modules = [], list(stack.features)
    for index, module in enumerate(modules):
        if not isinstance(module, nn.Conv2d):
            continue
        weight = module.weight.detach().double()
        bias = module.bias.detach().double() if module.bias is not None else weight.new_zeros(weight.shape[0])
        following = modules[index + 1] if index + 1 < len(modules) else None
        if isinstance(following, nn.BatchNorm2d):
            scale = following.weight.detach().double() / torch.sqrt(following.running_var.double() + following.eps)
            weight = weight * scale.view(-1, 1, 1, 1)
            bias = following.bias.detach().double() + (bias - following.running_mean.double()) * scale
        layers.append((weight, bias, module))
    return layers


class CheckedLayers(nn.Module):
    """A deeper MLP stack or a grouped CNN stack with checksums in every layer (module docstring): ``x -> (eta
    (M + 1, B, K + 2), checks (B, 2))``, float32.

    The check and magnitude weights are sums of the weights as the graph holds them (cast to float32 first, summed in
    float64 after), so the checksums hold up to the graph's own rounding.
    """

    def __init__(self, stack: MLPStack | CNNStack):
        super().__init__()
        m, k = stack.n_members, stack.spec.n_outputs
        self.m, self.k, self.conv = m, k, isinstance(stack, CNNStack)
        shape = tuple(stack.spec.input_shape)
        hidden: list[tuple[torch.Tensor, torch.Tensor, dict]] = []  # (weight rows (M, C, in, *k), bias, how)
        if self.conv:
            for index, (weight, bias, conv) in enumerate(_folded_convolutions(stack)):
                c = weight.shape[0] // m
                hidden.append((_graph_values(weight).view(m, c, *weight.shape[1:]), _graph_values(bias).view(m, c),
                               {"stride": conv.stride, "padding": conv.padding, "groups": 1 if index == 0 else m}))
            head = stack.head
        else:
            first = stack.first
            weight = _graph_values(first.weight).view(m, first.out_features, -1)
            hidden.append((weight, _graph_values(first.bias).view(m, -1), {}))
            for layer in stack.rest[:-1]:
                hidden.append((_graph_values(layer.weight).transpose(1, 2), _graph_values(layer.bias)[:, 0], {}))
            head = stack.rest[-1]
        assert isinstance(head, BatchedLinear)
        head_w, head_b = checked_blocks(_graph_values(head.weight).transpose(1, 2), _graph_values(head.bias)[:, 0],
                                        True, 2)
        output_terms = head.weight.shape[1] + 1
        output_gain = _gain(output_terms, m + 1) + math.sqrt(k + 1) - 1  # sqrt(h + 1) + sqrt(M + 1) + sqrt(K + 1)
        self.head_weight = nn.Parameter(head_w.transpose(1, 2).float(), requires_grad=False)  # (M, C + 2, K + 2)
        self.head_bias = nn.Parameter(head_b[:, None].float(), requires_grad=False)

        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        self.selectors, self.how = nn.ParameterList(), []
        size = shape[1:]  # a CNN's feature map height and width
        ratios, pixel_counts = [], []
        units_total, terms_max, weight_abs, bias_abs = 0, 0, 0.0, 0.0
        for index, (rows, bias, how) in enumerate(hidden):
            c = rows.shape[1]
            terms = math.prod(rows.shape[2:]) + 1  # each output's products (the zero inputs add exact zeros) + bias
            w, b = checked_blocks(rows, bias, index > 0, 0 if index == 0 else 2)
            weight_abs += float(w[:, :c + 1].abs().sum())
            bias_abs += float(b[:, :c + 1].abs().sum())
            if self.conv:
                size = _conv_size(size, how)
                w, b = w.reshape(m * (c + 2), *w.shape[2:]), b.reshape(-1)
            elif index == 0:
                w, b = w.reshape(m * (c + 2), -1), b.reshape(-1)
            else:
                w, b = w.transpose(1, 2), b[:, None]  # (M, in, C + 2), (M, 1, C + 2): a batched layer
            pixels = math.prod(size) if self.conv else 1
            units = pixels * m * (c + 1)  # the outputs each residual adds up
            ratio = _gain(terms, units) / output_gain
            ratios.append(ratio)
            pixel_counts.append(pixels)
            units_total, terms_max = units_total + units, max(terms_max, terms)
            selector = torch.zeros(c + 2, 2, dtype=torch.float64)
            selector[:c + 1, 0] = 1  # residual: every output but the magnitude
            # the magnitude, in units of the output layer's gain (the first layer's comes from |x|, below)
            selector[c + 1, 1] = ratio if index > 0 else 0.0
            if self.conv or index == 0:  # these outputs come as (B, M (C + 2))
                selector = selector.repeat(m, 1)
            self.weights.append(nn.Parameter(w.float(), requires_grad=False))
            self.biases.append(nn.Parameter(b.float(), requires_grad=False))
            self.selectors.append(nn.Parameter(selector.float(), requires_grad=False))
            self.how.append(how)
        # The first layer's magnitude: a . |x| + pixels * sum |b|, with a_q what input value q weighs in the sum of
        # the absolute weights over every output: a linear map of |x|, so its gradient.
        w0, b0 = self.weights[0].double(), self.biases[0].double()
        if self.conv:
            summed = w0.abs().sum(0, keepdim=True)  # (1, C_in, 3, 3); the magnitude channels are zero
            probe = torch.zeros(1, *shape, dtype=torch.float64, requires_grad=True)
            F.conv2d(probe, summed, None, stride=self.how[0]["stride"], padding=self.how[0]["padding"]).sum().backward()
            a = probe.grad.reshape(-1)
        else:
            a = w0.abs().sum(0)
        self.input_magnitude = nn.Parameter((ratios[0] * a).float(), requires_grad=False)
        self.first_bias_magnitude = float(ratios[0] * pixel_counts[0] * b0.abs().sum())
        self.register_buffer("second_column", torch.tensor([0.0, 1.0]))
        self.info = ChecksumInfo(
            scheme="layers-abft", output=CHECK_OUTPUT, layers=[*self._names(stack), "head" if self.conv else
                                                               f"rest.{len(stack.rest) - 1}"],
            hidden_terms=terms_max, hidden_units=units_total, hidden_weight_abs=weight_abs,
            hidden_bias_abs=bias_abs, output_terms=output_terms, unit_roundoff=UNIT_ROUNDOFF["fp32"])

    def _names(self, stack: MLPStack | CNNStack) -> list[str]:
        if self.conv:
            return [f"features.{i}" for i, module in enumerate(stack.features) if isinstance(module, nn.Conv2d)]
        return ["first", *(f"rest.{i}" for i in range(len(stack.rest) - 1))]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = x.shape[0]
        flat = x.flatten(1)
        magnitude = flat.abs() @ self.input_magnitude + self.first_bias_magnitude  # (B,)
        checks = magnitude.unsqueeze(1) * self.second_column  # (B, 2): no residual yet, the first magnitude
        h = x if self.conv else flat
        for index, (weight, bias, selector) in enumerate(zip(self.weights, self.biases, self.selectors)):
            if self.conv:
                z = F.conv2d(h, weight, bias, **self.how[index])  # (B, M (C + 2), H, W)
                checks = checks + z.sum((2, 3)) @ selector
            elif index == 0:
                z = F.linear(h, weight, bias)  # (B, M (C + 2))
                checks = checks + z @ selector
            else:
                z = torch.baddbmm(bias, h, weight)  # (M, B, C + 2)
                checks = checks + z.sum(0) @ selector
            h = torch.relu(z)
            if not self.conv and index == 0:
                h = h.view(batch, self.m, -1).transpose(0, 1)  # (M, B, C + 2)
        if self.conv:
            h = h.mean((2, 3)).view(batch, self.m, -1).transpose(0, 1)
        eta = torch.baddbmm(self.head_bias, h, self.head_weight)  # (M, B, K + 2)
        return F.pad(eta, (0, 0, 0, 0, 0, 1)), checks  # the check row: zeros until the runner writes the checks


def _graph_values(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter's values as the float32 graph will hold them, in float64 (to sum them exactly enough)."""
    return tensor.detach().float().double()


def _conv_size(size: tuple[int, ...], how: dict) -> tuple[int, ...]:
    """The output height and width of a 3x3 convolution."""
    stride, padding = how["stride"], how["padding"]
    return tuple((s + 2 * p - 3) // st + 1 for s, p, st in zip(size, padding, stride))


def checked_module(stack: MemberStack, float16: bool = False) -> nn.Module | None:
    """The checked graph's module of ``stack`` (CPU, eval mode), or None for stack kinds without one; its
    ``ChecksumInfo`` is :func:`checksum_info` of it."""
    from edgens.stacks import build_stack

    copy = build_stack(stack.spec)
    copy.load_state_dict({k: v.detach().cpu() for k, v in stack.state_dict().items()})
    copy.eval()
    if isinstance(copy, MLPStack) and len(copy.rest) == 1:
        checked = CheckedMLP(copy, torch.float16 if float16 else torch.float32).eval()
        return _Float16Checked(checked).eval() if float16 else checked
    if isinstance(copy, MLPStack | CNNStack) and not float16:  # float16 magnitudes of whole layers can overflow
        return CheckedLayers(copy).eval()
    return None


def checksum_info(module: nn.Module) -> ChecksumInfo:
    """The manifest's description of a module from :func:`checked_module`."""
    inner = module.checked if isinstance(module, _Float16Checked) else module
    assert isinstance(inner, CheckedMLP | CheckedLayers)
    return inner.info

