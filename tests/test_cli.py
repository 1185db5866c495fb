"""The command line: help is fast and torch-free, errors are one line, train and inspect work end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "edgens", *args], capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"edgens {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def test_help_does_not_import_torch_or_onnxruntime() -> None:
    code = ("import sys\nfrom edgens.cli import COMMANDS, main\n"
            "for args in [['--help']] + [[name, '--help'] for name in COMMANDS]:\n"
            "    try:\n        main(args)\n"
            "    except SystemExit as exit:\n        assert exit.code == 0, (args, exit.code)\n"
            "heavy = [m for m in ('torch', 'onnxruntime', 'onnx', 'tensorrt', 'matplotlib') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    from edgens.cli import COMMANDS

    assert {"train", "inspect"} <= set(COMMANDS)
    for command in COMMANDS:
        assert command in result.stdout


def test_user_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    result = _run("train", "--lam", "1.5", "--out", str(tmp_path / "r"), check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "Error: lam must be in [0, 1], got 1.5" in result.stderr
    result = _run("inspect", str(tmp_path / "missing"), check=False)
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_train_and_inspect(tmp_path: Path, fashion_mnist_dir: Path) -> None:
    out = tmp_path / "run"
    result = _run("train", "--preset", "mlp-16x64", "--epochs", "2", "--train-limit", "2000", "--val-size", "1000",
                  "--data-dir", str(fashion_mnist_dir), "--out", str(out), "--json")
    summary = json.loads(result.stdout)
    assert summary["run"] == str(out) and summary["epochs_run"] == 2
    assert "epoch   2" in result.stderr  # one summary line per epoch
    text = _run("inspect", str(out)).stdout
    assert "mlp-16x64" in text and "test error" in text
    data = json.loads(_run("inspect", str(out), "--json").stdout)
    assert data["epochs_done"] == 2 and data["summary"]["best_epoch"] in (1, 2)


@pytest.mark.parametrize("args", [["train", "--preset", "nope"], ["train", "--epochs", "0"]])
def test_click_validation(args: list[str]) -> None:
    result = _run(*args, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--prefix-stacks", "0.5,2"], "expected fractions in (0, 1], got '0.5,2'"),
    (["--prefix-stacks", "half"], "expected comma-separated fractions in (0, 1] or 'none', got 'half'"),
    (["--precision", "int4"], "'int4' is not one of 'fp32', 'fp16', 'int8'"),
    (["--precision", "int8", "--fp16"], "--precision int8 and --fp16 disagree; give one"),
    (["--precision-tolerance", "2"], "2.0 is not in the range 0<=x<=1"),
])
def test_export_refuses_bad_layout_and_precision_options(tmp_path: Path, args: list[str], message: str) -> None:
    from click.testing import CliRunner

    from edgens.cli import cli

    result = CliRunner().invoke(cli, ["export", str(tmp_path / "run"), "-o", str(tmp_path / "b"), *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "b").exists()


# Numeric options outside what they accept (NaN and infinities included): one line, exit 2, no run directory.
_BAD_TRAIN_OPTIONS = {
    "--lam": [math.nan, math.inf, -0.5, 1.5], "--lr": [math.nan, math.inf, 0.0, -1.0],
    "--momentum": [math.nan, math.inf, 1.0, -0.1], "--weight-decay": [math.nan, math.inf, -math.inf, -1e-9],
    "--lr-gamma": [math.nan, math.inf, 0.0, 1.5], "--lr-milestones": ["nan", "inf", "0", "1", "0.5,2"],
}


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_train_refuses_bad_numbers_before_writing(data: st.DataObject) -> None:
    from click.testing import CliRunner

    from edgens.cli import cli

    option = data.draw(st.sampled_from(sorted(_BAD_TRAIN_OPTIONS)))
    value = data.draw(st.sampled_from(_BAD_TRAIN_OPTIONS[option]))
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "run"
        result = CliRunner().invoke(cli, ["train", option, str(value), "--out", str(out)])
        assert result.exit_code == 2, (option, value, result.output, result.exception)
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.output, result.stderr
        assert not out.exists() and not any(Path(folder).iterdir())


@pytest.mark.parametrize("command", [["train", "--epochs", "1"], ["bench", "drop", "some-run"]])
def test_an_unwritable_destination_is_one_line_before_any_work(tmp_path: Path, command: list[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    result = _run(*command, "--out", str(blocker / "run"), check=False)
    assert result.returncode == 2, result.stderr
    target = blocker / "run" / "drop.json" if "bench" in command else blocker / "run"
    assert result.stderr.strip() == f"Error: cannot create {target}: {blocker} is not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
