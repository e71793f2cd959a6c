"""A replica's identity and heartbeat.

Every replica has a row in ``replicas``, refreshed every ``replica_heartbeat_s``. Others
take a replica for dead once its row is older than ``replica_ttl_s`` or says ``stopped``;
what it held is then theirs to take over or fail: its claims on contexts
(``store.claims``), the contexts it hosted (the reconciler's ``take_over``), the queries it
ran (``QueryRunner.recover``) and its waiting tickets (here).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from datetime import timedelta

from pclease_service.clock import Clock
from pclease_service.config import Settings
from pclease_service.db.session import Database
from pclease_service.db.tx import Tx
from pclease_service.loops import tick_forever
from pclease_service.states import ReplicaState
from pclease_service.store import replicas, waiting

log = logging.getLogger("pclease.replicas")

#: Rows of replicas gone this long are deleted (the events keep their names).
FORGET_AFTER_S = 24 * 3600.0


def new_replica_id(settings: Settings) -> str:
    if settings.replica_id:
        return settings.replica_id
    host = "".join(c if c.isalnum() or c in "-." else "-" for c in socket.gethostname())
    return f"{host[:60] or 'replica'}-{os.getpid()}-{secrets.token_hex(3)}"


class Liveness:
    def __init__(self, settings: Settings, db: Database, clock: Clock, replica: str) -> None:
        self.settings = settings
        self.db = db
        self.clock = clock
        self.replica = replica
        self.beats = 0
        self._wake = asyncio.Event()

    async def register(self) -> None:
        host = socket.gethostname()[:255]
        await self.db.write(
            lambda tx: replicas.register(tx, self.replica, host=host, pid=os.getpid())
        )
        log.info("replica %s is serving", self.replica)

    async def run(self) -> None:
        await tick_forever(
            self.tick,
            wake=self._wake,
            interval_s=self.settings.replica_heartbeat_s,
            clock=self.clock,
            log=log,
        )

    async def tick(self) -> None:
        ttl_s = self.settings.replica_ttl_s

        def unit(tx: Tx) -> int:
            if not replicas.heartbeat(tx, self.replica):
                log.warning("replica %s was marked stopped; registering again", self.replica)
                replicas.register(
                    tx, self.replica, host=socket.gethostname()[:255], pid=os.getpid()
                )
            alive = replicas.alive_ids(tx, ttl_s) | {self.replica}
            dropped = waiting.drop_tickets_of_dead(tx, alive=alive)
            replicas.forget_dead(tx, older_than=tx.now - timedelta(seconds=FORGET_AFTER_S))
            return dropped

        dropped = await self.db.write(unit)
        self.beats += 1
        if dropped:
            log.info("dropped %d waiting ticket(s) of replicas that are gone", dropped)

    async def set_state(self, state: ReplicaState) -> None:
        await self.db.write(lambda tx: replicas.set_state(tx, self.replica, state))
