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
                     "edgens/runtime/manifest.py", "edgens/runtime/bundle/manifest.py", "edgens/stacks/mlp.py",
                     "edgens/cli/__init__.py"):
        assert required in names, required
    assert not any(name.startswith(("export/", "runtime/")) for name in names)  # no bare top-level packages
    assert "edgens/runtime/bundle/manifest.schema.json" in names


def test_runtime_imports_with_torch_blocked() -> None:
    code = ("import sys\nsys.modules['torch'] = None\n"
            "import edgens.runtime, edgens.data, edgens.errors, edgens.fileio, edgens.config, edgens.presets\n"
            "assert sys.modules['torch'] is None\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr


def _extra_requirements(environment: dict[str, str]) -> dict[str, set[str]]:
    """``{extra: {distribution}}`` that pip would install on a machine with ``environment``, from pyproject's own
    requirement strings, evaluated by `packaging` (pip's marker evaluator) rather than by our code."""
    try:
        import tomllib  # novermin  (3.11; 3.10 takes tomli below)
    except ModuleNotFoundError:  # Python 3.10 (JetPack 6): the test extra installs tomli
        import tomli as tomllib

    from packaging.requirements import Requirement

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    chosen: dict[str, set[str]] = {}
    for extra, requirements in extras.items():
        chosen[extra] = set()
        for text in requirements:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({**environment, "extra": extra}):
                chosen[extra].add(f"{requirement.name}{requirement.specifier}")
    return chosen


LINUX_310 = {"sys_platform": "linux", "platform_system": "Linux", "os_name": "posix", "python_version": "3.10",
             "python_full_version": "3.10.12", "implementation_name": "cpython",
             "platform_python_implementation": "CPython"}


def test_extras_never_pip_install_tensorrt_or_a_gpu_onnxruntime_on_a_jetson() -> None:
    # JetPack 6 on an Orin: aarch64 and a kernel release ending in "-tegra" (uname -r there: 5.15.148-tegra).
    jetson = _extra_requirements({**LINUX_310, "platform_machine": "aarch64", "platform_release": "5.15.148-tegra"})
    from packaging.requirements import Requirement

    names = {Requirement(r).name for r in set().union(*jetson.values())}
    assert not names & {"tensorrt", "onnxruntime", "onnxruntime-gpu"}, names
    assert jetson["tensorrt"] == {"cuda-python<13,>=12.0"}  # JetPack 6 is CUDA 12
    assert jetson["runtime"] == set() and jetson["runtime-gpu"] == set()
    # An aarch64 server (not a Jetson): PyPI's CPU onnxruntime is right there, PyPI has no GPU build or TensorRT.
    server = _extra_requirements({**LINUX_310, "platform_machine": "aarch64", "platform_release": "6.8.0-1013-aws"})
    assert server["runtime"] == {"onnxruntime>=1.18"} and server["runtime-gpu"] == set()
    assert server["tensorrt"] == {"cuda-python>=12.0"}
    # x86-64: every extra as before.
    x86 = _extra_requirements({**LINUX_310, "platform_machine": "x86_64", "platform_release": "6.1.0-18-amd64"})
    assert x86["runtime"] == {"onnxruntime>=1.18"} and x86["runtime-gpu"] == {"onnxruntime-gpu>=1.18"}
    assert x86["tensorrt"] == {"tensorrt>=10.0", "cuda-python>=12.0"}
    assert "onnxruntime>=1.18" in x86["train"] and "onnxruntime>=1.18" in x86["test"]


def test_this_install_has_what_its_markers_say() -> None:
    # The markers evaluated by the pip that installed this environment: here (x86-64, not a Jetson) onnxruntime is in.
    import importlib.metadata
    import platform

    assert "tegra" not in platform.release()
    assert importlib.metadata.version("onnxruntime")
    requires = importlib.metadata.requires("edgens") or []
    assert any(r.startswith("onnxruntime>=1.18") and "tegra" in r and 'extra == "runtime"' in r for r in requires)
