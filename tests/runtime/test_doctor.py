"""`edgens doctor`: the recorded devices (tests/fixtures/devices/) and recorded Python setups give the findings and
fixes a person on that device needs; this machine's own probe is real (onnxruntime sessions, imports)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from bundle_factory import SyntheticBundle
from click.testing import CliRunner

from edgens.cli import cli
from edgens.doctor import PythonFacts, diagnose, probe_python
from edgens.doctor.probe import identity_model
from edgens.fileio import atomic_write_bytes, sha256_file
from edgens.runtime import EngineInfo, LatencyTable, load_manifest, save_latency_table, write_manifest
from edgens.runtime.device_info import ROOT_VARIABLE, read_system
from edgens.runtime.latency import StackLatency

DEVICES = Path(__file__).resolve().parents[1] / "fixtures" / "devices"
ORIN_NANO = "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super"


def _jetson_python(**changes) -> PythonFacts:
    """A Python set up as docs/jetson.md says: JetPack 6's Python 3.10 in a venv that sees the system's packages,
    NVIDIA's onnxruntime-gpu, TensorRT from JetPack, cuda-python, the serve extra, no torch."""
    facts = PythonFacts(python="3.10.12", executable="/home/user/edgens-venv/bin/python3", in_venv=True,
                        system_site_packages=True, onnxruntime="1.20.0", onnxruntime_distributions=["onnxruntime-gpu"],
                        providers=["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
                        provider_loads={"TensorrtExecutionProvider": True, "CUDAExecutionProvider": True},
                        tensorrt="10.3.0.30", cuda_python="12.9.0", serve=True)
    for key, value in changes.items():
        setattr(facts, key, value)
    return facts


def _by_topic(findings) -> dict[str, list]:
    topics: dict[str, list] = {}
    for finding in findings:
        topics.setdefault(finding.topic, []).append(finding)
    return topics


def _problems(findings) -> list[tuple[str, str]]:
    return [(f.level, f.topic) for f in findings if f.level in ("warn", "error")]


def test_a_jetson_set_up_as_documented_has_no_problem() -> None:
    findings = diagnose(read_system(DEVICES / "orin-nano-super-jp62"), _jetson_python())
    assert _problems(findings) == []
    topics = _by_topic(findings)
    assert topics["device"][0].message.startswith(f"{ORIN_NANO}: L4T 36.4.3 (JetPack 6.2.1), CUDA 12.6.68")
    assert [f.message for f in topics["onnxruntime"][1:]] == ["TensorrtExecutionProvider loads",
                                                            "CUDAExecutionProvider loads"]
    assert topics["power"][0].message == "power mode 25W (1); modes here: 15W (0), 25W (1), MAXN_SUPER (2), 7W (3)"
    assert topics["power"][1].fix == "sudo nvpmodel -m 2 for speed, then edgens profile BUNDLE again"
    assert topics["clocks"][0].level == "info" and topics["clocks"][0].fix.startswith("sudo jetson_clocks")
    assert topics["dla"][0].message == "no DLA cores on this module: engines run on the GPU"


def test_the_usual_jetson_mistakes_get_their_fixes() -> None:
    nano = read_system(DEVICES / "orin-nano-super-jp62")
    # A venv made without --system-site-packages: JetPack's TensorRT is installed but invisible.
    (finding,) = _by_topic(diagnose(nano, _jetson_python(tensorrt=None, system_site_packages=False)))["tensorrt"]
    assert finding.level == "warn" and "python3-libnvinfer 10.3.0.30-1+cuda12.5" in finding.message
    assert "--system-site-packages" in finding.fix and "include-system-site-packages = true" in finding.fix
    # PyPI's onnxruntime (CPU only on aarch64) instead of NVIDIA's build.
    cpu_only = _jetson_python(onnxruntime_distributions=["onnxruntime"], providers=["CPUExecutionProvider"],
                              provider_loads={})
    (_, finding) = _by_topic(diagnose(nano, cpu_only))["onnxruntime"]
    assert finding.level == "warn" and "CPU build" in finding.message
    assert finding.fix == ("pip uninstall -y onnxruntime, then pip install onnxruntime-gpu --index-url "
                           "https://pypi.jetson-ai-lab.io/jp6/cu126")
    # Both wheels: they overwrite each other's module.
    both = _jetson_python(onnxruntime_distributions=["onnxruntime", "onnxruntime-gpu"])
    assert _problems(diagnose(nano, both)) == [("error", "onnxruntime")]
    # A GPU build whose CUDA provider does not start (a wheel for another JetPack).
    failing = _jetson_python(provider_loads={"TensorrtExecutionProvider": True,
                                             "CUDAExecutionProvider": "RuntimeError: libcudnn.so.9: not found"})
    (finding,) = [f for f in diagnose(nano, failing) if f.level == "warn"]
    assert "CUDAExecutionProvider is in this build but does not load (RuntimeError: libcudnn.so.9" in finding.message
    assert "cu126" not in finding.message and "https://pypi.jetson-ai-lab.io/jp6/cu126" in finding.fix
    # A Python other than JetPack's 3.10 cannot import JetPack's TensorRT.
    assert ("warn", "python") in _problems(diagnose(nano, _jetson_python(python="3.12.3", tensorrt=None)))
    # No onnxruntime at all: edgens cannot run.
    none = diagnose(nano, _jetson_python(onnxruntime=None, onnxruntime_distributions=[], providers=[]))
    assert ("error", "onnxruntime") in _problems(none)


def test_an_agx_orin_without_tensorrt_bindings_running_hot() -> None:
    agx = read_system(DEVICES / "agx-orin-jp61")
    findings = diagnose(agx, _jetson_python(tensorrt=None, tensorrt_error="No module named 'tensorrt'"))
    assert _problems(findings) == [("warn", "tensorrt"), ("warn", "thermal")]
    topics = _by_topic(findings)
    assert topics["tensorrt"][0].fix.startswith("sudo apt-get install python3-libnvinfer")
    assert "(TensorRT 10.3.0.30-1+cuda12.5 is)" in topics["tensorrt"][0].message
    assert topics["thermal"][0].message.startswith("gpu-thermal at 88.4 C")
    assert topics["clocks"][0].level == "ok" and "power" in topics and len(topics["power"]) == 1  # MAXN: fastest
    assert topics["dla"][0].message.startswith("2 DLA cores")


def test_the_cli_explains_a_recorded_device(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["doctor", "--root", str(DEVICES / "orin-nx-jp60"), "--json", "--no-load"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["system"]["model"] == "NVIDIA Jetson Orin NX Engineering Reference Developer Kit"
    assert report["system"]["power_mode"] == {"id": 2, "name": "15W", "source": "/var/lib/nvpmodel/status"}
    assert report["system"]["jetpack"] == "6.0" and report["system"]["dla_cores"] == 2
    assert report["python"]["python"] == ".".join(map(str, sys.version_info[:3]))  # this Python, probed
    assert {f["topic"] for f in report["findings"]} >= {"device", "python", "onnxruntime", "tensorrt", "power"}
    text = CliRunner().invoke(cli, ["doctor", "--root", str(DEVICES / "orin-nx-jp60"), "--no-load"]).output
    assert "ok device" in text and "   fix: sudo apt-get install python3-libnvinfer" in text.replace("  ", " ")


def test_the_cli_on_this_machine_probes_for_real() -> None:
    env = {k: v for k, v in os.environ.items() if k != ROOT_VARIABLE}
    result = subprocess.run([sys.executable, "-m", "edgens", "doctor", "--json"], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["python"]["onnxruntime"] == ort.__version__
    assert report["python"]["providers"] == ort.get_available_providers()
    assert report["system"]["is_jetson"] is False and report["ok"] is True


def test_the_probe_loads_a_real_session_from_its_own_model() -> None:
    session = ort.InferenceSession(identity_model(3), providers=["CPUExecutionProvider"])
    x = np.array([[1.5, -2.0, 7.25]], dtype=np.float32)
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], x)
    onnx = pytest.importorskip("onnx")
    onnx.checker.check_model(onnx.load_model_from_string(identity_model()), full_check=True)
    facts = probe_python(with_torch=False)
    assert facts.onnxruntime == ort.__version__ and facts.onnxruntime_distributions == ["onnxruntime"]
    gpu = [p for p in facts.providers if p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")]
    assert sorted(facts.provider_loads) == sorted(gpu)  # each GPU provider offered was tried


def test_a_bundles_engines_and_latency_tables_are_checked_for_this_device(bundle: SyntheticBundle) -> None:
    nano = read_system(DEVICES / "orin-nano-super-jp62")
    manifest = load_manifest(bundle.path)
    (bundle.path / "engines").mkdir()
    for stack in manifest.stacks:  # engine files with the right checksums (their content is not read here)
        relative = f"engines/{stack.name}.engine"
        atomic_write_bytes(bundle.path / relative, f"engine of {stack.name}".encode())
        stack.engines = [EngineInfo(file=relative, sha256=sha256_file(bundle.path / relative), precision="fp16",
                                    tensorrt_version="10.3.0.30", device_name="Orin", compute_capability="8.7",
                                    min_batch=1, max_batch=64)]
    write_manifest(bundle.path, manifest)
    python = _jetson_python(tensorrt=None)  # TensorRT's version comes from JetPack's package then
    topics = _by_topic(diagnose(nano, python, bundle.path))
    assert topics["engines"][0].level == "ok"
    assert topics["latency"][0].level == "info" and topics["latency"][0].fix == f"edgens profile {bundle.path}"
    manifest.stacks[1].engines[0].dla_core = 0  # built on an AGX Orin's DLA: the Nano has none
    manifest.stacks[1].engines[0].precision = "fp16"
    write_manifest(bundle.path, manifest)
    (finding,) = _by_topic(diagnose(nano, python, bundle.path))["engines"]
    assert finding.level == "warn" and finding.message == (
        "3 of 4 stacks have a TensorRT engine usable here (general-001: built for DLA core 0, this module has 0)")
    manifest.stacks[1].engines[0].dla_core = None
    write_manifest(bundle.path, manifest)
    (bundle.path / "engines/general-002.engine").unlink()  # copied without it
    (finding,) = _by_topic(diagnose(nano, python, bundle.path))["engines"]
    assert finding.message.endswith("(general-002: its engine file engines/general-002.engine is missing)")
    table = LatencyTable(backend="onnxruntime", providers=["CPUExecutionProvider"], device=ORIN_NANO,
                         stacks={"general-000": {1: StackLatency(1, 2)}}, power_mode="MAXN_SUPER")
    save_latency_table(bundle.path, table)
    (finding,) = _by_topic(diagnose(nano, python, bundle.path))["latency"]
    assert finding.level == "warn" and "profiled in MAXN_SUPER, not in the current mode 25W (1)" in finding.message
    table.power_mode = "25W"
    save_latency_table(bundle.path, table)
    assert _by_topic(diagnose(nano, python, bundle.path))["latency"][0].level == "ok"


def test_the_cli_exits_1_when_edgens_cannot_run_here() -> None:
    code = ("import sys\nsys.modules['onnxruntime'] = None\nfrom edgens.cli import main\n"
            "main(['doctor', '--no-load'])\n")
    env = {k: v for k, v in os.environ.items() if k != ROOT_VARIABLE}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "XX onnxruntime  onnxruntime is not importable: edgens cannot run a bundle here" in result.stdout
    assert "fix: pip install 'edgens[runtime]'" in result.stdout
