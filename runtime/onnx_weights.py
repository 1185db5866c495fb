"""Find the weights inside a serialized ONNX model, without the onnx package (the device install has only
onnxruntime), so that fault injection can change their bits in place.

An ONNX file is a protobuf message: ``ModelProto.graph`` (field 7) holds ``GraphProto.initializer`` (field 5), the
weights, each a ``TensorProto`` with ``dims`` (1), ``data_type`` (2), ``name`` (8) and its values in ``raw_data``
(9) or, for small float tensors, packed ``float_data`` (4). This module walks the protobuf wire format far enough to
locate each initializer's value bytes in the file; changing bytes there keeps every length, so the patched model
needs no re-serialisation. Tensors stored outside the file (``external_data``) are not supported: edgens writes
self-contained stack files.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from edgens.errors import BundleError

# TensorProto.DataType codes of the weight types fault injection changes, with their numpy types.
WEIGHT_DTYPES = {1: np.dtype("<f4"), 10: np.dtype("<f2"), 3: np.dtype("i1"), 2: np.dtype("u1")}
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5
_TENSOR_DIMS, _TENSOR_TYPE, _TENSOR_FLOATS, _TENSOR_NAME, _TENSOR_RAW, _TENSOR_LOCATION = 1, 2, 4, 8, 9, 14


@dataclass(frozen=True)
class WeightTensor:
    """One initializer of a weight type, and where its values lie in the serialized model.

    Attributes:
        name: the initializer's name (e.g. ``first.weight``).
        shape: its dimensions.
        dtype: its numpy type (little-endian, as ONNX stores it).
        offset: byte offset of its first value in the model bytes.
    """

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int

    @property
    def size(self) -> int:
        """Number of values."""
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def bits(self) -> int:
        """Bits per value."""
        return self.dtype.itemsize * 8

    def values(self, model: bytes | bytearray | memoryview) -> np.ndarray:
        """The tensor's values read from ``model`` (a copy)."""
        return np.frombuffer(model, self.dtype, self.size, self.offset).reshape(self.shape).copy()


def weight_tensors(model: bytes | bytearray | memoryview) -> list[WeightTensor]:
    """Every float32, float16, int8 and uint8 initializer of a serialized ONNX model, in file order (integer shape
    constants such as a Reshape's target are not weights and are left out).

    Raises:
        BundleError: the bytes are not a well-formed ONNX model, or a weight is stored outside the file.
    """
    buf = memoryview(model)
    found = []
    for field, start, end in _fields(buf, 0, len(buf)):
        if field != _MODEL_GRAPH:
            continue
        for graph_field, t_start, t_end in _fields(buf, start, end):
            if graph_field == _GRAPH_INITIALIZER:
                tensor = _tensor(buf, t_start, t_end)
                if tensor is not None:
                    found.append(tensor)
    return found


def _tensor(buf: memoryview, start: int, end: int) -> WeightTensor | None:
    dims: list[int] = []
    data_type, name, values = 0, "", None
    for field, f_start, f_end in _fields(buf, start, end):
        if field == _TENSOR_DIMS:
            if f_end < 0:  # one varint, unpacked
                dims.append(f_start)
            else:
                pos = f_start
                while pos < f_end:
                    value, pos = _varint(buf, pos)
                    dims.append(value)
        elif field == _TENSOR_TYPE:
            data_type = f_start
        elif field == _TENSOR_NAME:
            name = bytes(buf[f_start:f_end]).decode("utf-8", errors="replace")
        elif field in (_TENSOR_RAW, _TENSOR_FLOATS) and f_end >= 0:
            values = (f_start, f_end)
        elif field == _TENSOR_LOCATION and f_start == 1:
            raise BundleError(f"initializer {name or '?'} is stored outside the model file; fault injection needs "
                              f"self-contained ONNX files")
    dtype = WEIGHT_DTYPES.get(data_type)
    if dtype is None or values is None:
        return None
    tensor = WeightTensor(name, tuple(dims), dtype, values[0])
    if values[1] - values[0] != tensor.size * dtype.itemsize:
        raise BundleError(f"initializer {name}: {values[1] - values[0]} value bytes for shape {tuple(dims)} of "
                          f"{dtype}; the model is malformed")
    return tensor


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise BundleError("not a well-formed ONNX model (a truncated or overlong varint)")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """The fields of one protobuf message in ``buf[start:end]``: ``(number, value start, value end)`` for
    length-delimited fields, ``(number, value, -1)`` for varints; fixed-width fields are skipped over."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, value, -1
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise BundleError("not a well-formed ONNX model (a field runs past its message)")
            yield number, pos, pos + length
            pos += length
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise BundleError(f"not a well-formed ONNX model (protobuf wire type {wire})")
    if pos != end:
        raise BundleError("not a well-formed ONNX model (a field runs past its message)")
