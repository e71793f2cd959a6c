"""What a serialized Polars plan would do, found out before Polars reads it.

Plans are untrusted input: a plan may scan any file the executor can open, sink anywhere it
can write, load a native plugin, and carry pickled Python (UDFs, callbacks, IO plugins,
credential providers) that runs when Polars reads the plan. Only expression UDFs carry the
``PLPYFN`` marker; the rest are bare pickles, so a search for the marker is not enough. This
module reads the plan bytes itself (pure Python, no Polars import, nothing executed), so the
executor can refuse a plan before any of it runs.

A plan (Polars 2.0) is ``b"DSL_VERSION"``, a little-endian u16 major and u16 minor DSL
version, the 64-hex hash of the DSL schema, then one MessagePack value::

    {"root": {"idx", "version"}, "dataframes": [...], "dsl_plans": [{"value": node, ...}]}

Plan nodes are maps with one key, the variant name (``{"Scan": {...}}``); shared nodes live in
the ``dsl_plans`` arena and are referenced by index. The guard decodes the whole value and
walks *every* map in it, wherever it sits (plans nest inside unions, sinks, expressions), so
every ``Scan``, ``Sink``, ``PythonScan`` and native plugin is found. It fails closed: map keys
that are not strings (serde would accept field indices), a known node that is not in the
exact shape Polars writes, a source or sink kind it does not know, or a DSL schema it was not
verified against are all refused. ``VERIFIED_SCHEMA_HASHES`` pins the schemas this walk was
checked against; a Polars upgrade must add its hash here after checking the new schema.

Errors are :class:`PlanError` with a ``type`` (``PlanInvalid``, ``PlanVersionMismatch``,
``PlanRefused``) and a message that says what to change.
"""

from __future__ import annotations

import os
import re
import struct
import sys
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from pclease_service.backends.base import IN_MEMORY_SINK, QueryTarget

MAGIC = b"DSL_VERSION"
HEADER_LEN = len(MAGIC) + 4 + 64
PYTHON_UDF_MARKER = b"PLPYFN"

#: DSL schema hashes whose plans this module's walk was checked against (polars 2.0.0).
VERIFIED_SCHEMA_HASHES = frozenset(
    {"dd13fd0271a06799ac92d2b87b196660f19f2ff5d3ca3e16edb09eed5c51de68"}
)

# How Polars 2.0 tells object-store URIs from local paths; anything else is a local path.
CLOUD_SCHEMES = frozenset(
    {"s3", "s3a", "gs", "gcs", "az", "azure", "abfs", "abfss", "adl", "http", "https", "hf"}
)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_GLOB_CHARS = re.compile(r"[*?\[]")

_SCAN_TYPES = frozenset({"Parquet", "Ipc", "Csv", "NDJson", "Lines"})
_SINK_FORMATS = {
    "Parquet": QueryTarget.PARQUET,
    "Ipc": QueryTarget.IPC,
    "Csv": QueryTarget.CSV,
    "NDJson": QueryTarget.NDJSON,
}
# Object-store settings that make the executor read a local file or call a local endpoint
# for credentials: a plan could use them to read files outside the data roots.
_DENIED_CLOUD_KEYS = frozenset(
    {
        "ServiceAccount",
        "ApplicationCredentials",
        "FederatedTokenFile",
        "WebIdentityTokenFile",
        "ContainerCredentialsRelativeUri",
        "ContainerCredentialsFullUri",
        "ContainerAuthorizationTokenFile",
        "MetadataEndpoint",
        "MsiEndpoint",
        "UseAzureCli",
    }
)
_WATCHED = frozenset({"Scan", "Sink", "PythonScan", "FfiPlugin"})
# Polars dtypes that serialize as a one-key map (``{"List": "Int64"}``).
_DTYPE_VARIANTS = frozenset(
    {
        "List",
        "Array",
        "Struct",
        "Datetime",
        "Duration",
        "Decimal",
        "Categorical",
        "Enum",
        "Object",
        "Extension",
        "Unknown",
    }
)
#: At most this many entries are checked for symlinks under a scanned directory or glob.
MAX_WALK_ENTRIES = 100_000


class PlanError(Exception):
    """The plan cannot run; ``type`` is the outcome's error type."""

    def __init__(self, type: str, message: str) -> None:
        super().__init__(f"{type}: {message}")
        self.type = type
        self.message = message


def _refused(message: str) -> PlanError:
    return PlanError("PlanRefused", message)


def _invalid(message: str) -> PlanError:
    return PlanError("PlanInvalid", message)


# -- header -------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanHeader:
    major: int
    minor: int
    schema_hash: str

    def describe(self) -> str:
        return f"DSL {self.major}.{self.minor}, schema {self.schema_hash[:12]}"

    def encode(self) -> bytes:
        return MAGIC + struct.pack("<HH", self.major, self.minor) + self.schema_hash.encode()


def read_header(plan: bytes) -> PlanHeader:
    if not plan.startswith(MAGIC):
        raise _invalid(
            "the bytes are not a Polars plan (they must start with DSL_VERSION); build it "
            "with polars._utils.cloud.prepare_cloud_plan"
        )
    if len(plan) < HEADER_LEN:
        raise _invalid(f"the plan is truncated inside its header ({len(plan)} bytes)")
    major, minor = struct.unpack_from("<HH", plan, len(MAGIC))
    raw_hash = plan[len(MAGIC) + 4 : HEADER_LEN]
    if not re.fullmatch(rb"[0-9a-f]{64}", raw_hash):
        raise _invalid("the plan header is damaged (its schema hash is not 64 hex digits)")
    return PlanHeader(major, minor, raw_hash.decode())


def check_compatible(plan: PlanHeader, ours: PlanHeader, polars_version: str) -> None:
    """Polars reads only plans of its own DSL major version, minor version at most its own,
    and exactly its own schema hash."""
    if (
        plan.major == ours.major
        and plan.minor <= ours.minor
        and plan.schema_hash == ours.schema_hash
    ):
        return
    raise PlanError(
        "PlanVersionMismatch",
        f"the plan was built by a Polars with {plan.describe()}, but this context runs "
        f"polars {polars_version} ({ours.describe()}); build the plan with "
        f"polars=={polars_version}",
    )


def refuse_python_udfs(plan: bytes, allowed: bool) -> None:
    """Refuse a plan that carries pickled Python (which runs when Polars reads the plan)."""
    if not allowed and PYTHON_UDF_MARKER in plan:
        raise _refused(
            "the plan contains a Python function (map_elements, map_batches, a Python scan "
            "or credential provider); the profile must set allow_python_udfs = true to run it"
        )


# -- MessagePack --------------------------------------------------------------------------
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


def _byte_run(count: int) -> re.Pattern[bytes]:
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
            run = _byte_run(count).match(buf, pos) if count >= 16 else None
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


# -- the walk -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Access:
    """One path the plan reads or writes."""

    mode: Literal["read", "write"]
    path: str
    #: True when Polars would expand glob characters in the path.
    glob: bool = False
    #: The sink at the root of the plan (the query's output).
    is_output: bool = False


@dataclass(frozen=True)
class OutputSink:
    """The sink at the root of the plan."""

    kind: Literal["File", "Partitioned"]
    path: str
    format: QueryTarget
    #: Sink-format options (CSV: include_header, separator, quote_char, ...).
    options: Map
    #: Where the sink's ``cloud_options`` value sits in the payload (to read the output back).
    cloud_options_span: tuple[int, int] | None
    input_ref: Map


@dataclass
class PlanInfo:
    header: PlanHeader
    #: The MessagePack payload (the plan without its header).
    payload: bytes
    tree: Map
    accesses: list[Access] = field(default_factory=list)
    output: OutputSink | None = None
    #: True when the root is an in-memory sink (``collect``) or no sink at all.
    collects: bool = False

    def without_output_sink(self) -> bytes:
        """The plan with its root moved from the output sink to the sink's input, so
        Polars collects the result instead of writing it."""
        if self.output is None:
            return self.header.encode() + self.payload
        ref = self.output.input_ref
        start, stop = self.tree.spans["root"]
        root = encode_ref(ref["idx"], ref["version"])
        return self.header.encode() + self.payload[:start] + root + self.payload[stop:]

    def output_cloud_options(self) -> bytes | None:
        """The output sink's storage options, exactly as the plan encodes them."""
        span = self.output.cloud_options_span if self.output else None
        return self.payload[span[0] : span[1]] if span else None


def rescan(template: bytes, path: str, cloud_options: bytes | None) -> bytes:
    """``template``, a plan with exactly one scan, changed to scan ``path`` with the given
    storage options (MessagePack taken from a sink: scans and sinks share their type)."""
    header = read_header(template)
    payload = template[HEADER_LEN:]
    tree = decode(payload)
    scans = [n["Scan"] for n in _maps(tree) if isinstance(n.get("Scan"), Map)]
    if len(scans) != 1:
        raise ValueError(f"the template has {len(scans)} scans, not one")
    scan = scans[0]
    edits = [(scan.spans["sources"], encode_path_sources(path))]
    if cloud_options is not None:
        edits.append((scan["unified_scan_args"].spans["cloud_options"], cloud_options))
    for (start, stop), data in sorted(edits, reverse=True):
        payload = payload[:start] + data + payload[stop:]
    return header.encode() + payload


def inspect(
    plan: bytes,
    *,
    allow_python_udfs: bool,
    python_version: tuple[int, int] = (sys.version_info.minor, sys.version_info.micro),
) -> PlanInfo:
    """Decode the plan and find everything it would read, write or run."""
    header = read_header(plan)
    if header.schema_hash not in VERIFIED_SCHEMA_HASHES:
        raise _refused(
            f"the plan guard has not been verified for {header.describe()}; pclease must "
            "check this Polars version's plan schema before it runs its plans"
        )
    refuse_python_udfs(plan, allow_python_udfs)
    payload = plan[HEADER_LEN:]
    tree = decode(payload)
    if not isinstance(tree, Map) or not isinstance(tree.get("dsl_plans"), list):
        raise _invalid("the plan does not have the layout Polars writes (no dsl_plans)")
    info = PlanInfo(header, payload, tree)
    root = _resolve_ref(tree, tree.get("root"))
    root_sink = _node(root, "Sink")
    info.collects = root_sink is None
    for node in _maps(tree):
        _check_node(node, info, allow_python_udfs, root_sink)
    if not allow_python_udfs:
        _refuse_pickles(tree, payload, python_version)
    return info


# Polars writes a Python object as [cloudpickle flag][Python minor][Python micro] + a pickle
# (checking the version only when the flag is set), in any field of a Python-object type:
# UDFs, callbacks, IO plugins, credential providers. Only some carry the PLPYFN marker. The
# schema gives no list of those fields, so every byte string outside the places that hold
# data (DataFrames, literals and dtypes, scan buffers) is examined: one that Polars would
# unpickle and that contains an opcode able to import or call anything is refused.
_DATA_KEYS = frozenset({"Literal", "Buffers"})
# GLOBAL, INST, STACK_GLOBAL, EXT1, EXT2, EXT4: the opcodes that import (and so can call).
_PICKLE_CALL_OPCODES = re.compile(rb"[\x63\x69\x93\x82\x83\x84]")
_BYTE_PAIR = re.compile(rb"\xcc([\x80-\xff])", re.DOTALL)


def _refuse_pickles(tree: Map, payload: bytes, python_version: tuple[int, int]) -> None:
    stack: list[tuple[Any, tuple[str, ...]]] = [
        (v, (k,)) for k, v in tree.items() if k != "dataframes"
    ]
    while stack:
        item, path = stack.pop()
        if isinstance(item, Map):
            stack.extend((v, (*path[-3:], k)) for k, v in item.items() if k not in _DATA_KEYS)
            continue
        data: bytes | None = None
        if isinstance(item, list):
            if len(item) >= 4 and all(isinstance(x, int) and 0 <= x <= 255 for x in item):
                data = bytes(item)
            else:
                stack.extend((v, path) for v in item)
        elif isinstance(item, Blob):
            data = _blob_bytes(item, payload)
        if data is not None and _may_be_pickle(data, python_version):
            raise _refused(
                f"the plan holds a pickled Python object at {'/'.join(path)} (a Python UDF, "
                "callback, IO plugin or credential provider); the profile must set "
                "allow_python_udfs = true to run it"
            )


def _blob_bytes(blob: Blob, payload: bytes) -> bytes:
    if blob.binary:
        return payload[blob.start : blob.start + blob.size]
    run = _byte_run(blob.size).match(payload, blob.start)
    assert run is not None  # the decoder matched this very run
    return _BYTE_PAIR.sub(rb"\1", run.group())


def _may_be_pickle(data: bytes, python_version: tuple[int, int]) -> bool:
    if len(data) < 4:
        return False
    if data.startswith(PYTHON_UDF_MARKER):
        return True
    unpickled = data[0] == 0 or tuple(data[1:3]) == python_version
    return unpickled and _PICKLE_CALL_OPCODES.search(data, 3) is not None


def _resolve_ref(tree: Map, ref: Any) -> Any:
    if not (isinstance(ref, Map) and set(ref) == {"idx", "version"}):
        raise _invalid("the plan does not have the layout Polars writes (bad root reference)")
    idx = ref["idx"]
    arena = tree["dsl_plans"]
    if not (isinstance(idx, int) and 0 <= idx < len(arena)) or not isinstance(arena[idx], Map):
        raise _invalid(f"the plan refers to node {idx!r}, which it does not contain")
    return arena[idx].get("value")


def _node(value: Any, variant: str) -> Map | None:
    if isinstance(value, Map) and len(value) == 1 and isinstance(value.get(variant), Map):
        node: Map = value[variant]
        return node
    return None


def _maps(tree: Any) -> Iterator[Map]:
    stack = [tree]
    while stack:
        item = stack.pop()
        if isinstance(item, Map):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _is_dtype(value: Any) -> bool:
    """A schema entry for a column that happens to be named like a plan node. None of the
    watched nodes can deserialize from these: they are structs with other required fields."""
    if isinstance(value, str):
        return True
    return isinstance(value, Map) and len(value) == 1 and next(iter(value)) in _DTYPE_VARIANTS


def _check_node(node: Map, info: PlanInfo, allow_udfs: bool, root_sink: Map | None) -> None:
    for key, value in node.items():
        if key not in _WATCHED or _is_dtype(value):
            continue
        if key == "Scan":
            _check_scan(_expect_map(value, "Scan"), info, allow_udfs)
        elif key == "Sink":
            sink = _expect_map(value, "Sink")
            _check_sink(sink, info, allow_udfs, is_root=sink is root_sink)
        elif key == "PythonScan" and not allow_udfs:
            raise _refused(
                "the plan scans through Python (a Python scan or IO plugin); the profile "
                "must set allow_python_udfs = true to run it"
            )
        elif key == "FfiPlugin":
            raise _refused(
                "the plan calls a native expression plugin (a shared library it names); "
                "plugins cannot run on pclease contexts"
            )


def _expect_map(value: Any, what: str, *keys: str) -> Map:
    if not isinstance(value, Map) or any(k not in value for k in keys):
        raise _refused(
            f"the plan has a {what!r} entry this guard cannot read, so it cannot tell what "
            f"the plan touches (if it is a column named {what!r}, rename the column)"
        )
    return value


def _variant(value: Any, what: str) -> tuple[str, Any]:
    if isinstance(value, str):
        return value, None
    if isinstance(value, Map) and len(value) == 1:
        ((name, body),) = value.items()
        return name, body
    raise _refused(f"the plan's {what} is not in a shape this guard can read")


def _path_of(value: Any, what: str) -> str:
    if isinstance(value, Map) and set(value) == {"inner"} and isinstance(value["inner"], str):
        path: str = value["inner"]
        return path
    raise _refused(f"the plan's {what} is not a plain path this guard can read")


def _check_cloud_options(options: Any, allow_udfs: bool) -> None:
    if options is None:
        return
    options = _expect_map(options, "cloud_options")
    if options.get("credential_provider") is not None and not allow_udfs:
        raise _refused(
            "the plan carries a Python credential provider; pass credential_provider=None "
            "with storage_options, or set allow_python_udfs = true in the profile"
        )
    config = options.get("config")
    if config is None:
        return
    _, pairs = _variant(config, "storage options")
    if not isinstance(pairs, list):
        raise _refused("the plan's storage options are not in a shape this guard can read")
    for pair in pairs:
        if not (isinstance(pair, list) and len(pair) == 2):
            raise _refused("the plan's storage options are not in a shape this guard can read")
        key = pair[0]
        if isinstance(key, Map) and len(key) == 1:
            key = next(iter(key.values()))
        if not isinstance(key, str):
            raise _refused("the plan's storage options are not in a shape this guard can read")
        if key in _DENIED_CLOUD_KEYS:
            raise _refused(
                f"the plan sets the storage option {key}, which makes the context read local "
                "credential files or endpoints; pass credentials as keys (e.g. "
                "aws_access_key_id) instead"
            )


def _check_scan(scan: Map, info: PlanInfo, allow_udfs: bool) -> None:
    scan = _expect_map(scan, "Scan", "sources", "unified_scan_args", "scan_type")
    scan_type, _ = _variant(scan["scan_type"], "scan type")
    if scan_type not in _SCAN_TYPES and not allow_udfs:
        raise _refused(
            f"the plan uses a {scan_type} scan; only Parquet, IPC, CSV, NDJSON and line "
            "scans of paths are allowed (Python scans need allow_python_udfs = true)"
        )
    args = _expect_map(scan["unified_scan_args"], "scan options", "cloud_options")
    _check_cloud_options(args.get("cloud_options"), allow_udfs)
    if args.get("deletion_files") is not None:
        raise _refused("the plan scans with deletion files, which pclease cannot check")
    glob = args.get("glob", True) is not False
    kind, sources = _variant(scan["sources"], "scan sources")
    if kind == "Buffers":
        return
    if kind != "Paths" or not isinstance(sources, list):
        raise _refused(
            f"the plan scans {kind} sources; only paths and in-memory buffers can be checked"
        )
    for source in sources:
        info.accesses.append(Access("read", _path_of(source, "scan source"), glob=glob))


def _check_sink(sink: Map, info: PlanInfo, allow_udfs: bool, *, is_root: bool) -> None:
    sink = _expect_map(sink, "Sink", "input", "payload")
    kind, payload = _variant(sink["payload"], "sink")
    if kind == "Memory" and payload is None:
        if is_root:
            info.collects = True
        return
    if kind not in ("File", "Partitioned"):
        if allow_udfs:
            return
        raise _refused(
            f"the plan ends in a {kind} sink; only file sinks are allowed (Python callback "
            "sinks need allow_python_udfs = true)"
        )
    payload = _expect_map(payload, f"{kind} sink", "file_format", "unified_sink_args")
    if kind == "File":
        path = _path_of(payload.get("target"), "sink target")
    else:
        path = _path_of(payload.get("base_path"), "partitioned sink's base path")
        if payload.get("file_path_provider") is not None and not allow_udfs:
            raise _refused(
                "the plan names its partition files with a Python function; the profile "
                "must set allow_python_udfs = true to run it"
            )
    args = _expect_map(payload["unified_sink_args"], "sink options", "cloud_options")
    _check_cloud_options(args.get("cloud_options"), allow_udfs)
    if args.get("sinked_paths_callback") is not None and not allow_udfs:
        raise _refused(
            "the plan reports sinked paths to a Python callback; the profile must set "
            "allow_python_udfs = true to run it"
        )
    fmt_name, fmt_options = _variant(payload["file_format"], "sink format")
    info.accesses.append(Access("write", path, is_output=is_root))
    if not is_root:
        return
    if fmt_name not in _SINK_FORMATS:
        raise _refused(f"the plan sinks to {fmt_name}; pclease runs Parquet, IPC, CSV, NDJSON")
    input_ref = sink["input"]
    if not (isinstance(input_ref, Map) and set(input_ref) == {"idx", "version"}):
        raise _refused("the plan's root sink does not refer to its input the way Polars does")
    span = payload["unified_sink_args"].spans.get("cloud_options")
    if args.get("cloud_options") is None:
        span = None
    info.output = OutputSink(
        kind="File" if kind == "File" else "Partitioned",
        path=path,
        format=_SINK_FORMATS[fmt_name],
        options=fmt_options if isinstance(fmt_options, Map) else Map(),
        cloud_options_span=span,
        input_ref=input_ref,
    )
    if path == IN_MEMORY_SINK and kind == "File":
        info.collects = True


# -- paths --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Roots:
    local: tuple[str, ...]
    uris: tuple[str, ...]
    denied: tuple[str, ...]
    shown: str

    @classmethod
    def of(cls, data_roots: tuple[str, ...], denied_paths: tuple[str, ...]) -> Roots:
        local = tuple(_real(r) for r in data_roots if r.startswith("/"))
        uris = tuple(r for r in data_roots if _cloud_scheme(r) is not None)
        denied = tuple(_real(d) for d in denied_paths if d.startswith("/"))
        return cls(local, uris, denied, ", ".join(data_roots))

    def outside(self, verb: str, shown: str) -> PlanError:
        if not self.shown:
            return _refused(
                f"the plan {verb} {shown}, but the profile has no data roots (data_roots), so "
                "its plans may not read or write files; use a profile that has them"
            )
        return _refused(
            f"the plan {verb} {shown}, outside the profile's data roots ({self.shown}); "
            "read and write only under those roots"
        )


def _real(path: str) -> str:
    # POSIX keeps a leading "//" through realpath; Linux treats it as "/".
    return "/" + os.path.realpath(path).lstrip("/")


def _cloud_scheme(path: str) -> str | None:
    match = _SCHEME.match(path)
    if match and path[match.end() : match.end() + 2] == "//":
        scheme = match.group(1)
        if scheme in CLOUD_SCHEMES:
            return scheme
    return None


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def check_access(
    info: PlanInfo,
    target: QueryTarget,
    data_roots: tuple[str, ...],
    denied_paths: tuple[str, ...],
) -> None:
    """Refuse the plan unless every path it touches is allowed and its output matches the
    query's target."""
    _check_target(info, target)
    roots = Roots.of(data_roots, denied_paths)
    for access in info.accesses:
        if access.path == IN_MEMORY_SINK and access.is_output and target is QueryTarget.COLLECT:
            continue
        _check_path(access, roots)


def _check_target(info: PlanInfo, target: QueryTarget) -> None:
    output = info.output
    if target is QueryTarget.COLLECT:
        if output is not None and output.path != IN_MEMORY_SINK:
            raise _refused(
                f"a collect query's plan must end in sink_*({IN_MEMORY_SINK!r}) or no sink, "
                f"but this one sinks to {output.path!r}; submit it as a "
                f"{output.format.value} sink instead"
            )
        return
    if output is None:
        raise _refused(
            f"a {target.value} query's plan must end in sink_{target.value}(path, lazy=True); "
            "this one has no file sink (submit it as collect instead)"
        )
    if output.path == IN_MEMORY_SINK:
        raise _refused(
            f"the plan sinks to {IN_MEMORY_SINK!r}, which only a collect query may do; "
            "sink to a path inside a data root"
        )
    if output.format is not target:
        raise _refused(
            f"the query's target is {target.value} but the plan sinks "
            f"{output.format.value}; make them agree"
        )


def _check_path(access: Access, roots: Roots) -> None:
    verb = "reads" if access.mode == "read" else "writes"
    path = access.path
    if path == IN_MEMORY_SINK:
        raise _refused(
            f"the plan {verb} {IN_MEMORY_SINK!r} somewhere other than a collect query's final sink"
        )
    if _cloud_scheme(path) is not None:
        _check_uri(path, verb, roots)
        return
    if _SCHEME.match(path) and path.lower().startswith("file:"):
        raise _refused(
            f"the plan {verb} {path!r}; use a plain absolute path instead of a file: URI"
        )
    if not path.startswith("/"):
        raise _refused(
            f"the plan {verb} {path!r}, a relative path; use an absolute path inside one of "
            f"the profile's data roots ({roots.shown or 'none'})"
        )
    _check_local(path, verb, access, roots)


def _check_uri(uri: str, verb: str, roots: Roots) -> None:
    rest = uri.split("://", 1)[1]
    segments = urllib.parse.unquote(rest).split("/")
    if "\\" in uri or any(s in (".", "..") for s in segments[1:]):
        raise _refused(f"the plan {verb} {uri!r}; URIs may not contain '.', '..' or '\\'")
    for root in roots.uris:
        if uri == root or uri.startswith(root if root.endswith("/") else root + "/"):
            return
    raise roots.outside(verb, repr(uri))


def _check_local(path: str, verb: str, access: Access, roots: Roots) -> None:
    is_glob = access.glob and access.mode == "read" and bool(_GLOB_CHARS.search(path))
    if is_glob:
        parts = path.split("/")
        first = next(i for i, p in enumerate(parts) if _GLOB_CHARS.search(p))
        if ".." in parts[first:]:
            raise _refused(f"the plan {verb} {path!r}; a glob pattern may not contain '..'")
        base = "/".join(parts[:first]) or "/"
    else:
        base = path
    resolved = _real(base)
    _check_resolved(path, resolved, verb, roots)
    if os.path.isdir(resolved):
        _check_tree(path, resolved, verb, roots)


def _check_resolved(path: str, resolved: str, verb: str, roots: Roots) -> None:
    shown = f"{path!r}" if resolved == path else f"{path!r} (which resolves to {resolved!r})"
    if not any(_inside(resolved, root) for root in roots.local):
        raise roots.outside(verb, shown)
    for denied in roots.denied:
        if _inside(resolved, denied):
            raise _refused(
                f"the plan {verb} {shown}, inside {denied!r}, which pclease keeps to itself; "
                "use another path"
            )


def _check_tree(path: str, directory: str, verb: str, roots: Roots) -> None:
    """A directory (or glob base) is read recursively: no denied path may lie inside it
    and no symlink in it may lead outside the roots."""
    for denied in roots.denied:
        if _inside(denied, directory):
            raise _refused(
                f"the plan {verb} {path!r}, which covers {denied!r}, a path pclease keeps to "
                "itself; name a narrower directory or pattern"
            )
    seen = 0
    for parent, dirnames, filenames in os.walk(directory):
        for name in (*dirnames, *filenames):
            seen += 1
            if seen > MAX_WALK_ENTRIES:
                raise _refused(
                    f"the plan {verb} {path!r}, which holds more than {MAX_WALK_ENTRIES} "
                    "entries to check; name a narrower directory or pattern"
                )
            entry = os.path.join(parent, name)
            if os.path.islink(entry):
                _check_resolved(entry, _real(entry), verb, roots)
