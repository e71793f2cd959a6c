"""MessagePack, decoded for the plan guard: one value that must fill the buffer exactly.

Pure Python and iterative (no recursion limit); builds no Polars objects and runs no
pickles. It keeps only what the guard needs: maps must have string keys and no duplicates
(:class:`Map` also remembers where each value sits, so the plan can be edited in place),
and binary values and long runs of small integers (how serde writes a ``Vec<u8>``) are kept
as :class:`Blob`. A truncated, padded or malformed payload is refused as invalid.
"""

from __future__ import annotations

import re
import struct
from typing import Any

from pclease_service.errors import PlanRefusal, PlanRefused


def _refused(message: str) -> PlanRefused:
    return PlanRefused(PlanRefusal.REFUSED, message)


def _invalid(message: str) -> PlanRefused:
    return PlanRefused(PlanRefusal.INVALID, message)


class Blob:
    """Binary data (``binary``: MessagePack bin) or an array of at least 16 small integers
    (how serde writes a ``Vec<u8>``): kept as its size and where it starts."""

    __slots__ = ("binary", "size", "start")

    def __init__(self, size: int, start: int, *, binary: bool) -> None:
        self.size = size
        self.start = start
        self.binary = binary

    def __repr__(self) -> str:
        return f"Blob({self.size}, binary={self.binary})"


class Map(dict[str, Any]):
    """A MessagePack map with string keys, and where each value sits in the buffer."""

    __slots__ = ("spans",)

    def __init__(self) -> None:
        super().__init__()
        self.spans: dict[str, tuple[int, int]] = {}


_FIXED = {
    0xC0: None,
    0xC2: False,
    0xC3: True,
}
_INT = {0xCC: (1, False), 0xCD: (2, False), 0xCE: (4, False), 0xCF: (8, False)}
_INT |= {0xD0: (1, True), 0xD1: (2, True), 0xD2: (4, True), 0xD3: (8, True)}
_LEN_STR = {0xD9: 1, 0xDA: 2, 0xDB: 4}
_LEN_BIN = {0xC4: 1, 0xC5: 2, 0xC6: 4}
_LEN_EXT = frozenset({0xC7, 0xC8, 0xC9})
_FIXEXT = frozenset({0xD4, 0xD5, 0xD6, 0xD7, 0xD8})
_BYTE_RUNS: dict[int, re.Pattern[bytes]] = {}


def byte_run(count: int) -> re.Pattern[bytes]:
    # ``count`` integers 0..255 in MessagePack's shortest form: how serde writes a Vec<u8>.
    pattern = _BYTE_RUNS.get(count)
    if pattern is None:
        pattern = re.compile(rb"(?:[\x00-\x7f]|\xcc[\x80-\xff]){%d}" % count, re.DOTALL)
        if len(_BYTE_RUNS) < 256:
            _BYTE_RUNS[count] = pattern
    return pattern


class _Frame:
    __slots__ = ("key", "obj", "remaining", "start")

    def __init__(self, obj: Map | list[Any], remaining: int, start: int) -> None:
        self.obj = obj
        self.remaining = remaining
        self.start = start
        self.key: str | None = None


def decode(buf: bytes, start: int = 0) -> Any:
    """Decode one MessagePack value that must fill ``buf[start:]`` exactly.

    Iterative (no recursion limit), keeps only what the guard needs: integer arrays and
    binary values become :class:`Blob`, maps must have string keys and no duplicates.
    """
    pos = start
    end = len(buf)
    stack: list[_Frame] = []
    result: Any = None
    done = False

    def need(n: int) -> None:
        if pos + n > end:
            raise _invalid(
                f"the plan is truncated (it ends at byte {end - start} of its payload); "
                "send the complete plan bytes"
            )

    while not done:
        need(1)
        item_start = pos
        c = buf[pos]
        pos += 1
        value: Any
        container: Map | list[Any] | None = None
        count = 0
        if c <= 0x7F:
            value = c
        elif c >= 0xE0:
            value = c - 0x100
        elif 0xA0 <= c <= 0xBF or c in _LEN_STR:
            if c in _LEN_STR:
                width = _LEN_STR[c]
                need(width)
                n = int.from_bytes(buf[pos : pos + width], "big")
                pos += width
            else:
                n = c & 0x1F
            need(n)
            value = buf[pos : pos + n].decode("utf-8", "surrogateescape")
            pos += n
        elif 0x80 <= c <= 0x8F or c in (0xDE, 0xDF):
            if c in (0xDE, 0xDF):
                width = 2 if c == 0xDE else 4
                need(width)
                count = int.from_bytes(buf[pos : pos + width], "big")
                pos += width
            else:
                count = c & 0x0F
            container = Map()
            value = container
        elif 0x90 <= c <= 0x9F or c in (0xDC, 0xDD):
            if c in (0xDC, 0xDD):
                width = 2 if c == 0xDC else 4
                need(width)
                count = int.from_bytes(buf[pos : pos + width], "big")
                pos += width
            else:
                count = c & 0x0F
            run = byte_run(count).match(buf, pos) if count >= 16 else None
            if run is not None:
                value = Blob(count, pos, binary=False)
                pos = run.end()
                count = 0
            else:
                container = []
                value = container
        elif c in _FIXED:
            value = _FIXED[c]
        elif c in _INT:
            width, signed = _INT[c]
            need(width)
            value = int.from_bytes(buf[pos : pos + width], "big", signed=signed)
            pos += width
        elif c in (0xCA, 0xCB):
            width = 4 if c == 0xCA else 8
            need(width)
            (value,) = struct.unpack_from(">f" if c == 0xCA else ">d", buf, pos)
            pos += width
        elif c in _LEN_BIN:
            width = _LEN_BIN[c]
            need(width)
            n = int.from_bytes(buf[pos : pos + width], "big")
            pos += width
            need(n)
            value = Blob(n, pos, binary=True)
            pos += n
        elif c in _LEN_EXT or c in _FIXEXT:
            raise _refused("the plan uses MessagePack extension types, which Polars never writes")
        else:
            raise _invalid(f"the plan is malformed (byte 0x{c:02x} at offset {item_start - start})")

        if container is not None and count > 0:
            stack.append(_Frame(container, count, item_start))
            continue
        # A complete value: hand it to its parents, closing every container it completes.
        while True:
            if not stack:
                result = value
                done = True
                break
            parent = stack[-1]
            if _attach(parent, value, item_start, pos):
                break
            stack.pop()
            value, item_start = parent.obj, parent.start
    if pos != end:
        raise _invalid(f"the plan has {end - pos} bytes of trailing data after its end")
    return result


def _attach(parent: _Frame, value: Any, start: int, stop: int) -> bool:
    """Add a value to ``parent``; False once ``parent`` is complete."""
    obj = parent.obj
    if isinstance(obj, list):
        obj.append(value)
        parent.remaining -= 1
    elif parent.key is None:
        if not isinstance(value, str):
            raise _refused(
                "the plan encodes a map key as something other than a string; "
                "only plans serialized by Polars itself can run"
            )
        if value in obj:
            raise _invalid(f"the plan repeats the key {value!r} in one map")
        parent.key = value
        return True
    else:
        obj[parent.key] = value
        obj.spans[parent.key] = (start, stop)
        parent.key = None
        parent.remaining -= 1
    return parent.remaining > 0


def encode_ref(idx: int, version: int) -> bytes:
    """``{"idx": idx, "version": version}`` as MessagePack."""
    return (
        b"\x82"
        + _encode_str("idx")
        + _encode_uint(idx)
        + _encode_str("version")
        + (_encode_uint(version))
    )


def encode_path_sources(path: str) -> bytes:
    """``{"Paths": [{"inner": path}]}`` as MessagePack (a scan's ``sources``)."""
    return b"\x81" + _encode_str("Paths") + b"\x91\x81" + _encode_str("inner") + (_encode_str(path))


def _encode_str(text: str) -> bytes:
    data = text.encode("utf-8", "surrogateescape")
    n = len(data)
    if n < 32:
        return bytes([0xA0 | n]) + data
    if n < 1 << 8:
        return b"\xd9" + n.to_bytes(1, "big") + data
    if n < 1 << 16:
        return b"\xda" + n.to_bytes(2, "big") + data
    return b"\xdb" + n.to_bytes(4, "big") + data


def _encode_uint(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    for marker, width in ((0xCC, 1), (0xCD, 2), (0xCE, 4), (0xCF, 8)):
        if n < 1 << (8 * width):
            return bytes([marker]) + n.to_bytes(width, "big")
    raise ValueError(n)
