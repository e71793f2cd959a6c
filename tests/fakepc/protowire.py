"""Just enough of the protobuf wire format to speak the client's few messages by field number.

No ``.proto`` is published for the Polars Cloud client service, so messages are read as
``{field_number: [raw values]}`` and written from ``(field_number, value)`` pairs.
"""

from __future__ import annotations

from collections.abc import Iterable

Value = int | bytes | str | list[tuple[int, "Value"]]

_VARINT = 0
_I64 = 1
_LEN = 2
_I32 = 5


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode(fields: Iterable[tuple[int, Value]]) -> bytes:
    """Encode ``(number, value)`` pairs: ints as varints, str/bytes and nested lists as LEN."""
    out = bytearray()
    for number, value in fields:
        if isinstance(value, bool | int):
            out += _varint(number << 3 | _VARINT) + _varint(int(value))
            continue
        if isinstance(value, str):
            payload = value.encode()
        elif isinstance(value, bytes):
            payload = value
        else:
            payload = encode(value)
        out += _varint(number << 3 | _LEN) + _varint(len(payload)) + payload
    return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def decode(buf: bytes) -> dict[int, list[int | bytes]]:
    """Decode one message level: every field number maps to its values in wire order.

    LEN values stay bytes; call :func:`decode` again on those known to be messages.
    """
    fields: dict[int, list[int | bytes]] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        value: int | bytes
        if wire_type == _VARINT:
            value, pos = _read_varint(buf, pos)
        elif wire_type == _LEN:
            size, pos = _read_varint(buf, pos)
            value = buf[pos : pos + size]
            if len(value) != size:
                raise ValueError("truncated length-delimited field")
            pos += size
        elif wire_type == _I64:
            value = int.from_bytes(buf[pos : pos + 8], "little")
            pos += 8
        elif wire_type == _I32:
            value = int.from_bytes(buf[pos : pos + 4], "little")
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        fields.setdefault(number, []).append(value)
    return fields


def first_bytes(fields: dict[int, list[int | bytes]], number: int) -> bytes | None:
    for value in fields.get(number, []):
        if isinstance(value, bytes):
            return value
    return None


def first_str(fields: dict[int, list[int | bytes]], number: int) -> str | None:
    raw = first_bytes(fields, number)
    return None if raw is None else raw.decode()
