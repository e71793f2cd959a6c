"""The in-process service the API tests drive: a fake clock, the memory backend, HTTP
through httpx's ASGI transport, and reconciler ticks by hand."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text

from pclease_service import principals, store
from pclease_service.backends.memory import MemoryBackend
from pclease_service.clock import FakeClock
from pclease_service.config import Settings
from pclease_service.db.engine import create_db_engine
from pclease_service.db.schema import metadata
from pclease_service.runtime import Service

#: Where the PostgreSQL tests create their database (a fresh one per session).
PG_ADMIN_DSN = os.environ.get("PCLEASE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")

PROFILES: dict[str, Any] = {
    "small": {
        "cpus": 1,
        "memory_gb": 1,
        "idle_grace_s": 30,
        "hourly_cost": 0.5,
        "max_leases_per_context": 4,
        "max_contexts": 2,
    },
    "large": {"cpus": 2, "memory_gb": 2, "idle_grace_s": 60, "hourly_cost": 2.0},
}


def truncate(url: str) -> None:
    engine = create_db_engine(url, pool_size=1)
    with engine.begin() as conn:
        names = ", ".join(t.name for t in metadata.sorted_tables)
        conn.execute(text(f"TRUNCATE {names} CASCADE"))
    engine.dispose()


@dataclass
class Harness:
    """An in-process service with a fake clock and the memory backend, driven by hand."""

    service: Service
    clock: FakeClock
    backend: MemoryBackend
    client: httpx.AsyncClient
    headers: dict[str, str]

    async def tick(self, seconds: float = 0.0) -> None:
        """Move the clock, run one reconciler and one query-runner tick, and wait for the
        reconciler's backend calls (queries keep running until they finish)."""
        if seconds:
            self.clock.advance(seconds)
        await self.service.reconciler.tick()
        await self.service.reconciler.drain()
        await self.service.runner.tick()
        for _ in range(5):
            await asyncio.sleep(0)

    async def settle(self, ticks: int = 3) -> None:
        for _ in range(ticks):
            await self.tick()

    def token(self, name: str, *scopes: str) -> dict[str, str]:
        value = principals.generate()
        self.service.db.write_sync(
            lambda tx: store.tokens.insert_token(
                tx, name=name, token_hash=principals.hash_token(value), scopes=scopes
            )
        )
        return {"Authorization": f"Bearer {value}"}

    async def lease(
        self, profile: str = "small", headers: dict[str, str] | None = None, **body: Any
    ) -> dict[str, Any]:
        response = await self.client.post(
            "/v1/leases", json={"profile": profile, **body}, headers=headers or self.headers
        )
        assert response.status_code == 201, response.text
        data: dict[str, Any] = response.json()
        return data

    async def context(self, context_id: str) -> dict[str, Any]:
        response = await self.client.get(f"/v1/contexts/{context_id}", headers=self.headers)
        assert response.status_code == 200, response.text
        data: dict[str, Any] = response.json()
        return data

    async def get_lease(self, lease_id: str) -> dict[str, Any]:
        response = await self.client.get(f"/v1/leases/{lease_id}", headers=self.headers)
        assert response.status_code == 200, response.text
        data: dict[str, Any] = response.json()
        return data


def make_settings(tmp_path: Path, database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "database_url": database_url,
        "backend": "memory",
        "profiles": PROFILES,
        "lease_ttl_s": 30,
        "lease_wait_default_s": 0,
        "reconcile_interval_s": 0.05,
        "health_check_interval_s": 1,
        "orphan_sweep_interval_s": 3600,
        "token_cache_s": 0,
    }
    values.update(overrides)
    return Settings(**values)
