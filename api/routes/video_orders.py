"""JSON API for video orders."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import StreamingResponse

from api import orders
from api.deps import SettingsDep, TemporalClientDep
from api.errors import ApiError
from api.ratelimit import check_order_rate, client_address

router = APIRouter(prefix="/api", tags=["video-orders"])


@router.post("/video-orders", status_code=201)
async def create_video_order(
    body: orders.VideoOrderCreate,
    request: Request,
    response: Response,
    settings: SettingsDep,
    temporal: TemporalClientDep,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> dict[str, str | None]:
    """201 with a new order; with an Idempotency-Key already used for the same request, 200
    and that order (`Idempotent-Replayed: true`; checkout_url null once it is past paying);
    409 if the key was used for a different request; 429 over ORDER_RATE_LIMIT (a replay
    is not counted)."""
    order = orders.new_order(settings, body, idempotency_key)
    created = await orders.create_order(
        temporal, settings, order, admit=lambda: check_order_rate(request)
    )
    if created.replayed:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    return {
        "order_id": created.order_id,
        "checkout_url": created.checkout_url,
        "status_url": orders.order_page_url(settings, created.order_id),
    }


@router.get("/video-orders/{order_id}")
async def get_video_order(order_id: str, temporal: TemporalClientDep) -> dict:
    return await orders.read_order(temporal, order_id)


@router.get("/video-orders/{order_id}/events")
async def video_order_events(
    order_id: str, request: Request, temporal: TemporalClientDep
) -> StreamingResponse:
    """Server-sent events of the order (see api/streams.py). Errors come before the stream
    opens: 404, 429 over STREAM_MAX_PER_CLIENT or STREAM_MAX_TOTAL, 503."""
    orders.check_order_id(order_id)
    return await request.app.state.streams.open(
        order_id,
        client_address(request),
        lambda: orders.read_order_state(temporal, order_id),
    )


@router.get("/checkout-sessions/{session_id}")
async def find_by_checkout_session(
    session_id: str, settings: SettingsDep, temporal: TemporalClientDep
) -> dict[str, str]:
    order_id = await orders.find_order_by_session(temporal, session_id)
    if order_id is None:
        raise ApiError(404, "session_not_found", "no order was paid with that checkout session")
    return {"order_id": order_id, "status_url": orders.order_page_url(settings, order_id)}
