"""The protobuf framing of a model file: its header read with the bytes of large weights skipped."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import onnx

# Weights with raw data of at least this many bytes are left out of `read_framing`'s header.
SKIPPED_BYTES = 1024


# Field numbers: ModelProto.graph, GraphProto.initializer, TensorProto.raw_data.
MODEL_GRAPH, GRAPH_INITIALIZER, TENSOR_RAW_DATA = 7, 5, 9


def _varint(data: Any, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated or malformed protobuf varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: Any, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, value start, value end, field start) of each field in data[start:end]."""
    pos = start
    while pos < end:
        first = pos
        key, pos = _varint(data, pos, end)
        number, wire = key >> 3, key & 7
        value = pos
        if wire == 0:
            _, pos = _varint(data, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, value = _varint(data, pos, end)
            pos = value + length
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > end or number == 0:
            raise ValueError("truncated or malformed protobuf field")
        yield number, wire, value, pos, first


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def length_delimited(number: int, payload: bytes) -> bytes:
    return encode_varint(number << 3 | 2) + encode_varint(len(payload)) + payload


def read_framing(data: Any, offsets: dict[int, int] | None = None) -> tuple[onnx.ModelProto, dict[int, int]]:
    """The ModelProto in `data` with the raw data of large main-graph initializers skipped.

    Returns the header and {index in graph.initializer: skipped byte count}; `offsets`, when
    given, receives {index: where the skipped bytes start in `data`}. A field that occurs twice
    is merged by protobuf (repeated fields concatenated), so indices count across graphs.
    """
    parts: list[bytes] = []
    skipped: dict[int, int] = {}
    index = 0
    for number, wire, start, end, first in _fields(data, 0, len(data)):
        if number != MODEL_GRAPH or wire != 2:
            parts.append(data[first:end])
            continue
        graph: list[bytes] = []
        for g_number, g_wire, g_start, g_end, g_first in _fields(data, start, end):
            if g_number == GRAPH_INITIALIZER and g_wire == 2:
                index += 1
                tensor: list[bytes] = []
                raw = raw_start = None
                for t_number, t_wire, t_start, t_end, t_first in _fields(data, g_start, g_end):
                    if t_number == TENSOR_RAW_DATA and t_wire == 2:
                        raw, raw_start = t_end - t_start, t_start  # given twice: protobuf keeps the last
                    else:
                        tensor.append(data[t_first:t_end])
                if raw is not None and raw >= SKIPPED_BYTES:
                    skipped[index - 1] = raw
                    if offsets is not None:
                        offsets[index - 1] = raw_start
                    graph.append(length_delimited(GRAPH_INITIALIZER, b"".join(tensor)))
                    continue
            graph.append(data[g_first:g_end])
        parts.append(length_delimited(MODEL_GRAPH, b"".join(graph)))
    return onnx.ModelProto.FromString(b"".join(parts)), skipped
