"""What the service may know about a plan without deserializing it.

A serialized Polars plan is ``b"DSL_VERSION"``, little-endian u16 major and minor DSL
versions, a 64-hex schema hash, then a MessagePack payload. The service checks that frame, walks the
MessagePack structure to prove it is complete (walking builds no Polars objects and runs
no pickles), compares the version with what its contexts run, and looks for the marker of
pickled Python functions. Only a backend's worker ever turns the bytes into a plan.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from functools import cache

import msgpack

MAGIC = b"DSL_VERSION"
PYTHON_UDF_MARKER = b"PLPYFN"
_HASH = re.compile(rb"^[0-9a-f]{64}$")
_HEADER_LEN = len(MAGIC) + 4 + 64


class PlanRejected(ValueError):
    """The bytes are not a plan this service can run; the message says why and what to do."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class PlanSignature:
    major: int
    minor: int
    schema_hash: str


def read_signature(data: bytes) -> PlanSignature:
    if not data.startswith(MAGIC):
        raise PlanRejected(
            "plan_invalid",
            "the upload is not a Polars plan (it must start with DSL_VERSION); build it with "
            "pclease_client or polars._utils.cloud.prepare_cloud_plan",
        )
    if len(data) < _HEADER_LEN:
        raise PlanRejected("plan_invalid", "the plan is truncated inside its header")
    major, minor = struct.unpack_from("<HH", data, len(MAGIC))
    schema_hash = data[len(MAGIC) + 4 : _HEADER_LEN]
    if not _HASH.match(schema_hash):
        raise PlanRejected("plan_invalid", "the plan header is damaged (bad schema hash)")
    return PlanSignature(major, minor, schema_hash.decode())


def check_complete(data: bytes) -> None:
    """Walk the MessagePack payload once; a truncated or padded plan is refused."""
    unpacker = msgpack.Unpacker(raw=True, strict_map_key=False, max_buffer_size=len(data) + 1)
    unpacker.feed(data[_HEADER_LEN:])
    try:
        unpacker.skip()
    except msgpack.OutOfData:
        raise PlanRejected(
            "plan_invalid", "the plan is truncated; upload the complete plan bytes"
        ) from None
    except (ValueError, msgpack.UnpackException) as exc:
        raise PlanRejected("plan_invalid", f"the plan is malformed ({exc})") from None
    if unpacker.tell() != len(data) - _HEADER_LEN:
        raise PlanRejected("plan_invalid", "the plan has trailing bytes after its end")


def contains_python_udf(data: bytes) -> bool:
    return PYTHON_UDF_MARKER in data


@cache
def local_signature() -> PlanSignature:
    """The signature of plans this process's Polars writes (and so its workers read)."""
    import polars as pl

    return read_signature(pl.LazyFrame({"x": [1]}).serialize())


def local_polars_version() -> str:
    from importlib.metadata import version

    return version("polars")
