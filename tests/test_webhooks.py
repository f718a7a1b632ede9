"""The Stripe webhook: signatures first, then one signal per event, and honest status codes."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from api.main import create_app
from tests.conftest import Stack, checkout_event, free_port, sign


@pytest.fixture
async def awaiting(stack: Stack) -> tuple[dict, dict]:
    order = await stack.create_order()
    view = await stack.order(order["order_id"])
    session = await stack.stripe.v1.checkout.sessions.retrieve_async(view["checkout_session_id"])
    # Paid as Stripe sees it, so a genuine event would complete the order.
    paid = {**session.to_dict(), "status": "complete", "payment_status": "paid",
            "payment_intent": "pi_test_from_event"}
    return order, paid


async def _still_awaiting(stack: Stack, order_id: str) -> None:
    # Give a wrongly accepted event time to act before checking that none did.
    await asyncio.sleep(1.0)
    assert (await stack.order(order_id))["status"] == "awaiting_payment"


async def test_missing_signature_is_rejected(stack: Stack, awaiting) -> None:
    order, paid = awaiting
    body = json.dumps(checkout_event(paid, "checkout.session.completed")).encode()
    resp = await stack.http.post("/webhooks/stripe", content=body)
    assert resp.status_code == 400
    assert resp.json()["error"] == "missing_signature"
    await _still_awaiting(stack, order["order_id"])


@pytest.mark.parametrize(
    "make_header",
    [
        lambda body: sign(body, secret="whsec_someone_else"),
        lambda body: sign(body + b" "),
        lambda body: sign(body, timestamp=int(time.time()) - 3600),  # replayed
        lambda body: "t=1,v1=deadbeef",
        lambda body: "garbage",
    ],
    ids=["wrong-secret", "tampered-body", "too-old", "bad-mac", "unparseable"],
)
async def test_bad_signature_is_rejected_and_nothing_happens(
    stack: Stack, awaiting, make_header
) -> None:
    order, paid = awaiting
    event = checkout_event(paid, "checkout.session.completed")
    body = json.dumps(event).encode()
    resp = await stack.send_event(event, signature=make_header(body))
    assert resp.status_code == 400
    assert resp.json()["error"] == "invalid_signature"
    await _still_awaiting(stack, order["order_id"])


async def test_unknown_event_types_are_acknowledged(stack: Stack, awaiting) -> None:
    order, paid = awaiting
    for type_ in ("payment_intent.succeeded", "charge.refunded", "customer.created"):
        resp = await stack.send_event(checkout_event(paid, type_))
        assert resp.status_code == 200
        assert resp.json() == {"received": True, "handled": False}
    await _still_awaiting(stack, order["order_id"])


async def test_event_matched_by_session_id_alone(stack: Stack, awaiting) -> None:
    order, paid = awaiting
    # A session stripped of our references is still found through its id.
    stripped = {**paid, "metadata": {}, "client_reference_id": None}
    resp = await stack.send_event(checkout_event(stripped, "checkout.session.completed"))
    assert resp.json() == {"received": True, "handled": True}
    view = await stack.wait_for(order["order_id"], "generating", "completed")
    assert view["payment_intent"] == "pi_test_from_event"


async def test_event_for_a_session_we_never_created_is_ignored(stack: Stack) -> None:
    stranger = {"id": "cs_test_not_ours", "object": "checkout.session",
                "payment_status": "paid", "status": "complete", "metadata": {}}
    resp = await stack.send_event(checkout_event(stranger, "checkout.session.completed"))
    assert resp.status_code == 200
    assert resp.json()["handled"] is False


async def test_non_json_body_with_valid_signature_is_400(stack: Stack) -> None:
    body = b"not json"
    resp = await stack.http.post(
        "/webhooks/stripe", content=body, headers={"Stripe-Signature": sign(body)}
    )
    assert resp.status_code == 400
    assert resp.json()["error"] == "invalid_payload"


async def test_temporal_unreachable_answers_503(stack: Stack, awaiting) -> None:
    order, paid = awaiting
    nowhere = stack.settings.model_copy(update={"temporal_address": f"127.0.0.1:{free_port()}"})
    app = create_app(nowhere)
    event = checkout_event(paid, "checkout.session.completed")
    body = json.dumps(event).encode()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://api"
    ) as http:
        resp = await http.post(
            "/webhooks/stripe", content=body, headers={"Stripe-Signature": sign(body)}
        )
    assert resp.status_code == 503
    assert resp.json()["error"] == "temporal_unavailable"
    # Stripe's retry of the same event, once Temporal is back, completes the order.
    assert (await stack.send_event(event)).json()["handled"] is True
    await stack.wait_for(order["order_id"], "generating", "completed")
