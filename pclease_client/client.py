"""A small synchronous HTTP client for the pclease v1 API."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import httpx

from pclease_client.errors import LeaseLost, PcleaseHTTPError, QueryFailed
from pclease_client.plans import Engine, Submission, Target, build_submission
from pclease_client.watchdog import Watchdog

if TYPE_CHECKING:
    import polars as pl

log = logging.getLogger("pclease_client")

_RETRY_STATUS = frozenset({502, 503, 504})
#: The longest a lease watch waits for news in one request (the service allows 60 s).
_WATCH_S = 20.0
ProgressCallback = Callable[[dict[str, Any]], None]


class PcleaseClient:
    """Talks to one pclease service with one token.

    Every call retries transient failures (connection errors, 502/503/504) with
    exponential backoff; lease creation carries an ``Idempotency-Key`` so a retried
    request never leases twice.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout_s: float = 30.0,
        verify: bool | str = True,
        retries: int = 4,
        backoff_s: float = 0.5,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.backoff_s = backoff_s
        self._verify = verify
        self._token = token
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {token}", "User-Agent": "pclease-client"},
            timeout=httpx.Timeout(timeout_s, read=max(timeout_s, 90.0)),
            verify=verify,
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> PcleaseClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing --------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        retry_unsent_only: bool = False,
        **kwargs: Any,
    ) -> httpx.Response:
        """One API call with retries; raises :class:`PcleaseHTTPError` on an error answer."""
        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                error: Exception = exc
            except httpx.TransportError as exc:
                if retry_unsent_only:
                    raise
                error = exc
            else:
                if response.status_code not in _RETRY_STATUS or retry_unsent_only:
                    return _checked(response)
                error = PcleaseHTTPError(response.status_code, "unavailable", response.text[:200])
            attempt += 1
            if attempt > self.retries:
                raise error
            delay = self.backoff_s * 2 ** (attempt - 1)
            log.warning("pclease %s %s failed (%s); retrying in %.1f s", method, path, error, delay)
            time.sleep(delay)

    # -- leases ----------------------------------------------------------------------------

    def create_lease(
        self,
        profile: str,
        *,
        holder: Mapping[str, Any] | None = None,
        ttl_s: float | None = None,
        wait_s: float | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"profile": profile, "holder": dict(holder or {})}
        if ttl_s is not None:
            body["ttl_s"] = ttl_s
        if wait_s is not None:
            body["wait_s"] = wait_s
        key = idempotency_key or str(uuid.uuid4())
        return _json(
            self.request("POST", "/v1/leases", json=body, headers={"Idempotency-Key": key})
        )

    def get_lease(
        self, lease_id: str, *, wait_s: float = 0, while_state: str | None = None
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"wait_s": wait_s}
        if while_state:
            params["state"] = while_state
        return _json(self.request("GET", f"/v1/leases/{lease_id}", params=params))

    def heartbeat(self, lease_id: str) -> dict[str, Any]:
        return _json(self.request("POST", f"/v1/leases/{lease_id}/heartbeat"))

    def release(self, lease_id: str) -> dict[str, Any]:
        return _json(self.request("DELETE", f"/v1/leases/{lease_id}"))

    def release_once(self, lease_id: str, *, timeout_s: float = 3.0) -> None:
        """One release attempt on a connection of its own, with a short timeout.

        For signal handlers (Airflow's ``on_kill``): the interrupted thread may be inside
        this client's connection pool, whose lock is not reentrant, and the process may be
        killed within seconds, so there is no time for retries.
        """
        with httpx.Client(
            base_url=self.base_url,
            headers=self._http.headers,
            timeout=timeout_s,
            verify=self._verify,
        ) as http:
            _checked(http.delete(f"/v1/leases/{lease_id}"))

    @contextmanager
    def lease(
        self,
        profile: str,
        *,
        holder: Mapping[str, Any] | None = None,
        ttl_s: float | None = None,
        wait_s: float | None = None,
        start_timeout_s: float = 900.0,
        on_progress: Callable[[str], None] | None = None,
        on_created: Callable[[Lease], None] | None = None,
        watchdog: bool = True,
    ) -> Iterator[Lease]:
        """Lease ``profile``, wait until its context runs, heartbeat, release on exit.

        ``on_created`` gets the lease as soon as it exists, before the wait for its context:
        whoever may have to release it early (a signal handler) can hold it from then on.
        With ``watchdog`` (the default) the lease is also released the moment this process
        dies, even by SIGKILL (see :mod:`pclease_client.watchdog`).
        """
        data = self.create_lease(profile, holder=holder, ttl_s=ttl_s, wait_s=wait_s)
        lease = Lease(self, data, on_progress=on_progress)
        try:
            if watchdog:
                lease.guard_with_watchdog()
            if on_created is not None:
                on_created(lease)
            lease.wait_active(start_timeout_s)
            lease.start_heartbeats()
            yield lease
        finally:
            lease.close()

    def watchdog_for(self, lease_id: str, *, give_up_after_s: float) -> Watchdog | None:
        """A :class:`Watchdog` that releases ``lease_id`` with this client's token when
        this process dies."""
        return Watchdog.start(
            f"{self.base_url}/v1/leases/{lease_id}",
            self._token,
            verify=self._verify,
            give_up_after_s=give_up_after_s,
        )

    def attach(self, lease: str | Mapping[str, Any]) -> Lease:
        """A handle on a lease someone else holds (a setup task, another process): it runs
        queries on the lease but neither heartbeats nor releases it."""
        data = self.get_lease(lease) if isinstance(lease, str) else dict(lease)
        return Lease(self, data, owned=False)

    # -- queries ---------------------------------------------------------------------------

    def submit(self, lease_id: str, submission: Submission) -> dict[str, Any]:
        import json

        return _json(
            self.request(
                "POST",
                f"/v1/leases/{lease_id}/queries",
                files={"plan": ("plan.bin", submission.plan, "application/octet-stream")},
                data={"options": json.dumps(submission.options)},
                retry_unsent_only=True,
            )
        )

    def get_query(self, query_id: str, *, wait_s: float = 0) -> dict[str, Any]:
        return _json(self.request("GET", f"/v1/queries/{query_id}", params={"wait_s": wait_s}))

    def cancel_query(self, query_id: str) -> dict[str, Any]:
        return _json(self.request("POST", f"/v1/queries/{query_id}/cancel"))

    def wait_query(
        self,
        query_id: str,
        *,
        timeout_s: float | None = None,
        on_progress: ProgressCallback | None = None,
        lease: Lease | None = None,
    ) -> dict[str, Any]:
        """Follow a query until it ends; raise :class:`QueryFailed` unless it succeeded."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        last_state = None
        while True:
            if lease is not None:
                lease.check()
            query = self.get_query(query_id, wait_s=20)
            if on_progress is not None and query["state"] != last_state:
                on_progress(query)
            last_state = query["state"]
            if query["state"] == "succeeded":
                return query
            if query["state"] in ("failed", "cancelled"):
                error = query.get("error") or {}
                raise QueryFailed(
                    query_id, error.get("type", query["state"]), error.get("message", "")
                )
            if deadline is not None and time.monotonic() > deadline:
                self.cancel_query(query_id)
                raise QueryFailed(
                    query_id, "ClientTimeout", f"no result within {timeout_s:g} s; cancelled it"
                )

    def result_bytes(self, query_id: str) -> bytes:
        return self.request("GET", f"/v1/queries/{query_id}/result").content


class Lease:
    """A held lease: heartbeats in the background, and runs queries on its context.

    The heartbeat thread also watches the lease (a long poll on its state), so a lease that
    ends underneath its holder (revoked, expired, released by someone else) is noticed at
    once: :attr:`lost` is set, and a query waiting on it fails with :class:`LeaseLost`
    as soon as the service has cancelled it.
    """

    def __init__(
        self,
        client: PcleaseClient,
        data: dict[str, Any],
        *,
        on_progress: Callable[[str], None] | None = None,
        owned: bool = True,
    ) -> None:
        self.client = client
        self.data = data
        self.owned = owned
        self.id: str = data["id"]
        self.context_id: str = data["context_id"]
        self._say = on_progress or (lambda message: log.info("%s", message))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watchdog: Watchdog | None = None
        self.lost: LeaseLost | None = None

    def __repr__(self) -> str:
        return f"Lease(id={self.id!r}, profile={self.data['profile']!r})"

    def guard_with_watchdog(self) -> None:
        """Release this lease the moment this process dies (see
        :mod:`pclease_client.watchdog`); after its TTL the service ends it anyway."""
        if self.owned and self._watchdog is None:
            ttl_s = float(self.data.get("ttl_s") or 60.0)
            self._watchdog = self.client.watchdog_for(self.id, give_up_after_s=ttl_s)

    def wait_active(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.data["state"] == "pending":
            if time.monotonic() > deadline:
                self.close()
                raise LeaseLost(self.id, "pending", f"context not running after {timeout_s:g} s")
            self._say(f"lease {self.id}: waiting for context {self.context_id} to start")
            self.data = self.client.get_lease(self.id, wait_s=20, while_state="pending")
            # A long wait counts against the TTL: keep the lease alive meanwhile.
            if self.data["state"] == "pending":
                self.data = self.client.heartbeat(self.id)
        if self.data["state"] != "active":
            raise LeaseLost(self.id, self.data["state"], self.data.get("end_reason"))
        self._say(f"lease {self.id}: context {self.context_id} is running")

    def start_heartbeats(self) -> None:
        interval = float(self.data.get("heartbeat_interval_s") or 10.0)
        self._thread = threading.Thread(
            target=self._beat,
            args=(interval,),
            name=f"pclease-heartbeat-{self.id[:8]}",
            daemon=True,
        )
        self._thread.start()

    def _beat(self, interval: float) -> None:
        """Heartbeat every ``interval``; between beats, long-poll the lease's state so that
        its end is seen at once rather than at the next beat."""
        next_beat = time.monotonic() + interval
        while not self._stop.is_set():
            wait_s = max(0.0, min(next_beat - time.monotonic(), _WATCH_S))
            try:
                current = self.client.get_lease(self.id, wait_s=wait_s, while_state="active")
                if self._stop.is_set():
                    return
                if current["state"] != "active":
                    self._lose(LeaseLost(self.id, current["state"], current.get("end_reason")))
                    return
                if time.monotonic() >= next_beat:
                    self.data = self.client.heartbeat(self.id)
                    next_beat = time.monotonic() + interval
            except PcleaseHTTPError as exc:
                if self._stop.is_set():
                    return
                if exc.status == 410:
                    try:
                        lost = self._lost()
                    except Exception as lookup:  # ended all the same; say what is known
                        lost = LeaseLost(self.id, "ended", f"{exc.message} ({lookup})")
                    self._lose(lost)
                    return
                log.warning("heartbeat of lease %s failed: %s", self.id, exc)
                self._stop.wait(1.0)
            except Exception as exc:  # the next round retries; the TTL is the limit
                if self._stop.is_set():
                    return
                log.warning("heartbeat of lease %s failed: %s", self.id, exc)
                self._stop.wait(1.0)

    def _lose(self, lost: LeaseLost) -> None:
        self.lost = lost
        log.error("%s", lost)
        # The holder cannot release it any more; nor need the watchdog.
        if self._watchdog is not None:
            self._watchdog.disarm()
            self._watchdog = None

    def _lost(self) -> LeaseLost:
        current = self.client.get_lease(self.id)
        return LeaseLost(self.id, current["state"], current.get("end_reason"))

    def check(self) -> None:
        """Raise :class:`LeaseLost` if the lease ended underneath us."""
        if self.lost is not None:
            raise self.lost

    def close(self) -> None:
        """Stop heartbeating and release (idempotent; an attached lease is left alone).

        The heartbeat thread is not waited for: it may be in a long poll, and it stops
        without another request once that returns."""
        self._stop.set()
        if not self.owned:
            return
        try:
            self.client.release(self.id)
        except Exception as exc:  # the service-side TTL ends it anyway
            log.warning("could not release lease %s (its TTL will end it): %s", self.id, exc)
        if self._watchdog is not None:
            self._watchdog.disarm()
            self._watchdog = None

    def release_now(self, *, timeout_s: float = 3.0) -> None:
        """Release at once from a signal handler: one short request on a connection of its
        own first, then stop heartbeating (see :meth:`PcleaseClient.release_once`)."""
        self._stop.set()
        if self.owned:
            try:
                self.client.release_once(self.id, timeout_s=timeout_s)
            except Exception as exc:  # the watchdog or the service-side TTL ends it anyway
                log.warning("could not release lease %s (its TTL will end it): %s", self.id, exc)
                return
            if self._watchdog is not None:
                self._watchdog.disarm(wait=False)

    def remote(
        self,
        lf: pl.LazyFrame,
        *,
        engine: Engine = "auto",
        labels: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> RemoteQuery:
        """Mirror of Polars Cloud's ``lf.remote(ctx)``: choose a sink or collect."""
        return RemoteQuery(self, lf, engine=engine, labels=labels, timeout_s=timeout_s)

    def run(
        self, submission: Submission, *, on_progress: ProgressCallback | None = None
    ) -> dict[str, Any]:
        self.check()
        try:
            query = self.client.submit(self.id, submission)
        except PcleaseHTTPError as exc:
            if exc.status == 410:  # it ended before the heartbeat thread noticed
                self.lost = self._lost()
                raise self.lost from None
            raise
        self._say(f"query {query['id']} submitted ({submission.options['target']})")
        try:
            return self.client.wait_query(
                query["id"], on_progress=on_progress or self._report, lease=self
            )
        except QueryFailed as exc:
            # The service cancels the queries of a lease that ends: say why it ended.
            if exc.error_type == "Cancelled":
                lost = self.lost or self._lost_if_ended()
                if lost is not None:
                    self.lost = lost
                    raise lost from exc
            raise

    def _lost_if_ended(self) -> LeaseLost | None:
        try:
            lost = self._lost()
        except Exception:  # the query's own error says enough then
            return None
        return None if lost.state in ("pending", "active") else lost

    def _report(self, query: dict[str, Any]) -> None:
        extra = ""
        if query["state"] == "succeeded":
            extra = f": {query.get('rows')} rows in {query.get('duration_s')} s"
        self._say(f"query {query['id']} {query['state']}{extra}")


class RemoteQuery:
    def __init__(
        self,
        lease: Lease,
        lf: pl.LazyFrame,
        *,
        engine: Engine,
        labels: Mapping[str, str] | None,
        timeout_s: float | None,
    ) -> None:
        self._lease = lease
        self._lf = lf
        self._engine: Engine = engine
        self._labels = dict(labels or {})
        self._timeout_s = timeout_s

    def _sink(
        self,
        target: Target,
        destination: str,
        storage_options: Mapping[str, str] | None,
        sink_options: Mapping[str, Any],
    ) -> dict[str, Any]:
        submission = build_submission(
            self._lf,
            target,
            destination,
            storage_options=storage_options,
            engine=self._engine,
            labels=self._labels,
            timeout_s=self._timeout_s,
            sink_options=sink_options,
        )
        return self._lease.run(submission)

    def sink_parquet(
        self,
        destination: str,
        *,
        storage_options: Mapping[str, str] | None = None,
        **sink_options: Any,
    ) -> dict[str, Any]:
        return self._sink("parquet", destination, storage_options, sink_options)

    def sink_csv(
        self,
        destination: str,
        *,
        storage_options: Mapping[str, str] | None = None,
        **sink_options: Any,
    ) -> dict[str, Any]:
        return self._sink("csv", destination, storage_options, sink_options)

    def sink_ipc(
        self,
        destination: str,
        *,
        storage_options: Mapping[str, str] | None = None,
        **sink_options: Any,
    ) -> dict[str, Any]:
        return self._sink("ipc", destination, storage_options, sink_options)

    def sink_ndjson(
        self,
        destination: str,
        *,
        storage_options: Mapping[str, str] | None = None,
        **sink_options: Any,
    ) -> dict[str, Any]:
        return self._sink("ndjson", destination, storage_options, sink_options)

    def collect(self) -> pl.DataFrame:
        import io

        import polars as pl

        submission = build_submission(
            self._lf,
            "collect",
            engine=self._engine,
            labels=self._labels,
            timeout_s=self._timeout_s,
        )
        query = self._lease.run(submission)
        return pl.read_ipc(io.BytesIO(self._lease.client.result_bytes(query["id"])))


def _checked(response: httpx.Response) -> httpx.Response:
    if response.is_success:
        return response
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", response.text[:500]
    raise PcleaseHTTPError(response.status_code, code, message)


def _json(response: httpx.Response) -> dict[str, Any]:
    data = response.json()
    if not isinstance(data, dict):
        raise PcleaseHTTPError(response.status_code, "bad_response", "expected a JSON object")
    return data
