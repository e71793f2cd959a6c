"""An executor: a child of a local worker that runs queries, one at a time.

``python -m pclease_service.backends.local_worker --executor-fd FD`` imports Polars, warms
up, caps its own address space at ``RLIMIT_AS = baseline + memory_gb`` and then answers
queries on FD. Plans are only ever read here, so a plan that blows the limit (or crashes
Polars) kills a process that the worker simply replaces.

Before Polars deserializes a plan, the plan pipeline (:func:`pclease_service.plans.check.
check_plan`) runs here, against this process's Polars: the version rule, pickled Python,
native plugins, and paths outside the data roots are all refused without running any of
the plan. A ``collect`` plan (one that sinks to ``"<in-memory>"``, or has no sink) is
re-rooted at the sink's input, collected with the query's engine and written as Arrow IPC
to ``result_path``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from types import ModuleType
from typing import Any

from pclease_service.backends.local_wire import Json, error_reply, recv_json, send_json
from pclease_service.errors import PlanRefused
from pclease_service.plans.check import Reader, check_plan
from pclease_service.plans.guard import OutputSink, PlanInfo, rescan
from pclease_service.plans.header import PlanHeader, read_header
from pclease_service.plans.targets import IN_MEMORY_SINK, QueryTarget

# Polars' messages end with the whole plan ("Resolved plan until failure: ..."); the type
# and first lines say what went wrong.
ERROR_MESSAGE_MAX_CHARS = 2000

# Messages Polars, Rust or libc produce when an allocation fails under RLIMIT_AS.
_OOM_MARKERS = (
    "memory allocation of",
    "cannot allocate memory",
    "out of memory",
    "os error 12",
    "failed to spawn thread",
    "memoryerror",
)
log = logging.getLogger("pclease.local_worker")


def memory_error_message(memory_gb: float | None, shared_by: int = 1) -> str:
    limit = f"{memory_gb:g} GB" if memory_gb else "the machine's memory"
    if memory_gb and shared_by > 1:
        return (
            f"query exceeded its memory limit of {limit} (the profile's memory_gb shared by "
            f"its {shared_by} concurrent_queries); use a larger profile, fewer "
            "concurrent_queries, or sink instead of collect"
        )
    return (
        f"query exceeded the profile's memory limit of {limit} (memory_gb); "
        "use a larger profile or sink instead of collect"
    )


def looks_like_oom(text: str) -> bool:
    lowered = text.lower()
    return any(marker in lowered for marker in _OOM_MARKERS)


def _vm_size_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    match = re.search(r"^VmSize:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


class QueryError(Exception):
    """A query ended (or was refused) without a result; ``type`` is the outcome's error
    type. Raised and answered inside the worker and its executor only."""

    def __init__(self, type: str, message: str) -> None:
        super().__init__(f"{type}: {message}")
        self.type = type
        self.message = message


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _polars_message(exc: BaseException) -> str:
    text = str(exc).split("\n\nResolved plan until failure")[0].strip()
    return text[:ERROR_MESSAGE_MAX_CHARS]


def _deserialize(pl: ModuleType, plan: bytes) -> Any:
    try:
        return pl.LazyFrame.deserialize(io.BytesIO(plan), format="binary")
    except Exception as exc:
        message = _polars_message(exc)
        if "is not compatible with this Polars version" in message:
            raise QueryError("PlanVersionMismatch", message) from exc
        raise QueryError("PlanInvalid", f"Polars cannot read the plan: {message}") from exc


def _write_result(frame: Any, path: str, max_bytes: int) -> Json:
    too_large = (
        "the result is {size}, more than this service returns ({limit}, max_result_bytes); "
        "sink it to a file in a data root instead (sink_parquet), or reduce it"
    )
    if frame.estimated_size() > max_bytes:
        raise QueryError(
            "ResultTooLarge",
            too_large.format(size=f"about {_size(frame.estimated_size())}", limit=_size(max_bytes)),
        )
    partial = f"{path}.partial"
    try:
        frame.write_ipc(partial)
        size = os.path.getsize(partial)
        if size > max_bytes:
            raise QueryError(
                "ResultTooLarge", too_large.format(size=_size(size), limit=_size(max_bytes))
            )
        os.replace(partial, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
    return {"ok": True, "rows": frame.height, "result_bytes": size, "output": path}


_COUNT_PLACEHOLDER = "/pclease-count-placeholder"


def _count_template(pl: ModuleType, output: OutputSink) -> bytes | None:
    """A plan counting the rows of a file like the output (its path is replaced later)."""
    options = output.options
    compression = options.get("compression")
    if output.format is QueryTarget.PARQUET:
        lf = pl.scan_parquet(_COUNT_PLACEHOLDER, glob=False)
    elif output.format is QueryTarget.IPC:
        lf = pl.scan_ipc(_COUNT_PLACEHOLDER, glob=False)
    elif output.format is QueryTarget.NDJSON and compression in (None, "Uncompressed"):
        lf = pl.scan_ndjson(_COUNT_PLACEHOLDER)
    elif output.format is QueryTarget.CSV and compression in (None, "Uncompressed"):
        csv = options.get("serialize_options")
        if not isinstance(csv, dict) or csv.get("line_terminator") not in ("\n", "\r\n"):
            return None
        quote = csv.get("quote_char")
        lf = pl.scan_csv(
            _COUNT_PLACEHOLDER,
            has_header=bool(options.get("include_header", True)),
            separator=chr(csv.get("separator", 44)),
            quote_char=chr(quote) if quote else None,
            glob=False,
        )
    else:
        return None
    data: bytes = lf.select(pl.len()).serialize()
    return data


def _count_rows(pl: ModuleType, info: PlanInfo) -> int | None:
    """Rows in the single file a sink wrote, read back from its footer or lines; None when
    that cannot be done cheaply (partitioned or compressed output)."""
    output = info.output
    if output is None or output.kind != "File":
        return None
    try:
        template = _count_template(pl, output)
        if template is None:
            return None
        plan = rescan(template, output.path, info.output_cloud_options())
        return int(_deserialize(pl, plan).collect().item())
    except Exception as exc:
        log.info("could not count the rows of %s: %s", output.path, exc)
        return None


def _run_query(pl: ModuleType, reader: Reader, request: Json, plan: bytes) -> Json:
    target = QueryTarget(request["target"])
    info = check_plan(
        plan,
        reader=reader,
        target=target,
        allow_python_udfs=bool(request["allow_python_udfs"]),
        data_roots=tuple(request["data_roots"]),
        denied_paths=tuple(request["denied_paths"]),
    )
    engine = request["engine"]
    if target is QueryTarget.COLLECT:
        path = request["result_path"]
        try:
            frame = _deserialize(pl, info.without_output_sink()).collect(engine=engine)
            return _write_result(frame, path, int(request["max_result_bytes"]))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
    assert info.output is not None  # check_access refuses sink queries without one
    _deserialize(pl, plan).collect(engine=engine)
    path = info.output.path
    size = os.path.getsize(path) if path.startswith("/") and os.path.isfile(path) else None
    return {"ok": True, "rows": _count_rows(pl, info), "result_bytes": size, "output": path}


def _answer(
    pl: ModuleType,
    reader: Reader,
    request: Json,
    plan: bytes,
    memory_gb: float | None,
    shared_by: int = 1,
) -> Json:
    message = memory_error_message(memory_gb, shared_by)
    oom = {**error_reply("MemoryLimitExceeded", message), "recycle": True}
    try:
        return _run_query(pl, reader, request, plan)
    except PlanRefused as exc:
        return error_reply(exc.error_type, exc.message)
    except QueryError as exc:
        return error_reply(exc.type, exc.message)
    except MemoryError:
        return oom
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # Polars' PanicException derives from BaseException
        text = f"{type(exc).__name__}: {exc}"
        if memory_gb and looks_like_oom(text):
            return oom
        return error_reply(type(exc).__name__, _polars_message(exc))


def _warm_up(pl: ModuleType, reader: Reader) -> None:
    # Touch what most queries touch (the plan checks, both engines, a Parquet scan and sink,
    # an IPC result) so that Polars' thread pools and allocator arenas exist before the
    # baseline address space is measured.
    with tempfile.TemporaryDirectory(prefix="pclease-warmup-") as tmp:
        source = Path(tmp) / "warmup.parquet"
        pl.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "x"]}).write_parquet(source)
        query = pl.scan_parquet(source).group_by("b").agg(pl.col("a").sum()).sort("b")
        request: Json = {
            "target": QueryTarget.COLLECT.value,
            "result_path": str(Path(tmp) / "warmup.arrow"),
            "engine": "auto",
            "max_result_bytes": 1 << 20,
            "allow_python_udfs": False,
            "data_roots": [tmp],
            "denied_paths": [],
        }
        _run_query(pl, reader, request, query.sink_parquet(IN_MEMORY_SINK, lazy=True).serialize())
        request |= {"target": QueryTarget.PARQUET.value, "engine": "streaming"}
        sink = query.sink_parquet(Path(tmp) / "out.parquet", lazy=True)
        _run_query(pl, reader, request, sink.serialize())


def _exit_when_orphaned(parent_pid: int) -> None:
    # A query can run for a long time without reading from the worker; this is how the
    # executor notices that its worker was SIGKILLed meanwhile.
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(0)


def _own_header(pl: ModuleType) -> PlanHeader:
    return read_header(pl.LazyFrame().serialize())


def executor_main(fd: int, memory_gb: float | None, shared_by: int = 1) -> int:
    conn = Connection(fd)
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    import resource

    import polars as pl

    reader = Reader(_own_header(pl), pl.__version__)
    _warm_up(pl, reader)
    baseline = _vm_size_bytes()
    limit = None
    if memory_gb:
        # RLIMIT_AS counts address space, and Polars' runtime alone reserves ~1 GB of it
        # with few pages resident, so the query's budget sits on top of that baseline.
        limit = baseline + int(memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    send_json(
        conn, {"ready": True, "pid": os.getpid(), "baseline_bytes": baseline, "limit_bytes": limit}
    )
    while True:
        try:
            request = recv_json(conn)
            plan = conn.recv_bytes()
        except EOFError:
            return 0
        reply = _answer(pl, reader, request, plan, memory_gb, shared_by)
        send_json(conn, reply)
        if reply.get("recycle"):
            return 0
