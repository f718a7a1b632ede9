"""Operator routes, behind ADMIN_TOKEN."""

from __future__ import annotations

import contextlib
from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from api import orders
from api.deps import AdminDep, TemporalClientDep
from api.errors import ApiError
from workflows.video_order import SettleRequest, VideoOrderWorkflow

router = APIRouter(prefix="/api/admin", tags=["admin"])


@router.get("/metrics")
async def metrics(_: AdminDep, request: Request) -> dict[str, int]:
    """Counters of this API process since it started: Temporal reads made for event streams
    (`order_reads_total`), open streams and the orders they read, what the abuse limits
    refused, and the sales assistant's model calls and context-cache hits."""
    counters = {
        **request.app.state.streams.metrics(),
        "orders_rate_limited_total": request.app.state.order_rate.rejected_total,
    }
    settings = request.app.state.settings
    if settings.shop_enabled:
        # The assistant's model calls, from every worker (recorded in Postgres).
        with contextlib.suppress(ApiError):
            counters |= await request.app.state.shop_db.call("assistant_metrics", {})
    return counters


@router.get("/video-orders")
async def recent_video_orders(
    _: AdminDep,
    temporal: TemporalClientDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> dict:
    return {"orders": await orders.list_recent_orders(temporal, limit)}


class SettleBody(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    reason: str = Field(min_length=1, max_length=500)


@router.get("/video-orders/{order_id}")
async def video_order(order_id: str, _: AdminDep, temporal: TemporalClientDep) -> dict:
    """The whole view, with what providers said and why it needs attention."""
    return await orders.read_order(temporal, order_id, admin=True)


@router.post("/video-orders/{order_id}/retry-refunds")
async def retry_refunds(order_id: str, _: AdminDep, temporal: TemporalClientDep) -> dict:
    """Tries again what left the order needing attention (its failed refunds, or reading
    its payment from Stripe). 409 when the order is not waiting for that."""
    return await orders.operate(temporal, order_id, VideoOrderWorkflow.retry_refunds)


@router.post("/video-orders/{order_id}/mark-settled")
async def mark_settled(
    order_id: str, body: SettleBody, _: AdminDep, temporal: TemporalClientDep
) -> dict:
    """Records that an operator settled by hand what the order still owed, and why."""
    request = SettleRequest(reason=body.reason)
    return await orders.operate(temporal, order_id, VideoOrderWorkflow.mark_settled, request)
