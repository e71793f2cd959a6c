"""Running a submitted plan for real: find its sink, redirect ``<in-memory>``, execute it."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import polars as pl

IN_MEMORY = "<in-memory>"
_BODY_START = b"\x83\xa4root"  # msgpack map {root, dataframes, dsl_plans} after the header

# Plan names -> the client's ``file_type_sink`` names (REST) and QueryOutput.file_type (gRPC).
FILE_TYPES: dict[str, tuple[str, int]] = {
    "Parquet": ("Parquet", 1),
    "Ipc": ("IPC", 2),
    "Csv": ("Csv", 3),
    "NDJson": ("NDJSON", 4),
    "Json": ("JSON", 5),
}


@dataclass(frozen=True)
class SinkInfo:
    target: str | None
    file_format: str | None  # plan spelling: Parquet, Ipc, Csv, NDJson, Json


def _msgpack_str(text: str) -> bytes:
    raw = text.encode()
    if len(raw) < 32:
        return bytes([0xA0 | len(raw)]) + raw
    if len(raw) < 1 << 8:
        return b"\xd9" + len(raw).to_bytes(1, "big") + raw
    if len(raw) < 1 << 16:
        return b"\xda" + len(raw).to_bytes(2, "big") + raw
    return b"\xdb" + len(raw).to_bytes(4, "big") + raw


def sink_of(plan: bytes) -> SinkInfo:
    """The plan's file sink, read from polars' msgpack DSL (no deserialization, no pickles)."""
    start = plan.find(_BODY_START)
    if start < 0:
        return SinkInfo(None, None)
    try:
        body = msgpack.unpackb(
            plan[start:], raw=False, strict_map_key=False, unicode_errors="surrogateescape"
        )
    except (ValueError, msgpack.UnpackException):
        return SinkInfo(None, None)
    for node in body.get("dsl_plans", []) if isinstance(body, dict) else []:
        value: Any = node.get("value") if isinstance(node, dict) else None
        if not isinstance(value, dict) or "Sink" not in value:
            continue
        payload = value["Sink"].get("payload", {})
        file = payload.get("File") if isinstance(payload, dict) else None
        if not isinstance(file, dict):
            continue
        target = file.get("target")
        path = target.get("inner") if isinstance(target, dict) else target
        fmt = file.get("file_format")
        fmt_name = next(iter(fmt)) if isinstance(fmt, dict) and fmt else fmt
        return SinkInfo(
            path if isinstance(path, str) else None,
            fmt_name if isinstance(fmt_name, str) else None,
        )
    return SinkInfo(None, None)


def redirect_in_memory(plan: bytes, path: Path) -> bytes:
    """Point a ``<in-memory>`` sink at ``path``.

    The DSL body is msgpack, where a string is self-delimiting and no outer length covers
    it, so swapping the encoded string for another one of any length keeps the plan valid.
    """
    old = b"\xa5inner" + _msgpack_str(IN_MEMORY)
    return plan.replace(old, b"\xa5inner" + _msgpack_str(str(path)))


def start(plan: bytes) -> Any:
    """Begin executing a plan (which carries its own sink); returns polars' InProcessQuery."""
    lf = pl.LazyFrame.deserialize(io.BytesIO(plan))
    return lf.collect(background=True)


def count_rows(path: str, file_format: str | None) -> int | None:
    """Rows written to a local sink file, when it is one readable file."""
    p = Path(path)
    if not p.is_file():
        return None
    readers: dict[str, Callable[[Path], pl.LazyFrame]] = {
        "Parquet": pl.scan_parquet,
        "Ipc": pl.scan_ipc,
        "Csv": pl.scan_csv,
        "NDJson": pl.scan_ndjson,
    }
    reader = readers.get(file_format or "")
    if reader is None:
        return None
    n: int = reader(p).select(pl.len()).collect().item()
    return n
