"""The fake control plane's state: workspace, computes, queries, failure knobs.

Transport-free: ``rest.py`` and ``grpc_api.py`` translate wire calls into these methods, and
the JSON shapes the client's serde models expect are built here.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from tests.fakepc import plans
from tests.fakepc.tokens import TokenAuthority

LIVE = ("Starting", "Idle", "Running")
DONE = ("Success", "Failed", "Canceled")


class NotFound(Exception):
    pass


class Unavailable(Exception):
    """A compute that cannot take queries (not Running/Idle)."""


@dataclass(frozen=True)
class Call:
    """One REST or gRPC call as it reached the fake.

    ``status`` is the HTTP status for REST; for gRPC it is 200 for OK, else the HTTP
    equivalent of the gRPC code (401 UNAUTHENTICATED, 404 NOT_FOUND, 409
    FAILED_PRECONDITION, 400 INVALID_ARGUMENT, 501 UNIMPLEMENTED).
    """

    method: str
    path: str
    bearer: str | None
    status: int


def _now() -> datetime:
    return datetime.now(UTC)


now = _now


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat().replace("+00:00", "Z")


def labels_to_dict(labels: list[str]) -> dict[str, str]:
    """Polars Cloud labels are plain strings; ``key=value`` (or ``key:value``) become pairs."""
    out: dict[str, str] = {}
    for label in labels:
        for sep in ("=", ":"):
            if sep in label:
                key, _, value = label.partition(sep)
                out[key] = value
                break
        else:
            out[label] = ""
    return out


@dataclass
class Compute:
    id: str
    workspace_id: str
    user_id: str
    body: dict[str, Any]
    labels: list[str]
    request_time: datetime
    ready_at: float  # monotonic; Starting ends here
    ends_failed: bool
    status: str = "Starting"
    stop_at: float | None = None  # monotonic; Stopping ends here
    termination: dict[str, Any] | None = None
    updated_at: datetime = field(default_factory=_now)
    name: str | None = None  # the manifest it was started from

    @property
    def specs(self) -> dict[str, Any]:
        specs = self.body.get("specs")
        return specs if isinstance(specs, dict) else {}


@dataclass
class Query:
    id: str
    compute_id: str
    workspace_id: str
    user_id: str
    plan: bytes
    labels: list[str]
    request_time: datetime
    status: str = "Queued"
    status_time: datetime = field(default_factory=_now)
    started_at: datetime | None = None
    ended_at: datetime | None = None
    uris: list[str] = field(default_factory=list)
    file_type: str | None = None  # plan spelling, see plans.FILE_TYPES
    n_rows: int | None = None
    error: str | None = None  # "PolarsErrorClass: message"
    settings: dict[str, Any] = field(default_factory=dict)  # grpc_api.query_settings
    cancel: threading.Event = field(default_factory=threading.Event)
    handle: Any = None  # polars InProcessQuery while executing


class ControlPlane:
    """Everything the fake knows, behind one lock. Knobs are plain attributes."""

    def __init__(
        self,
        *,
        client_id: str,
        client_secret: str,
        workspace: str = "pclease-ws",
        data_dir: Path,
        token_ttl_s: int = 3600,
    ) -> None:
        self._lock = threading.RLock()
        self.auth = TokenAuthority(client_id, client_secret, token_ttl_s)
        self.workspace_name = workspace
        self.workspace_id = str(uuid.uuid4())
        self.organization_id = str(uuid.uuid4())
        self.creator_id = str(uuid.uuid4())
        self.created_at = _now()
        self.data_dir = Path(data_dir)
        self.results_dir = self.data_dir / "results"
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self._computes: dict[str, Compute] = {}
        self._queries: dict[str, Query] = {}
        self._calls: list[Call] = []
        self._burst: list[int] = []
        self._threads: list[threading.Thread] = []
        self._credentials = (client_id, client_secret)
        # failure knobs (their defaults are in KNOBS)
        self.start_delay_s = 0.0
        self.stop_delay_s = 0.0
        self.fail_starts = 0
        self.lose_start_answers = 0
        self.hang_start_answers_s = 0.0
        self.start_ends_failed = False
        self.fail_stops = 0
        self.query_error: str | None = None
        self.query_delay_s = 0.0
        self.hang_submit_answers_s = 0.0
        # Imported here: the manifests module builds on this one.
        from tests.fakepc.manifests import Manifests

        self.manifests = Manifests(self)

    #: Every failure knob and its default.
    KNOBS: ClassVar[dict[str, Any]] = {
        "start_delay_s": 0.0,
        "stop_delay_s": 0.0,
        "fail_starts": 0,
        "lose_start_answers": 0,
        "hang_start_answers_s": 0.0,
        "start_ends_failed": False,
        "fail_stops": 0,
        "query_error": None,
        "query_delay_s": 0.0,
        "hang_submit_answers_s": 0.0,
    }

    def reset(self, **knobs: Any) -> None:
        """Every knob back to its default (``knobs`` overrides some), no pending error
        burst, the credentials the fake was made with, no running compute and no
        manifest."""
        unknown = set(knobs) - set(self.KNOBS)
        if unknown:
            raise TypeError(f"unknown knob(s) {sorted(unknown)}; known: {sorted(self.KNOBS)}")
        with self._lock:
            for knob, value in {**self.KNOBS, **knobs}.items():
                setattr(self, knob, value)
            self._burst.clear()
        client_id, client_secret = self._credentials
        self.rotate(client_secret, client_id)
        for compute in self.running():
            self.stop_compute(compute["workspace_id"], compute["id"])
        self.manifests.clear()

    # knobs and bookkeeping ------------------------------------------------------------

    def error_burst(self, n: int, status: int = 503) -> None:
        """The next ``n`` REST calls (except the token endpoint) answer ``status``."""
        with self._lock:
            self._burst.extend([status] * n)

    def take_burst(self) -> int | None:
        with self._lock:
            return self._burst.pop(0) if self._burst else None

    def take_fail_start(self) -> bool:
        with self._lock:
            if self.fail_starts > 0:
                self.fail_starts -= 1
                return True
            return False

    def take_lost_start(self) -> bool:
        """Whether to create the next compute but answer its start with a 500."""
        with self._lock:
            if self.lose_start_answers > 0:
                self.lose_start_answers -= 1
                return True
            return False

    def take_fail_stop(self) -> bool:
        with self._lock:
            if self.fail_stops > 0:
                self.fail_stops -= 1
                return True
            return False

    def record(self, call: Call) -> None:
        with self._lock:
            self._calls.append(call)

    @property
    def calls(self) -> list[Call]:
        with self._lock:
            return list(self._calls)

    @property
    def tokens_issued(self) -> int:
        return self.auth.issued

    def rotate(self, client_secret: str, client_id: str | None = None) -> None:
        """New credentials; tokens already issued stay valid."""
        self.auth.rotate(client_secret, client_id)

    def revoke_tokens(self) -> None:
        """Every token issued so far is rejected from now on."""
        self.auth.revoke_all()

    # workspace / organization / user ------------------------------------------------

    def workspace_json(self) -> dict[str, Any]:
        return {
            "id": self.workspace_id,
            "organization_id": self.organization_id,
            "name": self.workspace_name,
            "description": "pclease test workspace",
            "deployment": "Aws",
            "creator_id": self.creator_id,
            "status": "Active",
            "idle_timeout_mins": 60,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.created_at),
            "deleted_at": None,
        }

    def organization_json(self) -> dict[str, Any]:
        return {
            "id": self.organization_id,
            "name": "pclease-org",
            "description": "",
            "avatar_url": None,
            "creator_id": self.creator_id,
            "subscription_state": "Subscribed",
            "trial_started_at": None,
            "trial_expires_at": None,
            "tier": "PayAsYouGo",
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.created_at),
            "deleted_at": None,
        }

    def user_json(self, user_id: str) -> dict[str, Any]:
        return {
            "id": user_id,
            "first_name": None,
            "last_name": None,
            "email": None,
            "avatar_url": None,
            "default_workspace_id": self.workspace_id,
            "newsletter_updates": False,
            "personal_emails": False,
        }

    # computes -------------------------------------------------------------------------

    def _advance(self, c: Compute) -> None:
        now = time.monotonic()
        if c.status == "Starting" and now >= c.ready_at:
            if c.ends_failed:
                self._terminate(c, "Failed", "Failed", "fake: the compute failed to start")
            else:
                c.status = "Running"
                c.updated_at = _now()
        if c.status == "Stopping" and c.stop_at is not None and now >= c.stop_at:
            c.status = "Stopped"
            c.updated_at = _now()

    def _terminate(self, c: Compute, status: str, reason: str, message: str | None) -> None:
        c.status = status
        c.updated_at = _now()
        c.termination = {
            "termination_reason": reason,
            "termination_time": _iso(c.updated_at),
            "termination_message": message,
        }
        for q in self._queries.values():
            if q.compute_id == c.id and q.status not in DONE:
                self._finish(q, "Failed", f"ComputeError: compute {c.id} is {status.lower()}")
                q.cancel.set()

    def _compute(self, workspace_id: str, compute_id: str) -> Compute:
        c = self._computes.get(compute_id)
        if c is None or c.workspace_id != workspace_id:
            raise NotFound(f"compute {compute_id} not found")
        self._advance(c)
        return c

    def start_compute(
        self, workspace_id: str, user_id: str, body: dict[str, Any], *, name: str | None = None
    ) -> Compute:
        labels = body.get("labels") or []
        c = Compute(
            id=str(uuid.uuid4()),
            workspace_id=workspace_id,
            user_id=user_id,
            body=body,
            labels=[str(x) for x in labels] if isinstance(labels, list) else [str(labels)],
            request_time=_now(),
            ready_at=time.monotonic() + self.start_delay_s,
            ends_failed=self.start_ends_failed,
            name=name,
        )
        with self._lock:
            self._computes[c.id] = c
            self._advance(c)
        return c

    def get_compute(self, workspace_id: str, compute_id: str) -> dict[str, Any]:
        with self._lock:
            return self.compute_json(self._compute(workspace_id, compute_id))

    def list_computes(self, workspace_id: str, statuses: set[str] | None) -> list[dict[str, Any]]:
        with self._lock:
            out = []
            for c in self._computes.values():
                if c.workspace_id != workspace_id:
                    continue
                self._advance(c)
                if statuses is None or c.status in statuses:
                    out.append(self.compute_json(c))
            return out

    def stop_compute(self, workspace_id: str, compute_id: str) -> None:
        with self._lock:
            c = self._compute(workspace_id, compute_id)
            if c.status in ("Stopping", "Stopped", "Failed"):
                return
            self._terminate(c, "Stopping", "StoppedByUser", None)
            c.stop_at = time.monotonic() + self.stop_delay_s
            self._advance(c)

    def fail_compute(self, compute_id: str, message: str = "fake: compute failed") -> None:
        """A live compute becomes Failed, and its unfinished queries fail with it."""
        with self._lock:
            c = self._computes[compute_id]
            self._advance(c)
            if c.status not in LIVE:
                raise ValueError(f"compute {compute_id} is {c.status}, not live")
            self._terminate(c, "Failed", "Failed", message)

    def label_id(self, label: str) -> str:
        """A stable id per label name in this workspace, like the label objects upstream."""
        return str(uuid.uuid5(uuid.UUID(self.workspace_id), label))

    def compute_json(self, c: Compute) -> dict[str, Any]:
        specs = c.specs
        cpus = specs.get("cpus")
        ram_gb = specs.get("ram_gb")
        arch = specs.get("cpu_architectures")
        return {
            "id": c.id,
            "user_id": c.user_id,
            "workspace_id": c.workspace_id,
            "name": c.name,
            "instance_type": c.body.get("instance_type"),
            "cpu_architectures": arch,
            "req_ram_gb": ram_gb,
            "ram_mib": ram_gb * 1024 if isinstance(ram_gb, int) else None,
            "req_cpu_cores": cpus,
            "vcpus": cpus,
            "req_storage": c.body.get("storage"),
            "big_instance_type": c.body.get("big_instance_type"),
            "req_big_instance_multiplier": specs.get("multiplier"),
            "req_big_instance_storage": c.body.get("big_instance_storage"),
            "cluster_size": c.body.get("cluster_size", 1),
            "termination": c.termination,
            "gc_inactive_hours": 24,
            "request_time": _iso(c.request_time),
            "mode": c.body.get("mode") or "Proxy",
            "deployment_type": "Aws",
            "log_level": c.body.get("log_level") or "Info",
            "polars_version": c.body.get("polars_version") or "2.0.0",
            "compute_plane_version": None,
            "tunnel_addr": None,
            "last_heartbeat_time": _iso(c.updated_at) if c.status in LIVE else None,
            # The real model carries label ids, not names; the Python client exposes neither.
            "label_ids": [self.label_id(label) for label in c.labels],
            "created_at": _iso(c.request_time),
            "updated_at": _iso(c.updated_at),
            "deleted_at": None,
            "status": c.status,
            "connection_status": "Connected" if c.status in LIVE else "Unconnected",
        }

    def computes(self) -> list[dict[str, Any]]:
        """Every compute ever started, with what the fake understood of its request."""
        with self._lock:
            out = []
            for c in self._computes.values():
                self._advance(c)
                specs = c.specs
                out.append(
                    {
                        "id": c.id,
                        "name": c.name,
                        "status": c.status,
                        "labels": labels_to_dict(c.labels),
                        "label_list": list(c.labels),
                        "cpus": specs.get("cpus"),
                        "ram_gb": specs.get("ram_gb"),
                        "cluster_size": c.body.get("cluster_size"),
                        "instance_type": c.body.get("instance_type"),
                        "storage": c.body.get("storage"),
                        "idle_timeout_mins": c.body.get("idle_timeout_mins"),
                        "requirements_txt": c.body.get("requirements_txt"),
                        "env_vars": dict(c.body.get("env_vars") or {}),
                        "mode": c.body.get("mode"),
                        "workspace_id": c.workspace_id,
                        "termination": dict(c.termination) if c.termination else None,
                        "body": json.loads(json.dumps(c.body)),
                    }
                )
            return out

    def running(self) -> list[dict[str, Any]]:
        """Computes in Starting, Idle or Running."""
        return [c for c in self.computes() if c["status"] in LIVE]

    # queries --------------------------------------------------------------------------

    def submit_query(
        self,
        user_id: str,
        compute_id: str,
        plan: bytes,
        labels: list[str],
        settings: dict[str, Any] | None = None,
    ) -> Query:
        with self._lock:
            c = self._computes.get(compute_id)
            if c is None:
                raise NotFound(f"compute {compute_id} not found")
            self._advance(c)
            if c.status not in ("Idle", "Running"):
                raise Unavailable(f"compute {compute_id} is {c.status}")
            q = Query(
                id=str(uuid.uuid4()),
                compute_id=compute_id,
                workspace_id=c.workspace_id,
                user_id=user_id,
                plan=plan,
                labels=labels,
                request_time=_now(),
                settings=dict(settings or {}),
            )
            self._set_status(q, "InProgress")
            q.started_at = q.status_time
            self._queries[q.id] = q
            delay_s, error = self.query_delay_s, self.query_error
        thread = threading.Thread(
            target=self._execute, args=(q, delay_s, error), name=f"fakepc-query-{q.id[:8]}"
        )
        with self._lock:
            self._threads.append(thread)
        thread.start()
        return q

    def _set_status(self, q: Query, status: str) -> None:
        q.status = status
        q.status_time = _now()

    def _finish(self, q: Query, status: str, error: str | None = None) -> None:
        self._set_status(q, status)
        q.ended_at = q.status_time
        q.error = error

    def _execute(self, q: Query, delay_s: float, error: str | None) -> None:
        if q.cancel.wait(delay_s):
            return
        sink = plans.sink_of(q.plan)
        plan = q.plan
        target = sink.target
        if target == plans.IN_MEMORY:
            out = (self.results_dir / f"{q.id}.parquet").resolve()
            plan = plans.redirect_in_memory(plan, out)
            target = str(out)
        with self._lock:
            q.file_type = sink.file_format
            if target is not None:
                q.uris = [target]
            if q.status in DONE:
                return
            if error is not None:
                self._finish(q, "Failed", error)
                return
        try:
            handle = plans.start(plan)
            with self._lock:
                q.handle = handle
                cancelled = q.status in DONE
            if cancelled:
                handle.cancel()
                return
            handle.fetch_blocking()
            n_rows = plans.count_rows(target, sink.file_format) if target else None
        except Exception as exc:
            with self._lock:
                if q.status not in DONE:
                    self._finish(q, "Failed", f"{type(exc).__name__}: {exc}")
            return
        with self._lock:
            if q.status not in DONE:
                q.n_rows = n_rows
                self._finish(q, "Success")

    def _query(self, query_id: str, workspace_id: str | None = None) -> Query:
        q = self._queries.get(query_id)
        if q is None or (workspace_id is not None and q.workspace_id != workspace_id):
            raise NotFound(f"query {query_id} not found")
        return q

    def cancel_query(self, workspace_id: str, query_id: str) -> None:
        with self._lock:
            q = self._query(query_id, workspace_id)
            if q.status in DONE:
                return
            self._finish(q, "Canceled")
            q.cancel.set()
            handle = q.handle
        if handle is not None:
            handle.cancel()

    def query_json(self, workspace_id: str, query_id: str) -> dict[str, Any]:
        with self._lock:
            q = self._query(query_id, workspace_id)
            done = q.status in DONE
            result = None
            if done:
                result = {
                    "total_stages": 1,
                    "finished_stages": 1 if q.status == "Success" else 0,
                    "failed_stages": 1 if q.status == "Failed" else 0,
                    "errors": self._errors(q),
                    "n_rows_result": q.n_rows,
                    "file_type_sink": plans.FILE_TYPES.get(q.file_type or "", (None, 0))[0],
                }
            return {
                "id": q.id,
                "workspace_id": q.workspace_id,
                "cluster_id": q.compute_id,
                "user_id": q.user_id,
                "request_time": _iso(q.request_time),
                "output_location": q.uris[0] if q.uris else None,
                "status_code": q.status,
                "status_updated_at": _iso(q.status_time),
                "started_at": _iso(q.started_at),
                "ended_at": _iso(q.ended_at),
                "created_at": _iso(q.request_time),
                "updated_at": _iso(q.status_time),
                "deleted_at": None,
                "final_known_state": q.status if done else None,
                "final_status_time": _iso(q.status_time) if done else None,
                "last_known_state": q.status,
                "last_known_status_time": _iso(q.status_time),
                "last_progress_time": _iso(q.status_time),
                "latest_status": q.status,
                "latest_status_time": _iso(q.status_time),
                "result": result,
            }

    @staticmethod
    def _errors(q: Query) -> list[str]:
        if q.error is None:
            return []
        return [json.dumps({"scheduler": q.error})]

    def query_result(self, query_id: str) -> Query:
        """A snapshot copy of the query (for the gRPC GetQueryResult reply)."""
        with self._lock:
            q = self._query(query_id)
            return Query(
                **{
                    **q.__dict__,
                    "labels": list(q.labels),
                    "uris": list(q.uris),
                    "settings": dict(q.settings),
                }
            )

    def result_errors(self, q: Query) -> list[str]:
        return self._errors(q)

    def queries(self) -> list[dict[str, Any]]:
        """Every query submitted: id, compute_id, status, uris, file_type, error, n_rows."""
        with self._lock:
            return [
                {
                    "id": q.id,
                    "compute_id": q.compute_id,
                    "status": q.status,
                    "uris": list(q.uris),
                    "uri": q.uris[0] if q.uris else None,
                    "file_type": q.file_type,
                    "error": q.error,
                    "n_rows": q.n_rows,
                    "labels": list(q.labels),
                    "settings": dict(q.settings),
                    "started_at": q.started_at,
                    "ended_at": q.ended_at,
                }
                for q in self._queries.values()
            ]

    def shutdown_queries(self, timeout_s: float = 10.0) -> None:
        """Cancel every unfinished query and wait for the worker threads."""
        with self._lock:
            handles = []
            for q in self._queries.values():
                if q.status not in DONE:
                    self._finish(q, "Canceled")
                q.cancel.set()
                if q.handle is not None:
                    handles.append(q.handle)
            threads, self._threads = self._threads, []
        for handle in handles:
            handle.cancel()
        for thread in threads:
            thread.join(timeout_s)

    def wait_queries_idle(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if all(q.status in DONE for q in self._queries.values()):
                    return
            time.sleep(0.02)
