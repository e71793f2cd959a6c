"""The trigger a deferred pclease task waits in: it holds the task's lease in Airflow's
triggerer (heartbeats, and a long poll that notices the lease's end at once) while the
lease's context boots or one of its queries runs, and wakes the task when that is over.

What Airflow stores for it (``serialize()``) is the lease's :class:`~pclease_client.LeaseRef`
(its id and query labels), the connection id, the query's id and the deadline: never the
token. The trigger resolves the connection in the triggerer, as a hook does
(:meth:`PcleaseHook.get_async_conn <airflow_plugin.hooks.PcleaseHook.get_async_conn>`), so a
restarted or another triggerer picks the lease up where the last one left it, within its TTL.

The events it fires (a JSON object, ``status`` first):

- ``running``: the context runs (``lease``: the reference to go on with);
- ``done``: the query ended (``query``: the service's answer, succeeded, failed or
  cancelled);
- ``lost``: the lease ended underneath the task (``state``, ``reason``);
- ``timeout``: the context was not running by the deadline (the lease is released).

When a user marks the deferred task failed (or success) or clears it, ``on_kill`` cancels
the query and releases the lease (Airflow 3.3 calls it; on 3.2 the provider's listener
releases the task's leases, and the service cancels their queries). A triggerer that stops
or hands the trigger to another one leaves both alone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_plugin.hooks import PcleaseHook
from pclease_client import (
    AsyncLease,
    AsyncPcleaseClient,
    HandleState,
    LeaseLost,
    LeaseRef,
    QueryFailed,
)

#: How long on_kill's calls may take (Airflow bounds on_kill too).
KILL_TIMEOUT_S = 10.0


class PcleaseLeaseTrigger(BaseTrigger):
    """Hold a pclease lease while its context boots (no ``query_id``) or while one of its
    queries runs (``query_id``); see the module docstring for the events.

    :param lease: the lease's :class:`~pclease_client.LeaseRef`, as ``to_json()``
    :param pclease_conn_id: the Airflow connection to pclease the triggerer uses
    :param query_id: the query to wait for (none: wait for the context to run)
    :param deadline_at: when the context must run by (seconds since the epoch; a wall
        clock, so that a trigger restarted elsewhere keeps the task's deadline)
    :param not_before: fire no earlier than this (seconds since the epoch; see
        :data:`airflow_plugin.deferring.SETTLE_S`), holding the lease meanwhile
    """

    def __init__(
        self,
        *,
        lease: dict[str, Any],
        pclease_conn_id: str = PcleaseHook.default_conn_name,
        query_id: str | None = None,
        deadline_at: float | None = None,
        not_before: float | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.lease = LeaseRef.from_json(lease).to_json()
        self.pclease_conn_id = pclease_conn_id
        self.query_id = query_id
        self.deadline_at = deadline_at
        self.not_before = not_before

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "lease": self.lease,
                "pclease_conn_id": self.pclease_conn_id,
                "query_id": self.query_id,
                "deadline_at": self.deadline_at,
                "not_before": self.not_before,
            },
        )

    @property
    def lease_id(self) -> str:
        return str(self.lease["lease_id"])

    async def _client(self) -> AsyncPcleaseClient:
        return await PcleaseHook(self.pclease_conn_id).get_async_conn()

    async def run(self) -> AsyncIterator[TriggerEvent]:
        client = await self._client()
        lease: AsyncLease | None = None
        try:
            lease = await client.resume(LeaseRef.from_json(self.lease), on_progress=self.log.info)
            event = await self._wait(lease)
            await self._settle(lease)
        finally:
            # Stop heartbeating without releasing: the task (or the next trigger) goes on
            # holding the lease. Shielded: this runs when the triggerer cancels the run.
            if lease is not None:
                await asyncio.shield(lease.handoff())
            await asyncio.shield(client.aclose())
        yield TriggerEvent(event)  # type: ignore[no-untyped-call]

    async def _wait(self, lease: AsyncLease) -> dict[str, Any]:
        try:
            if self.query_id is None:
                left = None if self.deadline_at is None else self.deadline_at - time.time()
                if left is not None and left <= 0:
                    await lease.close("its context was not running by the task's deadline")
                    return self._timeout()
                try:
                    await lease.wait_active(float("inf") if left is None else left)
                except LeaseLost as lost:
                    if lost.state is not None and not lost.state.is_terminal:
                        return self._timeout()  # wait_active released it
                    raise
                return {"status": "running", "lease": lease.ref().to_json()}
            lease.check()
            lease.start_heartbeats()
            self.log.info("holding lease %s while query %s runs", lease.id, self.query_id)
            try:
                query = await lease.follow(self.query_id)
            except QueryFailed:
                query = await lease.client.get_query(self.query_id)
            return {"status": "done", "lease": lease.ref().to_json(), "query": query.to_json()}
        except LeaseLost as lost:
            return {
                "status": "lost",
                "lease_id": lost.lease_id,
                "state": lost.state.value if lost.state is not None else None,
                "reason": lost.reason,
            }

    async def _settle(self, lease: AsyncLease) -> None:
        """Wait until ``not_before``, heartbeating a held lease meanwhile."""
        left = (self.not_before or 0.0) - time.time()
        if left <= 0:
            return
        if lease.handle_state is HandleState.HELD and not lease.beating:
            lease.start_heartbeats()
        await asyncio.sleep(left)

    def _timeout(self) -> dict[str, Any]:
        return {"status": "timeout", "lease_id": self.lease_id}

    async def on_kill(self) -> None:
        """The user killed the deferred task: cancel its query, release its lease."""
        async with await self._client() as client:
            if self.query_id is not None:
                self.log.info("task killed: cancelling pclease query %s", self.query_id)
                await asyncio.wait_for(client.cancel_query(self.query_id), KILL_TIMEOUT_S)
            self.log.info("task killed: releasing pclease lease %s", self.lease_id)
            await asyncio.wait_for(client.release(self.lease_id), KILL_TIMEOUT_S)
