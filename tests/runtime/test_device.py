"""The device side of a Jetson: facts read from recorded device files (tests/fixtures/devices/), latency tables
kept and picked per power mode, and TensorRT's DLA engine logic that runs without TensorRT."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
from pathlib import Path

import jsonschema
import pytest
from bundle_factory import SyntheticBundle, make_data

import edgens.runtime.bundle.types as mf
import edgens.runtime.latency as latency_module
from edgens.errors import BackendUnavailableError, BundleError, ConfigError
from edgens.export.tensorrt_build import TargetDevice, check_precision, dla_supported
from edgens.runtime import EngineInfo, LatencyTable, Predictor, load_latency_tables, load_manifest, profile_stacks
from edgens.runtime import save_latency_table, write_manifest
from edgens.runtime.backends import describe_device
from edgens.runtime.backends.tensorrt import parse_accelerators, place_stacks, select_engine
from edgens.runtime.device_info import (ROOT_VARIABLE, parse_l4t_release, parse_nvpmodel_query, read_power_mode,
                                        read_system)
from edgens.runtime.latency import StackLatency

DEVICES = Path(__file__).resolve().parents[1] / "fixtures" / "devices"
ORIN_NANO = "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super"


def test_an_orin_nano_reads_as_recorded() -> None:
    facts = read_system(DEVICES / "orin-nano-super-jp62")
    assert facts.is_jetson and facts.model == ORIN_NANO and facts.machine == "aarch64"
    assert (facts.l4t, facts.jetpack, facts.cuda) == ("36.4.3", "6.2.1", "12.6.68")
    assert (facts.power_mode.id, facts.power_mode.name, facts.power_mode.label) == (1, "25W", "25W (1)")
    assert facts.power_modes == {0: "15W", 1: "25W", 2: "MAXN_SUPER", 3: "7W"} and facts.default_mode == 0
    assert (facts.dla_cores, facts.compute_capability) == (0, "8.7")
    assert facts.packages["python3-libnvinfer"] == "10.3.0.30-1+cuda12.5" and "zlib1g" not in facts.packages
    clocks = facts.clocks
    assert clocks.cpu_mhz == [729.6, 1036.8, 729.6, 1344.0, 729.6, 729.6] and clocks.cpu_max_mhz == [1344.0] * 6
    assert (clocks.gpu_mhz, clocks.gpu_max_mhz) == (306.0, 918.0) and clocks.pinned is False
    assert "cv0-thermal" not in clocks.temperatures_c  # -256 C marks an unused zone
    assert clocks.hottest == ("tj-thermal", pytest.approx(49.031))


def test_an_agx_orin_and_an_orin_nx_read_as_recorded() -> None:
    agx = read_system(DEVICES / "agx-orin-jp61")
    assert (agx.model, agx.l4t, agx.jetpack) == ("Jetson AGX Orin Developer Kit", "36.4.0", "6.1")
    assert agx.power_mode.label == "MAXN (0)" and agx.default_mode == 2
    assert agx.dla_cores == 2  # from /sys/bus/platform/devices/*nvdla*
    assert agx.clocks.pinned is True and agx.clocks.hottest[1] == pytest.approx(88.437)
    assert "python3-libnvinfer" not in agx.packages and agx.packages["tensorrt"].startswith("10.3.0.30")
    nx = read_system(DEVICES / "orin-nx-jp60")
    assert (nx.l4t, nx.jetpack, nx.cuda) == ("36.3.0", "6.0", None)  # JetPack from the L4T release
    assert nx.power_mode.label == "15W (2)"
    assert nx.dla_cores == 2  # no /sys/bus copied: from the module (Orin NX has two)
    assert nx.clocks.gpu_mhz is None and nx.clocks.pinned is False


def test_a_server_is_not_a_jetson() -> None:
    server = read_system(DEVICES / "x86-gpu-server")
    assert not server.is_jetson and server.l4t is None and server.power_mode is None
    assert server.model == "AMD EPYC 9654 96-Core Processor" and server.nvidia_gpu == "NVIDIA H200"
    assert server.dla_cores is None and server.to_dict()["power_modes"] == {}


def test_nvpmodel_and_l4t_text_as_the_tools_print_it() -> None:
    assert parse_nvpmodel_query("NV Power Mode: 25W\n1\n") == parse_nvpmodel_query(
        "NVPM VERB: Config file: /etc/nvpmodel.conf\nNVPM VERB: Current mode: NV Power Mode: 25W\n1\n")
    mode = parse_nvpmodel_query("NV Power Mode: MAXN_SUPER\n2\n")
    assert (mode.id, mode.name) == (2, "MAXN_SUPER")
    assert parse_nvpmodel_query("nvpmodel: command failed\n") is None
    assert parse_l4t_release("# R35 (release), REVISION: 6.1, GCID: 1, BOARD: t186ref") == "35.6.1"
    assert parse_l4t_release("Ubuntu 22.04") is None


def test_the_system_root_variable_makes_this_machine_read_as_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ROOT_VARIABLE, str(DEVICES / "orin-nano-super-jp62"))
    assert describe_device() == ORIN_NANO
    assert read_power_mode().key == "25W"
    monkeypatch.setenv(ROOT_VARIABLE, str(DEVICES / "x86-gpu-server"))
    assert describe_device() == f"AMD EPYC 9654 96-Core Processor x{os.cpu_count()}"
    assert read_power_mode() is None


# ------------------------------------------------------------------------------------------ power-mode latency


@pytest.fixture()
def jetson(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the Orin Nano's files, read as this machine's; its power mode can be switched."""
    root = tmp_path / "orin-nano"
    shutil.copytree(DEVICES / "orin-nano-super-jp62", root)
    monkeypatch.setenv(ROOT_VARIABLE, str(root))
    return root


def _set_mode(root: Path, mode_id: int) -> None:
    (root / "var/lib/nvpmodel/status").write_text(f"pmode:{mode_id:04d} fmode:quiet\n")


def _load(bundle: SyntheticBundle) -> Predictor:
    return Predictor.load(bundle.path, "onnxruntime", lanes=1)


def test_profile_records_the_power_mode_and_clocks(jetson: Path, bundle: SyntheticBundle, data) -> None:
    with _load(bundle) as predictor:
        table = profile_stacks(predictor, [1, 4], warmup=1, repeats=3)
    assert (table.power_mode, table.device) == ("25W", ORIN_NANO)
    assert table.clocks["gpu_mhz"] == 306.0 and table.clocks["cpu_max_mhz"] == [1344.0] * 6
    save_latency_table(bundle.path, table)
    written = json.loads((bundle.path / "latency.json").read_text())["tables"][0]
    assert written["power_mode"] == "25W" and written["clocks"]["temperatures_c"]["tj-thermal"] == 49.031
    with _load(bundle) as predictor:
        assert predictor.power_mode == "25W" and predictor.latency_table is not None
        assert predictor.predict(data[0][:4], latency_ms=10_000).stacks_run == ["general-000", "general-001",
                                                                                "general-002"]


def test_a_table_of_another_power_mode_is_never_used(jetson: Path, bundle: SyntheticBundle, data) -> None:
    with _load(bundle) as predictor:
        save_latency_table(bundle.path, profile_stacks(predictor, [4], warmup=0, repeats=2))
    _set_mode(jetson, 2)  # MAXN_SUPER: the 25W table would overstate every latency
    with _load(bundle) as predictor:
        assert predictor.power_mode == "MAXN_SUPER" and predictor.latency_table is None
        with pytest.raises(ConfigError, match=r"latency_ms budgets need this device's latency table: .*latency.json "
                                              r"has tables for this backend and device in power mode 25W, none for "
                                              r"the current mode MAXN_SUPER; run `edgens profile .*` in this mode"):
            predictor.predict(data[0][:4], latency_ms=10_000)
        assert len(predictor.predict(data[0][:4], deadline_ms=10_000).stacks_run) == 3  # observed latencies
        save_latency_table(bundle.path, profile_stacks(predictor, [4], warmup=0, repeats=2))
    assert sorted(t.power_mode for t in load_latency_tables(bundle.path)) == ["25W", "MAXN_SUPER"]  # side by side


def test_a_table_without_a_power_mode_is_not_used_on_a_jetson(jetson: Path, bundle: SyntheticBundle) -> None:
    # An older edgens recorded no mode: on a device that has modes nothing says which one it holds.
    with _load(bundle) as predictor:
        description = predictor.backend.describe()
    save_latency_table(bundle.path, LatencyTable(**description, stacks={"general-000": {1: StackLatency(1, 2)}}))
    with _load(bundle) as predictor:
        assert predictor.latency_table is None
        with pytest.raises(ConfigError, match="in power mode none recorded, none for the current mode 25W"):
            predictor.predict(make_data(2, seed=1)[0], latency_ms=100)


def test_a_running_predictor_follows_a_power_mode_change(jetson: Path, bundle: SyntheticBundle,
                                                         monkeypatch: pytest.MonkeyPatch, data) -> None:
    monkeypatch.setattr(latency_module, "POWER_MODE_CHECK_S", 0.0)
    with _load(bundle) as predictor:
        save_latency_table(bundle.path, profile_stacks(predictor, [4], warmup=0, repeats=2))
        predictor.reload_latency()
        assert predictor.predict(data[0][:4], latency_ms=10_000).stacks_run
        _set_mode(jetson, 3)  # sudo nvpmodel -m 3 (7W) while serving
        with pytest.raises(ConfigError, match="none for the current mode 7W"):
            predictor.predict(data[0][:4], latency_ms=10_000)
        assert predictor.power_mode == "7W"
        _set_mode(jetson, 1)
        assert predictor.predict(data[0][:4], latency_ms=10_000).stacks_run
        assert predictor.latency_table is not None and predictor.latency_table.power_mode == "25W"


def test_latency_calls_racing_power_mode_changes_never_fail_and_end_on_the_new_table(
        jetson: Path, bundle: SyntheticBundle, monkeypatch: pytest.MonkeyPatch, data) -> None:
    """Two threads keep planning latency_ms calls (as the batcher's worker and the event loop's budget checks do,
    each following the power mode) while the power mode switches between two modes that both have a table: no call
    may fail (a table is always there), and once the switching stops every plan is the last mode's. Before the
    latency view was published in one assignment, a call could find no table at all (a 400 saying "run edgens
    profile") or a plan cached from the old table."""
    monkeypatch.setattr(latency_module, "POWER_MODE_CHECK_S", 0.0)  # every call reads the mode
    status = jetson / "var/lib/nvpmodel/status"

    def set_mode(mode_id: int) -> None:  # as one write: a torn read is not what this test is about
        tmp = status.with_suffix(".tmp")
        tmp.write_text(f"pmode:{mode_id:04d} fmode:quiet\n")
        os.replace(tmp, status)

    x = data[0][:4]
    with _load(bundle) as predictor:
        description = predictor.backend.describe()
        names = [stack.name for stack in predictor.manifest.stacks]
        for mode, ms in (("25W", 1.0), ("MAXN_SUPER", 60.0)):  # within 100 ms: every stack at 25W, one at MAXN
            table = {name: {4: StackLatency(ms, ms)} for name in names}
            save_latency_table(bundle.path, LatencyTable(**description, stacks=table, power_mode=mode))
        predictor.reload_latency()
        assert len(predictor.predict(x, latency_ms=100).stacks_run) == 3
        stop, failures, calls = threading.Event(), [], [0, 0]

        def plan_calls(i: int) -> None:
            while not stop.is_set():
                try:
                    predictor.predict(x, latency_ms=100)
                except Exception as err:  # noqa: BLE001  (any failure fails the test)
                    failures.append(f"{type(err).__name__}: {err}")
                calls[i] += 1

        callers = [threading.Thread(target=plan_calls, args=(i,)) for i in range(2)]
        for caller in callers:
            caller.start()
        switches = 0
        while min(calls) < 300 or switches < 300:
            set_mode(2 if switches % 2 else 1)
            switches += 1
        stop.set()
        for caller in callers:
            caller.join()
        assert failures == [], failures[:3]
        set_mode(2)  # MAXN_SUPER from now on
        runs = [predictor.predict(x, latency_ms=100) for _ in range(50)]
        assert predictor.power_mode == "MAXN_SUPER"
        assert all(run.stacks_run == ["general-000"] for run in runs), {tuple(run.stacks_run) for run in runs}


def test_profile_refuses_when_the_power_mode_changes_while_it_measures(jetson: Path, bundle: SyntheticBundle) -> None:
    with _load(bundle) as predictor:
        with pytest.raises(ConfigError, match="power mode changed from 25W to MAXN_SUPER while measuring"):
            profile_stacks(predictor, [1], warmup=0, repeats=1, on_progress=lambda stack, batch: _set_mode(jetson, 2))
    assert not (bundle.path / "latency.json").exists()


def test_a_machine_without_power_modes_keeps_its_tables(bundle: SyntheticBundle, monkeypatch, data) -> None:
    monkeypatch.setenv(ROOT_VARIABLE, str(DEVICES / "x86-gpu-server"))
    with _load(bundle) as predictor:
        table = profile_stacks(predictor, [4], warmup=0, repeats=2)
        assert table.power_mode is None and table.clocks is None
        save_latency_table(bundle.path, table)
        predictor.reload_latency()
        assert predictor.latency_table is not None
        assert "power_mode" not in json.loads((bundle.path / "latency.json").read_text())["tables"][0]


# ---------------------------------------------------------------------------------- DLA engines, without TensorRT


def _engine(precision: str, dla_core: int | None = None, version: str = "10.3.0.30") -> EngineInfo:
    return EngineInfo(file=f"engines/x.{precision}.{dla_core}.engine", sha256="0" * 64, precision=precision,
                      tensorrt_version=version, device_name="Orin", compute_capability="8.7",
                      min_batch=8 if dla_core is not None else 1, max_batch=8 if dla_core is not None else 64,
                      dla_core=dla_core)


def test_stacks_are_placed_in_turn_on_the_gpu_and_the_dla_cores(bundle: SyntheticBundle) -> None:
    manifest = load_manifest(bundle.path)
    accelerators = parse_accelerators("gpu, DLA0,dla1")
    assert accelerators == ("gpu", "dla0", "dla1")
    assert place_stacks(manifest, accelerators) == {"general-000": "gpu", "general-001": "dla0",
                                                    "general-002": "dla1", "specialist-3": "gpu"}
    for bad in ("", "gpu,gpu", "npu0", "dla"):
        with pytest.raises(ConfigError, match="accelerators: expected distinct names among gpu, dla0, dla1"):
            parse_accelerators(bad)
    stack = manifest.stack("general-001")
    stack.engines = [_engine("fp16"), _engine("int8", 0), _engine("fp16", 1), _engine("fp16", 0, "10.4.0")]
    assert select_engine(stack, "8.7", "10.3.0.30", accelerator="dla0").precision == "int8"  # the fp16 one: 10.4
    assert select_engine(stack, "8.7", "10.3.0.30", accelerator="dla1").dla_core == 1
    assert select_engine(stack, "8.7", "10.3.0.30").dla_core is None
    assert select_engine(stack, "8.6", "10.3.0.30", accelerator="dla1") is None


def test_dla_engines_refuse_what_the_dla_cannot_run() -> None:
    check_precision("fp16", "10.3.0.30", dla_core=0)
    check_precision("int8", "10.7.0", dla_core=1)
    with pytest.raises(ConfigError, match="the DLA runs FP16 and INT8 only"):
        check_precision("fp32", "10.3.0.30", dla_core=0)
    with pytest.raises(ConfigError, match="the DLA takes no quantize/dequantize nodes"):
        check_precision("int8", "10.3.0.30", quantized_graph=True, dla_core=0)
    with pytest.raises(ConfigError, match="TensorRT 10.8.0 has no DLA support"):
        check_precision("fp16", "10.8.0", dla_core=0)
    assert [dla_supported(v) for v in ("10.3.0.30", "10.7.0", "10.13.0", "11.4.0", "11.4.1", "12.0")] == [
        True, True, False, False, True, True]
    device = TargetDevice("Orin", "8.7", "10.3.0.30")
    assert device.engine_file("general-000", "fp16", 1) == "engines/general-000.fp16.trt10.3.0.30.sm87.dla1.engine"
    assert device.engine_file("general-000", "fp16") == "engines/general-000.fp16.trt10.3.0.30.sm87.engine"


def test_dla_engines_round_trip_through_the_manifest(bundle: SyntheticBundle) -> None:
    manifest = load_manifest(bundle.path)
    manifest.stacks[0].engines = [_engine("fp16"), _engine("fp16", 1)]
    write_manifest(bundle.path, manifest)
    data = json.loads((bundle.path / "manifest.json").read_text())
    jsonschema.validate(data, json.loads((Path(mf.__file__).parent / "manifest.schema.json").read_text()))
    engines = load_manifest(bundle.path).stacks[0].engines
    assert [(e.dla_core, e.accelerator, e.max_batch) for e in engines] == [(None, "gpu", 64), (1, "dla1", 8)]
    data["stacks"][0]["engines"][1]["precision"] = "fp32"
    (bundle.path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"stacks\[0\].engines\[1\].precision: expected fp16 or int8 for a DLA "
                                          r"engine, got 'fp32'"):
        load_manifest(bundle.path)


def test_missing_tensorrt_on_a_jetson_names_jetpacks_package(jetson: Path, bundle: SyntheticBundle,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailableError, match=r"needs TensorRT >= 10, which is not importable .*; on a "
                                                      r"Jetson TensorRT comes with JetPack: `sudo apt-get install "
                                                      r"python3-libnvinfer`, in a venv made with `python3 -m venv "
                                                      r"--system-site-packages`"):
        Predictor.load(bundle.path, "tensorrt")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(BackendUnavailableError, match=r"on a Jetson install NVIDIA's GPU build: `pip install "
                                                      r"onnxruntime-gpu --index-url https://pypi.jetson-ai-lab.io/"
                                                      r"jp6/cu126`"):
        Predictor.load(bundle.path, "onnxruntime")


def test_without_the_status_file_the_live_system_asks_nvpmodel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if Path("/var/lib/nvpmodel/status").exists():
        pytest.skip("this machine has nvpmodel's status file")
    monkeypatch.delenv(ROOT_VARIABLE, raising=False)
    fake = tmp_path / "bin" / "nvpmodel"  # prints what `nvpmodel -q` printed on an Orin Nano (fixtures README)
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n[ \"$1\" = -q ] && printf 'NV Power Mode: 25W\\n1\\n'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    mode = read_power_mode()
    assert (mode.id, mode.name, mode.source) == (1, "25W", "nvpmodel -q")
    assert read_power_mode(query_command=False) is None  # a call's path never starts a process
