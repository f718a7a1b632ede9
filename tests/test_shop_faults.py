"""The shop under retries, races and faults: a retried order is one order, a buyer's order
rate is bounded, a pre-checkout is answered in time whatever Temporal does, a late payment
never buys a unit of another price, an approved checkout keeps its units, and a payment that
reaches a refunding run after its order closed is given back once, never the order's own."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid

from aiogram.types import LabeledPrice

from activities.telegram import make_bot
from api.shop import ShopOrderCreate, TelegramUser, new_purchase
from tests.shopkit import Shop, new_user_id
from workflows.purchase import PurchaseView, PurchaseWorkflow, workflow_id


def _body(product: int, method: str = "stars", quantity: int = 1) -> dict:
    return {"product_id": product, "quantity": quantity, "payment_method": method}


async def _post(shop: Shop, user: int, body: dict, key: str | None = None):
    headers = await shop.as_user(user)
    if key is not None:
        headers["Idempotency-Key"] = key
    return await shop.api.post("/api/shop/orders", json=body, headers=headers)


async def test_a_retried_order_with_its_idempotency_key_is_one_order(shop: Shop) -> None:
    product = await shop.product(stock=3, price=100)
    user = new_user_id()
    key = str(uuid.uuid4())
    first, again = await asyncio.gather(
        _post(shop, user, _body(product), key), _post(shop, user, _body(product), key)
    )
    assert {first.status_code, again.status_code} <= {200, 201}, (first.text, again.text)
    assert first.json()["order_id"] == again.json()["order_id"]
    assert first.json()["payment"]["invoice_link"] == again.json()["payment"]["invoice_link"]
    later = await _post(shop, user, _body(product), key)
    assert later.status_code == 200 and later.json()["order_id"] == first.json()["order_id"]
    # One order, one unit held.
    me = await shop.me(user)
    assert [o["order_id"] for o in me["orders"]] == [first.json()["order_id"]]
    catalog = (await shop.api.get("/api/shop/products", headers=await shop.as_user(user))).json()
    assert [p["available"] for p in catalog["products"] if p["id"] == product] == [2]
    # The same key for another request is refused; another buyer's same key is theirs.
    other_body = await _post(shop, user, _body(product, quantity=2), key)
    assert other_body.status_code == 409 and other_body.json()["error"] == "idempotency_conflict"
    someone = await _post(shop, new_user_id(), _body(product), key)
    assert someone.status_code == 201 and someone.json()["order_id"] != first.json()["order_id"]
    bad = await _post(shop, user, _body(product), "not a key")
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_idempotency_key"


async def test_a_keyed_refusal_is_answered_again_and_a_new_key_tries_afresh(shop: Shop) -> None:
    product = await shop.product(stock=1, price=300)
    user = new_user_id()
    await shop.credit(user, 1000)
    key = str(uuid.uuid4())
    done = await _post(shop, user, _body(product, "balance"), key)
    assert done.status_code == 201, done.text
    await shop.wait_status(user, done.json()["order_id"], "delivered")
    # The order is closed: the same request again is that order, charged once.
    replay = await _post(shop, user, _body(product, "balance"), key)
    assert replay.status_code == 200 and replay.json()["status"] == "delivered"
    assert (await shop.me(user))["balance"] == 700


async def test_orders_are_rate_limited_per_telegram_user_not_per_address(shop: Shop) -> None:
    product = await shop.product(stock=0)  # sold out: refused before any workflow starts
    user = new_user_id()
    limit = int(shop.stack.settings.shop_order_rate_limit.split("/")[0])
    for _ in range(limit):
        resp = await _post(shop, user, _body(product))
        assert resp.status_code == 409, resp.text
    over = await _post(shop, user, _body(product))
    assert over.status_code == 429 and over.json()["error"] == "rate_limited"
    assert int(over.headers["Retry-After"]) >= 1
    # Another buyer behind the same address orders as before.
    assert (await _post(shop, new_user_id(), _body(product))).status_code == 409


async def test_bad_order_input_is_422_and_holds_nothing(shop: Shop) -> None:
    product = await shop.product(stock=1)
    user = new_user_id()
    for body in (
        {"product_id": product, "quantity": True, "payment_method": "stars"},
        {"product_id": product, "quantity": "1", "payment_method": "stars"},
        {"product_id": product, "quantity": 0, "payment_method": "stars"},
        {"product_id": product, "quantity": 1, "payment_method": "cash"},
        {"product_id": product, "quantity": 1, "payment_method": "stars", "telegram_id": 1},
    ):
        resp = await _post(shop, user, body)
        assert resp.status_code == 422, (body, resp.text)
        assert set(resp.json()) == {"error", "detail"}
    assert (await shop.me(user))["orders"] == []
    non_ascii = await shop.api.get(
        "/api/shop/me", headers={"Authorization": "tma auth_date=1&hash=%C3%A9"}
    )
    assert non_ascii.status_code == 401 and non_ascii.json()["error"] == "unauthorized"
    huge = await shop.stack.admin(
        "POST", f"/users/{2**63}/balance", json={"amount": 1, "reason": "x", "idempotency_key": "k"}
    )
    assert huge.status_code == 422, huge.text


async def test_pre_checkout_is_answered_in_time_when_no_worker_answers(shop: Shop) -> None:
    """The order's workflow sits on a queue no worker polls: Telegram still gets its answer
    (a refusal the customer can retry) well inside its 10 s, and no money moves."""
    user = new_user_id()
    settings = shop.stack.settings
    order = new_purchase(
        settings,
        TelegramUser(user, "Buyer", None),
        ShopOrderCreate(product_id=1, quantity=1, payment_method="stars"),
    )
    await shop.stack.client.start_workflow(
        PurchaseWorkflow.run,
        order,
        id=workflow_id(order.order_id),
        task_queue=f"nobody-{uuid.uuid4().hex[:8]}",
    )
    bot = make_bot(settings.telegram_token, settings.telegram_base)
    try:
        link = await bot.create_invoice_link(
            title="Stuck",
            description="an order no worker answers for",
            payload=order.order_id,
            currency="XTR",
            prices=[LabeledPrice(label="Stuck", amount=10)],
        )
    finally:
        await bot.session.close()
    started = time.monotonic()
    paid = await shop.pay_invoice(link, user)
    assert time.monotonic() - started < 10
    assert paid["status"] == "declined", paid
    assert "try again" in str(paid).lower()


async def _start(shop: Shop, user: int, product: int, grace: int, **settings) -> tuple:
    s = shop.stack.settings.model_copy(update=settings)
    order = new_purchase(
        s,
        TelegramUser(user, "Buyer", None),
        ShopOrderCreate(product_id=product, quantity=1, payment_method="stars"),
    )
    order = dataclasses.replace(order, precheckout_grace_seconds=grace)
    handle = await shop.stack.client.start_workflow(
        PurchaseWorkflow.run, order, id=workflow_id(order.order_id), task_queue=s.task_queue
    )
    for _ in range(300):
        view: PurchaseView = await handle.query(PurchaseWorkflow.view)
        if view.invoice_link:
            return handle, order.order_id, view
        await asyncio.sleep(0.1)
    raise AssertionError("the order got no invoice")


async def test_a_late_payment_never_buys_a_unit_of_another_price(shop: Shop) -> None:
    product = await shop.product(stock=0, price=1000)
    await shop.add_stock(product, 1, discount=50)  # the order takes this one, for 500
    await shop.add_stock(product, 1)  # 1000
    user = new_user_id()
    handle, _, view = await _start(
        shop, user, product, grace=0, reservation_ttl_seconds=1
    )
    assert view.amount == 500
    paying = asyncio.create_task(shop.pay_invoice(view.invoice_link, user, delay=4))
    for _ in range(100):
        if (await handle.query(PurchaseWorkflow.view)).status == "expired":
            break
        await asyncio.sleep(0.1)
    # Someone else buys the discounted unit meanwhile; the full-price one stays.
    other = new_user_id()
    await shop.credit(other, 10_000)
    bought = (await shop.order(other, product, "balance")).json()
    assert bought["amount"] == 500
    await shop.wait_status(other, bought["order_id"], "delivered")

    paid = await paying
    assert paid["status"] == "paid"
    result: PurchaseView = await handle.result()
    assert result.status == "refunded" and result.error_code == "price_changed_late"
    charge = paid["telegram_payment_charge_id"]
    assert [r["charge_id"] for r in await shop.star_refunds()].count(charge) == 1
    catalog = (await shop.api.get("/api/shop/products", headers=await shop.as_user(user))).json()
    [listed] = [p for p in catalog["products"] if p["id"] == product]
    assert listed["available"] == 1 and listed["final_price"] == 1000


async def test_an_approved_checkout_keeps_its_units_past_the_reservation(shop: Shop) -> None:
    product = await shop.product(stock=1, price=200)
    user = new_user_id()
    _, order_id, view = await _start(
        shop, user, product, grace=8, reservation_ttl_seconds=2
    )
    # Approved at once; Telegram's payment step takes longer than the reservation.
    paying = asyncio.create_task(shop.pay_invoice(view.invoice_link, user, delay=4))
    await asyncio.sleep(3)
    other = new_user_id()
    taken = await shop.order(other, product, "stars")
    assert taken.status_code == 409 and taken.json()["error"] == "out_of_stock", taken.text
    paid = await paying
    assert paid["status"] == "paid"
    done = await shop.wait_status(user, order_id, "delivered")
    assert len(done["content"]) == 1
    assert paid["telegram_payment_charge_id"] not in {
        r["charge_id"] for r in await shop.star_refunds()
    }


async def test_a_payment_after_close_goes_back_once_and_the_orders_own_never(shop: Shop) -> None:
    product = await shop.product(stock=1, price=100)
    user = new_user_id()
    order = (await shop.order(user, product, "stars")).json()
    link = order["payment"]["invoice_link"]
    # Two checkouts approved at once; the second payment lands after the order has closed.
    own_paid, late = asyncio.create_task(shop.pay_invoice(link, user)), asyncio.create_task(
        shop.pay_invoice(link, user, delay=6)
    )
    own = (await own_paid)["telegram_payment_charge_id"]
    await shop.wait_status(user, order["order_id"], "delivered")
    handle = shop.stack.client.get_workflow_handle_for(
        PurchaseWorkflow.run, workflow_id(order["order_id"])
    )
    await handle.result()
    stray = await late
    assert stray["status"] == "paid", stray
    # Telegram then delivers the order's own payment again, while the refunding run the
    # stray payment started may still be open.
    redelivered = await shop.sandbox.post(
        f"/telegram/_sandbox/updates/{(await own_paid)['update_ids'][-1]}/redeliver"
    )
    assert redelivered.status_code == 200, redelivered.text
    charge = stray["telegram_payment_charge_id"]
    for _ in range(150):
        if charge in [r["charge_id"] for r in await shop.star_refunds()]:
            break
        await asyncio.sleep(0.2)
    final: PurchaseView = await handle.result()
    refunded = [r["charge_id"] for r in await shop.star_refunds()]
    assert refunded.count(charge) == 1 and own not in refunded
    assert final.payment_reference == own
    assert (await shop.get(user, order["order_id"])).json()["status"] == "delivered"
