"""Parsers of the manifest's parts: each takes the JSON value and its path, and raises a
:class:`~edgens.errors.BundleError` naming that path (through :class:`~edgens.runtime.bundle.json_reader.JsonReader`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgens.runtime.bundle.json_reader import JsonReader
from edgens.runtime.bundle.types import (CHECKSUM_SCHEMES, CURVE_KEYS, F1_KEYS, FORMAT_VERSION, PRECISIONS, ROLES,
                                         CalibrationInfo, ChecksumInfo, Curves, EngineInfo, InputSpec, MemberInfo,
                                         Metrics, OutlierInfo,
                                         Preprocessing, SelfTestInfo, SpecialistInfo, SplitMetrics, StackInfo,
                                         TrainingInfo)


def parse_input(r: JsonReader, obj: dict[str, Any]) -> InputSpec:
    shape = r.ints(obj, "shape", "input", minimum=1, non_empty=True)
    raw_range = None
    if obj.get("raw_range") is not None:  # optional: bundles written before it have none
        values = r.floats(obj, "raw_range", "input")
        if len(values) != 2 or values[0] > values[1]:
            raise r.fail("input.raw_range", "[smallest, largest] raw value, smallest first", values)
        raw_range = (values[0], values[1])
    return InputSpec(shape=tuple(shape), name=r.str_(obj, "name", "input"),
                     dtype=r.str_(obj, "dtype", "input", ("float32",)), raw_dtype=_dtype_name(r, obj, "input"),
                     raw_range=raw_range)


def _dtype_name(r: JsonReader, obj: dict[str, Any], path: str) -> str:
    value = r.str_(obj, "raw_dtype", path)
    try:
        np.dtype(value)
    except TypeError:
        raise r.fail(f"{path}.raw_dtype", "a numpy dtype name such as 'uint8' or 'float32'", value) from None
    return value


def parse_preprocessing(r: JsonReader, obj: dict[str, Any]) -> Preprocessing:
    std = r.floats(obj, "std", "preprocessing")
    for i, value in enumerate(std):
        if value <= 0:
            raise r.fail(f"preprocessing.std[{i}]", "a number > 0", value)
    return Preprocessing(applied_by=r.str_(obj, "applied_by", "preprocessing", ("runtime",)),
                         mean=r.floats(obj, "mean", "preprocessing"), std=std)


def parse_training(r: JsonReader, obj: dict[str, Any]) -> TrainingInfo:
    config = r.get(obj, "config", "training", "an object")
    return TrainingInfo(preset=r.str_(obj, "preset", "training"), lam=r.float_(obj, "lam", "training"),
                        dataset=r.str_(obj, "dataset", "training"), config=r.obj(config, "training.config"))


def parse_member(r: JsonReader, obj: dict[str, Any], path: str) -> MemberInfo:
    return MemberInfo(id=r.int_(obj, "id", path, minimum=0), params=r.int_(obj, "params", path, minimum=0),
                      flops=r.int_(obj, "flops", path, minimum=0),
                      val_error=r.float_(obj, "val_error", path), val_nll=r.float_(obj, "val_nll", path))


def parse_engine(r: JsonReader, obj: dict[str, Any], path: str) -> EngineInfo:
    engine = EngineInfo(file=r.relative_file(obj, "file", path), sha256=r.sha256(obj, "sha256", path),
                        precision=r.str_(obj, "precision", path, PRECISIONS),
                        tensorrt_version=r.str_(obj, "tensorrt_version", path),
                        device_name=r.str_(obj, "device_name", path),
                        compute_capability=r.str_(obj, "compute_capability", path),
                        min_batch=r.int_(obj, "min_batch", path, minimum=1),
                        max_batch=r.int_(obj, "max_batch", path, minimum=1),
                        val_error_change=r.optional_float(obj, "val_error_change", path))
    if engine.max_batch < engine.min_batch:
        raise r.fail(f"{path}.max_batch", f"an integer >= min_batch ({engine.min_batch})", engine.max_batch)
    if obj.get("dla_core") is not None:  # optional: bundles written before DLA engines have none
        engine.dla_core = r.int_value(obj["dla_core"], f"{path}.dla_core", minimum=0)
        if engine.precision == "fp32":
            raise r.fail(f"{path}.precision", "fp16 or int8 for a DLA engine", engine.precision)
    return engine


def parse_stack(r: JsonReader, obj: dict[str, Any], path: str, version: int = FORMAT_VERSION) -> StackInfo:
    engines = r.list_(obj, "engines", path, "a list of engine objects")
    precision = r.str_(obj, "precision", path, PRECISIONS) if version >= 2 else "fp32"
    return StackInfo(precision=precision,
                     val_error_change=r.optional_float(obj, "val_error_change", path) if version >= 2 else None,
                     precision_note=r.optional_str(obj, "precision_note", path) if version >= 2 else None,
                     name=r.str_(obj, "name", path), role=r.str_(obj, "role", path, ROLES),
                     file=r.relative_file(obj, "file", path), sha256=r.sha256(obj, "sha256", path),
                     bytes=r.int_(obj, "bytes", path, minimum=0),
                     members=r.ints(obj, "members", path, minimum=0, non_empty=True),
                     flops=r.int_(obj, "flops", path, minimum=0), input_name=r.str_(obj, "input_name", path),
                     output_name=r.str_(obj, "output_name", path),
                     engines=[parse_engine(r, r.obj(item, f"{path}.engines[{i}]"), f"{path}.engines[{i}]")
                              for i, item in enumerate(engines)],
                     checksum=parse_checksum(r, obj.get("checksum"), f"{path}.checksum"))


def parse_checksum(r: JsonReader, value: Any, path: str) -> ChecksumInfo | None:
    if value is None:  # optional: unchecked graphs and bundles written before checksums have none
        return None
    obj = r.obj(value, path)
    scheme = r.str_(obj, "scheme", path, CHECKSUM_SCHEMES)
    layers = r.list_(obj, "layers", path, "a list of layer names")
    count_ok = len(layers) == 2 if scheme == "mlp-abft" else len(layers) >= 2
    if not count_ok or not all(isinstance(name, str) for name in layers):
        raise r.fail(f"{path}.layers", "the names of the hidden layers, then the output layer's" +
                     (" (one hidden layer)" if scheme == "mlp-abft" else ""), layers)
    info = ChecksumInfo(scheme=scheme, output=r.str_(obj, "output", path),
                        layers=list(layers),
                        hidden_terms=r.int_(obj, "hidden_terms", path, minimum=1),
                        hidden_units=r.int_(obj, "hidden_units", path, minimum=1),
                        hidden_weight_abs=r.float_(obj, "hidden_weight_abs", path),
                        hidden_bias_abs=r.float_(obj, "hidden_bias_abs", path),
                        output_terms=r.int_(obj, "output_terms", path, minimum=1),
                        unit_roundoff=r.float_(obj, "unit_roundoff", path))
    for key in ("hidden_weight_abs", "hidden_bias_abs"):
        if getattr(info, key) < 0:
            raise r.fail(f"{path}.{key}", "a number >= 0", getattr(info, key))
    if not 0 < info.unit_roundoff < 1:
        raise r.fail(f"{path}.unit_roundoff", "a number in (0, 1), e.g. 2**-24 for fp32", info.unit_roundoff)
    return info


def parse_specialist(r: JsonReader, obj: dict[str, Any], path: str) -> SpecialistInfo:
    f1 = r.obj(r.get(obj, "val_f1", path, "an object"), f"{path}.val_f1")
    return SpecialistInfo(task=r.str_(obj, "task", path), class_index=r.int_(obj, "class_index", path, minimum=0),
                          members=r.ints(obj, "members", path, minimum=0, non_empty=True),
                          stack=r.str_(obj, "stack", path), selection=r.str_(obj, "selection", path),
                          val_f1={key: r.float_(f1, key, f"{path}.val_f1") for key in F1_KEYS})


def parse_calibration(r: JsonReader, value: Any) -> CalibrationInfo | None:
    if value is None:
        return None
    obj = r.obj(value, "calibration")
    return CalibrationInfo(file=r.relative_file(obj, "file", "calibration"),
                           sha256=r.sha256(obj, "sha256", "calibration"),
                           examples=r.int_(obj, "examples", "calibration", minimum=1))


def parse_outliers(r: JsonReader, value: Any) -> OutlierInfo | None:
    if value is None:
        return None
    obj = r.obj(value, "outliers")
    thresholds = r.obj(r.get(obj, "thresholds", "outliers", "an object"), "outliers.thresholds")
    info = OutlierInfo(thresholds={name: r.float_value(t, f"outliers.thresholds.{name}")
                                   for name, t in thresholds.items()},
                       margin=r.float_(obj, "margin", "outliers"),
                       min_groups=r.int_(obj, "min_groups", "outliers", minimum=2),
                       statistic=r.str_(obj, "statistic", "outliers", ("group-loo-l2",)),
                       examples=r.int_(obj, "examples", "outliers", minimum=0))
    if info.margin <= 0 or any(t < 0 for t in info.thresholds.values()):
        raise r.fail("outliers", "a positive margin and thresholds >= 0", value)
    return info


def parse_self_test(r: JsonReader, value: Any) -> SelfTestInfo | None:
    if value is None:
        return None
    obj = r.obj(value, "self_test")
    return SelfTestInfo(file=r.relative_file(obj, "file", "self_test"), sha256=r.sha256(obj, "sha256", "self_test"),
                        examples=r.int_(obj, "examples", "self_test", minimum=1))


def parse_curves(r: JsonReader, obj: dict[str, Any]) -> Curves:
    return Curves(**{key: r.floats(obj, key, "curves") for key in CURVE_KEYS})


def parse_metrics(r: JsonReader, obj: dict[str, Any]) -> Metrics:
    splits = {}
    for split in ("val", "test"):
        part = r.obj(r.get(obj, split, "metrics", "an object"), f"metrics.{split}")
        splits[split] = SplitMetrics(error=r.float_(part, "error", f"metrics.{split}"),
                                     nll=r.float_(part, "nll", f"metrics.{split}"))
    return Metrics(**splits)
