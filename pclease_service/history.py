"""What callers may read of the event log (every transition, with its actor and reason)."""

from __future__ import annotations

from pclease_service.db.session import Database
from pclease_service.db.tx import Tx
from pclease_service.errors import Forbidden, LeaseNotFound
from pclease_service.principals import Principal
from pclease_service.store import events, leases
from pclease_service.store.events import EventRecord


class History:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def events(
        self,
        principal: Principal,
        *,
        context_id: str | None = None,
        lease_id: str | None = None,
        after_id: int | None = None,
        limit: int = 200,
    ) -> list[EventRecord]:
        """Newest first. A token without the read scope sees the history of its own
        leases and nothing else."""

        def read(tx: Tx) -> list[EventRecord]:
            if not principal.can_read_all:
                if lease_id is None:
                    raise Forbidden(
                        "reading all events needs the read scope; pass lease_id=<your lease>"
                    )
                lease = leases.get_lease(tx, lease_id)
                if lease is None or lease.token_id != principal.token_id:
                    raise LeaseNotFound(lease_id)
            return events.list_events(
                tx, context_id=context_id, lease_id=lease_id, after_id=after_id, limit=limit
            )

        return await self.db.read(read)
