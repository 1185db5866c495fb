"""Checked stack graphs: the torch modules ``edgens export`` writes when a stack's graph carries its own checksums.

:class:`CheckedMLP` computes the same outputs as an :class:`~edgens.stacks.mlp.MLPStack` of one hidden layer plus
the checksums of ``edgens.runtime.checksums`` (scheme ``mlp-abft``): a check member in the hidden layer (its first
unit the negated sum of all the others), two extra output columns, and the hidden pre-activations' sum as a second
output. The class columns are computed by the
same matrix products over the same terms as the plain graph's; the extra rows and columns only widen them.

:class:`CheckedLayers` (scheme ``layers-abft``) checks every layer with weights of a deeper MLP or a grouped CNN
(batch norms folded into their convolutions, which is exact up to rounding). Each hidden layer runs as in the plain
graph, and beside it a small check layer of the same kind reads the same input: for the first layer one *check*
output (the negated sum of all its weight rows or filters, so that its outputs and the check sum to zero), for each
later layer a check and a *magnitude* output per member (the sum of the absolute values of the member's weights:
the layer's inputs are ReLU outputs, >= 0, so it outputs exactly the sum of the magnitudes of the terms the member's
outputs add up); the first layer reads the signed input, so its magnitude is ``a . |x|`` (``a``: what each input
value weighs in the layer's summed absolute weights). The graph adds up, over the layers, each layer's residual (the
sum of its outputs and checks) and its magnitude times the ratio of its rounding gain to the output layer's, and
returns both as its second output ``(B, 2)``, which the runner writes into the check row's columns K and K + 1 (the
check row itself is a zero row the graph appends). DenseNet stacks and float16 graphs of these kinds have no checked
form yet: :func:`checked_module` returns None for them and export writes them unchecked.
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


def check_rows(weight: torch.Tensor, bias: torch.Tensor, magnitude: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each member's check output and, with ``magnitude``, its magnitude output (float64).

    Args:
        weight: ``(M, C, inputs, *kernel)``: member j's C outputs' weights.
        bias: ``(M, C)``.
        magnitude: add the magnitude output: the sum of the absolute values of the block's weights and biases,
            check output included (its inputs must be >= 0 to make it the sum of the terms' magnitudes).

    Returns:
        ``(M, 1 or 2, inputs, *kernel)`` and ``(M, 1 or 2)``: the check output is ``-(sum of the block's C
        outputs)``, so the block's outputs and its check sum to zero.
    """
    check_w, check_b = -weight.sum(1, keepdim=True), -bias.sum(1, keepdim=True)
    if not magnitude:
        return check_w, check_b
    mag_w = weight.abs().sum(1, keepdim=True) + check_w.abs()
    mag_b = bias.abs().sum(1, keepdim=True) + check_b.abs()
    return torch.cat([check_w, mag_w], 1), torch.cat([check_b, mag_b], 1)


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

    Every hidden layer runs as in the plain graph (the same weights, shapes and groups, so the same kernels), and
    beside it one small layer of the same kind on the same input computes each member's check output and, after the
    first layer, its magnitude output. The check and magnitude weights are sums of the weights as the graph holds
    them (cast to float32 first, summed in float64 after), so the checksums hold up to the graph's own rounding.
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
            hidden.append((_graph_values(first.weight).view(m, first.out_features, -1),
                           _graph_values(first.bias).view(m, -1), {}))
            for layer in stack.rest[:-1]:
                hidden.append((_graph_values(layer.weight).transpose(1, 2), _graph_values(layer.bias)[:, 0], {}))
            head = stack.rest[-1]
        assert isinstance(head, BatchedLinear)
        head_rows = _graph_values(head.weight).transpose(1, 2)  # (M, K, C): rows are outputs
        head_bias = _graph_values(head.bias)[:, 0]
        extra_w, extra_b = check_rows(head_rows, head_bias, True)
        output_terms = head.weight.shape[1] + 1
        output_gain = _gain(output_terms, m + 1) + math.sqrt(k + 1) - 1  # sqrt(h + 1) + sqrt(M + 1) + sqrt(K + 1)
        self.head_weight = nn.Parameter(torch.cat([head_rows, extra_w], 1).transpose(1, 2).float(),
                                        requires_grad=False)  # (M, C, K + 2)
        self.head_bias = nn.Parameter(torch.cat([head_bias, extra_b], 1)[:, None].float(), requires_grad=False)

        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        self.check_weights, self.check_biases = nn.ParameterList(), nn.ParameterList()
        self.selectors, self.how = nn.ParameterList(), []
        size = shape[1:]  # a CNN's feature map height and width
        units_total, terms_max, weight_abs, bias_abs = 0, 0, 0.0, 0.0
        for index, (rows, bias, how) in enumerate(hidden):
            c = rows.shape[1]
            terms = math.prod(rows.shape[2:]) + 1  # each output's products and its bias
            if self.conv:  # the check layer is one dot product with the input per check output (below)
                terms = max(terms, rows.shape[2] * math.prod(size))
            if index == 0:  # the first layer reads the shared, signed input: one check output over every member
                check_w, check_b = check_rows(rows.reshape(1, m * c, *rows.shape[2:]), bias.reshape(1, -1), False)
            else:
                check_w, check_b = check_rows(rows, bias, True)
            weight_abs += float(rows.abs().sum() + check_w[:, :1].abs().sum())
            bias_abs += float(bias.abs().sum() + check_b[:, :1].abs().sum())
            if self.conv:
                size_in, size = size, _conv_size(size, how)
                w, b = rows.reshape(m * c, *rows.shape[2:]), bias.reshape(-1)
                # Only the check filters' outputs summed over the positions are needed, a linear map of the input:
                # one dot product per check output (a convolution with 1-2 outputs per group costs as much input
                # unfolding as the layer itself).
                cw = _summed_convolution(check_w.reshape(-1, *check_w.shape[2:]), rows.shape[2] * (1 if index == 0
                                         else m), size_in, how, 1 if index == 0 else m)
                cw = cw[0] if index == 0 else cw.transpose(1, 2)  # (C_in H W, 1), or (M, 2, C_in H W)
                cb = check_b * math.prod(size)  # (1, 1) or (M, 2)
                cb = cb.reshape(-1) if index == 0 else cb[:, :, None]  # (1,) or (M, 2, 1)
            elif index == 0:
                w, b = rows.reshape(m * c, -1), bias.reshape(-1)
                cw, cb = check_w.reshape(1, -1), check_b.reshape(-1)
            else:  # batched layers: (M, in, C) and (M, 1, C)
                w, b = rows.transpose(1, 2), bias[:, None]
                cw, cb = check_w.transpose(1, 2), check_b[:, None]
            pixels = math.prod(size) if self.conv else 1
            units = pixels * (m * c + (1 if index == 0 else m))  # the outputs each residual adds up, checks included
            ratio = _gain(terms, units) / output_gain
            if index == 0:  # its magnitude comes from the signed input: a . |x| + pixels * sum |b| (below)
                self._first_magnitude(rows, bias, check_w, check_b, shape, how, ratio, pixels)
            units_total, terms_max = units_total + units, max(terms_max, terms)
            # the check layer's summed outputs (B, 1 or 2 M) -> (residual, magnitude in units of the output gain)
            selector = torch.tensor([[1.0, 0.0]], dtype=torch.float64) if index == 0 else (
                torch.tensor([[1.0, 0.0], [0.0, ratio]], dtype=torch.float64).repeat(m, 1))
            self.weights.append(nn.Parameter(w.float(), requires_grad=False))
            self.biases.append(nn.Parameter(b.float(), requires_grad=False))
            self.check_weights.append(nn.Parameter(cw.float(), requires_grad=False))
            self.check_biases.append(nn.Parameter(cb.float(), requires_grad=False))
            self.selectors.append(nn.Parameter(selector.float(), requires_grad=False))
            self.how.append(how)
        self.register_buffer("second_column", torch.tensor([0.0, 1.0]))
        self.register_buffer("first_column", torch.tensor([1.0, 0.0]))
        self.info = ChecksumInfo(
            scheme="layers-abft", output=CHECK_OUTPUT, layers=[*self._names(stack), "head" if self.conv else
                                                               f"rest.{len(stack.rest) - 1}"],
            hidden_terms=terms_max, hidden_units=units_total, hidden_weight_abs=weight_abs,
            hidden_bias_abs=bias_abs, output_terms=output_terms, unit_roundoff=UNIT_ROUNDOFF["fp32"])

    def _first_magnitude(self, rows: torch.Tensor, bias: torch.Tensor, check_w: torch.Tensor, check_b: torch.Tensor,
                         shape: tuple[int, ...], how: dict, ratio: float, pixels: int) -> None:
        """The first layer's magnitude, ``a . |x| + pixels * sum |b|`` in units of the output gain: ``a_q`` is what
        input value q weighs in the sum of the absolute weights over every output (the check output's included), a
        linear map of ``|x|``: for a convolution, its gradient."""
        abs_rows = torch.cat([rows.reshape(-1, *rows.shape[2:]), check_w[0]]).abs()
        if self.conv:
            a = _summed_convolution(abs_rows.sum(0, keepdim=True), shape[0], shape[1:], how, 1)[0, :, 0]
        else:
            a = abs_rows.sum(0)
        self.input_magnitude = nn.Parameter((ratio * a).float(), requires_grad=False)
        self.first_bias_magnitude = float(ratio * pixels * (bias.abs().sum() + check_b.abs().sum()))

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
        layers = zip(self.weights, self.biases, self.check_weights, self.check_biases, self.selectors, strict=True)
        for index, (weight, bias, check_weight, check_bias, selector) in enumerate(layers):
            if self.conv:
                z = F.conv2d(h, weight, bias, **self.how[index])  # (B, M C, H, W): the plain graph's convolution
                if index == 0:  # (B, C_in H W) @ (C_in H W, 1)
                    extra = h.flatten(1) @ check_weight + check_bias
                else:  # (M, 2, C_in H W) @ each member's inputs (M, C_in H W, B): G read once, as is, per call
                    extra = torch.baddbmm(check_bias, check_weight, h.view(batch, self.m, -1).permute(1, 2, 0))
                    extra = extra.permute(2, 0, 1).reshape(batch, -1)  # (B, 2 M)
                total = z.sum((1, 2, 3))
            elif index == 0:
                z = F.linear(h, weight, bias)  # (B, M C)
                extra, total = F.linear(h, check_weight, check_bias), z.sum(1)
            else:
                z = torch.baddbmm(bias, h, weight)  # (M, B, C)
                extra = torch.baddbmm(check_bias, h, check_weight)  # (M, B, 2)
                extra, total = extra.transpose(0, 1).reshape(batch, -1), z.sum((0, 2))
            checks = checks + total.unsqueeze(1) * self.first_column + extra @ selector
            h = torch.relu(z)
            if not self.conv and index == 0:
                h = h.view(batch, self.m, -1).transpose(0, 1)  # (M, B, C)
        if self.conv:
            h = h.mean((2, 3)).view(batch, self.m, -1).transpose(0, 1)
        eta = torch.baddbmm(self.head_bias, h, self.head_weight)  # (M, B, K + 2)
        return F.pad(eta, (0, 0, 0, 0, 0, 1)), checks  # the check row: zeros until the runner writes the checks


def _summed_convolution(weight: torch.Tensor, channels: int, size: tuple[int, ...], how: dict,
                        groups: int) -> torch.Tensor:
    """The map ``G`` with ``sum over positions of conv(h, weight) = h . G`` (without bias), for inputs ``h`` of
    ``channels`` channels of ``size``: ``(groups, channels / groups H W, outputs / groups)`` (float64; a
    convolution is linear, so ``G`` is its summed output's gradient)."""
    probe = torch.zeros(1, channels, *size, dtype=torch.float64, requires_grad=True)
    out = F.conv2d(probe, weight, None, stride=how["stride"], padding=how["padding"], groups=groups).sum((0, 2, 3))
    rows = [torch.autograd.grad(value, probe, retain_graph=True)[0][0] for value in out]  # (channels, H, W) each
    per_group, outputs = channels // groups, len(rows) // groups
    return torch.stack([torch.stack([rows[g * outputs + o][g * per_group:(g + 1) * per_group].reshape(-1)
                                     for o in range(outputs)], 1) for g in range(groups)])


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

