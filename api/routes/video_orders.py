"""JSON API for video orders."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from api import orders
from api.deps import SettingsDep, TemporalClientDep
from api.errors import ApiError

router = APIRouter(prefix="/api", tags=["video-orders"])

# How often the event stream re-reads the order, and how often it proves it is alive.
STREAM_POLL_SECONDS = 1.0
STREAM_KEEPALIVE_SECONDS = 15.0


@router.post("/video-orders", status_code=201)
async def create_video_order(
    body: orders.VideoOrderCreate, settings: SettingsDep, temporal: TemporalClientDep
) -> dict[str, str]:
    order = orders.new_order(settings, body)
    checkout = await orders.start_order(temporal, settings, order)
    return {
        "order_id": order.order_id,
        "checkout_url": checkout.checkout_url,
        "status_url": orders.order_page_url(settings, order.order_id),
    }


@router.get("/video-orders/{order_id}")
async def get_video_order(order_id: str, temporal: TemporalClientDep) -> dict:
    return await orders.read_order(temporal, order_id)


@router.get("/video-orders/{order_id}/events")
async def video_order_events(
    order_id: str, request: Request, temporal: TemporalClientDep
) -> StreamingResponse:
    first = await orders.read_order(temporal, order_id)  # a 404 before the stream opens

    async def stream() -> AsyncIterator[str]:
        view, last, quiet = first, None, 0.0
        while True:
            body = json.dumps(view, sort_keys=True)
            if body != last:
                last, quiet = body, 0.0
                yield f"event: order\ndata: {body}\n\n"
            if view["final"] or await request.is_disconnected():
                return
            if quiet >= STREAM_KEEPALIVE_SECONDS:
                quiet = 0.0
                yield ": keep-alive\n\n"
            await asyncio.sleep(STREAM_POLL_SECONDS)
            quiet += STREAM_POLL_SECONDS
            try:
                view = await orders.read_order(temporal, order_id)
            except ApiError as err:
                if err.status != 404:
                    # No worker or no Temporal for a moment: the order is safe, so the
                    # stream waits it out instead of ending the customer's live page.
                    continue
                yield f"event: error\ndata: {json.dumps({'error': err.error})}\n\n"
                return

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


@router.get("/checkout-sessions/{session_id}")
async def find_by_checkout_session(
    session_id: str, settings: SettingsDep, temporal: TemporalClientDep
) -> dict[str, str]:
    order_id = await orders.find_order_by_session(temporal, session_id)
    if order_id is None:
        raise ApiError(404, "session_not_found", "no order was paid with that checkout session")
    return {"order_id": order_id, "status_url": orders.order_page_url(settings, order_id)}
