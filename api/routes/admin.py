"""Operator routes, behind ADMIN_TOKEN."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api import orders
from api.deps import AdminDep, TemporalClientDep

router = APIRouter(prefix="/api/admin", tags=["admin"])


@router.get("/video-orders")
async def recent_video_orders(
    _: AdminDep,
    temporal: TemporalClientDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> dict:
    return {"orders": await orders.list_recent_orders(temporal, limit)}
