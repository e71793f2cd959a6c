"""Turn a LazyFrame and a target into the bytes and options a submission carries.

The plan is prepared exactly as Polars Cloud's own client does it: the sink is attached
lazily (``collect`` sinks to the placeholder ``"<in-memory>"``, which the service
redirects) and ``polars._utils.cloud.prepare_cloud_plan`` serializes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import polars as pl

Target = Literal["collect", "parquet", "csv", "ipc", "ndjson"]
Engine = Literal["auto", "streaming", "in-memory"]
ShuffleCompression = Literal["auto", "uncompressed", "lz4", "zstd"]
ShuffleFormat = Literal["auto", "ipc", "parquet"]
SingleWorkerOps = Literal["auto", "allow", "forbid"]
IN_MEMORY_SINK = "<in-memory>"


@dataclass(frozen=True)
class Submission:
    plan: bytes
    options: dict[str, Any] = field(default_factory=dict)


def build_submission(
    lf: pl.LazyFrame,
    target: Target,
    destination: str | None = None,
    *,
    storage_options: Mapping[str, str] | None = None,
    engine: Engine = "auto",
    labels: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
    sink_options: Mapping[str, Any] | None = None,
    distributed: bool | Mapping[str, Any] | None = None,
) -> Submission:
    """Attach the sink for ``target`` to ``lf`` and serialize it for the service.

    ``storage_options`` (object-store credentials) travel inside the plan, as they do to
    Polars Cloud, and are never part of the options the service records. Scans that take
    ``storage_options`` need ``credential_provider=None`` too, for the same reason.

    ``distributed``: None lets the lease's profile decide, False runs on one node, True or
    settings (``min_workers``, ``shuffle_format``, ...) on Polars Cloud's distributed
    engine.
    """
    if distributed is not None and distributed is not False and engine == "in-memory":
        raise ValueError("engine 'in-memory' cannot run distributed queries")
    import polars as pl
    from polars._utils.cloud import prepare_cloud_plan

    extra = dict(sink_options or {})
    if target == "collect":
        if destination:
            raise ValueError("collect has no destination; use a sink target to write files")
        sunk = lf.sink_parquet(IN_MEMORY_SINK, lazy=True)
    else:
        if not destination:
            raise ValueError(f"a {target} sink needs a destination path or URI")
        sink = {
            "parquet": lf.sink_parquet,
            "csv": lf.sink_csv,
            "ipc": lf.sink_ipc,
            "ndjson": lf.sink_ndjson,
        }.get(target)
        if sink is None:
            raise ValueError(f"unknown target {target!r}; use collect, parquet, csv, ipc, ndjson")
        # credential_provider=None: Polars' default ("auto") would be pickled into the
        # plan, and pclease refuses plans that carry pickled Python.
        extra.setdefault("credential_provider", None)
        sunk = sink(  # type: ignore[operator]
            destination, storage_options=dict(storage_options or {}) or None, lazy=True, **extra
        )
    prepared = prepare_cloud_plan(sunk)
    plan = prepared[0] if isinstance(prepared, tuple) else prepared
    options: dict[str, Any] = {
        "target": target,
        "engine": engine,
        "labels": dict(labels or {}),
        "polars_version": pl.__version__,
    }
    if destination:
        options["destination"] = destination
    if timeout_s is not None:
        options["timeout_s"] = timeout_s
    if distributed is not None:
        options["distributed"] = distributed if isinstance(distributed, bool) else dict(distributed)
    return Submission(plan=plan, options=options)
