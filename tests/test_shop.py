"""The Telegram shop end to end: the Mini App API, purchase workflows on the real dev server,
the SQL functions on real Postgres, Telegram and Stripe from the sandbox over HTTP."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from typing import Any

from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHandle

from api.shop import ShopOrderCreate, TelegramUser, new_purchase
from tests.shopkit import Shop, new_user_id
from workflows.purchase import PurchaseView, PurchaseWorkflow, workflow_id


async def _start(
    shop: Shop,
    user_id: int,
    product_id: int,
    method: str,
    grace: int = 30,
    **settings: Any,
) -> tuple[WorkflowHandle, str]:
    """A purchase started as the API starts one, with some settings changed for this order
    (a reservation of seconds, say): they are frozen into the workflow's input."""
    s = shop.stack.settings.model_copy(update=settings)
    order = new_purchase(
        s,
        TelegramUser(user_id, "Buyer", None),
        ShopOrderCreate(product_id=product_id, quantity=1, payment_method=method),
    )
    order = dataclasses.replace(order, precheckout_grace_seconds=grace)
    handle = await shop.stack.client.start_workflow(
        PurchaseWorkflow.run,
        order,
        id=workflow_id(order.order_id),
        task_queue=s.task_queue,
    )
    return handle, order.order_id


async def _view(handle: WorkflowHandle, *statuses: str, timeout: float = 30) -> PurchaseView:
    for _ in range(int(timeout / 0.1)):
        view: PurchaseView = await handle.query(PurchaseWorkflow.view)
        if view.status in statuses and (view.invoice_link or view.status != "awaiting_payment"):
            return view
        await asyncio.sleep(0.1)
    raise AssertionError(f"purchase stayed {view.status}, wanted {statuses}")


async def _activity_attempts(handle: WorkflowHandle, activity: str) -> list[int]:
    """The attempt number each completed or failed run of an activity ended with."""
    events = (await handle.fetch_history()).events
    scheduled = {
        e.event_id
        for e in events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        and e.activity_task_scheduled_event_attributes.activity_type.name == activity
    }
    return [
        e.activity_task_started_event_attributes.attempt
        for e in events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED
        and e.activity_task_started_event_attributes.scheduled_event_id in scheduled
    ]


# --- payments ---------------------------------------------------------------------------


async def test_stars_purchase_delivers_the_goods_in_the_chat(shop: Shop) -> None:
    product = await shop.product(stock=3, price=499)
    user = new_user_id()
    resp = await shop.order(user, product, "stars")
    assert resp.status_code == 201, resp.text
    order = resp.json()
    assert order["order_type"] == "instant" and order["status"] == "awaiting_payment"
    assert order["amount"] == 499 and order["currency"] == shop.stack.settings.shop_currency
    assert order["amount_stars"] == 250  # 4.99 at 50 Stars per 1.00, rounded up
    assert order["payment"]["invoice_link"].startswith("https://t.me/$")
    assert order["reserved_until"] and order["fulfillment_deadline"] is None

    paid = await shop.pay_invoice(order["payment"]["invoice_link"], user)
    assert paid["status"] == "paid", paid
    done = await shop.wait_status(user, order["order_id"], "delivered")
    [key] = done["content"]
    assert key.startswith(f"KEY-{product}-")
    message = await shop.wait_message(user, key)
    assert order["order_id"][:8] in message["text"]
    # One unit sold: two left.
    catalog = (await shop.api.get("/api/shop/products", headers=await shop.as_user(user))).json()
    [listed] = [p for p in catalog["products"] if p["id"] == product]
    assert listed["available"] == 2


async def test_stripe_purchase_through_the_shared_checkout_webhook(shop: Shop) -> None:
    product = await shop.product(stock=1, price=1250)
    user = new_user_id()
    resp = await shop.order(user, product, "stripe")
    assert resp.status_code == 201, resp.text
    order = resp.json()
    url = order["payment"]["checkout_url"]
    assert url.startswith(f"{shop.stack.sandbox_url}/stripe/pay/cs_")
    session_id = url.rsplit("/", 1)[1]
    session = await shop.stack.stripe.v1.checkout.sessions.retrieve_async(session_id)
    assert session.amount_total == 1250 and session.metadata["kind"] == "shop"
    assert (await shop.stack.pay(session_id)).status_code == 303
    done = await shop.wait_status(user, order["order_id"], "delivered")
    assert len(done["content"]) == 1 and done["payment_method"] == "stripe"


async def test_balance_purchase_is_debited_through_the_ledger(shop: Shop) -> None:
    product = await shop.product(stock=2, price=300)
    user = new_user_id()
    assert await shop.credit(user, 1000) == 1000
    resp = await shop.order(user, product, "balance")
    assert resp.status_code == 201, resp.text
    order = resp.json()
    assert order["payment"] is None
    await shop.wait_status(user, order["order_id"], "delivered")
    me = await shop.me(user)
    assert me["balance"] == 700
    assert [o["order_id"] for o in me["orders"]] == [order["order_id"]]


async def test_insufficient_balance_is_402_and_holds_nothing(shop: Shop) -> None:
    product = await shop.product(stock=1, price=300)
    user = new_user_id()
    await shop.credit(user, 299)
    before = await shop.stack.workflows_on_queue()
    resp = await shop.order(user, product, "balance")
    assert resp.status_code == 402, resp.text
    assert resp.json()["error"] == "insufficient_balance"
    me = await shop.me(user)
    assert me["balance"] == 299 and me["orders"] == []
    # The unit is still for sale.
    other = new_user_id()
    assert (await shop.order(other, product, "stars")).status_code == 201
    assert await shop.stack.workflows_on_queue() == before + 1


async def test_out_of_stock_is_409_and_starts_nothing(shop: Shop) -> None:
    product = await shop.product(stock=1)
    user = new_user_id()
    before = await shop.stack.workflows_on_queue()
    resp = await shop.order(user, product, "stars", quantity=2)
    assert resp.status_code == 409 and resp.json()["error"] == "out_of_stock"
    resp = await shop.order(user, 10**12, "stars")
    assert resp.status_code == 422 and resp.json()["error"] == "product_not_found"
    for body in (
        {"product_id": product, "quantity": 0, "payment_method": "stars"},
        {"product_id": product, "quantity": 1, "payment_method": "cash"},
        {"product_id": product, "payment_method": "stars", "price": 1},
    ):
        resp = await shop.api.post("/api/shop/orders", json=body, headers=await shop.as_user(user))
        assert resp.status_code == 422, resp.text
        assert set(resp.json()) == {"error", "detail"}
    assert await shop.stack.workflows_on_queue() == before


async def test_unpaid_orders_are_limited_per_telegram_user(shop: Shop) -> None:
    product = await shop.product(stock=10)
    user = new_user_id()
    limit = shop.stack.settings.max_unpaid_orders_per_user
    for _ in range(limit):
        assert (await shop.order(user, product, "stars")).status_code == 201
    resp = await shop.order(user, product, "stars")
    assert resp.status_code == 429 and resp.json()["error"] == "too_many_unpaid_orders"
    # Another user from the same address is not limited by it.
    assert (await shop.order(new_user_id(), product, "stars")).status_code == 201


# --- reservations and late payments -----------------------------------------------------


async def test_unpaid_reservation_expires_and_releases_its_unit(shop: Shop) -> None:
    product = await shop.product(stock=1)
    user = new_user_id()
    handle, order_id = await _start(
        shop, user, product, "stars", reservation_ttl_seconds=2, shop_late_payment_seconds=1
    )
    view = await _view(handle, "awaiting_payment")
    result: PurchaseView = await handle.result()
    assert result.status == "expired" and result.error_code == "expired"
    # The unit is for sale again, and Telegram is told not to take the payment.
    assert (await shop.order(new_user_id(), product, "stars")).status_code == 201
    paid = await shop.pay_invoice(view.invoice_link, user)
    assert paid["status"] == "declined"
    assert (await shop.get(user, order_id)).json()["status"] == "expired"


async def test_late_payment_re_reserves_and_delivers(shop: Shop) -> None:
    product = await shop.product(stock=1, price=200)
    user = new_user_id()
    handle, order_id = await _start(
        shop, user, product, "stars", grace=0, reservation_ttl_seconds=1
    )
    view = await _view(handle, "awaiting_payment")
    # Approved at once, but Telegram's payment step takes longer than the reservation.
    paid = await shop.pay_invoice(view.invoice_link, user, delay=3)
    assert paid["status"] == "paid"
    done = await shop.wait_status(user, order_id, "delivered")
    assert len(done["content"]) == 1
    result: PurchaseView = await handle.result()
    assert result.payment_reference == paid["telegram_payment_charge_id"]
    assert paid["telegram_payment_charge_id"] not in {
        r["charge_id"] for r in await shop.star_refunds()
    }


async def test_late_payment_after_the_stock_sold_out_is_refunded(shop: Shop) -> None:
    product = await shop.product(stock=1, price=200)
    user = new_user_id()
    handle, order_id = await _start(
        shop, user, product, "stars", grace=0, reservation_ttl_seconds=1
    )
    view = await _view(handle, "awaiting_payment")
    paying = asyncio.create_task(shop.pay_invoice(view.invoice_link, user, delay=4))
    await _view(handle, "expired")
    # Meanwhile someone else buys the released unit.
    other = new_user_id()
    await shop.credit(other, 1000)
    bought = (await shop.order(other, product, "balance")).json()
    await shop.wait_status(other, bought["order_id"], "delivered")

    paid = await paying
    assert paid["status"] == "paid"
    charge = paid["telegram_payment_charge_id"]
    await shop.wait_status(user, order_id, "refunded")
    refunds = [r for r in await shop.star_refunds() if r["charge_id"] == charge]
    assert len(refunds) == 1 and refunds[0]["user_id"] == user
    await shop.wait_message(user, "refunded")


async def test_doubled_payment_acts_once_and_the_second_charge_goes_back(shop: Shop) -> None:
    product = await shop.product(stock=2, price=100)
    user = new_user_id()
    order = (await shop.order(user, product, "stars")).json()
    link = order["payment"]["invoice_link"]
    # Two payments of one invoice whose checkouts were both approved before either landed.
    first, second = await asyncio.gather(
        shop.pay_invoice(link, user, delay=1), shop.pay_invoice(link, user, delay=1.5)
    )
    assert first["status"] == second["status"] == "paid"
    # Telegram delivering the first payment's update again changes nothing.
    redelivered = await shop.sandbox.post(
        f"/telegram/_sandbox/updates/{first['update_ids'][-1]}/redeliver"
    )
    assert redelivered.status_code == 200, redelivered.text
    done = await shop.wait_status(user, order["order_id"], "delivered")
    assert len(done["content"]) == 1
    charges = {first["telegram_payment_charge_id"], second["telegram_payment_charge_id"]}
    for _ in range(100):
        refunded = {r["charge_id"] for r in await shop.star_refunds()} & charges
        if refunded:
            break
        await asyncio.sleep(0.2)
    assert len(refunded) == 1  # exactly one of the two charges went back
    # One unit sold, one still for sale.
    catalog = (await shop.api.get("/api/shop/products", headers=await shop.as_user(user))).json()
    assert [p["available"] for p in catalog["products"] if p["id"] == product] == [1]


async def test_pre_checkout_for_another_amount_is_refused(shop: Shop) -> None:
    product = await shop.product(stock=1, price=100)
    user = new_user_id()
    order = (await shop.order(user, product, "stars")).json()
    query = {
        "pre_checkout_query": {
            "id": uuid.uuid4().hex,
            "from": {"id": user, "is_bot": False, "first_name": "Buyer"},
            "currency": "XTR",
            "total_amount": order["amount_stars"] - 1,
            "invoice_payload": order["order_id"],
        }
    }
    assert (await shop.post_update(query)).status_code == 200
    # The real invoice (the right amount) still goes through.
    paid = await shop.pay_invoice(order["payment"]["invoice_link"], user)
    assert paid["status"] == "paid"


# --- delivery over Telegram -------------------------------------------------------------


async def test_delivery_waits_out_a_429_storm(shop: Shop) -> None:
    product = await shop.product(stock=1)
    user = new_user_id()
    await shop.credit(user, 10_000)
    await shop.fault(user, times=3, retry_after=1)
    handle, order_id = await _start(shop, user, product, "balance")
    done = await shop.wait_status(user, order_id, "delivered")
    await shop.wait_message(user, done["content"][0], timeout=30)
    await handle.result()
    attempts = await _activity_attempts(handle, "deliver_order")
    assert max(attempts) == 4  # three 429s, each waited out, then the message


async def test_blocked_bot_is_not_retried_and_the_goods_stay_readable(shop: Shop) -> None:
    product = await shop.product(stock=1)
    user = new_user_id()
    await shop.credit(user, 10_000)
    await shop.block(user)
    handle, order_id = await _start(shop, user, product, "balance")
    result: PurchaseView = await handle.result()
    assert result.status == "delivered" and result.delivery == "blocked"
    assert await _activity_attempts(handle, "deliver_order") == [1]
    order = (await shop.get(user, order_id)).json()
    assert order["status"] == "delivered" and len(order["content"]) == 1


# --- prepaid ----------------------------------------------------------------------------


async def test_prepaid_order_fulfilled_by_its_supplier(shop: Shop) -> None:
    supplier_id, token, supplier_chat = await shop.supplier()
    product = await shop.product(stock=0, made_to_order=True, hours=1, supplier_id=supplier_id)
    user = new_user_id()
    await shop.credit(user, 10_000)
    resp = await shop.order(user, product, "balance")
    assert resp.status_code == 201, resp.text
    order = resp.json()
    assert order["order_type"] == "prepaid"
    await shop.wait_status(user, order["order_id"], "awaiting_supplier")
    await shop.wait_message(supplier_chat, order["order_id"])

    auth = {"Authorization": f"Bearer {token}"}
    listed = await shop.api.get(
        "/api/suppliers/orders", params={"status": "awaiting_supplier"}, headers=auth
    )
    assert [o["order_id"] for o in listed.json()["orders"]] == [order["order_id"]]
    url = f"/api/suppliers/orders/{order['order_id']}/fulfil"
    goods = {"content": "Your logo: https://files/logo.svg"}
    resp = await shop.api.post(url, json=goods, headers=auth)
    assert resp.status_code == 200, resp.text
    done = await shop.wait_status(user, order["order_id"], "delivered")
    assert done["content"] == ["Your logo: https://files/logo.svg"]
    await shop.wait_message(user, "https://files/logo.svg")
    again = await shop.api.post(url, json={"content": "again"}, headers=auth)
    assert again.status_code == 409 and again.json()["error"] == "already_fulfilled"


async def test_fulfilment_racing_the_deadline_has_one_outcome(shop: Shop) -> None:
    supplier_id, token, _ = await shop.supplier()
    # A deadline of about two seconds after payment.
    product = await shop.product(stock=0, made_to_order=True, hours=0.0006, supplier_id=supplier_id)
    user = new_user_id()
    await shop.credit(user, 10_000)
    order = (await shop.order(user, product, "balance")).json()
    await shop.wait_status(user, order["order_id"], "awaiting_supplier")
    auth = {"Authorization": f"Bearer {token}"}
    url = f"/api/suppliers/orders/{order['order_id']}/fulfil"
    answers = []
    while True:
        resp = await shop.api.post(url, json={"content": "late goods"}, headers=auth)
        answers.append(resp.status_code)
        if resp.status_code != 200 and resp.json()["error"] == "deadline_passed":
            break
        if resp.status_code == 200:
            break
        await asyncio.sleep(0.05)
    final = await shop.wait_status(user, order["order_id"], "delivered", "refunded")
    me = await shop.me(user)
    if answers[-1] == 200:
        assert final["status"] == "delivered" and me["balance"] == 10_000 - order["amount"]
    else:
        assert final["status"] == "refunded" and me["balance"] == 10_000
        assert final["content"] is None


# --- trust ------------------------------------------------------------------------------


async def test_webhook_secret_is_required(shop: Shop) -> None:
    update = {"update_id": 1, "message": None}
    assert (await shop.post_update(update, secret="wrong")).status_code == 401
    resp = await shop.api.post("/webhooks/telegram", json=update)
    assert resp.status_code == 401 and resp.json()["error"] == "unauthorized"


async def test_init_data_valid_tampered_stale_and_someone_elses_order(shop: Shop) -> None:
    user, other = new_user_id(), new_user_id()
    product = await shop.product(stock=1)
    order = (await shop.order(user, product, "stars")).json()
    good = await shop.init_data(user)
    ok = await shop.api.get("/api/shop/me", headers={"Authorization": f"tma {good}"})
    assert ok.status_code == 200 and ok.json()["telegram_id"] == user
    tampered = good.replace(str(user), str(other))
    stale = await shop.init_data(user, auth_date=1_600_000_000)
    for header in (f"tma {tampered}", f"tma {stale}", "tma", f"Bearer {good}", ""):
        resp = await shop.api.get("/api/shop/me", headers={"Authorization": header})
        assert resp.status_code == 401, (header, resp.text)
        assert resp.json()["error"] == "unauthorized"
    # Another user's order is not found, exactly like a missing one.
    resp = await shop.get(other, order["order_id"])
    assert resp.status_code == 404 and resp.json()["error"] == "order_not_found"


async def test_supplier_tokens(shop: Shop) -> None:
    supplier_id, token, _ = await shop.supplier()
    _, other_token, _ = await shop.supplier()
    product = await shop.product(stock=0, made_to_order=True, supplier_id=supplier_id)
    user = new_user_id()
    await shop.credit(user, 10_000)
    order = (await shop.order(user, product, "balance")).json()
    await shop.wait_status(user, order["order_id"], "awaiting_supplier")
    url = f"/api/suppliers/orders/{order['order_id']}/fulfil"
    for headers in ({}, {"Authorization": "Bearer nope"}):
        resp = await shop.api.post(url, json={"content": "x"}, headers=headers)
        assert resp.status_code == 401
    other = {"Authorization": f"Bearer {other_token}"}
    assert (await shop.api.post(url, json={"content": "x"}, headers=other)).status_code == 404
    listed = await shop.api.get("/api/suppliers/orders", headers=other)
    assert listed.json()["orders"] == []
    mine = await shop.api.get("/api/suppliers/orders", headers={"Authorization": f"Bearer {token}"})
    assert [o["order_id"] for o in mine.json()["orders"]] == [order["order_id"]]


async def test_bot_commands_answer_once_per_update(shop: Shop) -> None:
    user = new_user_id()
    await shop.credit(user, 1234)

    async def say(text: str) -> int:
        resp = await shop.sandbox.post(
            f"/telegram/_sandbox/users/{user}/messages", json={"text": text}
        )
        assert resp.status_code == 200, resp.text
        return resp.json()["update_id"]

    start = await say("/start")
    welcome = await shop.wait_message(user, "Welcome")
    [[button]] = welcome["reply_markup"]["inline_keyboard"]
    assert button["web_app"]["url"] == f"{shop.stack.api_url}/app"
    await say("/balance")
    await shop.wait_message(user, "12.34 USD")
    await say("/orders")
    await shop.wait_message(user, "no orders yet")
    await say("/help")
    await shop.wait_message(user, "/orders lists your orders")
    # Telegram delivering /start again (a lost answer on its side) gets no second welcome.
    resp = await shop.sandbox.post(f"/telegram/_sandbox/updates/{start}/redeliver")
    assert resp.status_code == 200, resp.text
    # Other words go to the sales assistant (tests/test_chat.py), which answers once.
    await say("hello")
    await shop.wait_message(user, "What are you looking for?")
    texts = [m["text"] for m in await shop.messages(user)]
    assert sum("Welcome" in t for t in texts) == 1


async def test_refund_to_balance_credits_the_ledger_instead_of_stars(shop: Shop) -> None:
    product = await shop.product(stock=1, price=200)
    user = new_user_id()
    handle, order_id = await _start(
        shop, user, product, "stars", grace=0, reservation_ttl_seconds=1, refund_to_balance=True
    )
    view = await _view(handle, "awaiting_payment")
    paying = asyncio.create_task(shop.pay_invoice(view.invoice_link, user, delay=4))
    await _view(handle, "expired")
    other = new_user_id()
    await shop.credit(other, 1000)
    bought = (await shop.order(other, product, "balance")).json()
    await shop.wait_status(other, bought["order_id"], "delivered")
    paid = await paying
    await shop.wait_status(user, order_id, "refunded")
    # The order's price went to the balance; no Stars went back.
    assert (await shop.me(user))["balance"] == 200
    assert paid["telegram_payment_charge_id"] not in {
        r["charge_id"] for r in await shop.star_refunds()
    }
    listed = await shop.stack.admin("GET", "/shop-orders", params={"status": "refunded"})
    assert order_id in {o["order_id"] for o in listed.json()["orders"]}
    detail = (await shop.stack.admin("GET", f"/shop-orders/{order_id}")).json()
    assert detail["order"]["refund_method"] == "balance"
    assert detail["workflow"]["refunds"][0]["method"] == "balance"
