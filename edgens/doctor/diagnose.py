"""Turn what the doctor read (the machine, this Python, a bundle) into findings, each with its fix.

Every rule is a small function of the facts, so recorded facts (tests/fixtures/devices/ and a recorded
:class:`~edgens.doctor.probe.PythonFacts`) give the same findings as the device they were recorded on. The
install commands named here are the ones docs/jetson.md and docs/packaging.md give.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgens.doctor.probe import PythonFacts
from edgens.runtime.device_info import JETSON_INDEX, JETSON_ONNXRUNTIME_INSTALL, SystemFacts

LEVELS = ("ok", "info", "warn", "error")
HOT_C = 85.0  # Orin modules throttle their clocks as the junction nears its limit (~97-99 C); warn before that
TENSORRT_MIN = 10


@dataclass(frozen=True)
class Finding:
    """One thing the doctor found: ``level`` (ok, info, warn, error), a ``topic``, what it saw, and the fix."""

    level: str
    topic: str
    message: str
    fix: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _device(system: SystemFacts) -> list[Finding]:
    if not system.is_jetson:
        gpu = f", NVIDIA GPU {system.nvidia_gpu}" if system.nvidia_gpu else ", no NVIDIA GPU"
        return [Finding("ok", "device", f"{system.model} ({system.machine}){gpu}")]
    release = f"L4T {system.l4t}" if system.l4t else "L4T release unknown (/etc/nv_tegra_release unreadable)"
    jetpack = f" (JetPack {system.jetpack})" if system.jetpack else ""
    found = [Finding("ok", "device", f"{system.model}: {release}{jetpack}, CUDA {system.cuda or 'toolkit not found'}"
                     f", compute capability {system.compute_capability or 'unknown'}")]
    if system.l4t and not system.l4t.startswith("36."):
        found.append(Finding("warn", "device", f"L4T {system.l4t} is not JetPack 6: edgens' Jetson path "
                             f"(docs/jetson.md) is written and versioned for JetPack 6.x (L4T 36.x)",
                             "flash JetPack 6.1 or 6.2 (SD card image or SDK Manager)"))
    if system.cuda is None:
        found.append(Finding("info", "device", "no CUDA toolkit at /usr/local/cuda (JetPack's cuda packages)",
                             "sudo apt-get install nvidia-jetpack (the whole JetPack: CUDA, cuDNN, TensorRT)"))
    return found


def _python(system: SystemFacts, py: PythonFacts) -> list[Finding]:
    where = "a venv" if py.in_venv else "the system Python"
    sees = "" if not py.in_venv else (" that sees the system's packages" if py.system_site_packages
                                      else " without the system's packages")
    found = [Finding("ok", "python", f"Python {py.python} ({where}{sees}: {py.executable})")]
    if system.is_jetson and (system.l4t or "").startswith("36.") and not py.python.startswith("3.10."):
        found.append(Finding("warn", "python", f"JetPack 6's TensorRT bindings (python3-libnvinfer) are built for "
                             f"its Python 3.10; this is Python {py.python}, which cannot import them",
                             "make the venv with the system's Python: /usr/bin/python3 -m venv "
                             "--system-site-packages ~/edgens-venv"))
    return found


def _onnxruntime(system: SystemFacts, py: PythonFacts) -> list[Finding]:
    gpu_here = system.is_jetson or system.nvidia_gpu is not None
    if system.is_jetson:
        install = JETSON_ONNXRUNTIME_INSTALL
    else:
        install = "pip install 'edgens[runtime-gpu]'" if gpu_here else "pip install 'edgens[runtime]'"
    if len(py.onnxruntime_distributions) > 1:
        return [Finding("error", "onnxruntime", f"both {' and '.join(py.onnxruntime_distributions)} are installed; "
                        f"they provide the same module and break each other",
                        f"pip uninstall -y onnxruntime onnxruntime-gpu, then {install}")]
    if py.onnxruntime is None:
        return [Finding("error", "onnxruntime", "onnxruntime is not importable: edgens cannot run a bundle here",
                        install)]
    gpu_providers = [p for p in py.providers if p in ("TensorrtExecutionProvider", "CUDAExecutionProvider")]
    found = [Finding("ok", "onnxruntime", f"onnxruntime {py.onnxruntime}, providers {', '.join(py.providers)}")]
    if not gpu_providers:
        if gpu_here:
            kind = "PyPI's aarch64 onnxruntime is" if system.is_jetson else "this onnxruntime is"
            found.append(Finding("warn", "onnxruntime", f"{kind} a CPU build: stacks run on the CPU, not the GPU",
                                 f"pip uninstall -y onnxruntime, then {install}"))
        return found
    for provider in gpu_providers:
        loads = py.provider_loads.get(provider)
        if loads is True:
            found.append(Finding("ok", "onnxruntime", f"{provider} loads"))
        elif loads is None:
            found.append(Finding("info", "onnxruntime", f"{provider} offered, not tried (--no-load)"))
        else:
            fix = (f"the wheel must match JetPack's CUDA and cuDNN: on JetPack 6.1/6.2 (CUDA 12.6) install it from "
                   f"{JETSON_INDEX}; check that `ls /usr/local/cuda/lib64/libcudart.so.12` finds the library"
                   if system.is_jetson else
                   "install the CUDA 12 and cuDNN 9 libraries onnxruntime-gpu needs, on the library path")
            if provider == "TensorrtExecutionProvider":
                fix = ("onnxruntime's TensorRT provider needs TensorRT's libraries (libnvinfer) of the version it was "
                       "built with; edgens' own tensorrt backend does not need it")
            found.append(Finding("warn", "onnxruntime", f"{provider} is in this build but does not load ({loads}); "
                                 f"sessions fall back to the CPU", fix))
    return found


def _tensorrt(system: SystemFacts, py: PythonFacts) -> list[Finding]:
    if py.tensorrt is not None:
        major = py.tensorrt.split(".")[0]
        if major.isdigit() and int(major) < TENSORRT_MIN:
            return [Finding("warn", "tensorrt", f"TensorRT {py.tensorrt} is older than {TENSORRT_MIN}: the "
                            f"tensorrt backend needs TensorRT 10's API", "JetPack 6 ships TensorRT 10.3")]
        found = [Finding("ok", "tensorrt", f"TensorRT {py.tensorrt}")]
        if py.cuda_python is None:
            found.append(Finding("warn", "tensorrt", "cuda-python is not installed: the tensorrt backend needs it "
                                 "for device buffers", "pip install 'cuda-python>=12,<13' (CUDA 12.x)"))
        return found
    if system.is_jetson:
        bindings = system.packages.get("python3-libnvinfer")
        if bindings is not None and py.in_venv and not py.system_site_packages:
            return [Finding("warn", "tensorrt", f"TensorRT's Python bindings are installed (python3-libnvinfer "
                            f"{bindings}) but this venv does not see the system's packages",
                            "make the venv again with python3 -m venv --system-site-packages, or set "
                            "include-system-site-packages = true in its pyvenv.cfg")]
        if bindings is not None:
            return [Finding("warn", "tensorrt", f"python3-libnvinfer {bindings} is installed but `import tensorrt` "
                            f"fails ({py.tensorrt_error})", "use the system's Python 3.10 (JetPack 6) for the venv")]
        have = f" (TensorRT {system.packages['tensorrt']} is)" if "tensorrt" in system.packages else ""
        return [Finding("warn", "tensorrt", f"TensorRT's Python bindings are not installed{have}: no native "
                        f"TensorRT engines, onnxruntime runs the stacks",
                        "sudo apt-get install python3-libnvinfer (JetPack's package; never pip install tensorrt on "
                        "a Jetson)")]
    if system.nvidia_gpu is not None:
        return [Finding("info", "tensorrt", "TensorRT is not installed: the tensorrt backend is unavailable",
                        "pip install 'edgens[tensorrt]'")]
    return [Finding("info", "tensorrt", "no NVIDIA GPU: TensorRT does not apply here")]


def _power(system: SystemFacts) -> list[Finding]:
    if not system.is_jetson:
        return []
    mode = system.power_mode
    if mode is None:
        return [Finding("warn", "power", "cannot read the power mode (/var/lib/nvpmodel/status, nvpmodel -q): "
                        "latency tables cannot be matched to it", "sudo nvpmodel -q")]
    modes = ", ".join(f"{name} ({i})" for i, name in sorted(system.power_modes.items()))
    found = [Finding("ok", "power", f"power mode {mode.label}; modes here: {modes or 'unknown'}")]
    fastest = [i for i, name in system.power_modes.items() if name.upper().startswith("MAXN")]
    if fastest and mode.id not in fastest:
        found.append(Finding("info", "power", f"not the fastest mode ({system.power_modes[fastest[0]]}): latency "
                             f"budgets use the latency table profiled in {mode.label}",
                             f"sudo nvpmodel -m {fastest[0]} for speed, then edgens profile BUNDLE again"))
    clocks = system.clocks
    if clocks.pinned is False:
        found.append(Finding("info", "clocks", "clocks follow the load (DVFS): a stack's latency varies from call to "
                             "call until they rise", "sudo jetson_clocks (pins them at the mode's maximum; "
                             "sudo jetson_clocks --restore undoes it after sudo jetson_clocks --store)"))
    elif clocks.pinned:
        found.append(Finding("ok", "clocks", "every CPU and the GPU at the mode's maximum clock (jetson_clocks)"))
    hottest = clocks.hottest
    if hottest is not None and hottest[1] >= HOT_C:
        found.append(Finding("warn", "thermal", f"{hottest[0]} at {hottest[1]:.1f} C: near the point where the "
                             f"board throttles its clocks, and latency grows", "check the fan and airflow; "
                             "`tegrastats` shows temperatures and clocks live; a lower power mode runs cooler"))
    elif hottest is not None:
        found.append(Finding("ok", "thermal", f"hottest zone {hottest[0]} at {hottest[1]:.1f} C"))
    return found


def _dla(system: SystemFacts, py: PythonFacts) -> list[Finding]:
    if not system.is_jetson:
        return []
    cores = py.dla_cores if py.dla_cores is not None else system.dla_cores
    if not cores:
        return [Finding("info", "dla", "no DLA cores on this module: engines run on the GPU")]
    fix = None if py.tensorrt else "DLA engines need TensorRT (see the tensorrt finding)"
    return [Finding("ok", "dla", f"{cores} DLA cores: edgens export --add-tensorrt BUNDLE --fp16 --dla-core N "
                    f"builds engines for one", fix)]


def _torch_and_serve(system: SystemFacts, py: PythonFacts) -> list[Finding]:
    found = []
    if py.torch is None:
        found.append(Finding("ok", "torch", "torch is not installed: the device needs it only to train or export"))
    else:
        cuda = {True: f"CUDA on {py.cuda_device}", False: "no CUDA", None: "not imported"}[py.torch_cuda]
        found.append(Finding("ok", "torch", f"torch {py.torch} ({cuda})"))
        if system.is_jetson and py.torch_cuda is False:
            found.append(Finding("info", "torch", "this torch is a CPU build: training here runs on the CPU",
                                 "train on a GPU machine and copy the bundle; or install NVIDIA's torch for JetPack"))
    if not py.serve:
        found.append(Finding("info", "serve", "`edgens serve` is not installed", "pip install 'edgens[serve]'"))
    return found


def _bundle(bundle_dir: Path, system: SystemFacts, py: PythonFacts) -> list[Finding]:
    from edgens.errors import EdgensError
    from edgens.runtime.backends.tensorrt import engine_problem
    from edgens.runtime.latency import load_latency_tables, power_mode_matches
    from edgens.runtime.bundle import check_file, load_manifest

    try:
        manifest = load_manifest(bundle_dir)
    except EdgensError as err:
        return [Finding("error", "bundle", str(err), "export the bundle again (edgens export RUN -o BUNDLE)")]
    found = [Finding("ok", "bundle", f"{bundle_dir}: {len(manifest.stacks)} stacks, onnxruntime runs them all")]
    tensorrt = py.tensorrt or (system.packages.get("tensorrt", "").split("-")[0] or None)
    capability = py.compute_capability or system.compute_capability
    dla_cores = py.dla_cores if py.dla_cores is not None else system.dla_cores
    engines = [(stack.name, e) for stack in manifest.stacks for e in stack.engines]
    if engines:
        usable, reasons = set(), {}
        for name, engine in engines:
            problem = engine_problem(engine, capability, tensorrt, dla_cores or 0)  # no DLA core known: none
            if problem is None and (missing := check_file(bundle_dir, engine.file, engine.sha256)) is not None:
                problem = f"its engine file {missing}"  # a copy that missed the engines, or a broken one
            if problem is None:
                usable.add(name)
            else:
                reasons[name] = problem
        missing = [s.name for s in manifest.stacks if s.name not in usable]
        if missing:
            why = reasons.get(missing[0], "no engine")
            found.append(Finding("warn", "engines", f"{len(manifest.stacks) - len(missing)} of "
                                 f"{len(manifest.stacks)} stacks have a TensorRT engine usable here ({missing[0]}: "
                                 f"{why})", f"build them on this device: edgens export --add-tensorrt {bundle_dir}"))
        else:
            found.append(Finding("ok", "engines", "every stack has a TensorRT engine usable here"))
    elif tensorrt is not None:
        found.append(Finding("info", "engines", "the bundle has no TensorRT engines",
                             f"edgens export --add-tensorrt {bundle_dir} --fp16 (on this device)"))
    try:
        tables = load_latency_tables(bundle_dir)
    except EdgensError as err:
        return [*found, Finding("warn", "latency", str(err), f"edgens profile {bundle_dir}")]
    mode = system.power_mode
    here = [t for t in tables if t.device.startswith(system.model)]  # every backend's tables start with the board
    matching = [t for t in here if power_mode_matches(t.power_mode, mode)]
    if matching:
        found.append(Finding("ok", "latency", f"{len(matching)} latency table(s) for this device in power mode "
                             f"{mode.label if mode else 'unknown'}"))
    elif here:
        modes = ", ".join(sorted({t.power_mode or "no recorded mode" for t in here}))
        found.append(Finding("warn", "latency", f"latency tables for this device were profiled in {modes}, not in "
                             f"the current mode {mode.label if mode else 'unknown'}: latency_ms budgets have no "
                             f"table to plan with", f"edgens profile {bundle_dir} (in this mode)"))
    else:
        found.append(Finding("info", "latency", "no latency table for this device: latency_ms budgets need one",
                             f"edgens profile {bundle_dir}"))
    return found


def diagnose(system: SystemFacts, py: PythonFacts, bundle: str | Path | None = None) -> list[Finding]:
    """Findings about the machine, this Python and (optionally) a bundle, most basic first."""
    found = [*_device(system), *_python(system, py), *_onnxruntime(system, py), *_tensorrt(system, py),
             *_dla(system, py), *_power(system), *_torch_and_serve(system, py)]
    if bundle is not None:
        found += _bundle(Path(bundle), system, py)
    return found
