"""Money under faults (issue 5, items 2, 3, 4 and 7), on the real stack.

Stripe's faults come from the sandbox's fault control (500s that Stripe then replays for the
same idempotency key, refunds whose answer is lost, sessions that cannot be read); the
video provider's from prompts (`#lost-start`).
"""

from __future__ import annotations

import uuid

import httpx

from api import orders
from tests.conftest import Stack, checkout_event
from workers.worker import activities
from workflows.video_order import workflow_id


async def _pay(stack: Stack, order: dict) -> dict:
    view = await stack.order(order["order_id"])
    assert (await stack.pay(view["checkout_session_id"])).status_code == 303
    return view


async def _late_pay(stack: Stack, session_id: str) -> None:
    async with httpx.AsyncClient(base_url=stack.sandbox_url) as http:
        resp = await http.post(f"/stripe/_sandbox/sessions/{session_id}/late-pay")
    assert resp.status_code == 200, resp.text


async def _expire(stack: Stack, order_id: str) -> str:
    view = await stack.order(order_id)
    await stack.stripe.v1.checkout.sessions.expire_async(view["checkout_session_id"])
    return view["checkout_session_id"]


async def test_refund_whose_answer_was_lost_is_found_not_made_again(stack: Stack) -> None:
    """Item 2: the refund is made, its answer is a 500 (replayed by Stripe for that key);
    the next attempt finds the refund by its metadata and makes no second one."""
    order = await stack.create_order(prompt=f"a storm {uuid.uuid4().hex} #fail")
    await stack.fault("refund", order["order_id"], "lost_answer")
    await _pay(stack, order)
    done = await stack.wait_for(order["order_id"])
    assert done["status"] == "refunded"
    assert done["refunded_amount"] == done["amount_total"]
    refunds = await stack.refunds(done["payment_intent"])
    assert [r.amount for r in refunds] == [done["amount_total"]]
    [refund] = done["refunds"]
    assert refund["status"] == "succeeded"


async def test_refund_that_keeps_failing_needs_attention_until_retried(stack: Stack) -> None:
    """Items 2 and 7: past the retry bound the order says so in words, operators see why,
    and their retry moves the money once the fault is gone."""
    order = await stack.create_order(prompt=f"rain {uuid.uuid4().hex} #fail")
    order_id = order["order_id"]
    await stack.fault("refund", order_id, "error", times=1000)
    await _pay(stack, order)
    view = await stack.wait_for(order_id, "needs_attention", timeout=60)
    assert view["attention_code"] == "refund_pending"
    assert "refund" in view["attention"] and "Stripe" not in view["attention"]
    assert not view["final"]
    # Customers get words and codes; what the providers said stays with operators.
    assert "problems" not in view and "detail" not in view["videos"][0]
    assert view["videos"][0]["error"] == "This video could not be made."
    assert view["videos"][0]["error_code"] == "generation_failed"
    assert "sandbox" not in str(view)
    page = (await stack.http.get(f"/orders/{order_id}")).text
    assert "Our team is looking into this order." in page
    assert view["attention"] in page
    admin = (await stack.admin("GET", f"/video-orders/{order_id}")).json()
    assert any("500" in p or "unknown error" in p for p in admin["problems"])
    assert "sandbox" in admin["videos"][0]["detail"]
    assert await stack.refunds(view["payment_intent"]) == []

    # Stripe is healthy again; the operator retries and the refund goes through once.
    await stack.fault("refund", order_id, "off")
    resp = await stack.admin("POST", f"/video-orders/{order_id}/retry-refunds")
    assert resp.status_code == 200, resp.text
    done = await stack.wait_for(order_id)
    assert done["status"] == "refunded" and done["refunded_amount"] == done["amount_total"]
    assert [r.amount for r in await stack.refunds(done["payment_intent"])] == [
        done["amount_total"]
    ]
    # Nothing is stuck any more: a second retry is refused, not queued.
    resp = await stack.admin("POST", f"/video-orders/{order_id}/retry-refunds")
    assert resp.status_code == 409 and resp.json()["error"] == "not_needing_attention"


async def test_operator_marks_a_stuck_refund_settled_with_a_reason(stack: Stack) -> None:
    """Items 2 and 3: a late payment whose refund fails is never left saying "nothing was
    charged"; an operator who refunded it by hand records that, with a reason."""
    order = await stack.create_order(videos=2)
    order_id = order["order_id"]
    session_id = await _expire(stack, order_id)
    await stack.wait_for(order_id, "expired")
    await stack.fault("refund", order_id, "error", times=1000)
    await _late_pay(stack, session_id)
    view = await stack.wait_for(order_id, "needs_attention", timeout=60)
    assert view["payment_intent"] and view["refunded_amount"] == 0
    page = (await stack.http.get(f"/orders/{order_id}")).text
    assert "Our team is looking into this order." in page

    path = f"/video-orders/{order_id}/mark-settled"
    assert (await stack.http.post(f"/api/admin{path}", json={"reason": "x"})).status_code == 401
    resp = await stack.admin("POST", path, json={"reason": "   "})
    assert resp.status_code == 422 and resp.json()["error"] == "invalid_request"
    resp = await stack.admin("POST", path, json={"reason": "refunded in the dashboard, re_123"})
    assert resp.status_code == 200, resp.text
    done = await stack.wait_for(order_id)
    assert done["status"] == "settled" and done["final"]
    assert "reason" not in done["settlement"]  # the operator's words are not the customer's
    admin = (await stack.admin("GET", f"/video-orders/{order_id}")).json()
    assert admin["settlement"]["reason"] == "refunded in the dashboard, re_123"
    assert [r["status"] for r in admin["refunds"]] == ["settled"]
    page = (await stack.http.get(f"/orders/{order_id}")).text
    assert "Our team has settled this order by hand." in page
    assert "nothing was charged" not in page.split('data-notice="expired"')[0]
    await stack.fault("refund", order_id, "off")


async def _unconfirmed_order(stack: Stack) -> tuple[str, dict]:
    """An order whose session Stripe refuses to show when it expires."""
    order = await stack.create_order()
    order_id = order["order_id"]
    view = await stack.order(order_id)
    await stack.fault("session", view["checkout_session_id"], "forbidden")
    await _expire(stack, order_id)
    return order_id, await stack.wait_for(order_id, "needs_attention")


async def test_unreadable_session_at_expiry_keeps_the_order_open_for_its_payment(
    stack: Stack,
) -> None:
    """Item 3: Stripe refuses to show the session when it expires; the order does not close
    as failed but waits, and the payment that then arrives goes ahead."""
    order_id, view = await _unconfirmed_order(stack)
    assert view["attention_code"] == "payment_unconfirmed"
    assert "permission" not in view["attention"]
    await _late_pay(stack, view["checkout_session_id"])
    done = await stack.wait_for(order_id)
    assert done["status"] == "completed"
    assert done["videos"][0]["url"]


async def test_operator_retry_reads_the_session_again(stack: Stack) -> None:
    """Item 3: once Stripe answers again, the operator's retry settles the order as Stripe
    has it (here: unpaid, so it expires; nothing was charged)."""
    order_id, _ = await _unconfirmed_order(stack)
    resp = await stack.admin("POST", f"/video-orders/{order_id}/retry-refunds")
    assert resp.status_code == 200, resp.text
    done = await stack.wait_for(order_id, "expired")
    assert done["attention"] is None and done["refunded_amount"] == 0


async def _files(stack: Stack, prompt: str) -> list[str]:
    async with httpx.AsyncClient(base_url=stack.sandbox_url) as http:
        resp = await http.get("/superduperai/_sandbox/files", params={"prompt": prompt})
    return resp.json()["file_ids"]


async def test_video_whose_start_answers_are_lost_is_started_at_most_as_allowed(
    stack: Stack,
) -> None:
    """Item 4: every generate-video answer is lost (the provider started each one). The video
    is sent exactly VIDEO_START_ATTEMPTS times, then refunded, never started again."""
    prompt = f"a comet {uuid.uuid4().hex} #lost-start"
    order = await stack.create_order(prompt=prompt)
    await _pay(stack, order)
    done = await stack.wait_for(order["order_id"])
    assert done["status"] == "refunded"
    [video] = done["videos"]
    assert video["error_code"] == "StartUnconfirmed"
    assert video["error"] == "We could not confirm that this video was started."
    assert len(await _files(stack, prompt)) == stack.settings.video_start_attempts == 2
    assert [r.amount for r in await stack.refunds(done["payment_intent"])] == [
        done["amount_total"]
    ]


async def test_video_whose_first_start_answer_is_lost_is_resent_once(stack: Stack) -> None:
    """Item 4: the first answer is lost, the resend answers: the order completes with the
    second generation, and the record stops any third."""
    prompt = f"a tide {uuid.uuid4().hex} #lost-start-once"
    order = await stack.create_order(prompt=prompt)
    await _pay(stack, order)
    done = await stack.wait_for(order["order_id"])
    assert done["status"] == "completed"
    files = await _files(stack, prompt)
    assert len(files) == 2
    assert done["videos"][0]["file_id"] == files[1]


async def test_payment_for_a_closed_order_is_refunded_not_dropped(stack: Stack) -> None:
    """Item 3: the order expired and its workflow closed; then Stripe reports a payment for
    it. The order runs again, refunds that payment in full, and its page says so; the
    event's redelivery changes nothing."""
    settings = stack.settings.model_copy(update={"late_payment_window_seconds": 0})
    order = orders.new_order(settings, orders.VideoOrderCreate(prompt="a ghost ship", videos=2))
    await orders.start_order(stack.client, settings, order)
    order_id = order.order_id
    session_id = await _expire(stack, order_id)
    handle = stack.client.get_workflow_handle(workflow_id(order_id))
    assert (await handle.result())["status"] == "expired"  # closed, nothing listening

    await _late_pay(stack, session_id)
    done = await stack.wait_for(order_id, "refunded")
    assert done["refunded_amount"] == done["amount_total"] == 2 * order.unit_amount
    assert done["payment_intent"]
    assert [r.amount for r in await stack.refunds(done["payment_intent"])] == [
        done["amount_total"]
    ]
    page = (await stack.http.get(f"/orders/{order_id}")).text
    assert "Your payment was refunded." in page

    # Stripe redelivers the paid event to the closed order: acknowledged, no second refund.
    session = await stack.stripe.v1.checkout.sessions.retrieve_async(session_id)
    event = checkout_event(session.to_dict(), "checkout.session.completed")
    resp = await stack.send_event(event)
    assert resp.status_code == 200 and resp.json()["handled"] is True
    await handle.result()
    assert len(await stack.refunds(done["payment_intent"])) == 1
    assert (await stack.order(order_id))["status"] == "refunded"


async def test_every_client_call_ends_inside_its_activity_timeouts(stack: Stack) -> None:
    """Item 4: what the worker's clients may take (timeout x tries) fits inside the timeouts
    the workflow really scheduled, and a heartbeat outlasts the slowest start call."""
    order = await stack.create_order(videos=1)
    await _pay(stack, order)
    await stack.wait_for(order["order_id"])
    scheduled = {
        e.activity_task_scheduled_event_attributes.activity_type.name: (
            e.activity_task_scheduled_event_attributes
        )
        for e in await stack.history(order["order_id"])
        if e.activity_task_scheduled_event_attributes.activity_type.name
    }
    async with activities(stack.settings) as bound:
        clients = {fn.__name__: fn.__self__ for fn in bound}
        video_http = clients["generate_video"]._http
        stripe_client = clients["refund"]._client
        stripe_seconds = stripe_client._requestor._client._timeout
        stripe_tries = 1 + stripe_client._requestor._options.max_network_retries
    video_seconds = video_http.timeout.read
    generate = scheduled["generate_video"]
    assert generate.heartbeat_timeout.ToTimedelta().total_seconds() > video_seconds
    # A start call, a poll window and a last poll fit in one attempt.
    assert generate.start_to_close_timeout.ToTimedelta().total_seconds() > (
        stack.settings.generation_poll_window_seconds + 2 * video_seconds
    )
    # Every Stripe activity gets the same 30 s start-to-close as the checkout.
    checkout = scheduled["create_checkout_session"].start_to_close_timeout.ToTimedelta()
    assert stripe_seconds * stripe_tries < checkout.total_seconds()


async def test_refund_meeting_a_replayed_500_moves_to_a_fresh_key(stack: Stack) -> None:
    """Item 2: Stripe answers 500 and replays that 500 for the key; the next attempt finds
    no refund was made and refunds under a fresh key: one refund, no stall."""
    order = await stack.create_order(prompt=f"hail {uuid.uuid4().hex} #fail")
    await stack.fault("refund", order["order_id"], "error", times=1)
    await _pay(stack, order)
    done = await stack.wait_for(order["order_id"])
    assert done["status"] == "refunded"
    assert [r.amount for r in await stack.refunds(done["payment_intent"])] == [
        done["amount_total"]
    ]


async def test_payment_after_an_operator_settled_the_order_is_refunded(stack: Stack) -> None:
    """Item 3: the operator settled an order whose payment Stripe could not confirm; then
    the payment arrives after all. Whether it finds the workflow closing or closed, it is
    refunded in full."""
    order_id, view = await _unconfirmed_order(stack)
    resp = await stack.admin(
        "POST", f"/video-orders/{order_id}/mark-settled", json={"reason": "customer left"}
    )
    assert resp.status_code == 200, resp.text
    await _late_pay(stack, view["checkout_session_id"])
    done = await stack.wait_for(order_id, "refunded")
    assert done["refunded_amount"] == done["amount_total"]
    assert [r.amount for r in await stack.refunds(done["payment_intent"])] == [
        done["amount_total"]
    ]
