"""A fake pclease service for the tests of code that uses the client.

:class:`FakePclease` keeps leases, contexts, queries and events in memory with the
service's rules (leases share a context up to the profile's limit, a context goes idle when
its last lease ends, a lease that ends cancels its queries, heartbeats and queries on an
ended lease answer 410), answers the v1 API with the service's JSON and error codes, and
lets a test look at everything and make things go wrong. It runs no plans and has no
clock: a query ends as the test says, and what time would do, a knob does. No service,
database or Polars Cloud needed; ``polars`` only for a collect's result.

Through an ``httpx.MockTransport``, in-process::

    from pclease_client.testing import FakePclease, QueryOutcome

    def test_my_job() -> None:
        with FakePclease(profiles=["small"]) as fake, fake.client() as client:
            fake.answer_queries(lambda q: QueryOutcome(result=pl.DataFrame({"n": [1, 2]})))
            my_job(client)
            (lease,) = fake.leases()
            assert lease.state is LeaseState.RELEASED

On a loopback port, for code that builds its own client from an address (an Airflow
connection) and for the lease watchdog::

    with FakePclease() as fake, fake.serve() as url:
        ...  # point the pclease connection at url, with fake.token as its password

Knobs (each its own method): ``starts`` ("run": a new context runs when a client first
waits for it; "fail"; "hold" until :meth:`~FakeService.start_context`),
:meth:`~FakeService.revoke`, :meth:`~FakeService.expire`,
:meth:`~FakeService.stop_context`, :meth:`~FakeService.fail_context` (a lease lost
underneath its holder), a profile's ``max_contexts`` and ``max_leases_per_context``
(capacity exhausted: 429), :meth:`~FakeService.answer_queries` /
:meth:`~FakeService.fail_queries` (a query that succeeds with a result, fails with a
Polars error, or keeps running), :meth:`~FakeService.fail_requests` (503s, for retries),
:meth:`~FakeService.end_idle_grace`, :meth:`~FakeService.set_quota` (the token's
``max_live_leases`` and ``max_live_contexts``: 429 ``quota_exceeded``) and
:meth:`~FakeService.exhaust` (a spent day of instance-hours, or a spent monthly budget:
403 ``budget_exhausted``). State: :meth:`~FakeService.leases`,
:meth:`~FakeService.contexts`, :meth:`~FakeService.queries`,
:meth:`~FakeService.submitted` (a query's options and plan), :meth:`~FakeService.events`
and :attr:`~FakeService.requests`.

The fake accepts one token (:attr:`~FakeService.token`) with every scope.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from pclease_client.aio import AsyncPcleaseClient
from pclease_client.client import PcleaseClient
from pclease_client.testing import routes, server
from pclease_client.testing.records import QueryHandler, QueryOutcome, SubmittedQuery
from pclease_client.testing.service import FAKE_TOKEN, FakeService, Starts, fake_profile

__all__ = [
    "FAKE_TOKEN",
    "FAKE_URL",
    "FakePclease",
    "FakeService",
    "QueryHandler",
    "QueryOutcome",
    "Starts",
    "SubmittedQuery",
    "fake_profile",
]

#: The address of the in-process fake (through its transport, nothing listens there).
FAKE_URL = "http://pclease.fake"


class FakePclease(FakeService):
    """The fake service (:class:`FakeService`) with ways in: :meth:`transport`,
    :meth:`client` and :meth:`serve`. Close it (or use it as a context manager) to end the
    long polls still waiting on it."""

    def __enter__(self) -> FakePclease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def handle(self, request: httpx.Request) -> httpx.Response:
        """Answer one request as the service would."""
        return routes.handle(self, request)

    def transport(self) -> httpx.MockTransport:
        """A transport that answers from this fake, for ``PcleaseClient(transport=...)``."""
        return httpx.MockTransport(self.handle)

    def async_transport(self) -> httpx.MockTransport:
        """A transport for ``AsyncPcleaseClient(transport=...)``: each request is answered
        in a worker thread, so a long poll waits there and the event loop (the code under
        test, and the test moving the fake on) keeps running."""

        async def handle(request: httpx.Request) -> httpx.Response:
            await request.aread()
            return await asyncio.to_thread(self.handle, request)

        return httpx.MockTransport(handle)

    def async_client(self, **options: Any) -> AsyncPcleaseClient:
        """An asynchronous client of this fake (see :meth:`client`)."""
        options.setdefault("backoff_s", 0.0)
        return AsyncPcleaseClient(FAKE_URL, self.token, transport=self.async_transport(), **options)

    def client(self, **options: Any) -> PcleaseClient:
        """A client of this fake: its token, its transport, and no waiting between retries
        (``options`` go to :class:`PcleaseClient`)."""
        options.setdefault("backoff_s", 0.0)
        return PcleaseClient(FAKE_URL, self.token, transport=self.transport(), **options)

    @contextmanager
    def serve(self) -> Iterator[str]:
        """Serve this fake on a free loopback port while the block runs; yields its URL."""
        with server.serve(self.handle) as url:
            yield url
