"""``/v1/profiles``: the configured compute shapes."""

from __future__ import annotations

from fastapi import APIRouter

from pclease_service.api.deps import PrincipalDep, ServiceDep
from pclease_service.api.schemas import ProfileList, ProfileOut, errors

router = APIRouter(prefix="/v1", tags=["profiles"], responses=errors(401))


@router.get("/profiles")
async def list_profiles(service: ServiceDep, _: PrincipalDep) -> ProfileList:
    return ProfileList(profiles=[ProfileOut.of(p) for p in service.settings.profiles.values()])
