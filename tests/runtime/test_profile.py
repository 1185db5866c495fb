"""Latency tables: measured per stack and batch size, stored atomically per backend, providers and device."""

from __future__ import annotations

import json
import logging

import pytest
from bundle_factory import SyntheticBundle

from edgens.errors import BundleError, ConfigError
from edgens.runtime import LatencyTable, Predictor, load_latency_tables, profile_stacks, save_latency_table
from edgens.runtime.latency import StackLatency


def test_profile_measures_every_stack_and_batch_size(predictor: Predictor, bundle: SyntheticBundle, data) -> None:
    seen = []
    table = profile_stacks(predictor, [4, 1], warmup=1, repeats=5, on_progress=lambda s, b: seen.append((s, b)))
    names = ["general-000", "general-001", "general-002", "specialist-3"]
    assert sorted(table.stacks) == names
    assert len(seen) == 8 and set(seen) == {(n, b) for n in names for b in (1, 4)}
    for sizes in table.stacks.values():
        assert sorted(sizes) == [1, 4]
        for latency in sizes.values():
            assert 0 < latency.median_ms <= latency.p90_ms < 1000
    assert (table.backend, table.providers) == ("onnxruntime", ["CPUExecutionProvider"])
    assert (table.warmup, table.repeats) == (1, 5)

    path = save_latency_table(bundle.path, table)
    assert path == bundle.path / "latency.json" and not list(bundle.path.glob("*.tmp"))
    written = json.loads(path.read_text())
    assert written["format_version"] == 1 and len(written["tables"]) == 1
    assert set(written["tables"][0]["stacks"]["general-000"]) == {"1", "4"}  # batch sizes as JSON keys
    predictor.reload_latency()
    loaded = predictor.latency_table
    assert loaded is not None and loaded.matches(predictor.backend.describe())
    for name, sizes in table.stacks.items():
        for batch, latency in sizes.items():
            assert loaded.stacks[name][batch].median_ms == pytest.approx(latency.median_ms, abs=1e-6)
    prediction = predictor.predict(data[0][:4], latency_ms=1_000)
    assert prediction.stacks_run == ["general-000", "general-001", "general-002"]


def test_profiling_again_replaces_only_the_matching_table(bundle: SyntheticBundle) -> None:
    ours = LatencyTable(backend="onnxruntime", providers=["CPUExecutionProvider"], device="here",
                        stacks={"general-000": {1: StackLatency(1.0, 2.0)}})
    other = LatencyTable(backend="onnxruntime", providers=["CUDAExecutionProvider"], device="here",
                         stacks={"general-000": {1: StackLatency(0.1, 0.2)}})
    save_latency_table(bundle.path, ours)
    save_latency_table(bundle.path, other)
    ours.stacks["general-000"][1] = StackLatency(3.0, 4.0)
    save_latency_table(bundle.path, ours)
    tables = load_latency_tables(bundle.path)
    assert [(t.providers, t.stacks["general-000"][1].median_ms) for t in tables] == [
        (["CUDAExecutionProvider"], 0.1), (["CPUExecutionProvider"], 3.0)]


def test_estimates_interpolate_between_measured_batch_sizes() -> None:
    table = LatencyTable(backend="b", providers=[], device="d",
                         stacks={"s": {1: StackLatency(1.0, 1.0), 8: StackLatency(2.0, 2.0),
                                       64: StackLatency(10.0, 10.0)}})
    assert table.estimate("s", 1) == 1.0
    assert table.estimate("s", 4) == pytest.approx(1.0 + 3 / 7)
    assert table.estimate("s", 36) == pytest.approx(6.0)
    assert table.estimate("s", 128) == pytest.approx(20.0)  # beyond the largest: per-example cost
    assert table.estimate("unknown", 1) is None
    assert LatencyTable.from_dict(table.to_dict()).stacks == table.stacks


def test_a_malformed_latency_file_is_ignored_with_a_warning(bundle: SyntheticBundle, data,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    (bundle.path / "latency.json").write_text(json.dumps({"format_version": 1, "tables": [{"backend": "x"}]}))
    with pytest.raises(BundleError, match=r"latency.json: tables\[0\]: malformed \(KeyError"):
        load_latency_tables(bundle.path)
    with caplog.at_level(logging.WARNING, logger="edgens.runtime"):
        predictor = Predictor.load(bundle.path, "onnxruntime")
    assert any("latency table ignored" in r.getMessage() for r in caplog.records)
    assert predictor.predict(data[0]).stacks_run  # inference does not need the table
    with pytest.raises(ConfigError, match="latency_ms budgets need this device's latency table: .*malformed"):
        predictor.predict(data[0], latency_ms=5)
    (bundle.path / "latency.json").write_text(json.dumps({"format_version": 2, "tables": []}))
    with pytest.raises(BundleError, match="reads latency tables of version 1, got 2"):
        load_latency_tables(bundle.path)
    predictor.close()


def test_bad_profile_settings(predictor: Predictor) -> None:
    with pytest.raises(ConfigError, match=r"profile batch size: expected an integer >= 1, got 0"):
        profile_stacks(predictor, [0])
    with pytest.raises(ConfigError, match=r"profile batch size: expected an integer >= 1, got nan"):
        profile_stacks(predictor, [8, float("nan")])
    with pytest.raises(ConfigError, match=r"profile repeats: expected an integer >= 1, got 0"):
        profile_stacks(predictor, [8], repeats=0)


def test_profile_times_the_general_stacks_in_order_and_on_lanes(bundle: SyntheticBundle) -> None:
    from edgens.runtime.faults import Fault, inject_faults

    with Predictor.load(bundle.path, "onnxruntime", lanes=2) as predictor:
        slow = {name: Fault("sleep", sleep_ms=5.0) for name in ("general-000", "general-001", "general-002")}
        with inject_faults(predictor, slow):
            table = profile_stacks(predictor, [2], warmup=0, repeats=3)
    chain = table.lanes[2]
    assert chain.lanes == 2
    # In order: three 5 ms stacks one after another. On 2 lanes: two rounds (sleeping overlaps on any machine).
    assert 15.0 <= chain.in_order_ms < 45.0 and 10.0 <= chain.lanes_ms < chain.in_order_ms
    with Predictor.load(bundle.path, "onnxruntime", lanes=1) as predictor:
        assert not profile_stacks(predictor, [2], warmup=0, repeats=1).lanes  # nothing to compare with one lane
