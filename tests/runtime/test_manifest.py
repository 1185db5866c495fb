"""The manifest: round trip, the JSON Schema, errors that name the bad key, file checks."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from bundle_factory import SyntheticBundle

from edgens.errors import BundleError, DataNotFoundError
from edgens.runtime.bundle import types as mf
from edgens.fileio import sha256_file
from edgens.runtime.bundle import (CalibrationInfo, Manifest, check_stack_files, load_manifest, read_calibration,
                                     write_manifest)

SCHEMA = json.loads((Path(mf.__file__).parent / "manifest.schema.json").read_text())


def _raw(bundle: SyntheticBundle) -> dict[str, Any]:
    return json.loads((bundle.path / "manifest.json").read_text())


def test_written_manifest_matches_schema_and_round_trips(bundle: SyntheticBundle) -> None:
    data = _raw(bundle)
    jsonschema.validate(data, SCHEMA)
    assert data["format"] == "edgens-bundle" and data["format_version"] == 2
    loaded = load_manifest(bundle.path)
    assert loaded.to_dict() == data
    assert Manifest.from_dict(loaded.to_dict()) == loaded
    assert loaded.order == list(range(6))
    assert [s.name for s in loaded.general_stacks] == ["general-000", "general-001", "general-002"]
    assert loaded.stack("specialist-3").members == [4, 5]
    assert loaded.input.shape == (1, 28, 28)


def test_write_accepts_numpy_values_and_writes_plain_json(bundle: SyntheticBundle, tmp_path: Path) -> None:
    m = load_manifest(bundle.path)
    m.members[0].val_error = np.float32(0.25)  # type: ignore[assignment]
    m.members[0].flops = np.int64(m.members[0].flops)  # type: ignore[assignment]
    m.preprocessing.mean = np.array(m.preprocessing.mean)  # type: ignore[assignment]
    out = tmp_path / "copy"
    write_manifest(out, m)
    data = json.loads((out / "manifest.json").read_text())
    jsonschema.validate(data, SCHEMA)
    assert data["members"][0]["val_error"] == pytest.approx(0.25)
    assert not list(out.glob("*.tmp"))  # atomic write leaves no temporary file


def test_write_refuses_an_inconsistent_manifest(bundle: SyntheticBundle, tmp_path: Path) -> None:
    m = load_manifest(bundle.path)
    m.order = [0, 1, 2, 3, 4]  # member 5 missing
    with pytest.raises(BundleError, match=r"order: expected every member id exactly once"):
        write_manifest(tmp_path / "bad", m)
    assert not (tmp_path / "bad" / "manifest.json").exists()


def _set(data: dict[str, Any], path: str, value: Any) -> None:
    keys: list[Any] = [int(k) if k.isdigit() else k for k in path.replace("[", ".").replace("]", "").split(".")]
    target = data
    for key in keys[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value


_DELETE = object()

# (path, bad value, the error must contain this); every one of them is also rejected by the JSON Schema.
BAD = [
    ("stacks[2].sha256", 3, "stacks[2].sha256: expected a hex sha256 digest (64 lowercase characters), got 3"),
    ("stacks[0].members[1]", "a", "stacks[0].members[1]: expected an integer >= 0, got 'a'"),
    ("family", "binomial", "family: expected one of 'categorical', 'gaussian', 'poisson', got 'binomial'"),
    ("n_outputs", 0, "n_outputs: expected an integer >= 1, got 0"),
    ("n_outputs", True, "n_outputs: expected an integer >= 1, got True"),
    ("input.shape", [], "input.shape: expected a non-empty list of integers, got []"),
    ("input.dtype", "float16", "input.dtype: expected one of 'float32', got 'float16'"),
    ("preprocessing.std[0]", 0.0, "preprocessing.std[0]: expected a number > 0, got 0.0"),
    ("preprocessing.applied_by", "graph", "preprocessing.applied_by: expected one of 'runtime'"),
    ("members[1].flops", -5, "members[1].flops: expected an integer >= 0, got -5"),
    ("members[0].val_error", "low", "members[0].val_error: expected a finite number, got 'low'"),
    ("stacks[1].role", "backup", "stacks[1].role: expected one of 'general', 'prefix', 'specialist', got 'backup'"),
    ("stacks[1].file", "../outside.onnx", "stacks[1].file: expected a relative path inside the bundle"),
    ("stacks[1].file", "/etc/passwd", "stacks[1].file: expected a relative path inside the bundle"),
    ("stacks[0].bytes", _DELETE, "stacks[0].bytes: missing; expected an integer >= 0"),
    ("order_method", "random",
     "order_method: expected one of 'greedy', 'index', 'trained', 'trained-greedy', got 'random'"),
    ("specialists[0].val_f1", _DELETE, "specialists[0].val_f1: missing; expected an object"),
    ("metrics.test", {"error": 0.1}, "metrics.test.nll: missing; expected a finite number"),
    ("format", "something-else", "format: expected 'edgens-bundle'"),
    ("class_names", ["a", "b"], "class_names: expected null or a list of 10 strings (n_outputs)"),
    ("stacks[0].precision", "int4", "stacks[0].precision: expected one of 'fp32', 'fp16', 'int8', got 'int4'"),
    ("stacks[0].precision", _DELETE, "stacks[0].precision: missing; expected one of 'fp32', 'fp16', 'int8'"),
    ("stacks[1].val_error_change", "small", "stacks[1].val_error_change: expected a finite number or null"),
    ("stacks[2].precision_note", 3, "stacks[2].precision_note: expected a string or null, got 3"),
]


@pytest.mark.parametrize(("path", "value", "message"), BAD, ids=[f"{p}={v!r}" for p, v, _ in BAD])
def test_bad_keys_are_named(bundle: SyntheticBundle, path: str, value: Any, message: str) -> None:
    data = _raw(bundle)
    _set(data, path, value)
    (bundle.path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError) as info:
        load_manifest(bundle.path)
    assert message in str(info.value)
    assert str(info.value).startswith(str(bundle.path / "manifest.json") + ": ")
    if path != "class_names":  # a list length tied to n_outputs is beyond what the schema expresses
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(data, SCHEMA)


# Cross-references the schema cannot express; the reader catches them.
CROSS = [
    ("stacks[0].members", [0, 9], "stacks[0].members[1]: member id 9 is not in members"),
    ("stacks[0].flops", 1, "stacks[0].flops: expected"),
    ("stacks[1].name", "general-000", "stacks[1].name: 'general-000' is also the name of stacks[0]"),
    ("order", [1, 0, 2, 3, 4, 5], "stacks: the general stacks' members, in order, must be exactly `order`"),
    ("specialists[0].stack", "general-000", "specialists[0].stack: stack 'general-000' must be a specialist stack"),
    ("specialists[0].class_index", 10, "specialists[0].class_index: expected a class index below n_outputs (10)"),
    ("curves.order_val_error", [0.1], "curves.order_val_error: expected a list of 6 numbers"),
    ("preprocessing.mean", [1.0, 2.0], "preprocessing.mean: expected 1 values, one per channel"),
]


@pytest.mark.parametrize(("path", "value", "message"), CROSS, ids=[p for p, _, _ in CROSS])
def test_cross_references_are_checked(bundle: SyntheticBundle, path: str, value: Any, message: str) -> None:
    data = _raw(bundle)
    _set(data, path, value)
    with pytest.raises(BundleError, match=re.escape(message)):
        Manifest.from_dict(copy.deepcopy(data))


@pytest.mark.parametrize("version", [3, 0, "1", 1.0, True])
def test_unknown_format_version_says_which_are_supported(bundle: SyntheticBundle, version: Any) -> None:
    data = _raw(bundle)
    data["format_version"] = version
    (bundle.path / "manifest.json").write_text(json.dumps(data))
    expected = r"format_version: this edgens reads bundle format version\(s\) 1, 2, got"
    with pytest.raises(BundleError, match=expected) as info:
        load_manifest(bundle.path)
    assert ("upgrade edgens" in str(info.value)) == (version == 3)
    assert "written by edgens 0.1.0" in str(info.value)


def test_unknown_keys_are_ignored_and_top_level_ones_kept(bundle: SyntheticBundle, tmp_path: Path) -> None:
    data = _raw(bundle)
    data["future_key"] = {"anything": 1}
    data["stacks"][0]["future_key"] = 2
    m = Manifest.from_dict(data)
    assert m.extra == {"future_key": {"anything": 1}}
    # Rewriting a manifest (as adding engines on the device does) keeps what a newer writer put at the top level.
    write_manifest(tmp_path, m)
    rewritten = json.loads((tmp_path / "manifest.json").read_text())
    assert rewritten["future_key"] == {"anything": 1} and "future_key" not in rewritten["stacks"][0]
    jsonschema.validate(rewritten, SCHEMA)


def test_calibration_examples_round_trip_and_are_checked(bundle: SyntheticBundle, data) -> None:
    x, y = data
    np.savez(bundle.path / "calibration.npz", x=x, y=y)
    m = load_manifest(bundle.path)
    assert m.calibration is None and read_calibration(bundle.path, m) is None
    m.calibration = CalibrationInfo(file="calibration.npz", sha256=sha256_file(bundle.path / "calibration.npz"),
                                    examples=len(x))
    write_manifest(bundle.path, m)
    jsonschema.validate(_raw(bundle), SCHEMA)
    loaded = load_manifest(bundle.path)
    assert loaded.calibration == m.calibration
    got_x, got_y = read_calibration(bundle.path, loaded)
    np.testing.assert_array_equal(got_x, x)
    np.testing.assert_array_equal(got_y, y)
    np.savez(bundle.path / "calibration.npz", x=x[:3], y=y[:3])
    with pytest.raises(BundleError, match="calibration data: calibration.npz has sha256"):
        read_calibration(bundle.path, loaded)


def test_extra_must_not_shadow_a_field(bundle: SyntheticBundle, tmp_path: Path) -> None:
    m = load_manifest(bundle.path)
    m.extra["calibration"] = {"file": "calibration.npz"}
    with pytest.raises(BundleError, match=r"Manifest.extra holds 'calibration', which the format defines; set the "
                                          r"Manifest field instead"):
        write_manifest(tmp_path, m)


def test_missing_or_unreadable_manifest(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="does not exist or is not a directory"):
        load_manifest(tmp_path / "nope")
    with pytest.raises(DataNotFoundError, match="manifest.json does not exist"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(BundleError, match=r"\(top level\): expected an object, got \[1, 2\]"):
        load_manifest(tmp_path)


def test_file_checks_find_missing_and_corrupt_stacks(bundle: SyntheticBundle) -> None:
    m = load_manifest(bundle.path)
    assert check_stack_files(bundle.path, m) == {}
    (bundle.path / "stacks" / "general-001.onnx").unlink()
    path = bundle.path / "stacks" / "general-002.onnx"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, different content: only the checksum can tell
    path.write_bytes(bytes(data))
    problems = check_stack_files(bundle.path, m)
    assert set(problems) == {"general-001", "general-002"}
    assert "missing" in problems["general-001"]
    assert "sha256" in problems["general-002"]


def test_schema_file_is_a_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert set(SCHEMA["properties"]) == set(mf.KNOWN_KEYS)
    assert set(SCHEMA["required"]) == set(mf.KNOWN_KEYS) - mf.OPTIONAL_KEYS
    fields = set(Manifest.__dataclass_fields__) - {"extra"}
    assert fields | {"format", "format_version"} == set(mf.KNOWN_KEYS)


def _with_prefix(bundle: SyntheticBundle, members: list[int]) -> dict[str, Any]:
    """The bundle's manifest with a prefix stack (reusing general-000's file) inserted before the specialists."""
    data = _raw(bundle)
    prefix = dict(data["stacks"][0], name="prefix", role="prefix", members=members,
                  flops=data["stacks"][0]["flops"] // 2 * len(members))
    data["stacks"].insert(3, prefix)
    return data


def test_a_prefix_stack_must_hold_the_first_general_stacks(bundle: SyntheticBundle) -> None:
    # The template: general stacks of members [0, 1], [2, 3], [4, 5]; ends at 2, 4 and 6 members.
    assert [len(s.members) for s in Manifest.from_dict(_with_prefix(bundle, [0, 1, 2, 3])).prefix_stacks] == [4]
    for members in ([0, 1, 2], [2, 3, 0, 1], [0, 1, 4, 5]):
        with pytest.raises(BundleError, match=r"stacks\[3\]\.members: a prefix stack must hold exactly the members "
                                              r"of the first general stacks"):
            Manifest.from_dict(_with_prefix(bundle, members))
    data = _with_prefix(bundle, [0, 1, 2, 3])
    data["stacks"].insert(0, data["stacks"].pop(3))
    with pytest.raises(BundleError, match=r"stacks\[1\]\.role: general stacks must come before prefix"):
        Manifest.from_dict(data)
    data = _with_prefix(bundle, [0, 1, 2, 3])
    data["stacks"].insert(3, dict(data["stacks"][3], name="prefix-all", members=list(range(6)),
                                  flops=data["stacks"][3]["flops"] // 4 * 6))
    with pytest.raises(BundleError, match=r"prefix stacks must be listed smallest first"):
        Manifest.from_dict(data)
    jsonschema.validate(_with_prefix(bundle, [0, 1, 2, 3]), SCHEMA)


def test_format_version_1_loads_as_fp32_stacks_without_prefixes(bundle: SyntheticBundle) -> None:
    data = _raw(bundle)
    data["format_version"] = 1
    for stack in data["stacks"]:
        for key in ("precision", "val_error_change", "precision_note"):
            del stack[key]
    jsonschema.validate(data, SCHEMA)
    (bundle.path / "manifest.json").write_text(json.dumps(data))
    manifest = load_manifest(bundle.path)
    assert {stack.precision for stack in manifest.stacks} == {"fp32"} and not manifest.prefix_stacks
    assert manifest.to_dict()["format_version"] == 2  # rewriting upgrades it
    data["stacks"][0]["role"] = "prefix"  # version 1 had no prefix stacks
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, SCHEMA)
