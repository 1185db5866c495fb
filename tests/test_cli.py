"""The command line: help is fast and torch-free, errors are one line, train and inspect work end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
