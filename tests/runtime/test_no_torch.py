"""The runtime works where torch is not installed: fresh interpreters with torch blocked import it, load a bundle,
predict, and run the CLI commands; importing it stays light (no onnxruntime, onnx or tensorrt until used)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import SyntheticBundle

ROOT = Path(__file__).resolve().parents[2]
BLOCK = "import sys\nsys.modules['torch'] = None\n"


def _python(code: str, *args: str, env: dict[str, str] | None = None, timeout: int = 120
            ) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env=environment)


def test_import_load_and_predict_without_torch(bundle: SyntheticBundle, data, tmp_path: Path) -> None:
    x, _ = data
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "expected.npy", bundle.expected(x, [0, 1, 2, 3, 4, 5]))
    code = BLOCK + """
import pkgutil, importlib
import numpy as np
import edgens.runtime
light = [m for m in ('onnxruntime', 'onnx', 'tensorrt', 'matplotlib') if m in sys.modules]
assert not light, f'importing edgens.runtime imported {light}'
for module in pkgutil.walk_packages(edgens.runtime.__path__, 'edgens.runtime.'):
    importlib.import_module(module.name)  # every module, the tensorrt backend included
assert 'tensorrt' not in sys.modules
from edgens.runtime import Predictor
predictor = Predictor.load(sys.argv[1])
x, expected = np.load(sys.argv[2]), np.load(sys.argv[3])
prediction = predictor.predict(x)
np.testing.assert_allclose(prediction.probabilities, expected, atol=2e-5)
assert prediction.stacks_run == ['general-000', 'general-001', 'general-002'], prediction.stacks_run
assert sys.modules['torch'] is None and 'onnx' not in sys.modules
print('ok', predictor.backend.name)
"""
    result = _python(code, str(bundle.path), str(tmp_path / "x.npy"), str(tmp_path / "expected.npy"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok onnxruntime"


def test_cli_infer_and_profile_without_torch(bundle: SyntheticBundle, data, tmp_path: Path) -> None:
    x, y = data
    np.savez(tmp_path / "d.npz", x=x, y=y)
    code = BLOCK + """
from edgens.cli import COMMANDS, main
COMMANDS.setdefault('infer', 'edgens.cli.infer_cmd:infer')
COMMANDS.setdefault('profile', 'edgens.cli.profile_cmd:profile')
try:
    main(sys.argv[1:])
except SystemExit as exit:
    assert sys.modules['torch'] is None
    raise
"""
    profile = _python(code, "profile", str(bundle.path), "--batch-sizes", "1,32", "--repeats", "2")
    assert profile.returncode == 0, profile.stderr
    result = _python(code, "infer", str(bundle.path), "--input", str(tmp_path / "d.npz"), "--latency-ms", "1000",
                     "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    expected = float((bundle.expected(x, [0, 1, 2, 3, 4, 5]).argmax(axis=1) == y).mean())
    assert report["accuracy"] == pytest.approx(expected) and report["members_used"]["mean"] == 6.0


def test_training_commands_without_torch_say_which_extra(tmp_path: Path) -> None:
    code = BLOCK + "from edgens.cli import main\nmain(sys.argv[1:])\n"
    result = _python(code, "train", "--epochs", "1", "--out", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "`edgens train` needs torch" in result.stderr and "pip install 'edgens[train]'" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("EDGENS_BLOCK_TORCH") == "1", reason="already running with torch blocked")
def test_whole_runtime_suite_with_torch_blocked_from_the_start() -> None:
    # The autouse fixture blocks torch per test; this also covers collection and module imports. (The check that
    # the CLI registers the commands runs in the outer session; it is not about torch.)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", "-k",
               "not test_commands_are_registered", str(ROOT / "tests" / "runtime")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "EDGENS_BLOCK_TORCH": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
