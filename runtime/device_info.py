"""What this machine is, read from the files a Jetson (or any Linux machine) exposes: no imports beyond the standard
library, no commands except ``nvpmodel -q`` as a fallback on the live system.

Everything is read below a root directory, ``/`` by default or ``$EDGENS_SYSTEM_ROOT``: a copy of a device's files
(tests/fixtures/devices/) then reads as that device. Sources:

- ``/proc/device-tree/model``: the board ("NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super").
- ``/etc/nv_tegra_release``: the L4T release ("# R36 (release), REVISION: 4.3, ...") -> ``36.4.3``.
- ``/etc/nvpmodel.conf``: the power modes (``< POWER_MODEL ID=2 NAME=MAXN_SUPER >``) and the boot default
  (``< PM_CONFIG DEFAULT=2 >``); ``/var/lib/nvpmodel/status``: the mode nvpmodel last set (``pmode:0002``). Where the
  status file is missing on the live system, ``nvpmodel -q`` ("NV Power Mode: MAXN_SUPER" then "2").
- ``/sys/devices/system/cpu/cpu*/cpufreq``, ``/sys/class/devfreq/*gpu*``: current and maximum clocks;
  ``/sys/class/thermal/thermal_zone*``: temperatures.
- ``/sys/bus/platform/devices/*nvdla*``: the DLA cores (AGX Orin and Orin NX have two, Orin Nano none).
- ``/usr/local/cuda/version.json``: the CUDA toolkit; ``/var/lib/dpkg/status``: JetPack's packages (TensorRT's
  ``python3-libnvinfer`` among them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT_VARIABLE = "EDGENS_SYSTEM_ROOT"
# NVIDIA's pip index for JetPack 6 (CUDA 12.6): onnxruntime-gpu for Jetson is there, not on PyPI (docs/jetson.md).
JETSON_INDEX = "https://pypi.jetson-ai-lab.io/jp6/cu126"
JETSON_ONNXRUNTIME_INSTALL = f"pip install onnxruntime-gpu --index-url {JETSON_INDEX}"
# JetPack's packages worth reporting (dpkg names).
JETPACK_PACKAGES = ("nvidia-jetpack", "nvidia-l4t-core", "tensorrt", "libnvinfer10", "python3-libnvinfer",
                    "libnvinfer-dla-compiler10", "cuda-runtime-12-6", "cuda-runtime-12-2")
# L4T release -> JetPack release, for the releases edgens' Jetson path is written for (docs/jetson.md).
JETPACK_OF_L4T = {"36.3": "6.0", "36.4.0": "6.1", "36.4.2": "6.1", "36.4.3": "6.2", "36.4.4": "6.2.1",
                  "36.4.7": "6.2.1"}
# Jetson modules: (substring of the device-tree model, CUDA compute capability, DLA cores). Used where /sys does not
# list the DLA devices (a container without /sys/bus) and for the compute capability without CUDA.
MODULES = (("AGX Orin", "8.7", 2), ("Orin NX", "8.7", 2), ("Orin Nano", "8.7", 0), ("AGX Xavier", "7.2", 2),
           ("Xavier NX", "7.2", 2), ("Jetson Nano", "5.3", 0), ("AGX Thor", "11.0", 0))


def on_jetson(root: str | Path | None = None) -> bool:
    """Whether this machine is a Jetson (an L4T release file, or a Jetson device-tree model); two small reads."""
    base = system_root(root)
    return (base / "etc/nv_tegra_release").is_file() or "jetson" in (device_model(base) or "").lower()


def system_root(root: str | Path | None = None) -> Path:
    """``root``, else ``$EDGENS_SYSTEM_ROOT``, else ``/``."""
    return Path(root if root is not None else os.environ.get(ROOT_VARIABLE) or "/")


def _read(root: Path, path: str) -> str | None:
    try:
        return (root / path.lstrip("/")).read_text(errors="replace")
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class PowerMode:
    """A Jetson power mode: nvpmodel's id and name (``2``, ``MAXN_SUPER``); ``source`` says where it was read."""

    id: int | None
    name: str | None
    source: str = ""

    @property
    def key(self) -> str:
        """What latency tables record and match: the name (``MAXN_SUPER``), or ``mode 2`` where it is unknown."""
        return self.name if self.name is not None else f"mode {self.id}"

    @property
    def label(self) -> str:
        """``MAXN_SUPER (2)``: how edgens names a mode, in latency tables and reports."""
        if self.name is None:
            return f"mode {self.id}"
        return self.name if self.id is None else f"{self.name} ({self.id})"


def power_mode_key(root: str | Path | None = None, query_command: bool = True) -> str | None:
    """The current power mode's :attr:`PowerMode.key` (what latency tables record), None without power modes."""
    mode = read_power_mode(root, query_command)
    return None if mode is None else mode.key


def parse_nvpmodel_conf(text: str) -> tuple[dict[int, str], int | None]:
    """Power modes ``{id: name}`` and the boot default of an ``nvpmodel.conf``."""
    modes = {int(m.group(1)): m.group(2)
             for m in re.finditer(r"^<\s*POWER_MODEL\s+ID=(\d+)\s+NAME=([^\s>]+)\s*>", text, re.MULTILINE)}
    default = re.search(r"^<\s*PM_CONFIG\s+DEFAULT=(\d+)\s*>", text, re.MULTILINE)
    return modes, int(default.group(1)) if default else None


def parse_nvpmodel_query(text: str) -> PowerMode | None:
    """The mode in the output of ``nvpmodel -q`` ("NV Power Mode: 25W" and the id on the next line)."""
    match = re.search(r"NV Power Mode:\s*(\S+)\s*\n\s*(\d+)", text)
    if match:
        return PowerMode(int(match.group(2)), match.group(1), "nvpmodel -q")
    match = re.search(r"NV Power Mode:\s*(\S+)", text)
    return PowerMode(None, match.group(1), "nvpmodel -q") if match else None


def read_power_mode(root: str | Path | None = None, query_command: bool = True) -> PowerMode | None:
    """The current power mode, or None on a machine without nvpmodel (not a Jetson).

    Args:
        query_command: where the status file is missing on the live system, ask ``nvpmodel -q`` (a process:
            milliseconds, so not on a call's path).
    """
    base = system_root(root)
    modes, _ = parse_nvpmodel_conf(_read(base, "/etc/nvpmodel.conf") or "")
    status = _read(base, "/var/lib/nvpmodel/status")
    match = re.search(r"pmode:0*(\d+)", status or "")
    if match:
        mode_id = int(match.group(1))
        return PowerMode(mode_id, modes.get(mode_id), "/var/lib/nvpmodel/status")
    if query_command and base == Path("/") and shutil.which("nvpmodel"):
        try:
            done = subprocess.run(["nvpmodel", "-q"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return parse_nvpmodel_query(done.stdout)
    return None


@dataclass
class Clocks:
    """Clocks in MHz: each CPU's current and maximum (the power mode's cap), the GPU's; temperatures in deg C."""

    cpu_mhz: list[float] = field(default_factory=list)
    cpu_max_mhz: list[float] = field(default_factory=list)
    gpu_mhz: float | None = None
    gpu_max_mhz: float | None = None
    temperatures_c: dict[str, float] = field(default_factory=dict)

    @property
    def hottest(self) -> tuple[str, float] | None:
        return max(self.temperatures_c.items(), key=lambda kv: kv[1]) if self.temperatures_c else None

    @property
    def pinned(self) -> bool | None:
        """Whether every CPU and the GPU run at their maximum (``jetson_clocks``); None if not readable."""
        pairs = list(zip(self.cpu_mhz, self.cpu_max_mhz))
        if self.gpu_mhz is not None and self.gpu_max_mhz is not None:
            pairs.append((self.gpu_mhz, self.gpu_max_mhz))
        if not pairs:
            return None
        return all(current >= 0.98 * top for current, top in pairs)

    def to_dict(self) -> dict[str, Any]:
        return {"cpu_mhz": self.cpu_mhz, "cpu_max_mhz": self.cpu_max_mhz, "gpu_mhz": self.gpu_mhz,
                "gpu_max_mhz": self.gpu_max_mhz, "temperatures_c": self.temperatures_c}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Clocks:
        return cls([float(v) for v in data.get("cpu_mhz", [])], [float(v) for v in data.get("cpu_max_mhz", [])],
                   None if data.get("gpu_mhz") is None else float(data["gpu_mhz"]),
                   None if data.get("gpu_max_mhz") is None else float(data["gpu_max_mhz"]),
                   {str(k): float(v) for k, v in data.get("temperatures_c", {}).items()})


def read_clocks(root: str | Path | None = None) -> Clocks:
    """CPU and GPU clocks and thermal-zone temperatures, from sysfs (empty where not readable)."""
    base = system_root(root)
    clocks = Clocks()
    cpus = sorted((base / "sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq"),
                  key=lambda p: int(p.parent.name[3:]))
    for cpufreq in cpus:
        current, top = _read_int(cpufreq / "scaling_cur_freq"), _read_int(cpufreq / "scaling_max_freq")
        if current is not None and top is not None:  # kHz
            clocks.cpu_mhz.append(current / 1e3)
            clocks.cpu_max_mhz.append(top / 1e3)
    for devfreq in sorted((base / "sys/class/devfreq").glob("*gpu*")):
        current, top = _read_int(devfreq / "cur_freq"), _read_int(devfreq / "max_freq")
        if current is not None and top is not None:  # Hz
            clocks.gpu_mhz, clocks.gpu_max_mhz = current / 1e6, top / 1e6
            break
    for zone in sorted((base / "sys/class/thermal").glob("thermal_zone*")):
        kind, millidegrees = _read(zone, "type"), _read_int(zone / "temp")
        if kind and millidegrees is not None and millidegrees > -40_000:  # -256 C marks an unused zone
            clocks.temperatures_c[kind.strip()] = millidegrees / 1e3
    return clocks


def read_dpkg_versions(root: str | Path | None = None, names: tuple[str, ...] = JETPACK_PACKAGES) -> dict[str, str]:
    """``{package: version}`` of the installed packages among ``names`` (dpkg's status file)."""
    text = _read(system_root(root), "/var/lib/dpkg/status") or ""
    found = {}
    for stanza in text.split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.MULTILINE))
        if fields.get("Package") in names and "installed" in fields.get("Status", "").split():
            found[fields["Package"]] = fields.get("Version", "")
    return found


@dataclass
class SystemFacts:
    """What the machine is, read from files (no Python package is imported to find it).

    Attributes:
        model: the device-tree model (a Jetson's board), else the CPU's name.
        machine: ``aarch64``, ``x86_64``...
        l4t: the L4T release (``36.4.3``), None if not a Jetson.
        jetpack: the JetPack release, from the ``nvidia-jetpack`` package or the L4T release.
        power_mode: the current power mode; power_modes: every mode ``{id: name}``; default_mode: the boot default.
        clocks: clocks and temperatures.
        dla_cores: DLA cores (from /sys, else from the module); compute_capability: from the module table.
        cuda: the CUDA toolkit's version; packages: JetPack's dpkg packages and versions.
        nvidia_gpu: a discrete NVIDIA GPU's name (/proc/driver/nvidia), None on a Jetson or without one.
        is_jetson: :func:`on_jetson` of the same root.
    """

    model: str
    machine: str
    is_jetson: bool = False
    l4t: str | None = None
    jetpack: str | None = None
    power_mode: PowerMode | None = None
    power_modes: dict[int, str] = field(default_factory=dict)
    default_mode: int | None = None
    clocks: Clocks = field(default_factory=Clocks)
    dla_cores: int | None = None
    compute_capability: str | None = None
    cuda: str | None = None
    packages: dict[str, str] = field(default_factory=dict)
    nvidia_gpu: str | None = None

    def to_dict(self) -> dict[str, Any]:
        mode = self.power_mode
        return {"model": self.model, "machine": self.machine, "is_jetson": self.is_jetson, "l4t": self.l4t,
                "jetpack": self.jetpack,
                "power_mode": None if mode is None else {"id": mode.id, "name": mode.name, "source": mode.source},
                "power_modes": {str(k): v for k, v in sorted(self.power_modes.items())},
                "default_mode": self.default_mode, "clocks": self.clocks.to_dict(), "dla_cores": self.dla_cores,
                "compute_capability": self.compute_capability, "cuda": self.cuda, "packages": self.packages,
                "nvidia_gpu": self.nvidia_gpu}


def parse_l4t_release(text: str) -> str | None:
    """``# R36 (release), REVISION: 4.3, ...`` -> ``36.4.3``."""
    match = re.search(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"{match.group(1)}.{match.group(2).rstrip('.')}" if match else None


def device_model(root: str | Path | None = None) -> str | None:
    """The device-tree model (Jetson and other ARM boards), without its trailing NUL."""
    text = _read(system_root(root), "/proc/device-tree/model")
    return text.strip("\x00\n ") or None if text is not None else None


def cpu_name(root: str | Path | None = None) -> str | None:
    for line in (_read(system_root(root), "/proc/cpuinfo") or "").splitlines():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return None


def nvidia_gpu_name(root: str | Path | None = None) -> str | None:
    """The first discrete NVIDIA GPU's model name from the driver's /proc entry (Jetsons have none there)."""
    for info in sorted((system_root(root) / "proc/driver/nvidia/gpus").glob("*/information")):
        for line in (_read(info, "") or "").splitlines():
            if line.startswith("Model:"):
                return line.split(":", 1)[1].strip()
    return None


def _module(model: str) -> tuple[str, int] | None:
    for needle, capability, dla in MODULES:
        if needle.lower() in model.lower():
            return capability, dla
    return None


def read_system(root: str | Path | None = None) -> SystemFacts:
    """Everything this module reads, from ``root`` (see the module docstring)."""
    import platform

    base = system_root(root)
    model = device_model(base)
    l4t = parse_l4t_release(_read(base, "/etc/nv_tegra_release") or "")
    packages = read_dpkg_versions(base)
    facts = SystemFacts(model=model or cpu_name(base) or platform.processor() or "unknown",
                        machine="aarch64" if l4t else platform.machine(), is_jetson=on_jetson(base), l4t=l4t,
                        packages=packages, nvidia_gpu=nvidia_gpu_name(base))
    if "nvidia-jetpack" in packages:
        facts.jetpack = packages["nvidia-jetpack"].split("+")[0].split("-")[0]
    elif l4t:
        facts.jetpack = JETPACK_OF_L4T.get(l4t) or JETPACK_OF_L4T.get(".".join(l4t.split(".")[:2]))
    facts.power_modes, facts.default_mode = parse_nvpmodel_conf(_read(base, "/etc/nvpmodel.conf") or "")
    facts.power_mode = read_power_mode(base)
    facts.clocks = read_clocks(base)
    module = _module(facts.model) if facts.is_jetson else None
    platform_devices = base / "sys/bus/platform/devices"
    if facts.is_jetson and platform_devices.is_dir():
        facts.dla_cores = len(list(platform_devices.glob("*nvdla*")))
    elif module is not None:
        facts.dla_cores = module[1]
    if module is not None:
        facts.compute_capability = module[0]
    try:
        facts.cuda = json.loads(_read(base, "/usr/local/cuda/version.json") or "{}").get("cuda", {}).get("version")
    except (json.JSONDecodeError, AttributeError):
        facts.cuda = None
    return facts
