"""The little of protobuf that reading CRIU's images takes: varints and length-delimited
fields, by number; and varint fields written, for the pagemaps livemig rewrites
(pages/pagemap.py). Hand-written because a handful of fields is all livemig reads, and
pycriu is not installed with CRIU everywhere."""

from __future__ import annotations

import struct


def fields(buf: bytes):
    """(field number, int or bytes) for each field of a message; ValueError if malformed."""
    try:
        yield from _fields(buf)
    except struct.error as e:      # a fixed-size field cut short
        raise ValueError(f"truncated protobuf field ({e})") from None


def _fields(buf: bytes):
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire == 1:
            value, i = struct.unpack_from("<Q", buf, i)[0], i + 8
        elif wire == 5:
            value, i = struct.unpack_from("<I", buf, i)[0], i + 4
        else:
            raise ValueError(f"protobuf wire type {wire}")
        if i > len(buf):
            raise ValueError("truncated protobuf field")
        yield num, value


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def varint_field(num: int, value: int) -> bytes:
    """One field of wire type 0 (an unsigned integer), as protobuf encodes it."""
    return _encode_varint(num << 3) + _encode_varint(value)


def _encode_varint(value: int) -> bytes:
    if value < 0:
        raise ValueError("protobuf varints here are unsigned")
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)
