"""Video orders end to end on the real dev server, through the API and the sandbox."""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx

from tests.conftest import Stack, checkout_event


async def _paid_order(stack: Stack, **body) -> dict:
    order = await stack.create_order(**body)
    view = await stack.order(order["order_id"])
    resp = await stack.pay(view["checkout_session_id"])
    assert resp.status_code == 303, resp.text
    return order


async def test_one_video_happy_path(stack: Stack) -> None:
    order = await stack.create_order(prompt="a lighthouse at dusk", email="a@example.com")
    assert order["checkout_url"].startswith(f"{stack.sandbox_url}/stripe/pay/cs_")
    assert order["status_url"] == f"{stack.api_url}/orders/{order['order_id']}"

    view = await stack.order(order["order_id"])
    assert view["status"] == "awaiting_payment"
    assert view["amount_total"] == stack.settings.default_video_price
    assert view["currency"] == stack.settings.video_currency
    session = await stack.stripe.v1.checkout.sessions.retrieve_async(view["checkout_session_id"])
    assert session.amount_total == stack.settings.default_video_price
    assert session.client_reference_id == order["order_id"]

    resp = await stack.pay(view["checkout_session_id"])
    assert resp.status_code == 303
    assert resp.headers["location"].startswith(order["status_url"])

    done = await stack.wait_for(order["order_id"])
    assert done["status"] == "completed"
    assert done["refunded_amount"] == 0
    [video] = done["videos"]
    assert video["status"] == "completed" and video["progress"] == 100
    assert video["url"] and video["file_id"] and video["thumbnail_url"]
    async with httpx.AsyncClient() as http:
        media = await http.get(video["url"])
    assert media.status_code == 200
    assert media.headers["content-type"] == "video/mp4"
    assert media.content[4:8] == b"ftyp"

    history = await stack.history(order["order_id"])
    assert len(history) <= 40


async def test_three_videos_generate_in_parallel(stack: Stack) -> None:
    order = await _paid_order(stack, videos=3, aspect_ratio="9:16")
    done = await stack.wait_for(order["order_id"])
    assert done["status"] == "completed"
    assert done["amount_total"] == 3 * stack.settings.default_video_price
    assert [v["status"] for v in done["videos"]] == ["completed"] * 3
    assert len({v["file_id"] for v in done["videos"]}) == 3
    assert await stack.scheduled(order["order_id"], "generate_video") == 3
    assert len(await stack.history(order["order_id"])) <= 40 + 2 * 10


async def test_failed_videos_are_refunded_through_stripe(stack: Stack) -> None:
    order = await _paid_order(stack, prompt="a storm #fail", videos=2)
    done = await stack.wait_for(order["order_id"])
    assert done["status"] == "refunded"
    assert done["refunded_amount"] == done["amount_total"]
    assert all(v["status"] == "failed" and v["error"] for v in done["videos"])
    assert all(v["refunded_amount"] == stack.settings.default_video_price for v in done["videos"])
    refunds = await stack.refunds(done["payment_intent"])
    assert sorted(r.amount for r in refunds) == [stack.settings.default_video_price] * 2


async def test_one_failed_video_of_two_refunds_its_share(stack: Stack) -> None:
    order = await _paid_order(stack, prompt=f"two kites {uuid.uuid4().hex} #flaky", videos=2)
    done = await stack.wait_for(order["order_id"])
    assert done["status"] == "partially_refunded"
    assert sorted(v["status"] for v in done["videos"]) == ["completed", "failed"]
    [ok] = [v for v in done["videos"] if v["status"] == "completed"]
    [bad] = [v for v in done["videos"] if v["status"] == "failed"]
    assert ok["url"] and ok["refunded_amount"] == 0
    assert bad["url"] is None and bad["refunded_amount"] == stack.settings.default_video_price
    assert done["refunded_amount"] == stack.settings.default_video_price
    refunds = await stack.refunds(done["payment_intent"])
    assert [r.amount for r in refunds] == [stack.settings.default_video_price]


async def test_duplicate_and_concurrent_webhooks_act_once(stack: Stack) -> None:
    order = await stack.create_order(videos=2)
    view = await stack.order(order["order_id"])
    await stack.pay(view["checkout_session_id"])
    session = await stack.stripe.v1.checkout.sessions.retrieve_async(view["checkout_session_id"])
    event = checkout_event(session.to_dict(), "checkout.session.completed")
    # The same event three times at once, then again, then the async success for the
    # same payment: one payment, one generation per video.
    replies = await asyncio.gather(*(stack.send_event(event) for _ in range(3)))
    assert [r.status_code for r in replies] == [200, 200, 200]
    assert (await stack.send_event(event)).status_code == 200
    late = checkout_event(session.to_dict(), "checkout.session.async_payment_succeeded")
    assert (await stack.send_event(late)).status_code == 200

    done = await stack.wait_for(order["order_id"])
    assert done["status"] == "completed"
    assert await stack.scheduled(order["order_id"], "generate_video") == 2
    assert await stack.scheduled(order["order_id"], "refund") == 0


async def test_expiry_event_after_payment_does_not_undo_it(stack: Stack) -> None:
    order = await stack.create_order()
    view = await stack.order(order["order_id"])
    session = await stack.stripe.v1.checkout.sessions.retrieve_async(view["checkout_session_id"])
    # Out of order: an (invalid, late) expired event arrives, but Stripe's record says paid.
    await stack.pay(view["checkout_session_id"])
    expired = checkout_event(session.to_dict(), "checkout.session.expired", status="expired")
    assert (await stack.send_event(expired)).status_code == 200
    done = await stack.wait_for(order["order_id"])
    assert done["status"] == "completed"


async def test_delayed_bank_payment_completes_once_settled(stack: Stack) -> None:
    order = await stack.create_order()
    view = await stack.order(order["order_id"])
    # Checkout completes unpaid; the order waits for the bank transfer to settle.
    await stack.pay(view["checkout_session_id"], "pay-delayed")
    assert (await stack.order(order["order_id"]))["status"] == "awaiting_payment"
    done = await stack.wait_for(order["order_id"])
    assert done["status"] == "completed"


async def test_async_payment_failure_fails_the_order(stack: Stack) -> None:
    order = await stack.create_order(email="buyer+fail@example.com")
    view = await stack.order(order["order_id"])
    await stack.pay(view["checkout_session_id"], "pay-delayed")
    done = await stack.wait_for(order["order_id"])
    assert done["status"] == "failed"
    assert "payment" in done["error"]
    assert done["videos"][0]["file_id"] is None


async def test_expired_session_expires_the_order(stack: Stack) -> None:
    order = await stack.create_order(videos=2)
    view = await stack.order(order["order_id"])
    # As when the customer walks away and Stripe expires the session.
    await stack.stripe.v1.checkout.sessions.expire_async(view["checkout_session_id"])
    done = await stack.wait_for(order["order_id"], "expired")
    assert done["refunded_amount"] == 0
    assert done["checkout_url"] is None
    assert all(v["file_id"] is None for v in done["videos"])
    # The customer can no longer pay.
    assert (await stack.pay(view["checkout_session_id"])).status_code >= 400


async def test_payment_after_expiry_is_refunded_in_full(stack: Stack) -> None:
    order = await stack.create_order(videos=2)
    view = await stack.order(order["order_id"])
    await stack.stripe.v1.checkout.sessions.expire_async(view["checkout_session_id"])
    await stack.wait_for(order["order_id"], "expired")
    # The payment that raced the expiry still goes through at the provider.
    async with httpx.AsyncClient(base_url=stack.sandbox_url) as http:
        resp = await http.post(f"/stripe/_sandbox/sessions/{view['checkout_session_id']}/late-pay")
    assert resp.status_code == 200, resp.text
    done = await stack.wait_for(order["order_id"], "refunded")
    assert done["refunded_amount"] == done["amount_total"] == 2 * stack.settings.default_video_price
    assert await stack.scheduled(order["order_id"], "generate_video") == 0
    refunds = await stack.refunds(done["payment_intent"])
    assert [r.amount for r in refunds] == [done["amount_total"]]


async def test_event_stream_follows_the_order_to_the_end(stack: Stack) -> None:
    order = await stack.create_order()
    view = await stack.order(order["order_id"])
    statuses: list[str] = []
    async with stack.http.stream(
        "GET", f"/api/video-orders/{order['order_id']}/events", timeout=60
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = json.loads(line.removeprefix("data: "))
            statuses.append(data["status"])
            if len(statuses) == 1:
                await stack.pay(view["checkout_session_id"])
    # The stream ended by itself once the order was final.
    assert statuses[0] == "awaiting_payment"
    assert statuses[-1] == "completed"
    assert "generating" in statuses


async def test_lookup_by_checkout_session(stack: Stack) -> None:
    order = await stack.create_order()
    view = await stack.order(order["order_id"])
    resp = await stack.http.get(f"/api/checkout-sessions/{view['checkout_session_id']}")
    assert resp.status_code == 200
    assert resp.json() == {"order_id": order["order_id"], "status_url": order["status_url"]}
    for bad in ("cs_test_doesnotexist", "not-a-session", "cs_' OR 1=1 --"):
        resp = await stack.http.get(f"/api/checkout-sessions/{bad}")
        assert resp.status_code == 404
        assert resp.json()["error"] == "session_not_found"


async def test_admin_lists_orders_with_their_files(stack: Stack) -> None:
    order = await _paid_order(stack)
    await stack.wait_for(order["order_id"])
    resp = await stack.http.get("/api/admin/video-orders")
    assert resp.status_code == 401 and resp.json()["error"] == "unauthorized"
    resp = await stack.http.get(
        "/api/admin/video-orders", headers={"Authorization": "Bearer wrong"}
    )
    assert resp.status_code == 401
    resp = await stack.http.get(
        "/api/admin/video-orders",
        headers={"Authorization": f"Bearer {stack.settings.admin_token}"},
    )
    assert resp.status_code == 200
    listed = {o["order_id"]: o for o in resp.json()["orders"]}
    assert listed[order["order_id"]]["videos"][0]["url"]


async def test_unknown_order_is_404(stack: Stack) -> None:
    for order_id in ("A" * 22, "short", "not an id!"):
        resp = await stack.http.get(f"/api/video-orders/{order_id}")
        assert resp.status_code == 404
        assert resp.json()["error"] == "order_not_found"

