"""The Open Inference Protocol (KServe v2, as Triton speaks it) for one edgens bundle: model metadata, infer
requests with JSON tensors or the binary tensor data extension, and infer responses.

Pure functions over bytes and numpy arrays, without a web framework (:mod:`edgens.serve.app` serves them), so the
protocol's edge cases are tested directly. Everything a client can get wrong raises :class:`ProtocolError`: an HTTP
status and a one-line message naming what was received and what was expected.

Binary tensor data extension: the body is the JSON header followed by raw little-endian tensor bytes; the header
``Inference-Header-Content-Length`` gives the JSON's length, and each binary tensor says ``"parameters":
{"binary_data_size": N}``. Inputs may be binary (``tritonclient.http`` sends them so by default) or JSON; outputs
are binary when the request asks (``binary_data`` per output, or ``binary_data_output`` for all of them).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import orjson

from edgens.checks import cut, finite, shown
from edgens.errors import ConfigError
from edgens.runtime.bundle import Manifest
from edgens.runtime.policies import Budget
from edgens.runtime.prediction import Prediction

# Numeric tensor datatypes of the protocol and their little-endian numpy types (BOOL, BYTES and BF16 carry no
# image data edgens can take).
DATATYPES = {
    "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "<i1", "INT16": "<i2",
    "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}
BUDGET_PARAMETERS = ("deadline_ms", "members", "flops", "latency_ms", "confidence", "task")
# timeout: Triton's request timeout in microseconds (tritonclient's infer(timeout=)); edgens reads it as a deadline.
REQUEST_PARAMETERS = (*BUDGET_PARAMETERS, "binary_data_output", "timeout")
HEADER_LENGTH = "inference-header-content-length"
TRITON_PREFIX = "triton_"  # request parameters reserved for Triton's server, ignored
SHARED_MEMORY_KEYS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
VERSION = "1"  # a bundle is one model version


class ProtocolError(Exception):
    """A request the protocol cannot take: ``status`` (400 unless said) and a one-line message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the model's metadata."""

    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: any size

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ModelInfo:
    """What the protocol says about the bundle: its name, input and outputs."""

    name: str
    input: TensorInfo
    outputs: tuple[TensorInfo, ...]
    example_shapes: tuple[tuple[int, ...], ...]  # accepted shapes of one example
    family: str

    @classmethod
    def from_manifest(cls, manifest: Manifest, name: str) -> ModelInfo:
        shape = tuple(manifest.input.shape)
        by_dtype = {np.dtype(code).name: datatype for datatype, code in DATATYPES.items()}
        raw = by_dtype.get(np.dtype(manifest.input.raw_dtype).name, "FP32")
        k = manifest.n_outputs
        main = "probabilities" if manifest.family == "categorical" else "mean"
        outputs = [TensorInfo(main, "FP32", (-1, k))]
        if manifest.family == "categorical":
            outputs.append(TensorInfo("labels", "INT64", (-1,)))
        outputs.append(TensorInfo("members_used", "INT32", (-1,)))
        shapes = [shape] + ([shape[1:]] if len(shape) > 1 and shape[0] == 1 else [])
        return cls(name, TensorInfo(manifest.input.name, raw, (-1, *shape)), tuple(outputs), tuple(shapes),
                   manifest.family)

    def config(self, max_batch: int, max_queue: int, default_budget: Budget) -> dict[str, Any]:
        """Triton's model configuration (``GET /v2/models/{name}/config``, gRPC ``ModelConfig``), in its JSON form:
        the batch axis is implicit (``max_batch_size``), the batcher is a dynamic batcher that waits for nothing
        (``max_queue_delay_microseconds`` 0) and refuses beyond ``max_queue`` waiting requests; a default deadline
        is the queue policy's ``default_timeout_microseconds`` (a request's own budget overrides it), and any
        default budget is the ``default_budget`` parameter."""
        policy: dict[str, Any] = {"timeout_action": "REJECT", "allow_timeout_override": True,
                                  "max_queue_size": max_queue}
        if default_budget.kind == "deadline_ms":
            policy["default_timeout_microseconds"] = round(default_budget.value * 1e3)

        def dims(shape: tuple[int, ...]) -> list[int]:
            return list(shape[1:])  # without the batch axis, as Triton writes it when max_batch_size > 0

        return {"name": self.name, "platform": "edgens", "backend": "edgens", "max_batch_size": max_batch,
                "input": [{"name": self.input.name, "data_type": f"TYPE_{self.input.datatype}",
                           "dims": dims(self.input.shape)}],
                # one value per example (labels, members_used): dims [1] reshaped to none, as Triton says it
                "output": [{"name": o.name, "data_type": f"TYPE_{o.datatype}", "dims": dims(o.shape)}
                           if len(o.shape) > 1 else {"name": o.name, "data_type": f"TYPE_{o.datatype}", "dims": [1],
                                                     "reshape": {"shape": []}} for o in self.outputs],
                "dynamic_batching": {"max_queue_delay_microseconds": 0, "preserve_ordering": False,
                                     "default_queue_policy": policy},
                "parameters": {"default_budget": {"string_value": str(default_budget)}}}

    def metadata(self) -> dict[str, Any]:
        """The model metadata response (``GET /v2/models/{name}``)."""
        return {"name": self.name, "versions": [VERSION], "platform": "edgens",
                "inputs": [self.input.to_dict()], "outputs": [o.to_dict() for o in self.outputs]}


@dataclass(frozen=True)
class RegionUse:
    """Where a tensor is read or written in shared memory: ``byte_size`` bytes at ``offset`` in region ``name``."""

    name: str
    offset: int
    byte_size: int


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool
    shared_memory: RegionUse | None = None  # write it there instead of into the response


class SharedMemory(Protocol):
    """What parsing and encoding need of the registered regions (:class:`~edgens.serve.shared_memory.
    SharedMemoryRegions`)."""

    def read(self, use: RegionUse, what: str) -> bytes: ...

    def hold(self, use: RegionUse, what: str) -> Any: ...

    def write(self, region: Any, use: RegionUse, data: bytes, what: str) -> None: ...

    def release(self, region: Any) -> None: ...


@dataclass(frozen=True)
class InferRequest:
    """A parsed infer request: raw inputs ``x`` (B, *example shape), its budget (None: it gave none, so the server's
    default applies), and the outputs wanted."""

    id: str | None
    x: np.ndarray
    budget: Budget | None
    outputs: tuple[RequestedOutput, ...]
    held: dict[str, Any] = field(default_factory=dict)  # shared-memory regions of placed outputs, until written

    def release(self, shared_memory: SharedMemory | None) -> None:
        """Let go of the regions of outputs not written (a request refused or failed after parsing)."""
        while self.held:
            assert shared_memory is not None
            shared_memory.release(self.held.popitem()[1])


def parse_infer(body: bytes, header_length: str | None, model: ModelInfo,
                shared_memory: SharedMemory | None = None) -> InferRequest:
    """Parse an HTTP infer request's body (``header_length``: the ``Inference-Header-Content-Length`` header, if
    any).

    Raises:
        ProtocolError: anything malformed, with what was expected.
    """
    header, binary = _split_body(body, header_length)
    try:
        request = orjson.loads(header)  # 7x json's speed on a JSON tensor (issue 26)
    except orjson.JSONDecodeError:
        request = _loads_leniently(header)
    return parse_request(request, binary, model, shared_memory)


def _loads_leniently(header: bytes) -> Any:
    """What orjson refused, read by json: it takes NaN and Infinity (which some clients send, and which then get
    their own error), and its message says what is malformed otherwise.

    Raises:
        ProtocolError: malformed JSON.
    """
    try:
        return json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError(f"malformed JSON in the request: {err}") from None
    except RecursionError:
        raise ProtocolError("malformed JSON in the request: nested too deeply; expected the protocol's objects "
                            "and a flat or shaped data list") from None


def parse_request(request: Any, binary: memoryview, model: ModelInfo,
                  shared_memory: SharedMemory | None = None) -> InferRequest:
    """Parse an infer request in the protocol's JSON form (``binary``: the bytes after the JSON header, for the
    binary tensor data extension; ``shared_memory``: the registered regions, for tensors the request places in
    shared memory); the gRPC transport hands its messages over in this form too.

    Raises:
        ProtocolError: anything malformed, with what was expected.
    """
    if not isinstance(request, dict):
        raise ProtocolError(f"the request must be a JSON object, got {type(request).__name__}")
    unknown = sorted(set(request) - {"id", "parameters", "inputs", "outputs"})
    if unknown:
        raise ProtocolError(f"unknown request field(s) {_listed(unknown)}; expected id, parameters, inputs, "
                            f"outputs")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError(f"id: expected a string, got {type(request_id).__name__}")
    parameters = _object(request.get("parameters", {}), "parameters")
    budget, binary_default = _parse_parameters(parameters)
    x = _parse_input(request.get("inputs"), binary, model, shared_memory)
    outputs = _parse_outputs(request.get("outputs"), binary_default, model, shared_memory is not None)
    parsed = InferRequest(request_id, x, budget, outputs)
    try:  # hold the regions outputs go to now: unregistering one while the request runs cannot pull it away
        for output in outputs:
            if output.shared_memory is not None:
                assert shared_memory is not None
                parsed.held[output.name] = shared_memory.hold(output.shared_memory, f"output {output.name}")
    except ProtocolError:
        parsed.release(shared_memory)
        raise
    return parsed


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    if header_length is None:
        return body, memoryview(b"")
    try:
        length = int(header_length)
    except ValueError:
        raise ProtocolError(f"Inference-Header-Content-Length: expected the JSON header's length in bytes, got "
                            f"{shown(header_length)}") from None
    if not 0 < length <= len(body):
        raise ProtocolError(f"Inference-Header-Content-Length: {length} is not within the body's {len(body)} bytes")
    view = memoryview(body)
    return bytes(view[:length]), view[length:]


def _listed(names: list[str]) -> str:
    """Names a client sent, for a one-line message, cut short."""
    return cut(", ".join(map(repr, names)))


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def _parse_parameters(parameters: dict[str, Any]) -> tuple[Budget | None, bool]:
    # "triton_"-prefixed names are Triton's own, reserved for its server (perf_analyzer sends
    # triton_enable_empty_final_response on every gRPC request); they do not concern a non-decoupled model
    unknown = sorted(set(parameters) - set(REQUEST_PARAMETERS) - {k for k in parameters if k.startswith(TRITON_PREFIX)})
    if unknown:
        raise ProtocolError(f"unknown parameter(s) {_listed(unknown)}; expected budgets "
                            f"({', '.join(BUDGET_PARAMETERS)}), timeout or binary_data_output")
    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise ProtocolError(f"binary_data_output: expected true or false, got {shown(binary_default)}")
    budget = {key: parameters[key] for key in BUDGET_PARAMETERS if key in parameters}
    if "timeout" in parameters:
        timeout = parameters["timeout"]
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0 \
                or not finite(timeout):
            raise ProtocolError(f"timeout: expected microseconds > 0, got {shown(timeout)}")
        if "deadline_ms" in budget:
            raise ProtocolError("give timeout (microseconds) or deadline_ms, not both")
        budget["deadline_ms"] = timeout / 1e3
    for key, value in budget.items():
        if key == "task":
            if isinstance(value, bool) or not isinstance(value, str | int):
                raise ProtocolError(f"task: expected a task name, class index or class name, got {shown(value)}")
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise ProtocolError(f"{key}: expected a number, got {shown(value)}")
    if not budget:
        return None, binary_default  # the server's default budget applies
    try:
        return Budget.parse(**budget), binary_default
    except ConfigError as err:
        raise ProtocolError(str(err)) from None


def _parse_input(inputs: Any, binary: memoryview, model: ModelInfo, shared_memory: SharedMemory | None
                 ) -> np.ndarray:
    expected = model.input.name
    if inputs is None:
        raise ProtocolError(f"the request has no inputs; expected one tensor named {expected!r}")
    if not isinstance(inputs, list) or len(inputs) != 1:
        got = f"{len(inputs)} tensors" if isinstance(inputs, list) else type(inputs).__name__
        raise ProtocolError(f"inputs: expected a list of one tensor named {expected!r}, got {got}")
    tensor = _object(inputs[0], "inputs[0]")
    name = tensor.get("name")
    if name != expected:
        raise ProtocolError(f"unknown input {shown(name)}; this model's input is {expected!r}")
    datatype = tensor.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise ProtocolError(f"input {name}: datatype {shown(datatype)} is not supported; expected one of "
                            f"{', '.join(DATATYPES)} ({model.input.datatype} is the data set's own)")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                           for d in shape):
        raise ProtocolError(f"input {name}: shape must be a non-empty list of sizes >= 0, got {shown(shape)}")
    accepted = " or ".join("[B, " + ", ".join(map(str, s)) + "]" for s in model.example_shapes)
    if tuple(shape[1:]) not in model.example_shapes:
        raise ProtocolError(f"input {name}: shape {shown(shape)} does not fit the model; expected {accepted}")
    if shape[0] == 0:
        raise ProtocolError(f"input {name}: the batch is empty (shape {shape}); expected at least one example")
    dtype = np.dtype(DATATYPES[datatype])
    count = math.prod(shape)
    parameters = _object(tensor.get("parameters", {}), f"input {name} parameters")
    if "shared_memory_region" in parameters:
        if "data" in tensor or "binary_data_size" in parameters:
            raise ProtocolError(f"input {name}: give shared_memory_region, data or binary_data_size, one of them")
        if shared_memory is None:
            raise ProtocolError(f"input {name}: this transport does not take shared memory")
        use = region_use(parameters, f"input {name}")
        if use.byte_size != count * dtype.itemsize:
            raise ProtocolError(f"input {name}: shared_memory_byte_size {use.byte_size} does not match shape "
                                f"{shown(shape)} of {datatype} ({count * dtype.itemsize} bytes)")
        return np.frombuffer(shared_memory.read(use, f"input {name}"), dtype=dtype).reshape(shape)
    if "binary_data_size" in parameters:
        size = parameters["binary_data_size"]
        if "data" in tensor:
            raise ProtocolError(f"input {name}: give data or binary_data_size, not both")
        if size != count * dtype.itemsize:
            raise ProtocolError(f"input {name}: binary_data_size {shown(size)} does not match shape {shown(shape)} "
                                f"of {datatype} ({shown(count * dtype.itemsize)} bytes)")
        if len(binary) != size:
            raise ProtocolError(f"input {name}: the body holds {len(binary)} bytes of binary data after the JSON "
                                f"header, expected binary_data_size {size}")
        return np.frombuffer(binary, dtype=dtype).reshape(shape)
    if len(binary):
        raise ProtocolError(f"the body holds {len(binary)} bytes after the JSON header, but no input declares "
                            f"binary_data_size")
    if "data" not in tensor:
        raise ProtocolError(f"input {name}: no data; expected data (a list of {shown(count)} numbers) or "
                            f"binary_data_size")
    return _json_tensor(tensor["data"], shape, dtype, name, datatype)


def _json_tensor(data: Any, shape: list[int], dtype: np.dtype, name: str, datatype: str) -> np.ndarray:
    try:
        values = np.asarray(data)
    except (ValueError, RecursionError):  # ragged nesting, or more than numpy's 64 dimensions
        raise ProtocolError(f"input {name}: data is not a regular array of numbers") from None
    integer = dtype.kind in "ui"
    if values.dtype.kind not in ("iu" if integer else "iuf") or values.dtype == bool:
        kind = "integers" if integer else "numbers"
        raise ProtocolError(f"input {name}: data must hold {kind} for {datatype}, got {values.dtype.kind!r} "
                            f"values ({str(values.flat[0])[:20] if values.size else 'empty'}...)")
    if values.size != math.prod(shape):
        raise ProtocolError(f"input {name}: data holds {values.size} values, expected {shown(math.prod(shape))} for "
                            f"shape {shown(shape)}")
    if integer and values.size:
        limits = np.iinfo(dtype)
        low, high = int(values.min()), int(values.max())
        if low < limits.min or high > limits.max:
            raise ProtocolError(f"input {name}: values from {low} to {high} do not fit {datatype} "
                                f"({limits.min}..{limits.max})")
    return values.astype(dtype, copy=False).reshape(shape)


def region_use(parameters: dict[str, Any], what: str) -> RegionUse:
    """The shared-memory placement a tensor's parameters give.

    Raises:
        ProtocolError: a region name that is not a string, or a size or offset that is not a whole number >= 0.
    """
    name = parameters.get("shared_memory_region")
    if not isinstance(name, str):
        raise ProtocolError(f"{what}: shared_memory_region must be a region's name, got {shown(name)}")
    numbers = {}
    for key in ("shared_memory_byte_size", "shared_memory_offset"):
        value = parameters.get(key, 0 if key == "shared_memory_offset" else None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ProtocolError(f"{what}: {key} must be a whole number of bytes >= 0, got {shown(value)}")
        numbers[key] = value
    return RegionUse(name, numbers["shared_memory_offset"], numbers["shared_memory_byte_size"])


def _parse_outputs(outputs: Any, binary_default: bool, model: ModelInfo, shared_memory: bool = False
                   ) -> tuple[RequestedOutput, ...]:
    known = [o.name for o in model.outputs]
    if outputs is None:
        return tuple(RequestedOutput(name, binary_default) for name in known)
    if not isinstance(outputs, list) or not outputs:
        raise ProtocolError(f"outputs: expected a non-empty list of outputs by name ({', '.join(known)}), got "
                            f"{shown(outputs)}")
    wanted = []
    for i, output in enumerate(outputs):
        output = _object(output, f"outputs[{i}]")
        name = output.get("name")
        if name not in known:
            raise ProtocolError(f"unknown output {shown(name)}; this model's outputs are {', '.join(known)}")
        parameters = _object(output.get("parameters", {}), f"output {name} parameters")
        extra = sorted(set(parameters) - {"binary_data", *SHARED_MEMORY_KEYS})
        if extra:
            raise ProtocolError(f"output {name}: unsupported parameter(s) {_listed(extra)}; expected "
                                f"binary_data or {', '.join(SHARED_MEMORY_KEYS)}")
        binary = parameters.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise ProtocolError(f"output {name}: binary_data must be true or false, got {shown(binary)}")
        if any(w.name == name for w in wanted):
            raise ProtocolError(f"output {name} is asked for twice")
        placed = None
        if any(key in parameters for key in SHARED_MEMORY_KEYS):
            if not shared_memory:
                raise ProtocolError(f"output {name}: this transport does not take shared memory")
            placed = region_use(parameters, f"output {name}")
        wanted.append(RequestedOutput(name, binary, placed))
    return tuple(wanted)


def response_parameters(prediction: Prediction) -> dict[str, Any]:
    """What the response says about the call: members used (the fewest any example got), stacks run, failures,
    the deadline, how far past it the answer came, and whether that kept the promise of one stack."""
    parameters: dict[str, Any] = {
        "budget": prediction.budget,
        "members_used": int(prediction.members_used.min()),
        "stacks_run": ",".join(prediction.stacks_run),
        "failure_count": len(prediction.failures),
        "failures": "; ".join(str(f) for f in prediction.failures),
        "outliers_checked": prediction.outliers_checked,
        "elapsed_ms": round(prediction.elapsed_ms, 3),
    }
    if prediction.deadline_ms is not None:
        parameters["deadline_ms"] = prediction.deadline_ms
        parameters["overrun_ms"] = round(prediction.overrun_ms, 3)
        if prediction.promise_ms is not None:  # what the deadline promises at most: one stack late
            parameters["one_stack_ms"] = round(prediction.promise_ms, 3)
        parameters["within_one_stack"] = prediction.within_promise
    return parameters


def output_arrays(request: InferRequest, prediction: Prediction, model: ModelInfo
                  ) -> list[tuple[RequestedOutput, str, np.ndarray]]:
    """The outputs the request asked for: (what was asked, the protocol datatype, the array), in its order."""
    arrays = {"probabilities": prediction.mean, "mean": prediction.mean, "labels": prediction.labels,
              "members_used": prediction.members_used}
    datatypes = {o.name: o.datatype for o in model.outputs}
    return [(output, datatypes[output.name],
             np.ascontiguousarray(arrays[output.name], dtype=DATATYPES[datatypes[output.name]]))
            for output in request.outputs]


def write_shared_outputs(request: InferRequest, arrays: list[tuple[RequestedOutput, str, np.ndarray]],
                         shared_memory: SharedMemory | None) -> None:
    """Write the outputs placed in shared memory into the regions the parser held for them.

    Raises:
        ProtocolError: an output larger than the bytes given for it.
    """
    for output, _, array in arrays:
        if output.shared_memory is not None:
            assert shared_memory is not None  # the parser refuses placed outputs without it
            region = request.held.pop(output.name)
            shared_memory.write(region, output.shared_memory, array.tobytes(), f"output {output.name}")


def shared_output_parameters(output: RequestedOutput, array: np.ndarray) -> dict[str, Any]:
    """What the response says of an output written to shared memory: where, and how many bytes."""
    assert output.shared_memory is not None
    return {"shared_memory_region": output.shared_memory.name, "shared_memory_byte_size": array.nbytes,
            "shared_memory_offset": output.shared_memory.offset}


def encode_infer(request: InferRequest, prediction: Prediction, model: ModelInfo,
                 shared_memory: SharedMemory | None = None) -> tuple[bytes, int | None]:
    """The response body of an infer request, and the JSON header's length when binary outputs follow it; outputs
    placed in shared memory are written there.

    Raises:
        ProtocolError: an output placed in shared memory does not fit where the request placed it.
    """
    tensors, blobs = [], []
    arrays = output_arrays(request, prediction, model)
    write_shared_outputs(request, arrays, shared_memory)
    for output, datatype, array in arrays:
        tensor: dict[str, Any] = {"name": output.name, "datatype": datatype, "shape": list(array.shape)}
        if output.shared_memory is not None:
            pass  # no data and no parameters: Triton's C++ client reads any output parameters as binary data
        elif output.binary:
            blob = array.tobytes()
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = array.reshape(-1).tolist()
        tensors.append(tensor)
    response: dict[str, Any] = {"model_name": model.name, "model_version": VERSION}
    if request.id is not None:
        response["id"] = request.id
    response["parameters"] = response_parameters(prediction)
    response["outputs"] = tensors
    header = orjson.dumps(response)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)
