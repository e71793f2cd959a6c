"""What a serialized Polars plan would do, found out before Polars reads it.

Plans are untrusted input: a plan may scan any file the executor can open, sink anywhere it
can write, load a native plugin, and carry pickled Python (UDFs, callbacks, IO plugins,
credential providers) that runs when Polars reads the plan. Only expression UDFs carry the
``PLPYFN`` marker; the rest are bare pickles, so a search for the marker is not enough. This
module reads the plan bytes itself (pure Python, no Polars import, nothing executed), so a
plan is refused before any of it runs. The MessagePack value after the header is::

    {"root": {"idx", "version"}, "dataframes": [...], "dsl_plans": [{"value": node, ...}]}

Plan nodes are maps with one key, the variant name (``{"Scan": {...}}``); shared nodes live in
the ``dsl_plans`` arena and are referenced by index. The guard decodes the whole value and
walks *every* map in it, wherever it sits (plans nest inside unions, sinks, expressions), so
every ``Scan``, ``Sink``, ``PythonScan`` and native plugin is found. It fails closed: map keys
that are not strings (serde would accept field indices), a known node that is not in the
exact shape Polars writes, a source or sink kind it does not know, or a DSL schema it was not
verified against are all refused. ``VERIFIED_SCHEMA_HASHES`` pins the schemas this walk was
checked against; a Polars upgrade must add its hash here after checking the new schema.

What the walk finds (:class:`PlanInfo`: paths read and written, the output sink) is checked
against a profile's data roots in :mod:`pclease_service.plans.access`.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from pclease_service.errors import PlanRefusal, PlanRefused
from pclease_service.plans.header import HEADER_LEN, PlanHeader, read_header
from pclease_service.plans.messagepack import (
    Blob,
    Map,
    byte_run_values,
    decode,
    encode_path_sources,
    encode_ref,
)
from pclease_service.plans.targets import IN_MEMORY_SINK, QueryTarget

PYTHON_UDF_MARKER = b"PLPYFN"

#: DSL schema hashes whose plans this module's walk was checked against (polars 2.0.0).
VERIFIED_SCHEMA_HASHES = frozenset(
    {"dd13fd0271a06799ac92d2b87b196660f19f2ff5d3ca3e16edb09eed5c51de68"}
)

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


def _refused(message: str) -> PlanRefused:
    return PlanRefused(PlanRefusal.REFUSED, message)


def _invalid(message: str) -> PlanRefused:
    return PlanRefused(PlanRefusal.INVALID, message)


def refuse_python_udfs(plan: bytes, allowed: bool) -> None:
    """Refuse a plan that carries the marker of pickled Python functions (which run when
    Polars reads the plan), unless the profile allows them."""
    if not allowed and PYTHON_UDF_MARKER in plan:
        raise PlanRefused(
            PlanRefusal.PYTHON_UDF,
            "the plan contains a Python function (map_elements, map_batches, a UDF); "
            "running it would unpickle code, so this profile refuses it. Express it with "
            "Polars expressions, or ask an operator to set allow_python_udfs = true on the "
            "profile",
        )


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
        return payload[blob.start : blob.stop]
    return byte_run_values(payload, blob.start, blob.stop)


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
