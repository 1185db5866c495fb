"""The bundle manifest (format version 2; version 1 bundles still load): dataclasses, reading with clear errors,
atomic writing, file checks.

The format is described in ``docs/bundle-format.md``; this module is its reference reader and writer, and the
exporter builds a :class:`Manifest` and calls :func:`write_manifest`. Reading checks every key against the format
(type, range, cross-references such as "every member of a stack exists") and names the bad key's path in the error,
e.g. ``manifest.json: stacks[2].sha256: expected a hex sha256 digest (64 characters), got 3``.
``manifest.schema.json`` next to this module describes the same format as a JSON Schema for other tools; the
runtime does not need it (nor jsonschema).

Only numpy and the standard library are used here (the runtime must run without torch).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePath, PurePosixPath
from typing import Any

import numpy as np

from edgens.ensemble import FAMILIES
from edgens.arrays import UNREADABLE, load_array
from edgens.errors import BundleError, DataNotFoundError, unknown_choice
from edgens.fileio import atomic_write_json, sha256_file

FORMAT = "edgens-bundle"
FORMAT_VERSION = 2
# Version 2 added prefix stacks and each stack's precision; a version-1 manifest reads as fp32 stacks without
# prefix stacks, which is what it describes.
SUPPORTED_VERSIONS = (1, 2)
MANIFEST_FILE = "manifest.json"
ROLES = ("general", "prefix", "specialist")
ORDER_METHODS = ("greedy", "index", "trained", "trained-greedy")
PRECISIONS = ("fp32", "fp16", "int8")
CURVE_KEYS = ("order_val_error", "index_val_error", "random_val_error")
F1_KEYS = ("greedy", "best_of_random", "random_mean", "best_single")

KNOWN_KEYS = frozenset({
    "format", "format_version", "edgens_version", "created", "family", "n_outputs", "class_names", "input",
    "preprocessing", "training", "members", "order", "order_method", "stacks", "specialists", "curves", "metrics",
    "calibration", "outliers", "self_test"})
OPTIONAL_KEYS = frozenset({"calibration", "outliers", "self_test"})  # may be absent (or null)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MISSING = object()


def utc_now() -> str:
    """The current UTC time in ISO-8601 with a ``Z`` suffix, as ``created`` holds it."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass(kw_only=True)
class InputSpec:
    """What a stack graph takes: ``(batch, *shape)`` float32, already normalised.

    Attributes:
        shape: one example, channels first, e.g. ``(1, 28, 28)``; the batch axis is not included.
        name: graph input name (stacks may override it).
        dtype: dtype of the graph input; format 1 knows only ``float32``.
        raw_dtype: dtype the data set stores (``uint8`` for images), the units of ``Preprocessing``.
    """

    shape: tuple[int, ...]
    name: str = "x"
    dtype: str = "float32"
    raw_dtype: str = "uint8"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "raw_dtype": self.raw_dtype}


@dataclass(kw_only=True)
class Preprocessing:
    """Per-channel normalisation ``(raw - mean[c]) / std[c]``, in raw units, applied by the runtime.

    ``c`` indexes axis 0 of one example (the channel of an image, the feature of a flat vector), so ``mean`` and
    ``std`` hold ``input.shape[0]`` values each.
    """

    mean: list[float]
    std: list[float]
    applied_by: str = "runtime"

    def to_dict(self) -> dict[str, Any]:
        return {"applied_by": self.applied_by, "mean": list(self.mean), "std": list(self.std)}


@dataclass(kw_only=True)
class TrainingInfo:
    """How the ensemble was trained (informational)."""

    preset: str
    lam: float
    dataset: str
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, "lam": self.lam, "dataset": self.dataset, "config": self.config}


@dataclass(kw_only=True)
class MemberInfo:
    """One member of the ensemble.

    Attributes:
        id: member index as in training.
        params: number of parameters.
        flops: per example, 2 x multiply-adds of convolutions and matrix products.
        val_error: validation error of the member alone.
        val_nll: validation NLL of the member alone.
    """

    id: int
    params: int
    flops: int
    val_error: float
    val_nll: float

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "params": self.params, "flops": self.flops, "val_error": self.val_error,
                "val_nll": self.val_nll}


@dataclass(kw_only=True)
class EngineInfo:
    """A TensorRT engine built from one stack for one GPU and TensorRT version.

    Attributes:
        file: path relative to the bundle, e.g. ``engines/general-000.fp16.engine``.
        sha256: hex digest of the file.
        precision: ``fp32``, ``fp16`` or ``int8``.
        tensorrt_version: version of TensorRT that built it (engines only load in the same version).
        device_name: GPU it was built on, e.g. ``Orin``.
        compute_capability: e.g. ``"8.7"``.
        min_batch: smallest batch size of the optimisation profile.
        max_batch: largest batch size of the optimisation profile.
        val_error_change: validation error minus the fp32 ONNX stack's, or None if not measured.
        dla_core: the DLA core it was built for (layers the DLA cannot run fall back to the GPU), None for a GPU
            engine. DLA engines are FP16 or INT8 and have one batch size (``min_batch == max_batch``).
    """

    file: str
    sha256: str
    precision: str
    tensorrt_version: str
    device_name: str
    compute_capability: str
    min_batch: int
    max_batch: int
    val_error_change: float | None = None
    dla_core: int | None = None

    @property
    def accelerator(self) -> str:
        """Where it runs: ``gpu`` or ``dla0``, ``dla1``."""
        return "gpu" if self.dla_core is None else f"dla{self.dla_core}"

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, "precision": self.precision,
                "tensorrt_version": self.tensorrt_version, "device_name": self.device_name,
                "compute_capability": self.compute_capability, "min_batch": self.min_batch,
                "max_batch": self.max_batch, "val_error_change": self.val_error_change, "dla_core": self.dla_core}


@dataclass(kw_only=True)
class StackInfo:
    """One ONNX graph computing several members at once: ``x (B, *shape) -> eta (len(members), B, n_outputs)``.

    Attributes:
        name: unique, e.g. ``general-000`` or ``specialist-3``.
        role: ``general`` (the general stacks cut ``order`` into consecutive chunks), ``prefix`` (one graph holding
            the members of the first general stacks, so that a budget covering them runs one call) or
            ``specialist``.
        file: path of the ONNX file relative to the bundle, e.g. ``stacks/general-000.onnx``.
        sha256: hex digest of the file.
        bytes: size of the file.
        members: member ids in the order of the graph's output rows.
        flops: per example, the sum of the members' ``flops``.
        input_name: graph input name.
        output_name: graph output name.
        engines: TensorRT engines built from this stack (may be empty).
        precision: what the ONNX graph computes in: ``fp32``, ``fp16`` (float32 input and output) or ``int8``
            (static QDQ quantization).
        val_error_change: the stack's own validation error (its members' mean) minus the fp32 graph's, measured
            at export on the calibration examples; None for fp32 graphs.
        precision_note: why the stack is not in the precision the export asked for (refused by the accuracy
            guard, or the precision cannot run here), else None.
    """

    name: str
    role: str
    file: str
    sha256: str
    bytes: int
    members: list[int]
    flops: int
    input_name: str = "x"
    output_name: str = "eta"
    engines: list[EngineInfo] = field(default_factory=list)
    precision: str = "fp32"
    val_error_change: float | None = None
    precision_note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "file": self.file, "sha256": self.sha256, "bytes": self.bytes,
                "members": list(self.members), "flops": self.flops, "input_name": self.input_name,
                "output_name": self.output_name, "engines": [engine.to_dict() for engine in self.engines],
                "precision": self.precision, "val_error_change": self.val_error_change,
                "precision_note": self.precision_note}


@dataclass(kw_only=True)
class SpecialistInfo:
    """A sub-ensemble chosen for the one-vs-rest problem "is it class ``class_index``?".

    Attributes:
        task: the task's name, e.g. ``class-3`` (the runtime also accepts the class index and the class name).
        class_index: the class of the one-vs-rest problem.
        members: the selected member ids.
        stack: name of the specialist stack holding exactly these members.
        selection: how the members were chosen (``greedy``).
        val_f1: validation F1 of the class: ``greedy``, ``best_of_random``, ``random_mean``, ``best_single``.
    """

    task: str
    class_index: int
    members: list[int]
    stack: str
    selection: str = "greedy"
    val_f1: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "class_index": self.class_index, "members": list(self.members),
                "stack": self.stack, "selection": self.selection, "val_f1": dict(self.val_f1)}


@dataclass(kw_only=True)
class Curves:
    """Validation error over k = 1..M members: first k of ``order``, first k by id, mean over random k-subsets."""

    order_val_error: list[float]
    index_val_error: list[float]
    random_val_error: list[float]

    def to_dict(self) -> dict[str, Any]:
        return {"order_val_error": list(self.order_val_error), "index_val_error": list(self.index_val_error),
                "random_val_error": list(self.random_val_error)}


@dataclass(kw_only=True)
class SplitMetrics:
    """Error and NLL of the full ensemble on one split (computed in torch at export)."""

    error: float
    nll: float

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.error, "nll": self.nll}


@dataclass(kw_only=True)
class Metrics:
    """Full-ensemble metrics on the validation and test splits."""

    val: SplitMetrics
    test: SplitMetrics

    def to_dict(self) -> dict[str, Any]:
        return {"val": self.val.to_dict(), "test": self.test.to_dict()}


@dataclass(kw_only=True)
class CalibrationInfo:
    """Raw validation examples shipped in the bundle (optional), for TensorRT INT8 calibration and checks on the
    device, which may not have the data set.

    Attributes:
        file: path relative to the bundle of an ``.npz`` with arrays ``x`` (raw, as the data set stores it) and ``y``.
        sha256: hex digest of the file.
        examples: number of examples in it.
    """

    file: str
    sha256: str
    examples: int

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, "examples": self.examples}


@dataclass(kw_only=True)
class OutlierInfo:
    """Silent-fault detection's thresholds (optional), fitted at export on validation outputs
    (:mod:`edgens.runtime.outliers` defines the statistic).

    Attributes:
        thresholds: per general stack (its members form one group), the largest deviation of the group from the
            other groups seen on validation data.
        margin: a group is an outlier in a call when its deviation exceeds ``margin`` times its threshold.
        min_groups: calls with fewer answered groups are not checked (nothing can outvote one of two).
        statistic: ``group-loo-l2``.
        examples: validation examples the thresholds were fitted on.
    """

    thresholds: dict[str, float]
    margin: float
    min_groups: int = 3
    statistic: str = "group-loo-l2"
    examples: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"statistic": self.statistic, "margin": self.margin, "min_groups": self.min_groups,
                "examples": self.examples, "thresholds": dict(self.thresholds)}


@dataclass(kw_only=True)
class SelfTestInfo:
    """Expected outputs of every stack on stored inputs (optional), for :meth:`Predictor.self_test`.

    Attributes:
        file: path relative to the bundle of an ``.npz`` with ``x`` (raw inputs) and, per stack NAME, ``NAME`` (its
            outputs on the first inputs, ``(members, n, K)`` float32), ``NAME.sum`` and ``NAME.square`` (each
            member's sum and sum of squares of its outputs over all inputs, ``(members, K)`` float64), computed at
            export by onnxruntime on CPU.
        sha256: hex digest of the file.
        examples: number of inputs.
    """

    file: str
    sha256: str
    examples: int

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, "examples": self.examples}


@dataclass(kw_only=True)
class Manifest:
    """Everything ``manifest.json`` says about a bundle (format version 2).

    Build one with keyword arguments and write it with :func:`write_manifest`, which checks it first. ``format``
    and ``format_version`` are not fields: this class always writes the current format.

    Attributes:
        family: ``categorical``, ``gaussian`` or ``poisson``.
        n_outputs: K, the classes for categorical, 1 otherwise.
        input: the stack graphs' input.
        preprocessing: normalisation the runtime applies to raw input.
        members: one entry per member.
        order: the anytime order, every member id once.
        stacks: general stacks first (in order), then prefix stacks (smallest first), then specialist stacks.
        edgens_version: version of edgens that wrote the bundle.
        training: how the ensemble was trained.
        curves: validation curves over the number of members.
        metrics: full-ensemble validation and test metrics.
        class_names: K names (categorical) or None.
        order_method: ``greedy``, ``index``, ``trained`` (index order of a run trained for its prefixes) or
            ``trained-greedy`` (those prefixes kept, greedy order inside each).
        specialists: specialist sub-ensembles (may be empty).
        calibration: raw validation examples in the bundle, or None.
        outliers: thresholds of silent-fault detection, or None (bundles written before it; then no detection).
        self_test: stored expected outputs for the self-test, or None.
        created: ISO-8601 UTC time of export (default: now).
        extra: top-level keys this version does not know, kept as they are so that rewriting a manifest (e.g.
            adding engines on the device) does not drop what a newer writer put there.
    """

    family: str
    n_outputs: int
    input: InputSpec
    preprocessing: Preprocessing
    members: list[MemberInfo]
    order: list[int]
    stacks: list[StackInfo]
    edgens_version: str
    training: TrainingInfo
    curves: Curves
    metrics: Metrics
    class_names: list[str] | None = None
    order_method: str = "greedy"
    specialists: list[SpecialistInfo] = field(default_factory=list)
    calibration: CalibrationInfo | None = None
    outliers: OutlierInfo | None = None
    self_test: SelfTestInfo | None = None
    created: str = field(default_factory=utc_now)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def general_stacks(self) -> list[StackInfo]:
        """The general stacks, in anytime order."""
        return [stack for stack in self.stacks if stack.role == "general"]

    @property
    def prefix_stacks(self) -> list[StackInfo]:
        """The prefix stacks, smallest first: each holds the members of the first few general stacks."""
        return [stack for stack in self.stacks if stack.role == "prefix"]

    def stack(self, name: str) -> StackInfo:
        """The stack called ``name``.

        Raises:
            ConfigError: no stack has that name (the message lists them).
        """
        for stack in self.stacks:
            if stack.name == name:
                return stack
        raise unknown_choice("stack", name, [stack.name for stack in self.stacks])

    def member(self, member_id: int) -> MemberInfo:
        """The member with id ``member_id`` (KeyError if none)."""
        for member in self.members:
            if member.id == member_id:
                return member
        raise KeyError(f"member {member_id} is not in the manifest")

    def to_dict(self) -> dict[str, Any]:
        """The JSON object ``manifest.json`` holds (numpy scalars and arrays become plain Python values).

        Raises:
            BundleError: ``extra`` holds a key that is a field of this class.
        """
        clash = sorted(set(self.extra) & KNOWN_KEYS)
        if clash:
            raise BundleError(f"Manifest.extra holds {', '.join(map(repr, clash))}, which the format defines; set "
                              f"the Manifest field instead (e.g. Manifest.calibration = CalibrationInfo(...))")
        optional = {key: getattr(self, key).to_dict() for key in sorted(OPTIONAL_KEYS)
                    if getattr(self, key) is not None}
        return _plain({
            **self.extra,
            "format": FORMAT, "format_version": FORMAT_VERSION, "edgens_version": self.edgens_version,
            "created": self.created, "family": self.family, "n_outputs": self.n_outputs,
            "class_names": None if self.class_names is None else list(self.class_names),
            "input": self.input.to_dict(), "preprocessing": self.preprocessing.to_dict(),
            "training": self.training.to_dict(), "members": [member.to_dict() for member in self.members],
            "order": list(self.order), "order_method": self.order_method,
            "stacks": [stack.to_dict() for stack in self.stacks],
            "specialists": [specialist.to_dict() for specialist in self.specialists],
            "curves": self.curves.to_dict(), "metrics": self.metrics.to_dict(), **optional,
        })

    @classmethod
    def from_dict(cls, data: Any, source: str = MANIFEST_FILE) -> Manifest:
        """Parse and check a manifest's JSON object.

        Args:
            data: the parsed JSON.
            source: how errors name the manifest (the file's path when read from disk).

        Raises:
            BundleError: a key is missing, has the wrong type or range, refers to something that does not exist,
                or the format version is not one this reader knows. The message names the key's path.
        """
        return _parse_manifest(_Reader(source), data)


def load_manifest(bundle_dir: str | Path) -> Manifest:
    """Read and check ``BUNDLE/manifest.json``.

    Raises:
        DataNotFoundError: the bundle directory or its manifest does not exist.
        BundleError: the manifest is not valid JSON or breaks the format (the message names the key).
    """
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_FILE
    if not bundle_dir.is_dir():
        raise DataNotFoundError(f"bundle {bundle_dir} does not exist or is not a directory; expected a directory "
                                f"written by `edgens export` holding {MANIFEST_FILE}")
    if not path.is_file():
        raise DataNotFoundError(f"{path} does not exist; a bundle directory holds {MANIFEST_FILE} (written by "
                                f"`edgens export`)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise BundleError(f"{path}: cannot read it ({err})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise BundleError(f"{path}: not valid JSON ({err})") from None
    return Manifest.from_dict(data, source=str(path))


def write_manifest(bundle_dir: str | Path, manifest: Manifest) -> Path:
    """Check ``manifest`` and write it to ``BUNDLE/manifest.json`` atomically.

    The manifest goes through the same checks as reading, so a bundle that writes is a bundle that loads.

    Returns:
        The path written.

    Raises:
        BundleError: the manifest breaks the format (the message names the key).
    """
    data = manifest.to_dict()
    Manifest.from_dict(data, source=f"manifest to write to {bundle_dir}")
    return atomic_write_json(Path(bundle_dir) / MANIFEST_FILE, data)


def check_file(bundle_dir: str | Path, relative: str, sha256: str, size: int | None = None) -> str | None:
    """Check that a bundle file exists and matches its size and sha256.

    Returns:
        None if it does, else a short description of the problem (for a warning or an error).
    """
    path = Path(bundle_dir) / relative
    if not path.is_file():
        return f"{relative} is missing"
    if size is not None and path.stat().st_size != size:
        # Cheaper than hashing, and a clearer message for a truncated copy.
        return f"{relative} has {path.stat().st_size} bytes, the manifest says {size}"
    actual = sha256_file(path)
    if actual != sha256:
        return f"{relative} has sha256 {actual[:12]}..., the manifest says {sha256[:12]}..."
    return None


def check_stack_files(bundle_dir: str | Path, manifest: Manifest) -> dict[str, str]:
    """Check every stack's ONNX file.

    Returns:
        ``{stack name: problem}`` for the stacks whose file is missing or does not match the manifest.
    """
    problems = {}
    for stack in manifest.stacks:
        problem = check_file(bundle_dir, stack.file, stack.sha256, stack.bytes)
        if problem is not None:
            problems[stack.name] = problem
    return problems


def _read_arrays(bundle_dir: str | Path, info: CalibrationInfo | SelfTestInfo, what: str,
                 names: list[str]) -> dict[str, np.ndarray]:
    """The named arrays of a bundle's ``.npz`` file, after checking it against its sha256.

    Raises:
        BundleError: the file is missing, does not match, is not an archive, lacks an array or is unreadable.
    """
    problem = check_file(bundle_dir, info.file, info.sha256)
    if problem is not None:
        raise BundleError(f"{what}: {problem}")
    fix = f"export the bundle again (or copy its {PurePath(info.file).name} again)"
    data = load_array(Path(bundle_dir) / info.file, BundleError, fix)
    if not hasattr(data, "files"):
        raise BundleError(f"{what} {info.file}: a single array, expected an .npz archive; {fix}")
    with data:
        missing = [name for name in names if name not in data.files]
        if missing:
            raise BundleError(f"{what} {info.file}: expected arrays {', '.join(missing[:6])}, found "
                              f"{', '.join(data.files[:12]) or 'none'}; {fix}")
        try:
            return {name: data[name] for name in names}
        except UNREADABLE as err:
            raise BundleError(f"{what} {info.file}: unreadable ({type(err).__name__}: {err}); {fix}") from None


def read_calibration(bundle_dir: str | Path, manifest: Manifest) -> tuple[np.ndarray, np.ndarray] | None:
    """The bundle's raw validation examples ``(x, y)``, or None if it has none.

    Raises:
        BundleError: the file is missing, does not match its sha256, or lacks the arrays x and y.
    """
    if manifest.calibration is None:
        return None
    arrays = _read_arrays(bundle_dir, manifest.calibration, "calibration data", ["x", "y"])
    return arrays["x"], arrays["y"]


@dataclass(frozen=True)
class SelfTestData:
    """What ``selftest.npz`` holds (see :class:`SelfTestInfo`).

    Attributes:
        x: raw inputs ``(N, ...)``.
        outputs: per stack, its outputs on the first few inputs ``(members, n, K)``.
        sums: per stack, each member's sum of its outputs over all N inputs ``(members, K)``.
        squares: per stack, each member's sum of squared outputs over all N inputs ``(members, K)``.
    """

    x: np.ndarray
    outputs: dict[str, np.ndarray]
    sums: dict[str, np.ndarray]
    squares: dict[str, np.ndarray]


def read_self_test(bundle_dir: str | Path, manifest: Manifest) -> SelfTestData | None:
    """The self-test's inputs and every stack's expected outputs on them, or None if the bundle has none.

    Raises:
        BundleError: the file is missing, does not match its sha256, or lacks ``x`` or a stack's arrays.
    """
    if manifest.self_test is None:
        return None
    names = [stack.name for stack in manifest.stacks]
    arrays = _read_arrays(bundle_dir, manifest.self_test, "self-test data",
                          ["x", *names, *(f"{n}.sum" for n in names), *(f"{n}.square" for n in names)])
    return SelfTestData(x=arrays["x"], outputs={n: arrays[n] for n in names},
                        sums={n: arrays[f"{n}.sum"] for n in names}, squares={n: arrays[f"{n}.square"] for n in names})


# ----------------------------------------------------------------------------------------------------------------
# Parsing. Every reader function takes the JSON value and its path, and raises BundleError naming that path.


def _plain(value: Any) -> Any:
    """Turn numpy scalars and arrays, tuples and paths into JSON values (the exporter computes with numpy)."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, PurePath):
        return value.as_posix()
    return value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Reader:
    """Typed access to JSON values; errors name ``source: path``."""

    def __init__(self, source: str):
        self.source = source
        self.version = FORMAT_VERSION  # the manifest's format_version, once read

    def error(self, path: str, message: str) -> BundleError:
        return BundleError(f"{self.source}: {path}: {message}")

    def fail(self, path: str, expected: str, value: Any) -> BundleError:
        return self.error(path, f"expected {expected}, got {_show(value)}")

    def get(self, obj: dict[str, Any], key: str, path: str, expected: str, default: Any = _MISSING) -> Any:
        full = f"{path}.{key}" if path else key
        if key not in obj:
            if default is _MISSING:
                raise self.error(full, f"missing; expected {expected}")
            return default
        return obj[key]

    def obj(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, "an object", value)
        return value

    def str_(self, obj: dict[str, Any], key: str, path: str, choices: tuple[str, ...] | None = None,
             default: Any = _MISSING) -> str:
        expected = f"one of {', '.join(repr(c) for c in choices)}" if choices else "a string"
        value = self.get(obj, key, path, expected, default)
        if not isinstance(value, str) or (choices is not None and value not in choices):
            raise self.fail(f"{path}.{key}" if path else key, expected, value)
        return value

    def int_(self, obj: dict[str, Any], key: str, path: str, minimum: int | None = None) -> int:
        expected = "an integer" if minimum is None else f"an integer >= {minimum}"
        return self.int_value(self.get(obj, key, path, expected), f"{path}.{key}" if path else key, minimum)

    def int_value(self, value: Any, path: str, minimum: int | None = None) -> int:
        expected = "an integer" if minimum is None else f"an integer >= {minimum}"
        # bool is an int in Python but never a valid count or id.
        if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
            raise self.fail(path, expected, value)
        return value

    def float_(self, obj: dict[str, Any], key: str, path: str) -> float:
        return self.float_value(self.get(obj, key, path, "a finite number"), f"{path}.{key}" if path else key)

    def optional_str(self, obj: dict[str, Any], key: str, path: str) -> str | None:
        value = self.get(obj, key, path, "a string or null")
        if value is not None and not isinstance(value, str):
            raise self.fail(f"{path}.{key}" if path else key, "a string or null", value)
        return value

    def optional_float(self, obj: dict[str, Any], key: str, path: str) -> float | None:
        value = self.get(obj, key, path, "a finite number or null")
        if value is None:
            return None
        return self.float_value(value, f"{path}.{key}" if path else key, "a finite number or null")

    def float_value(self, value: Any, path: str, expected: str = "a finite number") -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise self.fail(path, expected, value)
        return float(value)

    def list_(self, obj: dict[str, Any], key: str, path: str, expected: str) -> list[Any]:
        full = f"{path}.{key}" if path else key
        value = self.get(obj, key, path, expected)
        if not isinstance(value, list):
            raise self.fail(full, expected, value)
        return value

    def ints(self, obj: dict[str, Any], key: str, path: str, minimum: int | None = None,
             non_empty: bool = False) -> list[int]:
        full = f"{path}.{key}" if path else key
        expected = "a non-empty list of integers" if non_empty else "a list of integers"
        values = self.list_(obj, key, path, expected)
        if non_empty and not values:
            raise self.fail(full, expected, values)
        return [self.int_value(item, f"{full}[{i}]", minimum) for i, item in enumerate(values)]

    def floats(self, obj: dict[str, Any], key: str, path: str) -> list[float]:
        full = f"{path}.{key}" if path else key
        values = self.list_(obj, key, path, "a list of numbers")
        return [self.float_value(item, f"{full}[{i}]") for i, item in enumerate(values)]

    def relative_file(self, obj: dict[str, Any], key: str, path: str) -> str:
        value = self.str_(obj, key, path)
        pure = PurePosixPath(value)
        # A manifest must not point outside its bundle (a copied bundle must be self-contained, and a crafted one
        # must not make the runtime read arbitrary files).
        if not value or pure.is_absolute() or ".." in pure.parts or "\\" in value:
            raise self.fail(f"{path}.{key}", "a relative path inside the bundle (POSIX separators, no '..')", value)
        return value

    def sha256(self, obj: dict[str, Any], key: str, path: str) -> str:
        value = self.get(obj, key, path, "a hex sha256 digest (64 characters)")
        if not isinstance(value, str) or not _SHA256.match(value):
            raise self.fail(f"{path}.{key}", "a hex sha256 digest (64 lowercase characters)", value)
        return value


def _parse_manifest(r: _Reader, data: Any) -> Manifest:
    data = r.obj(data, "(top level)")
    if data.get("format") != FORMAT:
        raise r.fail("format", f"{FORMAT!r} (is this an edgens bundle?)", data.get("format", "nothing"))
    version = r.get(data, "format_version", "", "an integer")
    if type(version) is not int or version not in SUPPORTED_VERSIONS:  # type(): neither True nor 1.0 is a version
        supported = ", ".join(str(v) for v in SUPPORTED_VERSIONS)
        newer = type(version) is int and version > max(SUPPORTED_VERSIONS)
        hint = "; the bundle is newer than this edgens: upgrade edgens on the device" if newer else ""
        writer = data.get("edgens_version")
        by = f" (written by edgens {writer})" if isinstance(writer, str) else ""
        raise r.error("format_version", f"this edgens reads bundle format version(s) {supported}, got "
                                        f"{_show(version)}{by}{hint}")
    r.version = version
    family = r.str_(data, "family", "", FAMILIES)
    n_outputs = r.int_(data, "n_outputs", "", minimum=1)
    class_names = r.get(data, "class_names", "", "a list of strings or null")
    if class_names is not None:
        if (not isinstance(class_names, list) or len(class_names) != n_outputs
                or not all(isinstance(name, str) for name in class_names)):
            raise r.fail("class_names", f"null or a list of {n_outputs} strings (n_outputs)", class_names)
        class_names = list(class_names)
    manifest = Manifest(
        family=family,
        n_outputs=n_outputs,
        class_names=class_names,
        edgens_version=r.str_(data, "edgens_version", ""),
        created=r.str_(data, "created", ""),
        input=_parse_input(r, r.obj(r.get(data, "input", "", "an object"), "input")),
        preprocessing=_parse_preprocessing(r, r.obj(r.get(data, "preprocessing", "", "an object"), "preprocessing")),
        training=_parse_training(r, r.obj(r.get(data, "training", "", "an object"), "training")),
        members=[_parse_member(r, r.obj(item, f"members[{i}]"), f"members[{i}]")
                 for i, item in enumerate(r.list_(data, "members", "", "a list of member objects"))],
        order=r.ints(data, "order", ""),
        order_method=r.str_(data, "order_method", "", ORDER_METHODS),
        stacks=[_parse_stack(r, r.obj(item, f"stacks[{i}]"), f"stacks[{i}]")
                for i, item in enumerate(r.list_(data, "stacks", "", "a list of stack objects"))],
        specialists=[_parse_specialist(r, r.obj(item, f"specialists[{i}]"), f"specialists[{i}]")
                     for i, item in enumerate(r.list_(data, "specialists", "", "a list of specialist objects"))],
        curves=_parse_curves(r, r.obj(r.get(data, "curves", "", "an object"), "curves")),
        metrics=_parse_metrics(r, r.obj(r.get(data, "metrics", "", "an object"), "metrics")),
        calibration=_parse_calibration(r, data.get("calibration")),
        outliers=_parse_outliers(r, data.get("outliers")),
        self_test=_parse_self_test(r, data.get("self_test")),
        extra={key: value for key, value in data.items() if key not in KNOWN_KEYS},
    )
    _check_consistency(r, manifest)
    return manifest


def _parse_input(r: _Reader, obj: dict[str, Any]) -> InputSpec:
    shape = r.ints(obj, "shape", "input", minimum=1, non_empty=True)
    return InputSpec(shape=tuple(shape), name=r.str_(obj, "name", "input"),
                     dtype=r.str_(obj, "dtype", "input", ("float32",)), raw_dtype=_dtype_name(r, obj, "input"))


def _dtype_name(r: _Reader, obj: dict[str, Any], path: str) -> str:
    value = r.str_(obj, "raw_dtype", path)
    try:
        np.dtype(value)
    except TypeError:
        raise r.fail(f"{path}.raw_dtype", "a numpy dtype name such as 'uint8' or 'float32'", value) from None
    return value


def _parse_preprocessing(r: _Reader, obj: dict[str, Any]) -> Preprocessing:
    std = r.floats(obj, "std", "preprocessing")
    for i, value in enumerate(std):
        if value <= 0:
            raise r.fail(f"preprocessing.std[{i}]", "a number > 0", value)
    return Preprocessing(applied_by=r.str_(obj, "applied_by", "preprocessing", ("runtime",)),
                         mean=r.floats(obj, "mean", "preprocessing"), std=std)


def _parse_training(r: _Reader, obj: dict[str, Any]) -> TrainingInfo:
    config = r.get(obj, "config", "training", "an object")
    return TrainingInfo(preset=r.str_(obj, "preset", "training"), lam=r.float_(obj, "lam", "training"),
                        dataset=r.str_(obj, "dataset", "training"), config=r.obj(config, "training.config"))


def _parse_member(r: _Reader, obj: dict[str, Any], path: str) -> MemberInfo:
    return MemberInfo(id=r.int_(obj, "id", path, minimum=0), params=r.int_(obj, "params", path, minimum=0),
                      flops=r.int_(obj, "flops", path, minimum=0),
                      val_error=r.float_(obj, "val_error", path), val_nll=r.float_(obj, "val_nll", path))


def _parse_engine(r: _Reader, obj: dict[str, Any], path: str) -> EngineInfo:
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


def _parse_stack(r: _Reader, obj: dict[str, Any], path: str) -> StackInfo:
    engines = r.list_(obj, "engines", path, "a list of engine objects")
    precision = r.str_(obj, "precision", path, PRECISIONS) if r.version >= 2 else "fp32"
    return StackInfo(precision=precision,
                     val_error_change=r.optional_float(obj, "val_error_change", path) if r.version >= 2 else None,
                     precision_note=r.optional_str(obj, "precision_note", path) if r.version >= 2 else None,
                     name=r.str_(obj, "name", path), role=r.str_(obj, "role", path, ROLES),
                     file=r.relative_file(obj, "file", path), sha256=r.sha256(obj, "sha256", path),
                     bytes=r.int_(obj, "bytes", path, minimum=0),
                     members=r.ints(obj, "members", path, minimum=0, non_empty=True),
                     flops=r.int_(obj, "flops", path, minimum=0), input_name=r.str_(obj, "input_name", path),
                     output_name=r.str_(obj, "output_name", path),
                     engines=[_parse_engine(r, r.obj(item, f"{path}.engines[{i}]"), f"{path}.engines[{i}]")
                              for i, item in enumerate(engines)])


def _parse_specialist(r: _Reader, obj: dict[str, Any], path: str) -> SpecialistInfo:
    f1 = r.obj(r.get(obj, "val_f1", path, "an object"), f"{path}.val_f1")
    return SpecialistInfo(task=r.str_(obj, "task", path), class_index=r.int_(obj, "class_index", path, minimum=0),
                          members=r.ints(obj, "members", path, minimum=0, non_empty=True),
                          stack=r.str_(obj, "stack", path), selection=r.str_(obj, "selection", path),
                          val_f1={key: r.float_(f1, key, f"{path}.val_f1") for key in F1_KEYS})


def _parse_calibration(r: _Reader, value: Any) -> CalibrationInfo | None:
    if value is None:
        return None
    obj = r.obj(value, "calibration")
    return CalibrationInfo(file=r.relative_file(obj, "file", "calibration"),
                           sha256=r.sha256(obj, "sha256", "calibration"),
                           examples=r.int_(obj, "examples", "calibration", minimum=1))


def _parse_outliers(r: _Reader, value: Any) -> OutlierInfo | None:
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


def _parse_self_test(r: _Reader, value: Any) -> SelfTestInfo | None:
    if value is None:
        return None
    obj = r.obj(value, "self_test")
    return SelfTestInfo(file=r.relative_file(obj, "file", "self_test"), sha256=r.sha256(obj, "sha256", "self_test"),
                        examples=r.int_(obj, "examples", "self_test", minimum=1))


def _parse_curves(r: _Reader, obj: dict[str, Any]) -> Curves:
    return Curves(**{key: r.floats(obj, key, "curves") for key in CURVE_KEYS})


def _parse_metrics(r: _Reader, obj: dict[str, Any]) -> Metrics:
    splits = {}
    for split in ("val", "test"):
        part = r.obj(r.get(obj, split, "metrics", "an object"), f"metrics.{split}")
        splits[split] = SplitMetrics(error=r.float_(part, "error", f"metrics.{split}"),
                                     nll=r.float_(part, "nll", f"metrics.{split}"))
    return Metrics(**splits)


def _check_consistency(r: _Reader, m: Manifest) -> None:
    """Cross-references between keys: what a per-key type check cannot see."""
    channels = m.input.shape[0]
    for key in ("mean", "std"):
        values = getattr(m.preprocessing, key)
        if len(values) != channels:
            raise r.fail(f"preprocessing.{key}", f"{channels} values, one per channel (input.shape[0])", values)
    ids = [member.id for member in m.members]
    if not ids:
        raise r.fail("members", "at least one member", [])
    seen: set[int] = set()
    for i, member_id in enumerate(ids):
        if member_id in seen:
            raise r.error(f"members[{i}].id", f"member id {member_id} appears twice; ids must be unique")
        seen.add(member_id)
    if sorted(m.order) != sorted(ids):
        raise r.fail("order", f"every member id exactly once ({len(ids)} ids: {sorted(ids)[:8]}...)", m.order)
    flops = {member.id: member.flops for member in m.members}
    names: dict[str, int] = {}
    general: list[int] = []
    boundaries: set[int] = set()  # member counts at which a general stack ends
    prefixes: list[tuple[str, StackInfo]] = []
    previous_prefix = 0
    for i, stack in enumerate(m.stacks):
        path = f"stacks[{i}]"
        if stack.name in names:
            raise r.error(f"{path}.name", f"{stack.name!r} is also the name of stacks[{names[stack.name]}]; names "
                                          f"must be unique")
        names[stack.name] = i
        for j, member_id in enumerate(stack.members):
            if member_id not in seen:
                raise r.error(f"{path}.members[{j}]", f"member id {member_id} is not in members")
        if len(set(stack.members)) != len(stack.members):
            raise r.fail(f"{path}.members", "distinct member ids", stack.members)
        expected = sum(flops[member_id] for member_id in stack.members)
        if stack.flops != expected:
            raise r.fail(f"{path}.flops", f"{expected}, the sum of its members' flops", stack.flops)
        if stack.role == "general":
            if any(s.role != "general" for s in m.stacks[:i]):
                raise r.error(f"{path}.role", "general stacks must come before prefix and specialist stacks")
            general.extend(stack.members)
            boundaries.add(len(general))
        elif stack.role == "prefix":
            if any(s.role == "specialist" for s in m.stacks[:i]):
                raise r.error(f"{path}.role", "prefix stacks must come before specialist stacks")
            if len(stack.members) <= previous_prefix:
                raise r.error(f"{path}.members", "prefix stacks must be listed smallest first, each larger than the "
                                                 "one before")
            previous_prefix = len(stack.members)
            prefixes.append((path, stack))
    if general != m.order:
        raise r.error("stacks", f"the general stacks' members, in order, must be exactly `order` (consecutive "
                                f"chunks); got {general[:12]}, order is {m.order[:12]}")
    for path, stack in prefixes:
        n = len(stack.members)
        if stack.members != m.order[:n] or n not in boundaries:
            raise r.error(f"{path}.members", f"a prefix stack must hold exactly the members of the first general "
                                             f"stacks, in order (order[:n] with n one of {sorted(boundaries)}); got "
                                             f"{len(stack.members)} members starting {stack.members[:6]}")
    tasks: set[str] = set()
    for i, specialist in enumerate(m.specialists):
        path = f"specialists[{i}]"
        if specialist.task in tasks:
            raise r.error(f"{path}.task", f"task {specialist.task!r} appears twice; tasks must be unique")
        tasks.add(specialist.task)
        if specialist.class_index >= m.n_outputs:
            raise r.fail(f"{path}.class_index", f"a class index below n_outputs ({m.n_outputs})",
                         specialist.class_index)
        if specialist.stack not in names:
            raise r.fail(f"{path}.stack", f"the name of a stack ({', '.join(sorted(names))})", specialist.stack)
        stack = m.stacks[names[specialist.stack]]
        if stack.role != "specialist" or sorted(stack.members) != sorted(specialist.members):
            raise r.error(f"{path}.stack", f"stack {stack.name!r} must be a specialist stack holding exactly the "
                                           f"members {specialist.members}; it is a {stack.role} stack holding "
                                           f"{stack.members}")
    if m.outliers is not None:
        general_names = [stack.name for stack in m.stacks if stack.role == "general"]
        if sorted(m.outliers.thresholds) != sorted(general_names):
            raise r.fail("outliers.thresholds", f"one threshold per general stack ({', '.join(general_names)})",
                         sorted(m.outliers.thresholds))
    for key in CURVE_KEYS:
        values = getattr(m.curves, key)
        if len(values) != len(ids):
            raise r.fail(f"curves.{key}", f"a list of {len(ids)} numbers (one per k = 1..M)", values)
