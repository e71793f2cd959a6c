"""The v1 API: every resource's routes (in :mod:`pclease_service.api.routes`) under one
router."""

from __future__ import annotations

from fastapi import APIRouter

from pclease_service.api.routes import contexts, events, leases, profiles, queries

router = APIRouter()
for _module in (profiles, leases, contexts, events, queries):
    router.include_router(_module.router)
