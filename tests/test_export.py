"""Export: ONNX parity for every stack kind, the bundle's contents against independent maths, safety."""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgens.config import TrainConfig
from edgens.errors import BackendUnavailableError, ConfigError, ExportError, RunDirectoryError
from edgens.export import ExportOptions, export_bundle
from edgens.export.onnx_export import check_parity, export_stack
from edgens.runtime.bundle import load_manifest
from edgens.stacks import StackSpec, build_stack
from edgens.train import train

ROOT = Path(__file__).resolve().parents[1]
SMALL = {
    "mlp": StackSpec("mlp", 6, (1, 28, 28), 10, {"hidden": (4,)}),
    "cnn": StackSpec("cnn", 3, (1, 12, 12), 5, {"channels": (4, 8, 8), "strides": (1, 2, 1)}),
    "densenet": StackSpec("densenet", 2, (3, 8, 8), 4, {"depth": 10, "growth": 3}),
}


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_onnx_parity_and_dynamic_batch(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    spec = SMALL[kind]
    stack = build_stack(spec)
    with torch.no_grad():  # non-trivial batch-norm statistics
        stack.train()
        for _ in range(3):
            stack(torch.randn(8, *spec.input_shape) + 0.3)
    stack.eval()
    path = export_stack(stack, tmp_path / f"{kind}.onnx", opset=17)
    model = onnx.load(path)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 64):  # exported with an example batch of 4: the batch axis must stay dynamic
        x = np.random.default_rng(batch).normal(size=(batch, *spec.input_shape)).astype(np.float32)
        got = session.run(None, {"x": x})[0]
        want = stack(torch.from_numpy(x)).detach().numpy()
        assert got.shape == (spec.n_members, batch, spec.n_outputs)
        np.testing.assert_allclose(got, want, atol=1e-4)
    report = check_parity(path, stack, np.random.default_rng(0).normal(size=(20, *spec.input_shape)))
    assert report.ok and report.max_abs_diff < 1e-4


def _loud_stack() -> torch.nn.Module:
    """An mlp-256x4 stack whose members have logits in the hundreds (max ~440), as a run trained for its prefixes
    has (issue 28: its correct export was refused by a tolerance keyed to each output's own size)."""
    from edgens.presets import create_stack

    torch.manual_seed(0)
    stack = create_stack("mlp-256x4", (1, 28, 28), 10)
    with torch.no_grad():
        stack.first.weight.mul_(8.0)
        stack.rest[0].weight.mul_(30.0)
        stack.rest[0].bias.normal_(0.0, 3.0)
    return stack.eval()


def test_parity_of_members_with_logits_in_the_hundreds(tmp_path: Path) -> None:
    stack = _loud_stack()
    x = np.random.default_rng(0).standard_normal((512, 1, 28, 28)).astype(np.float32)
    with torch.no_grad():
        assert 300 < float(stack(torch.from_numpy(x)).abs().max()) < 1000
    path = export_stack(stack, tmp_path / "loud.onnx")
    report = check_parity(path, stack, x)
    assert report.ok, report.problems
    # a wrong graph is still refused: the reference changed as an export bug would change the graph
    wrong = {"flipped sign": lambda s: s.rest[0].weight[7].neg_(),
             "swapped members": lambda s: s.rest[0].weight.index_copy_(0, torch.tensor([3, 4]),
                                                                       s.rest[0].weight[[4, 3]].clone()),
             "dropped bias": lambda s: s.rest[0].bias[11].zero_()}
    for what, change in wrong.items():
        other = _loud_stack()
        with torch.no_grad():
            change(other)
        refused = check_parity(path, other, x)
        assert not refused.ok and "exceeds" in refused.problems[0], what


def test_parity_check_catches_a_wrong_graph(tmp_path: Path) -> None:
    stack = build_stack(SMALL["mlp"]).eval()
    other = build_stack(SMALL["mlp"]).eval()  # same shape, different weights
    path = export_stack(other, tmp_path / "other.onnx")
    report = check_parity(path, stack, np.zeros((4, 1, 28, 28), np.float32) + 0.5)
    assert not report.ok and "exceeds" in report.problems[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, fashion_mnist_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    config = TrainConfig(preset="mlp-16x64", n_members=12, lam=0.95, epochs=2, train_limit=3000, val_size=2000,
                         data_dir=str(fashion_mnist_dir), seed=1)
    train(config, out)
    return out


@pytest.fixture(scope="module")
def bundle(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "bundle"
    export_bundle(tiny_run, out, ExportOptions(stack_size=5, specialist_size=4))
    return out


def _softmax_error(eta_mean: np.ndarray, y: np.ndarray) -> float:
    return float((eta_mean.argmax(-1) != y).mean())


def test_bundle_layout_and_schema(bundle: Path) -> None:
    import jsonschema

    data = json.loads((bundle / "manifest.json").read_text())
    schema = json.loads((ROOT / "runtime" / "bundle" / "manifest.schema.json").read_text())
    jsonschema.validate(data, schema)
    manifest = load_manifest(bundle)
    assert sorted(manifest.order) == list(range(12))
    general = manifest.general_stacks
    assert [len(s.members) for s in general] == [5, 5, 2]
    # Default prefix fractions 0.1, 0.25, 0.5, 1 rounded up to general-stack ends (5, 10, 12): 5 is the first
    # general stack itself, so only 10 and 12 get a prefix stack.
    assert [(s.name, s.members) for s in manifest.prefix_stacks] == [("prefix-0010", manifest.order[:10]),
                                                                     ("prefix-0012", manifest.order)]
    assert {s.precision for s in manifest.stacks} == {"fp32"}
    assert [m for s in general for m in s.members] == manifest.order  # consecutive chunks of the order
    assert len(manifest.specialists) == 10 and all(len(s.members) == 4 for s in manifest.specialists)
    assert not list(bundle.parent.glob(".bundle.*"))  # no leftovers of the temporary directory
    for stack in manifest.stacks:
        assert stack.flops == sum(manifest.member(m).flops for m in stack.members)


def test_stacks_reproduce_the_runs_outputs(bundle: Path, tiny_run: Path) -> None:
    from edgens.data import load_dataset

    manifest = load_manifest(bundle)
    val_eta = np.load(tiny_run / "outputs" / "val_eta.npy")
    data = load_dataset("fashion-mnist", val_size=2000)
    raw = data.val_x[:300]
    # the runtime's normalisation, from the manifest alone
    x = ((raw.astype(np.float32) - manifest.preprocessing.mean[0]) / manifest.preprocessing.std[0]).astype(np.float32)
    for stack in manifest.stacks:
        session = ort.InferenceSession(str(bundle / stack.file), providers=["CPUExecutionProvider"])
        eta = session.run(None, {"x": x})[0]
        assert stack.checksum is not None  # the default export checks every MLP stack
        m, k = len(stack.members), manifest.n_outputs
        assert eta.shape == (m + 1, len(x), k + 2)
        np.testing.assert_allclose(eta[:m, :, :k], val_eta[stack.members, :300], atol=1e-4)


def test_silent_fault_data_matches_the_runs_outputs(bundle: Path, tiny_run: Path) -> None:
    from edgens.data import load_dataset
    from edgens.runtime.bundle import read_self_test

    manifest = load_manifest(bundle)
    val_eta = np.load(tiny_run / "outputs" / "val_eta.npy").astype(np.float64)
    # thresholds: per general stack, the largest distance over validation examples between its members' mean and
    # the other members' mean (centred over classes); with 3 general stacks the only prefix checked is all of them
    general = manifest.general_stacks
    want = {}
    for stack in general:
        others = [m for s in general if s is not stack for m in s.members]
        d = val_eta[stack.members].mean(0) - val_eta[others].mean(0)
        d -= d.mean(axis=1, keepdims=True)
        want[stack.name] = float(np.sqrt((d ** 2).sum(1)).max())
    assert manifest.outliers is not None and manifest.outliers.examples == val_eta.shape[1]
    assert manifest.outliers.thresholds == pytest.approx(want, rel=1e-3)  # ONNX vs torch: ~1e-5 relative
    # self-test: the first 1000 raw validation images, every stack's outputs on the first 32, and each member's
    # sums and sums of squares over all 1000
    stored = read_self_test(bundle, manifest)
    data = load_dataset("fashion-mnist", val_size=2000)
    np.testing.assert_array_equal(stored.x, data.val_x[:1000])
    assert manifest.self_test.examples == 1000
    for stack in manifest.stacks:
        eta = val_eta[stack.members, :1000]
        np.testing.assert_allclose(stored.outputs[stack.name], eta[:, :32], atol=1e-4)
        np.testing.assert_allclose(stored.sums[stack.name], eta.sum(axis=1), atol=1e-4 * 1000)
        np.testing.assert_allclose(stored.squares[stack.name], (eta ** 2).sum(axis=1), rtol=1e-4)


def test_greedy_order_beats_index_order_on_validation(bundle: Path, tiny_run: Path) -> None:
    manifest = load_manifest(bundle)
    val_eta = np.load(tiny_run / "outputs" / "val_eta.npy")
    val_y = np.load(tiny_run / "outputs" / "val_y.npy")
    # recompute both curves independently from the stored outputs
    greedy = [_softmax_error(val_eta[manifest.order[:k]].mean(0), val_y) for k in range(1, 13)]
    index = [_softmax_error(val_eta[:k].mean(0), val_y) for k in range(1, 13)]
    np.testing.assert_allclose(manifest.curves.order_val_error, greedy, atol=1e-9)
    np.testing.assert_allclose(manifest.curves.index_val_error, index, atol=1e-9)
    assert greedy[0] == min(_softmax_error(val_eta[j], val_y) for j in range(12))  # the best single member first
    assert np.mean(greedy) <= np.mean(index)
    assert greedy[-1] == pytest.approx(index[-1])
    assert np.mean(greedy) <= np.mean(manifest.curves.random_val_error)


def test_specialists_beat_random_subsets(bundle: Path, tiny_run: Path) -> None:
    manifest = load_manifest(bundle)
    val_eta = np.load(tiny_run / "outputs" / "val_eta.npy")
    val_y = np.load(tiny_run / "outputs" / "val_y.npy")
    rng = np.random.default_rng(0)
    for spec in manifest.specialists:
        c = spec.class_index
        predicted = val_eta[spec.members].mean(0).argmax(-1) == c
        actual = val_y == c
        f1 = 2 * (predicted & actual).sum() / (predicted.sum() + actual.sum())
        assert f1 == pytest.approx(spec.val_f1["greedy"], abs=1e-9)
        random_f1 = []
        for _ in range(50):
            subset = rng.choice(12, 4, replace=False)
            p = val_eta[subset].mean(0).argmax(-1) == c
            random_f1.append(2 * (p & actual).sum() / (p.sum() + actual.sum()))
        assert f1 >= np.mean(random_f1)
        assert spec.val_f1["greedy"] >= spec.val_f1["random_mean"]


def test_runtime_loads_bundle_without_torch(bundle: Path) -> None:
    code = ("import sys\nsys.modules['torch'] = None\nimport numpy as np\n"
            "from edgens.runtime import Predictor\n"
            f"p = Predictor.load({str(bundle)!r})\n"
            "x = np.random.default_rng(0).integers(0, 255, (3, 28, 28), dtype=np.uint8)\n"
            "out = p.predict(x)\nassert out.mean.shape == (3, 10)\nassert 'torch' not in sys.modules or "
            "sys.modules['torch'] is None\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr


def test_interrupted_export_leaves_nothing(tiny_run: Path, tmp_path: Path) -> None:
    def interrupt(stage: str, done: int, total: int) -> None:
        if stage == "export stacks" and done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_bundle(tiny_run, tmp_path / "b", ExportOptions(stack_size=3, specialist_size=0), interrupt)
    assert list(tmp_path.iterdir()) == []


def test_existing_destination_needs_force(tiny_run: Path, tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="--force"):
        export_bundle(tiny_run, tmp_path / "b", ExportOptions(specialist_size=0))
    assert (tmp_path / "b" / "keep.txt").exists()
    export_bundle(tiny_run, tmp_path / "b", ExportOptions(specialist_size=0, order="index", force=True))
    assert not (tmp_path / "b" / "keep.txt").exists()
    assert load_manifest(tmp_path / "b").order == list(range(12))


def test_incomplete_or_inconsistent_runs(tiny_run: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_run, broken)
    (broken / "outputs" / "val_eta.npy").unlink()
    with pytest.raises(RunDirectoryError, match="outputs/val_eta.npy"):
        export_bundle(broken, tmp_path / "b1")
    other = tmp_path / "other"
    shutil.copytree(tiny_run, other)
    config = json.loads((other / "config.json").read_text())
    config["config"]["preset"] = "mlp-64x16"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(RunDirectoryError, match="not preset 'mlp-64x16'"):
        export_bundle(other, tmp_path / "b2")
    assert not (tmp_path / "b1").exists() and not (tmp_path / "b2").exists()


def test_bad_options(tiny_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown precision 'fp8'; expected one of fp32, fp16, int8"):
        export_bundle(tiny_run, tmp_path / "b", ExportOptions(precision="fp8"))
    with pytest.raises(ConfigError, match="prefix stack fraction"):
        export_bundle(tiny_run, tmp_path / "b", ExportOptions(prefix_stacks=(0.5, 1.5)))
    with pytest.raises(ConfigError, match="unknown order"):
        export_bundle(tiny_run, tmp_path / "b", ExportOptions(order="random"))


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_tensorrt_missing_names_the_extra(tiny_run: Path, tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailableError, match=r"edgens\[tensorrt\]"):
        export_bundle(tiny_run, tmp_path / "b", ExportOptions(tensorrt=True, precision="fp16", specialist_size=0))
    assert not (tmp_path / "b").exists()


def test_cli_export_then_infer_matches_the_runs_own_outputs(tiny_run: Path, tmp_path: Path) -> None:
    # End to end through the commands a user types: the runtime's accuracy with the first k members must equal the
    # accuracy of the same members computed from the run's stored torch test outputs.
    out = tmp_path / "bundle"

    def edgens(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "edgens", *args], capture_output=True, text=True, cwd=ROOT,
                                timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stdout

    report = json.loads(edgens("export", str(tiny_run), "-o", str(out), "--stack-size", "4", "--specialist-size",
                               "0", "--json"))
    assert report["general_stacks"] == 3 and all(row["ok"] for row in report["parity"])
    manifest = load_manifest(out)
    assert report["outlier_thresholds"] == pytest.approx(manifest.outliers.thresholds)
    assert report["self_test_examples"] == manifest.self_test.examples == 2000 // 2  # 1000 of the 2000 validation
    test_eta = np.load(tiny_run / "outputs" / "test_eta.npy")
    test_y = np.load(tiny_run / "outputs" / "test_y.npy")
    for k in (3, 12):
        result = json.loads(edgens("infer", str(out), "--input", "fashion-mnist:test", "--members", str(k),
                                   "--limit", "2000", "--json"))
        expected = 1 - _softmax_error(test_eta[manifest.order[:k], :2000].mean(0), test_y[:2000])
        assert result["members_used"]["mean"] == k
        assert result["accuracy"] == pytest.approx(expected, abs=1e-3)  # float32 ties may flip an example or two


def test_a_stack_size_above_the_member_count_exports_one_stack(tiny_run: Path, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="edgens.export.bundle"):
        export_bundle(tiny_run, tmp_path / "b", ExportOptions(stack_size=100, specialist_size=0, order="index"))
    general = load_manifest(tmp_path / "b").general_stacks
    assert len(general) == 1 and general[0].members == list(range(12))
    assert "stack size 100 is larger than the run's 12 members: exporting one stack of all 12" in caplog.text


def test_default_schedule_is_fine_early_and_coarse_late() -> None:
    from edgens.export.bundle import general_schedule, prefix_sizes

    sizes = [end - start for start, end in general_schedule(256, None)]
    assert sizes == [16] * 8 + [32] * 4 and sum(sizes) == 256
    chunks = [list(range(start, end)) for start, end in general_schedule(256, None)]
    assert prefix_sizes(chunks, (0.1, 0.25, 0.5, 1.0)) == [32, 64, 128, 256]  # 10% (25.6) rounds up to 32
    assert [end - start for start, end in general_schedule(3, None)] == [1, 1, 1]
    assert [end - start for start, end in general_schedule(12, None)] == [1, 1, 1, 1, 1, 1, 2, 1, 1, 2]
    assert general_schedule(10, 4) == [(0, 4), (4, 8), (8, 10)]


def _int8_stacks_negated(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make int8 quantization produce graphs that lose accuracy: every int8 weight negated."""
    from onnx import numpy_helper

    from edgens.export import precision

    real = precision.quantize_int8

    def damaged(source: Path, destination: Path, *args: object, **kwargs: object) -> None:
        real(source, destination, *args, **kwargs)
        model = onnx.load(str(destination))
        for i, tensor in enumerate(model.graph.initializer):
            values = numpy_helper.to_array(tensor)
            if values.dtype == np.int8 and values.size > 1:
                model.graph.initializer[i].CopyFrom(numpy_helper.from_array(-values, tensor.name))
        onnx.save(model, str(destination))

    monkeypatch.setattr(precision, "quantize_int8", damaged)


def _stack_error_on_val(bundle: Path, name: str, tiny_run: Path) -> float:
    """A stack's own error (mean of its members' logits) on the run's validation split, computed from its file."""
    from edgens.data import load_dataset

    manifest = load_manifest(bundle)
    stack = manifest.stack(name)
    data = load_dataset("fashion-mnist", val_size=2000)
    x = ((data.val_x.astype(np.float32) - manifest.preprocessing.mean[0]) / manifest.preprocessing.std[0])
    x = x.reshape(-1, 1, 28, 28).astype(np.float32)
    session = ort.InferenceSession(str(bundle / stack.file), providers=["CPUExecutionProvider"])
    # Batches of the export's size: kernels may round differently for other batch shapes (and on other CPUs), and
    # an int8 graph can turn such a difference into a whole quantisation step.
    from edgens.export.precision import CHECK_BATCH

    eta = np.concatenate([session.run(None, {"x": x[i:i + CHECK_BATCH]})[0] for i in range(0, len(x), CHECK_BATCH)],
                         axis=1)
    eta = eta[:len(stack.members), :, :manifest.n_outputs]  # a checked graph's check row and columns aside
    return _softmax_error(eta.astype(np.float64).mean(0), data.val_y)


def test_int8_export_quantizes_stacks_and_records_the_accuracy_change(tiny_run: Path, bundle: Path,
                                                                       tmp_path: Path) -> None:
    out = tmp_path / "int8"
    export_bundle(tiny_run, out, ExportOptions(stack_size=5, specialist_size=0, precision="int8",
                                               precision_tolerance=1.0))
    manifest = load_manifest(out)
    fp32 = load_manifest(bundle)
    for stack in manifest.stacks:
        assert stack.precision == "int8" and stack.file == f"stacks/{stack.name}.int8.onnx"
        assert not (out / f"stacks/{stack.name}.onnx").exists()  # only what runs is shipped
        ops = {node.op_type for node in onnx.load(str(out / stack.file)).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        # The recorded change, recomputed from both files on the whole validation split.
        change = _stack_error_on_val(out, stack.name, tiny_run) - _stack_error_on_val(bundle, stack.name, tiny_run)
        assert stack.val_error_change == pytest.approx(change, abs=1e-9)
        assert abs(change) < 0.05  # int8 stays close to fp32 on these small MLPs
    assert [s.name for s in manifest.stacks] == [s.name for s in fp32.stacks if s.role != "specialist"]


def test_int8_guard_keeps_fp32_for_a_stack_that_loses_accuracy(tiny_run: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _int8_stacks_negated(monkeypatch)
    out = tmp_path / "int8"
    export_bundle(tiny_run, out, ExportOptions(stack_size=5, specialist_size=0, precision="int8"))
    manifest = load_manifest(out)
    for stack in manifest.stacks:
        assert stack.precision == "fp32" and stack.file == f"stacks/{stack.name}.onnx"
        assert stack.val_error_change is not None and stack.val_error_change > 0.005
        assert stack.precision_note is not None and stack.precision_note.startswith("int8 refused")
        assert not (out / f"stacks/{stack.name}.int8.onnx").exists()


def test_fp16_export_writes_float16_graphs_with_float32_io(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "fp16"
    export_bundle(tiny_run, out, ExportOptions(stack_size=5, specialist_size=0, precision="fp16",
                                               prefix_stacks=()))
    manifest = load_manifest(out)
    for stack in manifest.stacks:
        assert stack.precision == "fp16", stack.precision_note
        model = onnx.load(str(out / stack.file))
        assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
        assert abs(stack.val_error_change) < 0.01


def test_a_run_trained_for_its_prefixes_is_exported_in_the_trained_order(tmp_path: Path,
                                                                        fashion_mnist_dir: Path) -> None:
    run = tmp_path / "run"
    config = TrainConfig(preset="mlp-16x64", n_members=8, lam=0.95, epochs=1, train_limit=1000, val_size=500,
                         data_dir=str(fashion_mnist_dir), seed=3, anytime_weight=1.0, prefixes=(2, 4))
    train(config, run)
    assert json.loads((run / "config.json").read_text())["config"]["prefixes"] == [2, 4]
    export_bundle(run, tmp_path / "b", ExportOptions(stack_size=2, specialist_size=0, prefix_stacks=()))
    manifest = load_manifest(tmp_path / "b")
    # the trained prefixes (2 and 4 members) are kept; greedy selection may reorder inside them
    assert manifest.order_method in ("trained", "trained-greedy")
    assert sorted(manifest.order[:2]) == [0, 1] and sorted(manifest.order[:4]) == [0, 1, 2, 3]
    if manifest.order_method == "trained":
        assert manifest.order == list(range(8))
    # --order greedy still chooses by validation outputs
    export_bundle(run, tmp_path / "g", ExportOptions(stack_size=2, specialist_size=0, prefix_stacks=(), order="greedy"))
    assert load_manifest(tmp_path / "g").order_method == "greedy"


def test_anytime_on_an_exported_bundle_answers_early_and_improves(bundle: Path) -> None:
    """Issue 28, item 1: the budgets known before a call run one prefix stack, but a caller who sees each partial
    prediction gets the smallest prefix stack first and then each general stack that extends it."""
    from edgens.ensemble import softmax
    from edgens.runtime import Predictor, read_calibration

    with Predictor.load(bundle, "onnxruntime", lanes=1) as predictor:
        manifest = predictor.manifest
        x = read_calibration(bundle, manifest)[0][:16]
        parts = list(predictor.anytime(x))
        assert [int(p.members_used[0]) for p in parts] == [10, 12]  # prefix-0010, then general-002
        assert parts[0].stacks_run == ["prefix-0010"] and parts[1].stacks_run == ["prefix-0010", "general-002"]
        etas = predictor.stack_outputs(x, [s.name for s in manifest.general_stacks])
        eta = np.concatenate([etas[s.name] for s in manifest.general_stacks])  # members in the anytime order
        for part in parts:
            k = int(part.members_used[0])
            np.testing.assert_allclose(part.probabilities, softmax(eta[:k].mean(axis=0)), atol=2e-5)
        np.testing.assert_allclose(parts[-1].probabilities, predictor.predict(x).probabilities, atol=2e-5)
        seen: list[int] = []
        stopped = predictor.predict(x, on_update=lambda p: seen.append(int(p.members_used[0])) or True)
        assert seen == [10] and (stopped.members_used == 10).all() and stopped.stacks_run == ["prefix-0010"]
        with_deadline = list(predictor.anytime(x, deadline_ms=60_000))
        assert len(with_deadline) >= 2 and with_deadline[-1].members_used[0] == 12
        assert with_deadline[0].members_used[0] < 12


def test_the_manifest_records_the_training_data_range(bundle: Path, tiny_run: Path) -> None:
    from edgens.export.run_model import load_run

    dataset = load_run(tiny_run).dataset
    manifest = load_manifest(bundle)
    assert manifest.input.raw_range == (float(dataset.train_x.min()), float(dataset.train_x.max())) == (0.0, 255.0)
    assert json.loads((bundle / "manifest.json").read_text())["input"]["raw_range"] == [0.0, 255.0]
