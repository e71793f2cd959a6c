"""What callers may do with contexts: list them, read one, stop one by force."""

from __future__ import annotations

from collections.abc import Iterable

from pclease_service.config import Profile, Settings
from pclease_service.contexts import lifecycle
from pclease_service.db.session import Database
from pclease_service.db.tx import Tx
from pclease_service.errors import ContextNotFound, Forbidden, IllegalTransition
from pclease_service.principals import Principal
from pclease_service.states import ContextState, StopKind
from pclease_service.store import contexts
from pclease_service.store.contexts import ContextRecord


class ContextManager:
    """Every token may read contexts (they hold no holder data); only admins stop them."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db

    def profile(self, context: ContextRecord) -> Profile | None:
        """The context's profile as configured now (None: no longer configured)."""
        return self.settings.profiles.get(context.profile)

    async def list_contexts(
        self,
        *,
        states: Iterable[ContextState] | None = None,
        profile: str | None = None,
        limit: int = 500,
    ) -> list[ContextRecord]:
        return await self.db.read(
            lambda tx: contexts.list_contexts(tx, states=states, profile=profile, limit=limit)
        )

    async def get(self, context_id: str) -> ContextRecord:
        context = await self.db.read(lambda tx: contexts.get_context(tx, context_id))
        if context is None:
            raise ContextNotFound(context_id)
        return context

    async def force_stop(self, principal: Principal, context_id: str) -> ContextRecord:
        """Revoke every lease of a context and stop it now; stopping one that is already
        stopping changes nothing."""
        if not principal.is_admin:
            raise Forbidden("stopping a context needs a token with the admin scope")

        def unit(tx: Tx) -> ContextRecord:
            context = contexts.get_context(tx, context_id)
            if context is None:
                raise ContextNotFound(context_id)
            if context.state is ContextState.STOPPING:
                return context
            if context.state.is_terminal:
                raise IllegalTransition(
                    f"context {context_id} is already {context.state.value}; nothing to stop"
                )
            stopped = lifecycle.force_stopped(
                tx,
                context_id,
                kind=StopKind.FORCED,
                actor=principal.actor,
                reason=f"force-stopped by {principal.actor}",
            )
            return stopped or context

        return await self.db.write(unit)
