"""Packaging: the wheel holds edgens.export and edgens.runtime, and the runtime imports without torch."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_contains_export_and_runtime(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("edgens-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("edgens/__init__.py", "edgens/export/__init__.py", "edgens/runtime/__init__.py",
                     "edgens/runtime/manifest.py", "edgens/stacks/mlp.py", "edgens/cli/__init__.py"):
        assert required in names, required
    assert not any(name.startswith(("export/", "runtime/")) for name in names)  # no bare top-level packages
    assert "edgens/runtime/manifest.schema.json" in names


def test_runtime_imports_with_torch_blocked() -> None:
    code = ("import sys\nsys.modules['torch'] = None\n"
            "import edgens.runtime, edgens.data, edgens.errors, edgens.fileio, edgens.config, edgens.presets\n"
            "assert sys.modules['torch'] is None\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
