"""``edgens infer`` and ``edgens profile`` through the real click group (errors become one line, exit status 2)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import SyntheticBundle, make_data
from click.testing import CliRunner

from edgens.cli import COMMANDS, cli

OURS = {"infer": "edgens.cli.infer_cmd:infer", "profile": "edgens.cli.profile_cmd:profile"}


@pytest.fixture()
def run(monkeypatch: pytest.MonkeyPatch):
    # Register the commands for these tests whatever the state of the group's table (checked separately below).
    for name, target in OURS.items():
        monkeypatch.setitem(COMMANDS, name, target)

    def invoke(*args: str, code: int = 0):
        result = CliRunner().invoke(cli, [str(a) for a in args])
        assert result.exit_code == code, (result.output, result.exception)
        return result

    return invoke


@pytest.fixture()
def npz(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    x, y = make_data(100, seed=11)
    path = tmp_path / "test.npz"
    np.savez(path, x=x, y=y)
    return path, x, y


def test_commands_are_registered() -> None:
    for name, target in OURS.items():
        assert COMMANDS.get(name) == target, f"edgens {name} is not registered in edgens/cli/__init__.py COMMANDS"


def test_infer_json_reports_accuracy_latency_members(run, bundle: SyntheticBundle, npz) -> None:
    path, x, y = npz
    report = json.loads(run("infer", bundle.path, "--input", path, "--batch-size", 32, "--json").stdout)
    expected_accuracy = float((bundle.expected(x, [0, 1, 2, 3, 4, 5]).argmax(axis=1) == y).mean())
    assert report["accuracy"] == pytest.approx(expected_accuracy)
    assert report["examples"] == 100 and report["batches"] == 4
    assert report["members_used"] == {"mean": 6.0, "min": 6, "max": 6}
    assert report["failures"] == {} and report["unavailable_stacks"] == {}
    assert report["providers"] == ["CPUExecutionProvider"] and report["budget"] == "all members"
    assert 0 < report["latency_ms"]["median"] <= report["latency_ms"]["p90"]


def test_infer_text_with_a_members_budget(run, bundle: SyntheticBundle, npz) -> None:
    path, x, y = npz
    out = run("infer", bundle.path, "--input", path, "--members", "50%").stdout
    accuracy = (bundle.expected(x, [0, 1, 2]).argmax(axis=1) == y).mean()
    assert f"accuracy: {accuracy:.2%} (100 examples)" in out
    assert "members:  mean 3.00 per example (min 3, max 3) of 6" in out
    assert "budget: members=0.5" in out and "failures: none" in out


def test_infer_npy_without_labels_and_a_deadline(run, bundle: SyntheticBundle, tmp_path: Path) -> None:
    x, _ = make_data(10, seed=2)
    np.save(tmp_path / "x.npy", x[:, 0])
    report = json.loads(run("infer", bundle.path, "--input", tmp_path / "x.npy", "--deadline-ms", 1000,
                            "--json").stdout)
    assert "accuracy" not in report and report["examples"] == 10
    deadline = report["deadline"]
    assert deadline == {"deadline_ms": 1000.0, "overrun_batches": 0, "beyond_one_stack_batches": 0,
                        "p99_overrun_ms": 0.0, "max_overrun_ms": 0.0, "one_stack_ms": deadline["one_stack_ms"]}
    assert deadline["one_stack_ms"] > 0  # the slowest stack's slowest observed run: no latency table here


def test_infer_reports_deadlines_against_one_stack(run, bundle: SyntheticBundle, npz) -> None:
    # a deadline shorter than any stack: every batch is past it, by its first stack (and the runtime's own work)
    report = json.loads(run("infer", bundle.path, "--input", npz[0], "--deadline-ms", 1e-6, "--batch-size", 10,
                            "--json").stdout)["deadline"]
    assert report["overrun_batches"] == 10 and 0 <= report["beyond_one_stack_batches"] <= 10
    assert 0 < report["p99_overrun_ms"] <= report["max_overrun_ms"] and report["one_stack_ms"] > 0.1
    out = run("infer", bundle.path, "--input", npz[0], "--deadline-ms", 1e-6, "--batch-size", 10).output
    assert re.search(r"deadline: 1e-06 ms kept within one stack \(up to [0-9.]+ ms, p90\) in [0-9]+/10 batches; "
                     r"past the deadline in 10, p99 overrun [0-9.]+ ms, max [0-9.]+ ms", out), out


def test_infer_task_reports_the_class_f1(run, bundle: SyntheticBundle, npz) -> None:
    path, x, y = npz
    report = json.loads(run("infer", bundle.path, "--input", path, "--task", "Dress", "--json").stdout)
    predicted = bundle.expected(x, [4, 5]).argmax(axis=1) == 3
    actual = y == 3
    f1 = 2 * (predicted & actual).sum() / (predicted.sum() + actual.sum())
    assert report["task_f1"] == pytest.approx(f1) and report["members_used"]["mean"] == 2.0


def test_profile_then_infer_with_a_latency_budget(run, bundle: SyntheticBundle, npz) -> None:
    path, _, _ = npz
    out = run("profile", bundle.path, "--batch-sizes", "1,64", "--repeats", 3, "--warmup", 1).stdout
    assert "general-002" in out and f"wrote {bundle.path / 'latency.json'}" in out
    table = json.loads(run("profile", bundle.path, "--batch-sizes", "8", "--repeats", 2, "--json").stdout)
    assert set(table["stacks"]["general-000"]) == {"8"}
    assert len(json.loads((bundle.path / "latency.json").read_text())["tables"]) == 1  # replaced, not added
    report = json.loads(run("infer", bundle.path, "--input", path, "--latency-ms", 10_000, "--json").stdout)
    assert report["members_used"]["mean"] == 6.0


@pytest.mark.parametrize(("args", "message"), [
    (["--members", "2", "--flops", "10"], "Error: give one budget at a time, got members=2 and flops=10.0"),
    (["--latency-ms", "5"], "run `edgens profile BUNDLE` first"),
    (["--members", "two"], "expected a count (3), a fraction (0.5) or a percentage (50%), got 'two'"),
    (["--task", "class-7"], "Error: unknown task 'class-7'; this bundle's specialists: class-3 (Dress)"),
])
def test_infer_user_errors_are_one_line(run, bundle: SyntheticBundle, npz, args, message) -> None:
    result = run("infer", bundle.path, "--input", npz[0], *args, code=2)
    assert message in result.output and "Traceback" not in result.output


def test_infer_refuses_absurd_inputs_in_one_line(run, bundle: SyntheticBundle, tmp_path: Path) -> None:
    path = tmp_path / "absurd.npz"
    np.savez(path, x=np.full((3, 28, 28), 3e38, dtype=np.float32))
    result = run("infer", bundle.path, "--input", path, code=2)
    assert result.output.count("\n") == 1 and "expected raw values within -255..510" in result.output


def test_infer_bad_paths(run, bundle: SyntheticBundle, tmp_path: Path, npz) -> None:
    result = run("infer", tmp_path / "nope", "--input", npz[0], code=2)
    assert "does not exist or is not a directory" in result.output
    result = run("infer", bundle.path, "--input", tmp_path / "missing.npz", code=2)
    assert "missing.npz: no such file" in result.output
    np.savez(tmp_path / "wrong.npz", images=np.zeros((2, 28, 28), np.uint8))
    result = run("infer", bundle.path, "--input", tmp_path / "wrong.npz", code=2)
    assert "expected an array x (and optionally y) or x_test (and y_test), found images" in result.output
    np.save(tmp_path / "flat.npy", np.zeros((2, 784), np.uint8))
    result = run("infer", bundle.path, "--input", tmp_path / "flat.npy", code=2)
    assert "input: received shape (2, 784), expected (B, 1, 28, 28) or (B, 28, 28)" in result.output
    result = run("infer", bundle.path, "--input", "fashion-mnist:dev", code=2)
    assert "SPLIT one of train, val, test" in result.output
    result = run("profile", bundle.path, "--batch-sizes", "0,a", code=2)
    assert "expected comma-separated batch sizes >= 1" in result.output


def test_infer_on_fashion_mnist_test(run, bundle: SyntheticBundle, fashion_mnist_dir: Path) -> None:
    from edgens.data import load_dataset

    test = load_dataset("fashion-mnist", data_dir=fashion_mnist_dir)
    report = json.loads(run("infer", bundle.path, "--input", "fashion-mnist:test", "--data-dir", fashion_mnist_dir,
                            "--limit", 200, "--json").stdout)
    expected = bundle.expected(test.test_x[:200], [0, 1, 2, 3, 4, 5]).argmax(axis=1)
    assert report["examples"] == 200
    assert report["accuracy"] == pytest.approx(float((expected == test.test_y[:200]).mean()))


def test_profile_checks_it_can_write_the_table_before_measuring(run, bundle: SyntheticBundle) -> None:
    (bundle.path / "latency.json").mkdir()  # what root cannot write either (permissions do not stop root)
    result = run("profile", bundle.path, "--repeats", "100000", code=2)  # would take minutes if it measured
    assert "cannot write" in result.output and "latency.json: it is a directory" in result.output
    assert result.output.count("\n") == 1


def test_profile_on_a_jetson_names_the_power_mode_and_clocks(run, bundle: SyntheticBundle, npz,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    devices = Path(__file__).resolve().parents[1] / "fixtures" / "devices"
    monkeypatch.setenv("EDGENS_SYSTEM_ROOT", str(devices / "orin-nano-super-jp62"))
    out = run("profile", bundle.path, "--batch-sizes", "1", "--repeats", 2, "--warmup", 0).stdout
    assert ("power mode 25W; clocks as it ended: CPU 730-1344 of 1344 MHz, GPU 306 of 918 MHz (not pinned: "
            "`sudo jetson_clocks` gives steadier latencies)") in out
    monkeypatch.setenv("EDGENS_SYSTEM_ROOT", str(devices / "agx-orin-jp61"))  # another board: its own table
    out = run("profile", bundle.path, "--batch-sizes", "1", "--repeats", 2, "--warmup", 0).stdout
    assert "power mode MAXN; clocks as it ended: CPU 2202-2202 of 2202 MHz, GPU 1300 of 1300 MHz\n" in out
    tables = json.loads((bundle.path / "latency.json").read_text())["tables"]
    assert [(t["device"], t["power_mode"]) for t in tables] == [
        ("NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super", "25W"),
        ("Jetson AGX Orin Developer Kit", "MAXN")]
    path, _, _ = npz
    assert json.loads(run("infer", bundle.path, "--input", path, "--latency-ms", 10_000, "--json").stdout)


def test_missing_packages_on_a_jetson_name_jetpack_and_the_jetson_index(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgens.cli import missing_package_error

    devices = Path(__file__).resolve().parents[1] / "fixtures" / "devices"
    monkeypatch.setenv("EDGENS_SYSTEM_ROOT", str(devices / "agx-orin-jp61"))
    tensorrt = str(missing_package_error("infer", ModuleNotFoundError(name="tensorrt")).message)
    assert "sudo apt-get install python3-libnvinfer (JetPack's package)" in tensorrt and "pip" not in tensorrt
    onnxruntime = str(missing_package_error("infer", ModuleNotFoundError(name="onnxruntime")).message)
    assert onnxruntime.endswith("pip install onnxruntime-gpu --index-url https://pypi.jetson-ai-lab.io/jp6/cu126")
    monkeypatch.setenv("EDGENS_SYSTEM_ROOT", str(devices / "x86-gpu-server"))
    assert str(missing_package_error("infer", ModuleNotFoundError(name="tensorrt")).message).endswith(
        "pip install 'edgens[tensorrt]'")
