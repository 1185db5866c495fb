"""Checksums in every layer of deeper MLPs and grouped CNNs (scheme ``layers-abft``): the checked graphs against
numpy and float64 torch re-computations from the original weights, a flipped weight in each layer caught at a
one-stack budget, and no false alarm on clean data."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from edgens.config import TrainConfig
from edgens.data import load_dataset
from edgens.export import ExportOptions, export_bundle
from edgens.export.onnx_export import check_parity, export_checked_stack
from edgens.presets import create_stack
from edgens.runtime import Predictor
from edgens.runtime.bundle import load_manifest
from edgens.runtime.checksums import SAFETY
from edgens.runtime.faults import BitFault, inject_bit_faults
from edgens.train import train

EXPONENT_TOP = 30
U = 2.0 ** -24


def _gain(terms: int, units: int) -> float:
    """The documented rounding gain of a sum (over SAFETY u): sqrt(terms) + sqrt(units) + 1."""
    return math.sqrt(terms) + math.sqrt(units) + 1


def test_a_deeper_mlp_graph_against_numpy(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m, k, hidden = 3, 10, (8, 6)
    stack = create_stack("mlp-16x64", (1, 28, 28), k, n_members=m, hidden=hidden).eval()
    path = tmp_path / "stack.onnx"
    info = export_checked_stack(stack, path)
    assert info is not None and info.scheme == "layers-abft" and info.layers == ["first", "rest.0", "rest.1"]
    x = np.random.default_rng(0).normal(size=(16, 1, 28, 28)).astype(np.float32)
    eta, checks = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert eta.shape == (m + 1, 16, k + 2) and checks.shape == (16, 2)

    # numpy's forward pass from the stack's own weights, with every layer's sum of magnitudes
    w = {name: p.detach().double().numpy() for name, p in stack.named_parameters()}
    flat = x.reshape(16, -1).astype(np.float64)
    w1 = w["first.weight"].reshape(m, hidden[0], -1)  # (M, h, n)
    b1 = w["first.bias"].reshape(m, hidden[0])
    z = np.einsum("mhn,bn->mbh", w1, flat) + b1[:, None]
    check_w1 = -w1.sum((0, 1))  # the first layer's one check unit: minus the sum of every member's rows
    magnitude = (np.abs(flat) @ (np.abs(w1).sum((0, 1)) + np.abs(check_w1)) + np.abs(b1).sum() + abs(b1.sum()))
    output_gain = math.sqrt(hidden[1] + 1) + math.sqrt(m + 1) + math.sqrt(k + 1)
    bound_term = _gain(flat.shape[1] + 1, m * hidden[0] + 1) / output_gain * magnitude
    h = np.maximum(z, 0)
    w2, b2 = w["rest.0.weight"], w["rest.0.bias"]  # (M, h0, h1), (M, 1, h1)
    z2 = h @ w2 + b2
    check2 = -w2.sum(2)  # (M, h0): each member's check unit (its inputs are >= 0 after the ReLU)
    magnitude2 = (np.einsum("mbi,mio->b", h, np.abs(w2)) + np.einsum("mbi,mi->b", h, np.abs(check2))
                  + np.abs(b2).sum() + np.abs(b2.sum(2)).sum())
    bound_term = bound_term + _gain(hidden[0] + 1, m * (hidden[1] + 1)) / output_gain * magnitude2
    out = np.maximum(z2, 0) @ w["rest.1.weight"] + w["rest.1.bias"]  # (M, B, K)
    np.testing.assert_allclose(eta[:m, :, :k], out, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(eta[:m, :, :k + 1].sum(2), 0, atol=1e-4)  # each member's outputs sum to zero
    np.testing.assert_allclose(checks[:, 1], bound_term, rtol=1e-4)
    # the hidden residual is rounding noise, far below its bound
    assert (np.abs(checks[:, 0]) < 0.05 * SAFETY * U * output_gain * checks[:, 1]).all()
    assert not eta[m].any()  # the check row: zero until the runner writes the checks into it


@pytest.fixture(scope="module")
def cnn_bundle(tmp_path_factory: pytest.TempPathFactory, fashion_mnist_dir: Path) -> Path:
    run = tmp_path_factory.mktemp("cnn") / "run"
    train(TrainConfig(preset="cnn-10", n_members=2, lam=0.95, epochs=1, train_limit=300, val_size=300,
                      data_dir=str(fashion_mnist_dir), seed=3), run)
    bundle = run.parent / "bundle"
    # the layout export writes by default, small: a general stack per member, the prefix stack of both, specialists
    export_bundle(run, bundle, ExportOptions(stack_size=1, specialist_size=1, random_draws=1,
                                             checksum_convolutions=True))
    return bundle


def test_cnn_stacks_are_checked_only_when_asked(cnn_bundle: Path, tmp_path: Path) -> None:
    """Their checks cost a large share of the graph on onnxruntime's CPU provider: opt-in."""
    plain = tmp_path / "default"
    export_bundle(cnn_bundle.parent / "run", plain, ExportOptions(stack_size=2, prefix_stacks=(), specialist_size=0,
                                                                  random_draws=1))
    assert all(stack.checksum is None for stack in load_manifest(plain).stacks)


def test_a_cnn_bundle_is_checked_and_its_bound_matches_torch_in_float64(cnn_bundle: Path,
                                                                         fashion_mnist_dir: Path) -> None:
    manifest = load_manifest(cnn_bundle)
    assert {s.role for s in manifest.stacks} == {"general", "prefix", "specialist"}
    assert all(s.checksum is not None and s.checksum.scheme == "layers-abft" for s in manifest.stacks)
    stacks = manifest.general_stacks
    run = cnn_bundle.parent / "run"
    dataset = load_dataset("fashion-mnist", str(fashion_mnist_dir), val_size=300)
    raw = dataset.test_x[:8]
    x = ((raw.astype(np.float64) - manifest.preprocessing.mean[0]) / manifest.preprocessing.std[0])
    x = x.reshape(8, 1, 28, 28)
    model = create_stack("cnn-10", (1, 28, 28), 10, n_members=len(manifest.members)).double().eval()
    model.load_state_dict(torch.load(run / "checkpoints" / "best.pt", map_location="cpu",
                                     weights_only=False)["model"])
    stack = stacks[0]
    m, k = len(stack.members), manifest.n_outputs
    # Each convolution's sum of |w| |input| + |b| over every output (check filters included: minus the sum of the
    # filters they check), with batch norm folded in: the documented magnitude, from the original float64 model's
    # activations.
    features = list(model.features)
    convs = [i for i, module in enumerate(features) if isinstance(module, torch.nn.Conv2d)]
    h = torch.from_numpy(x)
    term = torch.zeros(8, dtype=torch.float64)
    for index, at in enumerate(convs):
        conv, norm = features[at], features[at + 1]
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        weight = (conv.weight * scale.view(-1, 1, 1, 1))
        bias = norm.bias - norm.running_mean * scale
        total = len(manifest.members)
        c = weight.shape[0] // total
        own = slice(stack.members[0] * c, (stack.members[-1] + 1) * c)  # this stack's members' filters
        weight, bias = weight[own].detach(), bias[own].detach()
        groups = 1 if index == 0 else m
        # the check filters: one for the whole first layer (it reads the shared input), one per member after it
        blocks = weight.view(1 if index == 0 else m, -1, *weight.shape[1:])
        biases = bias.view(blocks.shape[0], -1)
        abs_weight = torch.cat([blocks.abs(), blocks.sum(1, keepdim=True).abs()], 1).view(-1, *weight.shape[1:])
        abs_bias = torch.cat([biases.abs(), biases.sum(1, keepdim=True).abs()], 1).reshape(-1)
        own_input = h if index == 0 else h[:, (stack.members[0]) * h.shape[1] // total:
                                           (stack.members[-1] + 1) * h.shape[1] // total]
        products = F.conv2d(own_input.abs(), abs_weight, None, conv.stride, conv.padding, groups=groups)
        pixels = products.shape[2] * products.shape[3]
        magnitude = products.sum((1, 2, 3)) + pixels * abs_bias.sum()
        terms = max(weight.shape[1] * 9 + 1, weight.shape[1] * h.shape[2] * h.shape[3])  # or the check's dot product
        units = pixels * (m * c + blocks.shape[0])
        output_gain = math.sqrt(model.head.weight.shape[1] + 1) + math.sqrt(m + 1) + math.sqrt(k + 1)
        term += _gain(terms, units) / output_gain * magnitude.detach()
        h = torch.relu(features[at + 1](conv(h))).detach()
    session = ort.InferenceSession(str(cnn_bundle / stack.file), providers=["CPUExecutionProvider"])
    eta, checks = session.run(None, {"x": x.astype(np.float32)})
    np.testing.assert_allclose(checks[:, 1], term.numpy(), rtol=1e-3)
    assert (np.abs(checks[:, 0]) < 0.05 * SAFETY * U * output_gain * checks[:, 1]).all()
    expected = model(torch.from_numpy(x))[stack.members].detach().numpy()
    np.testing.assert_allclose(eta[:m, :, :k], expected, rtol=1e-3, atol=1e-3)


def test_a_flipped_weight_in_each_cnn_layer_is_caught(cnn_bundle: Path, fashion_mnist_dir: Path) -> None:
    manifest = load_manifest(cnn_bundle)
    stack = manifest.general_stacks[0]
    dataset = load_dataset("fashion-mnist", str(fashion_mnist_dir), val_size=300)
    model = onnx.load(str(cnn_bundle / stack.file))
    weights = [t for t in model.graph.initializer if t.name.startswith("weights.") or t.name == "head_weight"]
    assert len(weights) == len(stack.checksum.layers)  # the plain graph's layers: each convolution, the head
    with Predictor.load(cnn_bundle, quarantine_after=None, detect_outliers=False) as predictor:
        clean = predictor.predict(dataset.test_x[:32], members=len(stack.members))
        assert not clean.failures
        for tensor in weights:
            index = int(np.prod(tensor.dims)) // 3  # a weight of a member's filter (the head's: a class column)
            with inject_bit_faults(predictor, {stack.name: [BitFault(tensor.name, index, EXPONENT_TOP, "stuck-1")]}):
                prediction = predictor.predict(dataset.test_x[:32], members=len(stack.members))
            failures = [f for f in prediction.failures if f.stack == stack.name]
            assert [f.kind for f in failures] == ["checksum"], (tensor.name, prediction.failures)
            assert stack.name not in prediction.stacks_run


def test_no_false_alarm_on_a_cnn_bundle_at_batch_1_and_64(cnn_bundle: Path, fashion_mnist_dir: Path) -> None:
    dataset = load_dataset("fashion-mnist", str(fashion_mnist_dir), val_size=300)
    manifest = load_manifest(cnn_bundle)
    with Predictor.load(cnn_bundle) as predictor:
        names = [s.name for s in manifest.stacks]
        assert sorted(predictor.stack_outputs(dataset.val_x, names, batch_size=64)) == sorted(names)
        for raw in dataset.test_x[:20]:
            for budget in ({}, {"members": 1}, {"task": manifest.specialists[0].task}, {"deadline_ms": 1000}):
                assert not predictor.predict(raw[None], **budget).failures


def test_parity_catches_a_wrong_check_weight(tmp_path: Path) -> None:
    """Export's own check refuses a checked graph whose checksums do not hold on real inputs."""
    torch.manual_seed(1)
    stack = create_stack("mlp-16x64", (1, 28, 28), 10, n_members=2, hidden=(5, 4)).eval()
    path = tmp_path / "stack.onnx"
    info = export_checked_stack(stack, path)
    x = np.random.default_rng(1).normal(size=(32, 1, 28, 28)).astype(np.float32)
    assert not check_parity(path, stack, x, name="s", checksum=info).problems
    graph = onnx.load(str(path))
    # rest.0's check layer: (M, inputs, 2), each member's check and magnitude outputs
    tensor = next(t for t in graph.graph.initializer if list(t.dims) == [2, 5, 2])
    values = onnx.numpy_helper.to_array(tensor).copy()
    values[0, 0, 0] += 1.0  # the first member's check output, wrong by one
    tensor.CopyFrom(onnx.numpy_helper.from_array(values, tensor.name))
    onnx.save(graph, str(path))
    problems = check_parity(path, stack, x, name="s", checksum=info).problems
    assert problems and "checksums fail" in problems[0]


def test_the_fault_bench_names_each_part_of_a_layered_graph(cnn_bundle: Path) -> None:
    from edgens.bench.checksum_faults import _Checked

    manifest = load_manifest(cnn_bundle)
    stack = manifest.general_stacks[0]
    x = np.zeros((4, 1, 28, 28), dtype=np.uint8)
    bench = _Checked(cnn_bundle, x, np.zeros(4, dtype=np.int64), 4)
    try:
        _, shapes = bench.weights(stack.name)
        assert bench.part(stack.name, "weights.1", shapes["weights.1"], 5) == "hidden weights"
        check = shapes["check_weights.1"]  # (M, C_in H W, 2): each member's check and magnitude outputs
        assert bench.part(stack.name, "check_weights.1", check, 2 * 7) == "hidden check output"
        assert bench.part(stack.name, "check_weights.1", check, 2 * 7 + 1) == "hidden magnitude output"
        assert bench.part(stack.name, "check_weights.0", shapes["check_weights.0"], 2) == "hidden check output"
        assert bench.part(stack.name, "check_biases.1", shapes["check_biases.1"], 1) == "hidden magnitude output"
        assert bench.part(stack.name, "input_magnitude", shapes["input_magnitude"], 3) == "check machinery"
        head = shapes["head_weight"]  # (M, C + 2, K + 2)
        assert bench.part(stack.name, "head_weight", head, manifest.n_outputs) == "output check column"
        assert bench.part(stack.name, "head_weight", head, 1) == "output weights"
    finally:
        bench.close()
