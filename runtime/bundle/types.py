"""The bundle format's types (format version 2; version 1 bundles still load): the constants and one dataclass per
part of ``manifest.json`` (the :class:`~edgens.runtime.bundle.manifest.Manifest` holds them).

``docs/bundle-format.md`` describes the format; ``manifest.schema.json`` beside this module describes it as a JSON
Schema for other tools (the runtime needs neither it nor jsonschema).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

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
        raw_range: the smallest and largest raw value of the training data (``(0, 255)`` for Fashion-MNIST), from
            which the runtime refuses inputs far beyond it; None in bundles written before it (optional).
    """

    shape: tuple[int, ...]
    name: str = "x"
    dtype: str = "float32"
    raw_dtype: str = "uint8"
    raw_range: tuple[float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                                "raw_dtype": self.raw_dtype}
        if self.raw_range is not None:
            data["raw_range"] = [float(self.raw_range[0]), float(self.raw_range[1])]
        return data


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


CHECKSUM_SCHEMES = ("mlp-abft", "layers-abft")


@dataclass(kw_only=True)
class ChecksumInfo:
    """Checksums inside a stack graph (algorithm-based fault tolerance; :mod:`edgens.runtime.checksums` checks
    them): a checked graph's ``eta`` output is ``(members + 1, B, K + 2)`` and it has a second output.

    Attributes:
        scheme: ``mlp-abft``: the hidden layer's weights have one extra row, the negated sum of all the others, so
            that its pre-activations sum to zero; the output layer has two extra columns per member, the negated sum
            of its class columns (the member's outputs sum to zero) and the sum of their absolute values (the
            magnitudes a rounding bound scales with); row ``members`` is the check row (zero but for the hidden
            residual, which the runner writes into column K). ``layers-abft`` (deeper MLPs, grouped CNNs): every
            hidden layer's member blocks have a check and a magnitude output, and the graph's second output
            ``(B, 2)`` is the hidden layers' summed residual and their bound's magnitude term, which the runner
            writes into the check row's columns K and K + 1 (docs/bundle-format.md).
        output: the name of the graph's second output: the hidden residual ``(B, 1)`` (``mlp-abft``) or the hidden
            residual and magnitude ``(B, 2)`` (``layers-abft``).
        layers: the checked layers' names, hidden first, then the output layer.
        hidden_terms: terms of each hidden pre-activation (inputs + 1 for the bias; ``layers-abft``: the most of any
            hidden layer).
        hidden_units: pre-activations the hidden residual sums (``layers-abft``: over every layer and position).
        hidden_weight_abs: sum of |w| over the hidden layers' weights (extra rows included).
        hidden_bias_abs: sum of |b| over their biases (extra rows included).
        output_terms: terms of each output (hidden units + 1).
        unit_roundoff: of the graph's arithmetic: 2**-24 for fp32, 2**-11 for fp16.
    """

    scheme: str
    output: str
    layers: list[str]
    hidden_terms: int
    hidden_units: int
    hidden_weight_abs: float
    hidden_bias_abs: float
    output_terms: int
    unit_roundoff: float

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "output": self.output, "layers": list(self.layers),
                "hidden_terms": self.hidden_terms, "hidden_units": self.hidden_units,
                "hidden_weight_abs": self.hidden_weight_abs, "hidden_bias_abs": self.hidden_bias_abs,
                "output_terms": self.output_terms, "unit_roundoff": self.unit_roundoff}


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
        checksum: the checksums inside the graph, or None (an unchecked graph: bundles before them, int8 stacks
            and stack kinds without a checked form).
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
    checksum: ChecksumInfo | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "role": self.role, "file": self.file, "sha256": self.sha256, "bytes": self.bytes,
               "members": list(self.members), "flops": self.flops, "input_name": self.input_name,
               "output_name": self.output_name, "engines": [engine.to_dict() for engine in self.engines],
               "precision": self.precision, "val_error_change": self.val_error_change,
               "precision_note": self.precision_note}
        if self.checksum is not None:  # optional: absent for unchecked graphs, as in bundles written before
            out["checksum"] = self.checksum.to_dict()
        return out


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
