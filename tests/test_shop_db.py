"""The shop's SQL functions, one contract over both transports.

Every contract test runs twice: over asyncpg on the suite's database (PostgresShopDb), and
over supabase-py against the sandbox's PostgREST stand-in on the same database
(SupabaseShopDb). Each test makes its own products and users, so tests never share stock.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from activities.shop_db import (
    PostgresShopDb,
    ShopDb,
    ShopError,
    ShopUnavailable,
    SupabaseShopDb,
    open_shop_db,
)
from sandbox.app import SandboxConfig
from sandbox.app import create_app as create_sandbox
from tests.conftest import ServiceThread, make_settings, uvicorn_service, wait_http
from workers.settings import SANDBOX_SUPABASE_KEY
from workers.stack import apply_migrations, load_demo_catalog

STARS = 50  # Stars per 1.00

ORDER_KEYS = {
    "order_id",
    "order_type",
    "status",
    "product_id",
    "product_name",
    "quantity",
    "amount",
    "currency",
    "amount_stars",
    "payment_method",
    "payment_reference",
    "reserved_until",
    "fulfillment_deadline",
    "telegram_id",
    "supplier_id",
    "telegram_delivery",
    "refund_method",
    "refund_amount",
    "paid_at",
    "delivered_at",
    "created_at",
}


def new_user() -> int:
    return 10**9 + secrets.randbelow(10**12)


def new_order_id() -> str:
    return str(uuid.uuid4())


def at(timestamp: str) -> datetime:
    return datetime.fromisoformat(timestamp)


class Shop:
    """The calls the tests make, over one transport."""

    def __init__(self, db: ShopDb, sql: asyncpg.Pool) -> None:
        self.db = db
        self.sql = sql  # setup the functions do not offer, and checks of the ledger

    async def call(self, function: str, **params: Any) -> Any:
        return await self.db.rpc(function, params)

    async def refused(self, code: str, function: str, **params: Any) -> ShopError:
        with pytest.raises(ShopError) as info:
            await self.call(function, **params)
        assert info.value.code == code, info.value
        assert info.value.detail, "a refusal says why"
        return info.value

    async def supplier(self) -> tuple[int, str]:
        token = secrets.token_urlsafe(24)
        created = await self.call(
            "admin_create_supplier",
            p_name="Test supplier",
            p_telegram_chat_id=new_user(),
            p_token_hash=hashlib.sha256(token.encode()).hexdigest(),
        )
        return created["id"], token

    async def product(
        self,
        price: int = 1000,
        stock: int = 0,
        discount: int = 0,
        made_to_order: bool = False,
        hours: float | None = None,
        supplier: int | None = None,
    ) -> int:
        created = await self.call(
            "admin_create_product",
            p_name=f"Product {uuid.uuid4().hex[:6]}",
            p_description="For a test",
            p_price=price,
            p_currency="usd",
            p_made_to_order=made_to_order,
            p_fulfillment_time_hours=hours,
            p_supplier_id=supplier,
        )
        if stock:
            await self.stock(created["id"], stock, discount)
        return created["id"]

    async def stock(self, product: int, count: int, discount: int = 0) -> list[str]:
        items = [f"key-{product}-{uuid.uuid4().hex[:10]}" for _ in range(count)]
        added = await self.call(
            "admin_add_stock", p_product_id=product, p_items=items, p_discount_percent=discount
        )
        assert added == {"added": count}
        return items

    async def order(
        self,
        product: int,
        user: int | None = None,
        quantity: int = 1,
        method: str = "stars",
        ttl: int = 900,
        max_unpaid: int = 5,
        order_id: str | None = None,
    ) -> dict[str, Any]:
        return await self.call(
            "create_order_with_availability_check",
            p_order_id=order_id or new_order_id(),
            p_telegram_id=user or new_user(),
            p_product_id=product,
            p_quantity=quantity,
            p_payment_method=method,
            p_ttl_seconds=ttl,
            p_stars_per_unit=STARS,
            p_max_unpaid=max_unpaid,
            p_max_quantity=10,
        )

    async def listing(self, product: int) -> dict[str, Any] | None:
        catalog = await self.call("shop_catalog", p_stars_per_unit=STARS)
        return next((p for p in catalog if p["id"] == product), None)

    async def available(self, product: int) -> int:
        listing = await self.listing(product)
        assert listing is not None
        return listing["available"]

    async def complete(self, order_id: str, reference: str = "charge-1") -> dict[str, Any]:
        return await self.call(
            "complete_purchase",
            p_order_id=order_id,
            p_payment_method="stars",
            p_payment_reference=reference,
        )

    async def ledger_sum(self, user: int) -> int:
        return await self.sql.fetchval(
            "SELECT coalesce(sum(amount), 0) FROM balance_transactions WHERE telegram_id = $1",
            user,
        )


# --- Transports ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
async def sql_pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    yield pool
    await pool.close()


@pytest.fixture(scope="session")
async def postgres_db(database_url: str) -> AsyncIterator[PostgresShopDb]:
    db = await PostgresShopDb.connect(database_url, max_size=20)
    yield db
    await db.close()


def start_sandbox(base: Path, database_url: str | None) -> tuple[ServiceThread, str]:
    settings = make_settings(base, database_url or "", "127.0.0.1:7233")
    config = SandboxConfig.from_settings(settings, database_url=database_url)
    app = create_sandbox(config)
    service = ServiceThread("shop-sandbox", uvicorn_service(app, settings.sandbox_port))
    return service.start(), settings.sandbox_url


@pytest.fixture(scope="session")
async def shop_sandbox_url(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[str]:
    service, url = start_sandbox(tmp_path_factory.mktemp("shop-sandbox"), database_url)
    await wait_http(f"{url}/healthz")
    yield url
    service.stop()
    assert service.error is None, service.error


@pytest.fixture(scope="session")
async def supabase_db(shop_sandbox_url: str) -> AsyncIterator[SupabaseShopDb]:
    db = await SupabaseShopDb.connect(f"{shop_sandbox_url}/supabase", SANDBOX_SUPABASE_KEY)
    yield db
    await db.close()


@pytest.fixture(params=["postgres", "supabase"])
def shop(
    request: pytest.FixtureRequest,
    postgres_db: PostgresShopDb,
    supabase_db: SupabaseShopDb,
    sql_pool: asyncpg.Pool,
) -> Shop:
    return Shop(postgres_db if request.param == "postgres" else supabase_db, sql_pool)


# --- Catalogue -----------------------------------------------------------------------------


async def test_catalog_prices_the_next_unit(shop: Shop) -> None:
    product = await shop.product(price=1990)
    listing = await shop.listing(product)
    assert listing is not None
    assert listing["available"] == 0 and listing["final_price"] == 1990
    assert listing["price_stars"] == 995  # 19.90 at 50 Stars per 1.00

    await shop.stock(product, 2)
    await shop.stock(product, 1, discount=25)
    listing = await shop.listing(product)
    assert listing == listing | {
        "price": 1990,
        "discount_percent": 25,
        "final_price": 1493,  # 1492.5 rounded half up
        "price_stars": 747,  # 746.5 rounded up
        "currency": "usd",
        "available": 3,
        "made_to_order": False,
        "fulfillment_time_hours": 48,
    }
    assert set(listing) >= {"id", "name", "description"}

    await shop.sql.execute("UPDATE products SET status = 'inactive' WHERE id = $1", product)
    assert await shop.listing(product) is None
    assert await shop.call("stars_for_amount", p_amount=1, p_stars_per_unit=STARS) == 1
    assert await shop.call("stars_for_amount", p_amount=1000, p_stars_per_unit=STARS) == 500


# --- Instant orders ------------------------------------------------------------------------


async def test_instant_order_takes_the_best_discount_first_and_delivers(shop: Shop) -> None:
    product = await shop.product(price=1000)
    await shop.stock(product, 2)
    (discounted,) = await shop.stock(product, 1, discount=30)
    user = new_user()

    order = await shop.order(product, user=user, quantity=2)
    assert set(order) >= ORDER_KEYS
    assert order["order_type"] == "instant" and order["status"] == "awaiting_payment"
    assert order["amount"] == 700 + 1000 and order["currency"] == "usd"
    assert order["amount_stars"] == 850 and order["telegram_id"] == user
    assert order["reserved_until"] is not None and order["paid_at"] is None
    assert await shop.available(product) == 1

    # A retried activity gets the same order, and nothing more is reserved.
    assert await shop.order(product, user=user, quantity=2, order_id=order["order_id"]) == order
    assert await shop.available(product) == 1
    assert await shop.call("get_order", p_order_id=order["order_id"]) == order
    assert await shop.call("get_order_content", p_order_id=order["order_id"]) is None

    done = await shop.complete(order["order_id"], "charge-a")
    assert done["order"]["status"] == "delivered"
    assert done["order"]["payment_reference"] == "charge-a"
    assert done["order"]["paid_at"] and done["order"]["delivered_at"]
    assert len(done["content"]) == 2 and discounted in done["content"]
    # Delivered already: the same answer, however often it is asked.
    assert await shop.complete(order["order_id"], "charge-a") == done
    content = await shop.call("get_order_content", p_order_id=order["order_id"])
    assert content == {
        "order_id": order["order_id"],
        "telegram_id": user,
        "product_name": order["product_name"],
        "items": done["content"],
    }
    assert await shop.call("get_order", p_order_id=new_order_id()) is None


async def test_create_order_refusals(shop: Shop) -> None:
    product = await shop.product(stock=2)
    await shop.refused("product_not_found", **_create(product=10**12))
    await shop.refused("invalid_quantity", **_create(product, quantity=0))
    await shop.refused("invalid_quantity", **_create(product, quantity=11))
    await shop.refused("invalid_payment_method", **_create(product, method="cash"))

    # All or nothing: asking for three of two claims none.
    await shop.refused("out_of_stock", **_create(product, quantity=3))
    assert await shop.available(product) == 2
    await shop.refused("out_of_stock", **_create(await shop.product()))

    # Paying from a balance that cannot cover the order creates nothing.
    user, order_id = new_user(), new_order_id()
    await shop.refused(
        "insufficient_balance", **_create(product, user=user, method="balance", order_id=order_id)
    )
    assert await shop.call("get_order", p_order_id=order_id) is None
    assert await shop.available(product) == 2

    withdrawn = await shop.product(stock=1)
    await shop.sql.execute("UPDATE products SET status = 'inactive' WHERE id = $1", withdrawn)
    await shop.refused("product_unavailable", **_create(withdrawn))


def _create(
    product: int,
    user: int | None = None,
    quantity: int = 1,
    method: str = "stars",
    order_id: str | None = None,
) -> dict[str, Any]:
    return {
        "function": "create_order_with_availability_check",
        "p_order_id": order_id or new_order_id(),
        "p_telegram_id": user or new_user(),
        "p_product_id": product,
        "p_quantity": quantity,
        "p_payment_method": method,
        "p_ttl_seconds": 900,
        "p_stars_per_unit": STARS,
        "p_max_unpaid": 5,
        "p_max_quantity": 10,
    }


async def test_unpaid_orders_are_limited_per_user(shop: Shop) -> None:
    product = await shop.product(stock=5)
    user = new_user()
    first = await shop.order(product, user=user, max_unpaid=2)
    await shop.order(product, user=user, max_unpaid=2)
    await shop.refused(
        "too_many_unpaid_orders", **_create(product, user=user) | {"p_max_unpaid": 2}
    )
    # An order that stops waiting for payment frees a place.
    await shop.call("expire_order", p_order_id=first["order_id"])
    await shop.order(product, user=user, max_unpaid=2)
    await shop.order(product, max_unpaid=2)  # another user is not affected


async def test_reserve_is_idempotent_and_all_or_nothing(shop: Shop) -> None:
    product = await shop.product(price=500, stock=3)
    order_id = new_order_id()
    reserve = {"p_order_id": order_id, "p_product_id": product, "p_ttl_seconds": 60}
    first = await shop.call("reserve_product_for_purchase", **reserve, p_quantity=2)
    assert first["order_id"] == order_id and first["units"] == 2 and first["amount"] == 1000
    again = await shop.call("reserve_product_for_purchase", **reserve, p_quantity=2)
    assert again["amount"] == 1000 and at(again["reserved_until"]) >= at(first["reserved_until"])
    assert await shop.available(product) == 1

    other = {**reserve, "p_order_id": new_order_id()}
    await shop.refused("out_of_stock", "reserve_product_for_purchase", **other, p_quantity=2)
    assert await shop.available(product) == 1
    await shop.refused("invalid_quantity", "reserve_product_for_purchase", **other, p_quantity=0)

    assert await shop.call("release_reservation", p_order_id=order_id) == {"released": 2}
    assert await shop.call("release_reservation", p_order_id=order_id) == {"released": 0}
    assert await shop.available(product) == 3


async def test_a_lapsed_reservation_is_available_and_can_be_claimed(shop: Shop) -> None:
    contested = await shop.product(stock=1)
    kept = await shop.product(stock=1)
    lapsed = await shop.order(contested, ttl=1)
    held = await shop.order(kept, ttl=1)
    assert await shop.available(contested) == 0
    await asyncio.sleep(1.1)

    # Nothing released it, yet the unit is for sale again and the next buyer gets it.
    assert await shop.available(contested) == 1
    winner = await shop.order(contested)
    assert winner["order_type"] == "instant"
    await shop.refused("reservation_lost", "complete_purchase", **_complete(lapsed))
    assert (await shop.complete(winner["order_id"]))["order"]["status"] == "delivered"

    # A lapsed reservation nobody took still completes.
    assert (await shop.complete(held["order_id"]))["order"]["status"] == "delivered"


def _complete(order: dict[str, Any]) -> dict[str, Any]:
    return {
        "p_order_id": order["order_id"],
        "p_payment_method": "stars",
        "p_payment_reference": "charge-late",
    }


async def test_expiry_releases_and_a_late_payment_reserves_again(shop: Shop) -> None:
    product = await shop.product(price=800, stock=1)
    order = await shop.order(product)
    expired = await shop.call("expire_order", p_order_id=order["order_id"])
    assert expired["status"] == "expired"
    assert await shop.call("expire_order", p_order_id=order["order_id"]) == expired
    assert await shop.available(product) == 1
    await shop.refused("reservation_lost", "complete_purchase", **_complete(order))

    again = await shop.call(
        "reserve_product_for_purchase",
        p_order_id=order["order_id"],
        p_product_id=product,
        p_quantity=1,
        p_ttl_seconds=60,
    )
    assert again["amount"] == 800
    assert (await shop.call("get_order", p_order_id=order["order_id"]))["reserved_until"]
    done = await shop.complete(order["order_id"], "charge-late")
    assert done["order"]["status"] == "delivered" and len(done["content"]) == 1
    await shop.refused("wrong_state", "expire_order", p_order_id=order["order_id"])
    await shop.refused("order_not_found", "expire_order", p_order_id=new_order_id())


async def test_complete_purchase_refusals(shop: Shop) -> None:
    product = await shop.product(stock=2)
    released = await shop.order(product)
    await shop.call("release_reservation", p_order_id=released["order_id"])
    await shop.refused("reservation_lost", "complete_purchase", **_complete(released))

    refunded = await shop.order(product)
    await shop.call(
        "record_external_refund",
        p_order_id=refunded["order_id"],
        p_method="stars",
        p_reference="refund-1",
        p_amount=refunded["amount"],
        p_reason="customer asked",
    )
    await shop.refused("wrong_state", "complete_purchase", **_complete(refunded))
    await shop.refused(
        "order_not_found", "complete_purchase", **_complete({"order_id": new_order_id()})
    )


# --- Made to order -------------------------------------------------------------------------


async def test_prepaid_order_is_fulfilled_by_its_supplier(shop: Shop) -> None:
    supplier, token = await shop.supplier()
    stranger, _ = await shop.supplier()
    product = await shop.product(price=4900, made_to_order=True, hours=24, supplier=supplier)
    order = await shop.order(product, quantity=2)
    assert order["order_type"] == "prepaid" and order["amount"] == 9800
    assert order["supplier_id"] == supplier and order["fulfillment_deadline"]
    assert (
        order["supplier_chat_id"]
        == (
            await shop.call(
                "supplier_for_token", p_token_hash=(hashlib.sha256(token.encode()).hexdigest())
            )
        )["telegram_chat_id"]
    )
    order_id = order["order_id"]

    await shop.refused(
        "wrong_state",
        "submit_fulfilment",
        p_order_id=order_id,
        p_supplier_id=supplier,
        p_content="too early",
    )
    paid = await shop.call(
        "process_prepaid_payment",
        p_order_id=order_id,
        p_payment_method="stripe",
        p_payment_reference="pi_1",
    )
    assert paid["status"] == "awaiting_supplier" and paid["paid_at"]
    assert at(paid["fulfillment_deadline"]) >= at(order["fulfillment_deadline"])
    again = await shop.call(
        "process_prepaid_payment",
        p_order_id=order_id,
        p_payment_method="stripe",
        p_payment_reference="pi_1",
    )
    assert again == paid
    await shop.refused(
        "wrong_state",
        "process_prepaid_payment",
        p_order_id=order_id,
        p_payment_method="stripe",
        p_payment_reference="pi_2",
    )

    found = await shop.call(
        "supplier_for_token", p_token_hash=hashlib.sha256(token.encode()).hexdigest()
    )
    assert found["id"] == supplier and found["name"] == "Test supplier"
    assert await shop.call("supplier_for_token", p_token_hash="0" * 64) is None
    waiting = await shop.call(
        "supplier_orders", p_supplier_id=supplier, p_status="awaiting_supplier"
    )
    assert [o["order_id"] for o in waiting] == [order_id]
    assert await shop.call("supplier_orders", p_supplier_id=stranger, p_status=None) == []

    submit = {"p_order_id": order_id, "p_content": "https://example.com/logo.svg"}
    await shop.refused("order_not_found", "submit_fulfilment", **submit, p_supplier_id=stranger)
    submission = await shop.call("submit_fulfilment", **submit, p_supplier_id=supplier)
    delivered = await shop.call(
        "fulfill_prepaid_order", p_order_id=order_id, p_submission_id=submission["submission_id"]
    )
    assert delivered["status"] == "delivered" and delivered["delivered_at"]
    again = await shop.call(
        "fulfill_prepaid_order", p_order_id=order_id, p_submission_id=submission["submission_id"]
    )
    assert again == delivered
    await shop.refused("already_fulfilled", "submit_fulfilment", **submit, p_supplier_id=supplier)
    content = await shop.call("get_order_content", p_order_id=order_id)
    assert content["items"] == ["https://example.com/logo.svg"]


async def test_prepaid_past_its_deadline_is_refunded_to_the_balance_once(shop: Shop) -> None:
    supplier, _ = await shop.supplier()
    # 0.00025 h is 0.9 s.
    product = await shop.product(price=3000, made_to_order=True, hours=0.00025, supplier=supplier)
    user = new_user()
    order = await shop.order(product, user=user)
    await shop.refused("not_paid", "process_refund", p_order_id=order["order_id"], p_reason="x")
    await shop.call(
        "process_prepaid_payment",
        p_order_id=order["order_id"],
        p_payment_method="stars",
        p_payment_reference="charge-p",
    )
    await asyncio.sleep(1.0)
    await shop.refused(
        "deadline_passed",
        "submit_fulfilment",
        p_order_id=order["order_id"],
        p_supplier_id=supplier,
        p_content="late work",
    )

    refund = await shop.call("process_refund", p_order_id=order["order_id"], p_reason="deadline")
    assert refund["credited"] is True and refund["balance"] == 3000
    assert refund["order"]["status"] == "refunded"
    assert refund["order"]["refund_method"] == "balance"
    assert refund["order"]["refund_amount"] == 3000
    again = await shop.call("process_refund", p_order_id=order["order_id"], p_reason="deadline")
    assert again == {"order": refund["order"], "credited": False, "balance": 3000}
    assert await shop.ledger_sum(user) == 3000
    await shop.refused(
        "wrong_state", "fulfill_prepaid_order", p_order_id=order["order_id"], p_submission_id=1
    )


# --- Money ---------------------------------------------------------------------------------


async def test_balance_changes_are_idempotent_and_never_negative(shop: Shop) -> None:
    user = new_user()
    add = {"p_telegram_id": user, "p_reason": "top-up"}
    await shop.refused(
        "invalid_amount",
        "add_to_user_balance",
        **add,
        p_amount=0,
        p_idempotency_key=uuid.uuid4().hex,
    )
    await shop.refused(
        "insufficient_balance",
        "add_to_user_balance",
        **add,
        p_amount=-1,
        p_idempotency_key=uuid.uuid4().hex,
    )

    key = uuid.uuid4().hex
    first = await shop.call("add_to_user_balance", **add, p_amount=1500, p_idempotency_key=key)
    assert first["balance"] == 1500 and first["applied"] is True
    again = await shop.call("add_to_user_balance", **add, p_amount=1500, p_idempotency_key=key)
    assert again == first | {"applied": False}
    await shop.refused(
        "idempotency_conflict", "add_to_user_balance", **add, p_amount=1600, p_idempotency_key=key
    )
    await shop.refused(
        "idempotency_conflict",
        "add_to_user_balance",
        **add | {"p_telegram_id": new_user()},
        p_amount=1500,
        p_idempotency_key=key,
    )

    spent = await shop.call(
        "add_to_user_balance", **add, p_amount=-1500, p_idempotency_key=uuid.uuid4().hex
    )
    assert spent["balance"] == 0
    assert await shop.ledger_sum(user) == 0


async def test_paying_from_the_balance(shop: Shop) -> None:
    product = await shop.product(price=1200, stock=3)
    user = new_user()
    await shop.call(
        "add_to_user_balance",
        p_telegram_id=user,
        p_amount=2000,
        p_reason="top-up",
        p_idempotency_key=uuid.uuid4().hex,
    )

    order = await shop.order(product, user=user, method="balance")
    paid = await shop.call("pay_order_from_balance", p_order_id=order["order_id"])
    assert paid["balance"] == 800 and paid["transaction_id"]
    assert await shop.call("pay_order_from_balance", p_order_id=order["order_id"]) == paid
    done = await shop.call(
        "complete_purchase",
        p_order_id=order["order_id"],
        p_payment_method="balance",
        p_payment_reference=str(paid["transaction_id"]),
    )
    assert done["order"]["status"] == "delivered"
    # Retried after delivery: still the one debit.
    assert await shop.call("pay_order_from_balance", p_order_id=order["order_id"]) == paid

    short = await shop.order(product, user=user, method="stars")  # no balance check for Stars
    await shop.refused(
        "insufficient_balance", "pay_order_from_balance", p_order_id=short["order_id"]
    )
    await shop.call("expire_order", p_order_id=short["order_id"])
    await shop.call(
        "set_order_status", p_order_id=short["order_id"], p_status="failed", p_reason="gave up"
    )
    await shop.refused("wrong_state", "pay_order_from_balance", p_order_id=short["order_id"])
    await shop.refused("order_not_found", "pay_order_from_balance", p_order_id=new_order_id())
    assert await shop.ledger_sum(user) == 800

    # A debited order never ends failed or expired with the money kept: only a refund
    # (or delivery) ends it.
    await shop.call("add_to_user_balance", p_telegram_id=user, p_amount=400,
                    p_reason="top-up", p_idempotency_key=uuid.uuid4().hex)  # fmt: skip
    kept = await shop.order(product, user=user, method="balance")
    await shop.call("pay_order_from_balance", p_order_id=kept["order_id"])
    await shop.refused("wrong_state", "expire_order", p_order_id=kept["order_id"])
    await shop.refused(
        "wrong_state", "set_order_status",
        p_order_id=kept["order_id"], p_status="failed", p_reason="lost answer",
    )  # fmt: skip
    back = await shop.call("process_refund", p_order_id=kept["order_id"], p_reason="lost answer")
    assert back["credited"] and back["order"]["status"] == "refunded"
    assert await shop.ledger_sum(user) == 1200


async def test_a_recorded_late_payment_is_refunded_once(shop: Shop) -> None:
    product = await shop.product(price=900, stock=1)
    user = new_user()
    order = await shop.order(product, user=user)
    order_id = order["order_id"]
    await shop.refused("not_paid", "process_refund", p_order_id=order_id, p_reason="late")

    pay = {"p_order_id": order_id, "p_payment_method": "stripe", "p_payment_reference": "pi_9"}
    recorded = await shop.call("record_payment", **pay)
    assert recorded["paid_at"] and recorded["payment_reference"] == "pi_9"
    assert await shop.call("record_payment", **pay) == recorded
    await shop.refused("wrong_state", "record_payment", **pay | {"p_payment_reference": "pi_10"})

    refunds = await asyncio.gather(
        *(shop.call("process_refund", p_order_id=order_id, p_reason="late") for _ in range(3))
    )
    assert sorted(r["credited"] for r in refunds) == [False, False, True]
    assert {r["balance"] for r in refunds} == {900}
    assert refunds[0]["order"]["status"] == "refunded"
    assert await shop.available(product) == 1  # the reservation went back on sale
    assert await shop.ledger_sum(user) == 900


async def test_an_external_refund_is_recorded_once(shop: Shop) -> None:
    product = await shop.product(price=700, stock=1)
    order = await shop.order(product)
    refund = {
        "p_order_id": order["order_id"],
        "p_method": "stars",
        "p_reference": "stars-refund-1",
        "p_amount": 700,
        "p_reason": "expired before payment arrived",
    }
    await shop.refused(
        "invalid_payment_method", "record_external_refund", **refund | {"p_method": "balance"}
    )
    await shop.refused("invalid_amount", "record_external_refund", **refund | {"p_amount": 0})
    done = await shop.call("record_external_refund", **refund)
    assert done["status"] == "refunded" and done["refund_method"] == "stars"
    assert done["refund_amount"] == 700
    assert await shop.call("record_external_refund", **refund) == done
    assert await shop.available(product) == 1
    credited = await shop.call("process_refund", p_order_id=order["order_id"], p_reason="again")
    assert credited["credited"] is False


# --- Status, users, administration ---------------------------------------------------------


async def test_order_status_and_telegram_delivery(shop: Shop) -> None:
    product = await shop.product(stock=2)
    order = await shop.order(product)
    held = await shop.call(
        "set_order_status",
        p_order_id=order["order_id"],
        p_status="needs_attention",
        p_reason="stuck",
    )
    assert held["status"] == "needs_attention"
    assert await shop.available(product) == 1  # an operator decides; the units stay held
    await shop.refused(
        "invalid_argument",
        "set_order_status",
        p_order_id=order["order_id"],
        p_status="delivered",
        p_reason=None,
    )
    done = await shop.complete(order["order_id"])
    assert done["order"]["status"] == "delivered"
    await shop.refused(
        "wrong_state",
        "set_order_status",
        p_order_id=order["order_id"],
        p_status="failed",
        p_reason=None,
    )

    for outcome in ("blocked", "sent"):
        seen = await shop.call(
            "record_telegram_delivery", p_order_id=order["order_id"], p_outcome=outcome
        )
        assert seen["telegram_delivery"] == outcome

    failed = await shop.order(product)
    gone = await shop.call(
        "set_order_status",
        p_order_id=failed["order_id"],
        p_status="failed",
        p_reason="workflow gave up",
    )
    assert gone["status"] == "failed" and gone["failure_reason"] == "workflow gave up"
    assert await shop.available(product) == 1


async def test_user_overview_and_admin_orders(shop: Shop) -> None:
    product = await shop.product(price=300, stock=3)
    user = new_user()
    unknown = await shop.call("user_overview", p_telegram_id=user, p_limit=10)
    assert unknown == {"telegram_id": user, "balance": 0, "orders": []}

    first = await shop.order(product, user=user)
    second = await shop.order(product, user=user)
    await shop.call(
        "add_to_user_balance",
        p_telegram_id=user,
        p_amount=50,
        p_reason="gift",
        p_idempotency_key=uuid.uuid4().hex,
    )
    overview = await shop.call("user_overview", p_telegram_id=user, p_limit=10)
    assert overview["balance"] == 50
    assert [o["order_id"] for o in overview["orders"]] == [second["order_id"], first["order_id"]]
    latest = await shop.call("user_overview", p_telegram_id=user, p_limit=1)
    assert [o["order_id"] for o in latest["orders"]] == [second["order_id"]]

    recent = await shop.call("admin_shop_orders", p_status="awaiting_payment", p_limit=500)
    assert {first["order_id"], second["order_id"]} <= {o["order_id"] for o in recent}
    assert all(o["status"] == "awaiting_payment" for o in recent)


async def test_admin_refusals(shop: Shop) -> None:
    product = {
        "p_name": "X",
        "p_description": "",
        "p_price": 100,
        "p_currency": "usd",
        "p_fulfillment_time_hours": None,
    }
    await shop.refused(
        "supplier_not_found",
        "admin_create_product",
        **product,
        p_made_to_order=False,
        p_supplier_id=10**12,
    )
    await shop.refused(
        "supplier_not_found",
        "admin_create_product",
        **product,
        p_made_to_order=True,
        p_supplier_id=None,
    )
    await shop.refused(
        "invalid_amount",
        "admin_create_product",
        **product | {"p_price": 0},
        p_made_to_order=False,
        p_supplier_id=None,
    )
    await shop.refused("product_not_found", "admin_add_stock", p_product_id=10**12, p_items=["a"])
    real = await shop.product()
    await shop.refused("invalid_argument", "admin_add_stock", p_product_id=real, p_items=["a", ""])
    await shop.refused(
        "invalid_argument",
        "admin_add_stock",
        p_product_id=real,
        p_items=["a"],
        p_discount_percent=95,
    )
    assert await shop.call("admin_add_stock", p_product_id=real, p_items=["a"]) == {"added": 1}


async def test_each_telegram_update_is_claimed_once(shop: Shop) -> None:
    update = new_user()
    claims = await asyncio.gather(
        *(shop.call("claim_telegram_update", p_update_id=update) for _ in range(4))
    )
    assert sorted(c["claimed"] for c in claims) == [False, False, False, True]


async def test_both_transports_return_the_same_json(
    postgres_db: PostgresShopDb, supabase_db: SupabaseShopDb, sql_pool: asyncpg.Pool
) -> None:
    shop = Shop(postgres_db, sql_pool)
    order = await shop.order(await shop.product(stock=1))
    for function, params in [
        ("get_order", {"p_order_id": order["order_id"]}),
        ("user_overview", {"p_telegram_id": order["telegram_id"], "p_limit": 5}),
        ("shop_catalog", {"p_stars_per_unit": STARS}),
    ]:
        assert await postgres_db.rpc(function, params) == await supabase_db.rpc(function, params)


async def test_settings_choose_the_transport(
    database_url: str, shop_sandbox_url: str, tmp_path: Path
) -> None:
    direct = make_settings(tmp_path, database_url, "127.0.0.1:7233")
    supabase = direct.model_copy(
        update={
            "supabase_url": f"{shop_sandbox_url}/supabase",
            "supabase_service_role_key": SANDBOX_SUPABASE_KEY,
        }
    )
    for settings, kind in [(direct, PostgresShopDb), (supabase, SupabaseShopDb)]:
        async with open_shop_db(settings) as db:
            assert isinstance(db, kind)
            assert await db.rpc("get_order", {"p_order_id": new_order_id()}) is None


# --- Concurrency ---------------------------------------------------------------------------


async def _buyers(shop: Shop, buyers: int, units: int) -> None:
    product = await shop.product(price=100)
    stocked = await shop.stock(product, units)

    async def buy() -> dict[str, Any] | None:
        try:
            return await shop.order(product)
        except ShopError as err:
            assert err.code == "out_of_stock", err
            return None

    orders = [o for o in await asyncio.gather(*(buy() for _ in range(buyers))) if o]
    assert len(orders) == units
    done = await asyncio.gather(*(shop.complete(o["order_id"]) for o in orders))
    sold = [item for d in done for item in d["content"]]
    assert sorted(sold) == sorted(stocked)  # every unit sold, none twice
    assert await shop.available(product) == 0


async def test_200_buyers_for_50_units_buy_exactly_50(
    postgres_db: PostgresShopDb, sql_pool: asyncpg.Pool
) -> None:
    await _buyers(Shop(postgres_db, sql_pool), buyers=200, units=50)


async def test_concurrent_buyers_over_supabase(
    supabase_db: SupabaseShopDb, sql_pool: asyncpg.Pool
) -> None:
    await _buyers(Shop(supabase_db, sql_pool), buyers=40, units=10)


async def test_the_ledger_matches_the_balance_under_concurrent_changes(shop: Shop) -> None:
    user = new_user()
    await shop.call(
        "add_to_user_balance",
        p_telegram_id=user,
        p_amount=500,
        p_reason="seed",
        p_idempotency_key=uuid.uuid4().hex,
    )
    changes = [(uuid.uuid4().hex, amount) for amount in [120, -170] * 20]
    changes += changes[:10]  # redelivered: each key acts once

    async def change(key: str, amount: int) -> int:
        try:
            result = await shop.call(
                "add_to_user_balance",
                p_telegram_id=user,
                p_amount=amount,
                p_reason="test",
                p_idempotency_key=key,
            )
        except ShopError as err:
            assert err.code == "insufficient_balance", err
            return 0
        assert result["balance"] >= 0
        return amount if result["applied"] else 0

    applied = await asyncio.gather(*(change(key, amount) for key, amount in changes))
    overview = await shop.call("user_overview", p_telegram_id=user, p_limit=1)
    assert overview["balance"] == 500 + sum(applied) >= 0
    assert await shop.ledger_sum(user) == overview["balance"]


# --- The PostgREST stand-in ----------------------------------------------------------------


async def test_the_sandbox_answers_as_postgrest(shop_sandbox_url: str) -> None:
    base = f"{shop_sandbox_url}/supabase/rest/v1/rpc"
    key = {"apikey": SANDBOX_SUPABASE_KEY, "Authorization": f"Bearer {SANDBOX_SUPABASE_KEY}"}
    async with httpx.AsyncClient(base_url=base) as http:
        resp = await http.post("/get_order", json={"p_order_id": new_order_id()})
        assert resp.status_code == 401
        resp = await http.post("/get_order", json={}, headers={"apikey": "guess"})
        assert resp.status_code == 401 and resp.json()["message"] == "Invalid API key"

        resp = await http.post("/get_order", json={"p_order_id": new_order_id()}, headers=key)
        assert resp.status_code == 200 and resp.json() is None

        resp = await http.post("/no_such_function", json={"p_x": 1}, headers=key)
        assert resp.status_code == 404
        assert resp.json()["code"] == "PGRST202" and set(resp.json()) == {
            "code",
            "message",
            "details",
            "hint",
        }
        resp = await http.post("/get_order", json={"p_wrong": 1}, headers=key)
        assert resp.status_code == 404 and resp.json()["code"] == "PGRST202"

        resp = await http.post("/expire_order", json={"p_order_id": new_order_id()}, headers=key)
        assert resp.status_code == 400
        assert resp.json() == {
            "code": "P0001",
            "message": "order_not_found",
            "details": resp.json()["details"],
            "hint": None,
        }
        resp = await http.post("/get_order", json={"p_order_id": "not-a-uuid"}, headers=key)
        assert resp.status_code == 400 and resp.json()["code"] == "22P02"

        supplier = {"p_name": "Twice", "p_telegram_chat_id": 1, "p_token_hash": "ab" * 32}
        resp = await http.post("/admin_create_supplier", json=supplier, headers=key)
        assert resp.status_code == 200
        resp = await http.post("/admin_create_supplier", json=supplier, headers=key)
        assert resp.status_code == 409 and resp.json()["code"] == "23505"


async def test_the_sandbox_starts_without_a_database(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    service, url = start_sandbox(tmp_path_factory.mktemp("no-db"), None)
    try:
        await wait_http(f"{url}/healthz")
        db = await SupabaseShopDb.connect(f"{url}/supabase", SANDBOX_SUPABASE_KEY)
        try:
            # An outage, which callers retry (the API answers 503), never a refusal.
            with pytest.raises(ShopUnavailable) as info:
                await db.rpc("get_order", {"p_order_id": new_order_id()})
            assert getattr(info.value.__cause__, "code", None) == "PGRST000"
        finally:
            await db.close()
    finally:
        service.stop()
    assert service.error is None


# --- The demo catalogue --------------------------------------------------------------------


async def test_the_demo_catalogue_loads_once_into_an_empty_shop(database_url: str) -> None:
    name = f"demo_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        dsn = database_url.replace("/orderflow?", f"/{name}?")
        await apply_migrations(dsn)
        assert await load_demo_catalog(dsn) is True
        assert await load_demo_catalog(dsn) is False
        db = await PostgresShopDb.connect(dsn, max_size=1)
        try:
            catalog = await db.rpc("shop_catalog", {"p_stars_per_unit": STARS})
            supplier = await db.rpc(
                "supplier_for_token",
                {"p_token_hash": hashlib.sha256(b"demo-supplier-token").hexdigest()},
            )
        finally:
            await db.close()
        assert len(catalog) == 16
        assert sum(p["made_to_order"] for p in catalog) == 3
        assert any(p["discount_percent"] > 0 for p in catalog)
        assert all(p["available"] > 0 for p in catalog if not p["made_to_order"])
        assert supplier is not None and supplier["name"] == "Demo Studio"
        assert json.dumps(catalog, ensure_ascii=False).count("/") > 8  # English / Russian
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
