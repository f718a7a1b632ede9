"""Stripe webhooks: verify, match the order, signal its workflow. Nothing else."""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from typing import Any

import stripe
from fastapi import APIRouter, Request
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from api import orders, shop
from api.deps import SettingsDep, TemporalClientDep
from api.errors import ApiError
from workers.settings import Settings
from workflows import purchase
from workflows.purchase import ORDER_KIND as PURCHASE_KIND
from workflows.video_order import PAID_EVENTS, StripeEvent, VideoOrderWorkflow, workflow_id

log = logging.getLogger(__name__)
router = APIRouter(prefix="/webhooks", tags=["webhooks"])

# Stripe's own default: older signatures are treated as replays.
SIGNATURE_TOLERANCE_SECONDS = stripe.Webhook.DEFAULT_TOLERANCE

CHECKOUT_EVENTS = frozenset(
    {
        "checkout.session.completed",
        "checkout.session.async_payment_succeeded",
        "checkout.session.async_payment_failed",
        "checkout.session.expired",
    }
)


class RecentIds:
    """Event ids this process has already handed to Temporal, newest last, bounded.

    Stripe redelivers an event whenever it is unsure we got it. A redelivery found here is
    answered without a round trip to Temporal; one that is not (another API process, a
    restart) is signalled again and the workflow drops it by id. So this is only a fast
    path, never the thing that makes an event act once.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, event_id: str) -> bool:
        return event_id in self._ids

    def add(self, event_id: str) -> None:
        self._ids[event_id] = None
        if len(self._ids) > self._size:
            self._ids.popitem(last=False)


def verify(body: bytes, header: str | None, secret: str) -> dict[str, Any]:
    if not header:
        raise ApiError(400, "missing_signature", "Stripe-Signature header is required")
    try:
        stripe.WebhookSignature.verify_header(
            body.decode("utf-8"), header, secret, tolerance=SIGNATURE_TOLERANCE_SECONDS
        )
        event = json.loads(body)
    except stripe.SignatureVerificationError as err:
        raise ApiError(400, "invalid_signature", str(err.user_message or err)) from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(400, "invalid_payload", "body is not a JSON event") from err
    if not isinstance(event, dict) or not isinstance(event.get("id"), str):
        raise ApiError(400, "invalid_payload", "body is not a Stripe event")
    return event


@router.post("/stripe")
async def stripe_webhook(
    request: Request, settings: SettingsDep, temporal: TemporalClientDep
) -> dict[str, Any]:
    # The signature is checked over the raw bytes before anything is parsed or looked up.
    header = request.headers.get("stripe-signature")
    event = verify(await request.body(), header, settings.webhook_secret)
    if event.get("type") not in CHECKOUT_EVENTS:
        return {"received": True, "handled": False}
    acknowledged: RecentIds = request.app.state.acknowledged_events
    if event["id"] in acknowledged:
        return {"received": True, "handled": True, "duplicate": True}
    session = (event.get("data") or {}).get("object") or {}
    session_id = session.get("id")
    if not isinstance(session_id, str):
        raise ApiError(400, "invalid_payload", "checkout event without a session id")

    metadata = session.get("metadata") or {}
    if metadata.get("kind") == PURCHASE_KIND:
        await _purchase_event(request, settings, temporal, event, session)
        acknowledged.add(event["id"])
        return {"received": True, "handled": True}

    order_id = await _order_for(temporal, session)
    if order_id is None:
        log.info("stripe event %s: session %s belongs to no order", event["id"], session_id)
        return {"received": True, "handled": False}

    signal = _stripe_event(event, session)
    handle = temporal.get_workflow_handle(workflow_id(order_id))
    try:
        await handle.signal(VideoOrderWorkflow.stripe_event, signal)
    except RPCError as err:
        if err.status != RPCStatusCode.NOT_FOUND:
            # Ours to fix: a 5xx makes Stripe deliver the event again.
            raise orders.unavailable(err) from err
        # The order's workflow has closed. A payment it never took must not vanish.
        if signal.type not in PAID_EVENTS or signal.payment_status != "paid":
            return {"received": True, "handled": False}
        if not await orders.payment_for_closed_order(temporal, order_id, signal):
            log.warning("stripe event %s: no order %s here", event["id"], order_id)
            return {"received": True, "handled": False}
        log.info("stripe event %s: payment for closed order %s", event["id"], order_id)
    acknowledged.add(event["id"])
    # Pages watching this order show the change now rather than at their next poll.
    request.app.state.streams.poke(order_id)
    return {"received": True, "handled": True}


def _stripe_event(event: dict[str, Any], session: dict[str, Any]) -> StripeEvent:
    return StripeEvent(
        event_id=event["id"],
        type=event["type"],
        session_id=session["id"],
        payment_status=session.get("payment_status"),
        payment_intent=_id_of(session.get("payment_intent")),
        amount_total=session.get("amount_total"),
    )


async def _purchase_event(
    request: Request,
    settings: Settings,
    temporal: Client,
    event: dict[str, Any],
    session: dict[str, Any],
) -> None:
    """A checkout of a shop purchase: the same event, signalled to the purchase workflow."""
    signal = _stripe_event(event, session)
    order_id = shop.check_order_id(str((session.get("metadata") or {}).get("order_id")))
    handle = temporal.get_workflow_handle(purchase.workflow_id(order_id))
    try:
        await handle.signal(purchase.PurchaseWorkflow.stripe_event, signal)
        return
    except RPCError as err:
        if err.status != RPCStatusCode.NOT_FOUND:
            raise orders.unavailable(err) from err
    if signal.type not in PAID_EVENTS or signal.payment_status != "paid":
        return
    # Paid, and the order's workflow has closed: the money goes back unless it is the
    # payment the order took.
    row = await request.app.state.shop_db.call("get_order", {"p_order_id": order_id})
    payment = purchase.Payment(
        "stripe",
        signal.payment_intent or signal.session_id,
        signal.amount_total or 0,
        str(session.get("currency") or settings.shop_currency),
    )
    await shop.payment_for_closed_order(
        temporal, settings, order_id, payment, int(row["telegram_id"]) if row else 0
    )


async def _order_for(temporal: Client, session: dict[str, Any]) -> str | None:
    metadata = session.get("metadata") or {}
    for candidate in (metadata.get("order_id"), session.get("client_reference_id")):
        if isinstance(candidate, str) and orders.ORDER_ID_RE.match(candidate):
            return candidate
    return await orders.find_order_by_session(temporal, session["id"])


def _id_of(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("id")
    return value if isinstance(value, str) else None
