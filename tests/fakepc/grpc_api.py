"""The gRPC half of the fake: ``ClientService`` SubmitQuery / GetQueryResult on raw bytes."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc

from tests.fakepc import plans, protowire
from tests.fakepc.control import Call, ControlPlane, NotFound, Unavailable
from tests.fakepc.tokens import bearer_of

SERVICE = "polars_cloud.control_plane.client.v1.ClientService"

_HTTP_EQUIVALENT = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.UNIMPLEMENTED: 501,
}


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _ids(raw: bytes | None) -> str | None:
    """``{1: id string}``, the shape every id travels in."""
    return None if raw is None else protowire.first_str(protowire.decode(raw), 1)


class ClientService(grpc.GenericRpcHandler):  # type: ignore[misc]
    def __init__(self, plane: ControlPlane) -> None:
        self._plane = plane
        self._methods: dict[str, Callable[[bytes, str], bytes]] = {
            f"/{SERVICE}/SubmitQuery": self._submit_query,
            f"/{SERVICE}/GetQueryResult": self._get_query_result,
        }

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method
        metadata = dict(handler_call_details.invocation_metadata or ())
        bearer = bearer_of(metadata.get("authorization"))

        def behaviour(request: bytes, context: grpc.ServicerContext) -> bytes:
            code = grpc.StatusCode.OK
            try:
                claims = self._plane.auth.verify(bearer)
                if claims is None:
                    raise _Abort(grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token")
                impl = self._methods.get(method)
                if impl is None:
                    raise _Abort(grpc.StatusCode.UNIMPLEMENTED, f"fakepc: no {method}")
                return impl(request, str(claims.get("sub")))
            except _Abort as exc:
                code = exc.code
                context.abort(exc.code, exc.message)
                raise  # abort raises; this line is never reached
            finally:
                self._plane.record(Call("POST", method, bearer, _HTTP_EQUIVALENT.get(code, 500)))

        return grpc.unary_unary_rpc_method_handler(behaviour)

    def _submit_query(self, request: bytes, user_id: str) -> bytes:
        fields = protowire.decode(request)
        compute_id = _ids(protowire.first_bytes(fields, 1))
        plan = protowire.first_bytes(fields, 3)
        if compute_id is None or plan is None:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "compute id and plan are required")
        labels = _labels(protowire.first_bytes(fields, 4))
        settings = query_settings(protowire.first_bytes(fields, 2) or b"")
        try:
            q = self._plane.submit_query(user_id, compute_id, plan, labels, settings)
        except NotFound as exc:
            raise _Abort(grpc.StatusCode.NOT_FOUND, str(exc)) from None
        except Unavailable as exc:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None
        if self._plane.hang_submit_answers_s:
            time.sleep(self._plane.hang_submit_answers_s)
        return protowire.encode([(1, [(1, q.id)])])

    def _get_query_result(self, request: bytes, user_id: str) -> bytes:
        query_id = _ids(protowire.first_bytes(protowire.decode(request), 1))
        if query_id is None:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "query id is required")
        try:
            q = self._plane.query_result(query_id)
        except NotFound as exc:
            raise _Abort(grpc.StatusCode.NOT_FOUND, str(exc)) from None
        result: list[tuple[int, Any]] = [
            (1, 1),
            (2, 1 if q.status == "Success" else 0),
            (3, 1 if q.status == "Failed" else 0),
        ]
        result += [(4, [(1, e)]) for e in self._plane.result_errors(q)]
        output: list[tuple[int, Any]] = [(1, [(1, uri)]) for uri in q.uris]
        output.append((2, plans.FILE_TYPES.get(q.file_type or "", ("", 1))[1]))
        if q.n_rows is not None:
            output.append((3, q.n_rows))
        result.append((5, output))
        return protowire.encode([(1, result)])


def _labels(raw: bytes | None) -> list[str]:
    """SubmitQuery field 4: ``{1: repeated {1: label string}}``; empty without labels."""
    if not raw:
        return []
    labels = []
    for entry in protowire.decode(raw).get(1, []):
        if isinstance(entry, bytes) and (label := protowire.first_str(protowire.decode(entry), 1)):
            labels.append(label)
    return labels


_ENGINES = {1: "auto", 2: "streaming", 3: "in-memory"}
_SHUFFLE_FORMATS = {1: "auto", 2: "ipc", 3: "parquet"}
_SHUFFLE_COMPRESSIONS = {1: "auto", 2: "lz4", 3: "zstd", 4: "uncompressed"}
_SINGLE_WORKER_OPS = {1: "auto", 2: "allow", 3: "forbid"}
_PLANNERS = {1: "auto", 2: "naive", 3: "miso"}


def _int(fields: dict[int, list[int | bytes]], number: int) -> int | None:
    values = fields.get(number)
    return values[0] if values and isinstance(values[0], int) else None


def query_settings(raw: bytes) -> dict[str, Any]:
    """SubmitQuery field 2, the query settings, read the way they were observed with
    polars-cloud 0.12.0 (``serialize_query_settings``): 1 engine enum; one of 2 (empty:
    single node) or 4 (distributed: 1 shuffle {1 format, 2 compression, 3 level},
    2 sort_partitioned, 3 pre_aggregation, 4 equi_join_broadcast_limit,
    5 partitions_per_worker, 8 single_worker_ops, 9 expression_lowering, 10 planner);
    9 workers {1 min, 2 max}. Unknown enum values come back as ``"?N"``."""
    fields = protowire.decode(raw)
    settings: dict[str, Any] = {
        "engine": _ENGINES.get(_int(fields, 1) or 0, f"?{_int(fields, 1)}"),
        "mode": "single-node",
    }
    workers = protowire.decode(protowire.first_bytes(fields, 9) or b"")
    settings["min_workers"] = _int(workers, 1)
    settings["max_workers"] = _int(workers, 2)
    distributed = protowire.first_bytes(fields, 4)
    if distributed is None:
        return settings
    d = protowire.decode(distributed)
    shuffle = protowire.decode(protowire.first_bytes(d, 1) or b"")
    lowering = _int(d, 9)
    settings |= {
        "mode": "distributed",
        "shuffle_format": _SHUFFLE_FORMATS.get(_int(shuffle, 1) or 0, f"?{_int(shuffle, 1)}"),
        "shuffle_compression": _SHUFFLE_COMPRESSIONS.get(
            _int(shuffle, 2) or 0, f"?{_int(shuffle, 2)}"
        ),
        "shuffle_compression_level": _int(shuffle, 3),
        "sort_partitioned": bool(_int(d, 2)),
        "pre_aggregation": bool(_int(d, 3)),
        "equi_join_broadcast_limit": _int(d, 4) or 0,
        "partitions_per_worker": _int(d, 5),
        "single_worker_ops": _SINGLE_WORKER_OPS.get(_int(d, 8) or 0, f"?{_int(d, 8)}"),
        "expression_lowering": None if lowering is None else bool(lowering),
        "planner": _PLANNERS.get(_int(d, 10) or 0, f"?{_int(d, 10)}"),
    }
    return settings


def serve(plane: ControlPlane) -> tuple[grpc.Server, int]:
    """A grpcio server on a free loopback port; the front splices HTTP/2 connections to it."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="fakepc-grpc"),
        handlers=[ClientService(plane)],
        options=[("grpc.max_receive_message_length", 256 * 1024 * 1024)],
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port
