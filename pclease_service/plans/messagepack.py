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

    __slots__ = ("binary", "size", "start", "stop")

    def __init__(self, size: int, start: int, *, binary: bool, stop: int | None = None) -> None:
        self.size = size
        self.start = start
        self.binary = binary
        #: Where its bytes end in the buffer.
        self.stop = start + size if stop is None else stop

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
# How serde writes a ``Vec<u8>``: each integer 0..255 in MessagePack's shortest form, a
# positive fixint (one byte below 0x80) or uint8 (0xcc and a byte from 0x80). An embedded
# DataFrame is one such run of millions, so a run is recognised by C loops over the buffer
# (bytes.translate, a literal regex substitution and the UTF-8 decoder, each reading a GB/s
# or more) instead of a per-integer regex or Python loop (tens of MB/s). Each byte is mapped
# to a stand-in that makes a valid run valid UTF-8 with one character per integer: a byte
# below 0x80 to ``A``, 0xcc to 0xc3 (a UTF-8 lead byte) and any other byte from 0x80 to 0x80
# (a continuation byte). A byte below 0x80 never follows 0xcc in a valid run, so a run of
# 0xcc bytes always starts an integer and pairs up from its left: the substitution (left to
# right, without overlap, like the decoder) turns each 0xcc 0xcc (the integer 204) into
# ``B``. What is left decodes exactly as far as the bytes are a run of small integers: a
# continuation byte where an integer starts, or 0xcc followed by a byte below 0x80, stops
# the decoder there.
_RUN_STANDIN = bytes(0x41 if b < 0x80 else 0xC3 if b == 0xCC else 0x80 for b in range(256))
_INTEGER_204 = re.compile(rb"\xc3\xc3")
_RUN_WINDOW = 1 << 20  # bytes; at least 2 (one integer)


def run_standin(buf: bytes) -> bytes:
    """``buf`` in the stand-in bytes :func:`byte_run_end` reads (one translate for a whole
    plan is cheaper than one per run or window)."""
    return buf.translate(_RUN_STANDIN)


def byte_run_end(buf: bytes, pos: int, count: int, standin: bytes | None = None) -> int | None:
    """Where a run of ``count`` small integers (a ``Vec<u8>``) starting at ``buf[pos]`` ends,
    or None when the bytes there are not such a run. ``standin``: ``run_standin(buf)``."""
    end = len(buf)
    view = memoryview(buf.translate(_RUN_STANDIN) if standin is None else standin)
    while True:
        stop = min(end, pos + min(2 * count, _RUN_WINDOW))
        window = _INTEGER_204.sub(b"B", view[pos:stop])
        try:
            tokens = window.decode("utf-8")
            broken = False
        except UnicodeDecodeError as exc:
            tokens = str(memoryview(window)[: exc.start], "utf-8")
            # A window may end between 0xcc and its byte: the next window starts at 0xcc.
            cut = stop < end and exc.start == len(window) - 1 and window[-1] == 0xC3
            broken = not cut
        n = len(tokens)
        if n >= count:
            # "A": one byte; "B" (0xcc 0xcc) and U+00C0 (0xcc and another byte): two.
            return pos + 2 * count - tokens.count("A", 0, count)
        if broken or n == 0:
            return None
        pos += 2 * n - tokens.count("A")
        count -= n


def byte_run_values(buf: bytes, start: int, stop: int) -> bytes:
    """The integers of the run ``buf[start:stop]`` (found by :func:`byte_run_end`) as bytes."""
    return _BYTE_PAIR.sub(rb"\1", buf[start:stop])


_BYTE_PAIR = re.compile(rb"\xcc([\x80-\xff])", re.DOTALL)


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
    standin: bytes | None = None
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
            run_end = None
            if count >= 16:
                if standin is None:
                    standin = run_standin(buf)
                run_end = byte_run_end(buf, pos, count, standin)
            if run_end is not None:
                value = Blob(count, pos, binary=False, stop=run_end)
                pos = run_end
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
