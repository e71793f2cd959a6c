"""A plan's frame, and the one rule for which Polars can read it.

A serialized Polars plan (Polars 2.0) is ``b"DSL_VERSION"``, a little-endian u16 major and
u16 minor DSL version, the 64-hex hash of the DSL schema, then one MessagePack value.

**The version rule** (:func:`check_version`), which is Polars' own: a Polars reads a plan of
its own DSL major version, a minor version at most its own, and exactly its own schema hash.
It is checked at submission against the Polars the service's contexts run, and again where
the plan runs, against the Polars there.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from functools import cache

from pclease_service.errors import PlanRefusal, PlanRefused

MAGIC = b"DSL_VERSION"
HEADER_LEN = len(MAGIC) + 4 + 64


@dataclass(frozen=True)
class PlanHeader:
    major: int
    minor: int
    schema_hash: str

    def describe(self) -> str:
        return f"DSL {self.major}.{self.minor}, schema {self.schema_hash[:12]}"

    def encode(self) -> bytes:
        return MAGIC + struct.pack("<HH", self.major, self.minor) + self.schema_hash.encode()


def _invalid(message: str) -> PlanRefused:
    return PlanRefused(PlanRefusal.INVALID, message)


def read_header(plan: bytes) -> PlanHeader:
    if not plan.startswith(MAGIC):
        raise _invalid(
            "the bytes are not a Polars plan (they must start with DSL_VERSION); build it "
            "with pclease_client or polars._utils.cloud.prepare_cloud_plan"
        )
    if len(plan) < HEADER_LEN:
        raise _invalid(f"the plan is truncated inside its header ({len(plan)} bytes)")
    major, minor = struct.unpack_from("<HH", plan, len(MAGIC))
    raw_hash = plan[len(MAGIC) + 4 : HEADER_LEN]
    if not re.fullmatch(rb"[0-9a-f]{64}", raw_hash):
        raise _invalid("the plan header is damaged (its schema hash is not 64 hex digits)")
    return PlanHeader(major, minor, raw_hash.decode())


def check_version(
    plan: PlanHeader,
    ours: PlanHeader,
    polars_version: str,
    *,
    client_polars_version: str | None = None,
) -> None:
    """Refuse a plan that the Polars with header ``ours`` (version ``polars_version``)
    cannot read (see the module docstring)."""
    if (
        plan.major == ours.major
        and plan.minor <= ours.minor
        and plan.schema_hash == ours.schema_hash
    ):
        return
    client = f" (the client says polars {client_polars_version})" if client_polars_version else ""
    raise PlanRefused(
        PlanRefusal.VERSION_MISMATCH,
        f"the plan was built by a Polars with {plan.describe()}{client}, but this context "
        f"runs polars {polars_version} ({ours.describe()}); build the plan with "
        f"polars=={polars_version}",
    )


@cache
def local_header() -> PlanHeader:
    """The header of plans this process's Polars writes (and so reads)."""
    import polars as pl

    return read_header(pl.LazyFrame().serialize())


def local_polars_version() -> str:
    from importlib.metadata import version

    return version("polars")
