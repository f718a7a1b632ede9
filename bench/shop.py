"""The shop's figures: reservations on one hot product, units sold against stock, and Stars
purchases end to end (`python -m bench --figures efg`).

e. 64 buyers reserve one unit at a time of one product, through the shop's SQL function
   (`reserve_product_for_purchase` via asyncpg), until its stock is gone; the baseline is a
   bare `FOR UPDATE SKIP LOCKED` claim loop, one UPDATE per unit, with as many connections on
   another product of the same stock, on the same database in the same run. Runs alternate
   (baseline, ours, baseline, ours) and each side's rate is the mean of its runs.
f. After e, every product's units: all reserved, each by one order, none twice.
g. Buyers each order an in-stock item in the Mini App API (their own signed initData), pay
   its Stars invoice on the sandbox and wait for the goods: orders per second, and from
   payment to delivered.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import httpx

from activities.shop_db import PostgresShopDb, ShopError
from bench.orders import Report, Row, percentile, ratio, verdict
from bench.stack import Target, log

BUYERS = 64
RESERVATION_TARGET = 0.8
# A user id range no demo or developer account uses.
FIRST_USER = 8_800_000_000

RAW_CLAIM = """
UPDATE stock_items SET status = 'reserved', order_id = $2,
       reserved_until = now() + interval '15 minutes'
WHERE id = (
    SELECT id FROM stock_items
    WHERE product_id = $1 AND status = 'available'
    ORDER BY discount_percent DESC, id
    LIMIT 1 FOR UPDATE SKIP LOCKED
)
RETURNING id
"""


async def _product(db: PostgresShopDb, stock: int, name: str) -> int:
    created = await db.rpc(
        "admin_create_product",
        {
            "p_name": name,
            "p_description": "bench",
            "p_price": 100,
            "p_currency": "usd",
            "p_made_to_order": False,
            "p_fulfillment_time_hours": 48,
            "p_supplier_id": None,
        },
    )
    product = int(created["id"])
    for start in range(0, stock, 1000):
        items = [f"BENCH-{product}-{i}" for i in range(start, min(stock, start + 1000))]
        await db.rpc(
            "admin_add_stock",
            {"p_product_id": product, "p_items": items, "p_discount_percent": 0},
        )
    return product


async def _drain(buyers: int, claim: Callable[[], Awaitable[bool]]) -> float:
    """Seconds until `buyers` concurrent loops of `claim` find nothing left."""

    async def buyer() -> None:
        while await claim():
            pass

    started = time.perf_counter()
    await asyncio.gather(*(buyer() for _ in range(buyers)))
    return time.perf_counter() - started


async def _ours(db: PostgresShopDb, product: int) -> bool:
    try:
        await db.rpc(
            "reserve_product_for_purchase",
            {
                "p_order_id": str(uuid.uuid4()),
                "p_product_id": product,
                "p_quantity": 1,
                "p_ttl_seconds": 900,
            },
        )
    except ShopError as err:
        if err.code == "out_of_stock":
            return False
        raise
    return True


async def reservations(dsn: str, stock: int, report: Report) -> None:
    # One pool of 64 connections, opened before any timing, for both sides: the database
    # allows about a hundred clients and the stack holds some of them.
    raw = await asyncpg.create_pool(dsn, min_size=BUYERS, max_size=BUYERS)
    db = PostgresShopDb(raw)
    try:
        ours_rates: list[float] = []
        raw_rates: list[float] = []
        products: dict[int, str] = {}
        for run in range(2):
            baseline = await _product(db, stock, f"bench raw {run}")
            products[baseline] = "raw"

            async def raw_claim(product: int = baseline) -> bool:
                return await raw.fetchval(RAW_CLAIM, product, uuid.uuid4()) is not None

            log(f"e: raw SKIP LOCKED claims, {stock} units, {BUYERS} buyers (run {run + 1})")
            raw_rates.append(stock / await _drain(BUYERS, raw_claim))

            hot = await _product(db, stock, f"bench hot {run}")
            products[hot] = "ours"
            log(f"e: reserve_product_for_purchase, {stock} units (run {run + 1})")
            ours_rates.append(stock / await _drain(BUYERS, lambda product=hot: _ours(db, product)))
        ours_rate = sum(ours_rates) / len(ours_rates)
        raw_rate = sum(raw_rates) / len(raw_rates)
        report.add(
            "e",
            Row(
                "e. reservations/s, 64 buyers, one product",
                f"{ours_rate:.0f}/s",
                f"{raw_rate:.0f}/s",
                ratio(ours_rate, raw_rate),
                f">= {RESERVATION_TARGET}x",
                verdict(ours_rate >= RESERVATION_TARGET * raw_rate),
            ),
        )
        report.notes.append(
            "  e: runs alternate, baseline first; per run ours "
            + ", ".join(f"{r:.0f}/s" for r in ours_rates)
            + ", baseline "
            + ", ".join(f"{r:.0f}/s" for r in raw_rates)
        )
        await _sold_against_stock(raw, products, stock, report)
    finally:
        await raw.close()


async def _sold_against_stock(
    pool: asyncpg.Pool, products: dict[int, str], stock: int, report: Report
) -> None:
    rows = await pool.fetch(
        """
        SELECT product_id, count(*) FILTER (WHERE status = 'reserved') AS reserved,
               count(DISTINCT order_id) AS orders, count(*) AS units
        FROM stock_items WHERE product_id = ANY($1::bigint[]) GROUP BY product_id
        """,
        list(products),
    )
    ok = len(rows) == len(products) and all(
        r["reserved"] == r["orders"] == r["units"] == stock for r in rows
    )
    ours = [r for r in rows if products[r["product_id"]] == "ours"]
    report.add(
        "f",
        Row(
            "f. units sold against stock",
            " + ".join(f"{r['reserved']}" for r in ours) + f" of {len(ours)} x {stock}",
            "-",
            "-",
            "equal, none twice",
            verdict(ok),
        ),
    )


async def purchases(target: Target, orders: int, concurrency: int, report: Report) -> None:
    admin = {"Authorization": f"Bearer {target.admin_token}"}
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with (
        httpx.AsyncClient(base_url=target.api_url, timeout=60, limits=limits) as api,
        httpx.AsyncClient(base_url=target.sandbox_url, timeout=60, limits=limits) as sandbox,
    ):
        created = await api.post(
            "/api/admin/products",
            json={"name": "bench stars item", "price": 199, "made_to_order": False},
            headers=admin,
        )
        created.raise_for_status()
        product = created.json()["id"]
        items = [f"BENCH-STARS-{i}" for i in range(orders)]
        added = await api.post(
            f"/api/admin/products/{product}/stock", json={"items": items}, headers=admin
        )
        added.raise_for_status()

        delays: list[float] = []
        users = iter(range(FIRST_USER + int(time.time()) % 100_000 * 1000, 10**13))

        async def one() -> None:
            user = next(users)
            signed = await sandbox.get("/telegram/_sandbox/init-data", params={"user_id": user})
            auth = {"Authorization": f"tma {signed.json()['init_data']}"}
            resp = await api.post(
                "/api/shop/orders",
                json={"product_id": product, "quantity": 1, "payment_method": "stars"},
                headers=auth,
            )
            resp.raise_for_status()
            order = resp.json()
            slug = order["payment"]["invoice_link"].rsplit("$", 1)[1]
            paid_at = time.perf_counter()
            paid = await sandbox.post(
                f"/telegram/_sandbox/invoices/{slug}/pay", json={"user_id": user}
            )
            if paid.json().get("status") != "paid":
                raise RuntimeError(f"payment {paid.json()}")
            while True:
                status = await api.get(f"/api/shop/orders/{order['order_id']}", headers=auth)
                if status.json()["status"] == "delivered":
                    break
                await asyncio.sleep(0.05)
            delays.append(time.perf_counter() - paid_at)

        gate = asyncio.Semaphore(concurrency)

        async def slot() -> None:
            async with gate:
                await one()

        log(f"g: {orders} Stars purchases, {concurrency} at once")
        started = time.perf_counter()
        await asyncio.gather(*(slot() for _ in range(orders)))
        elapsed = time.perf_counter() - started
    report.add(
        "g",
        Row(
            f"g. Stars purchases/s end to end ({concurrency} in flight)",
            f"{orders / elapsed:.1f}/s",
        ),
    )
    report.add(
        "g",
        Row(
            "g. payment -> delivered p50, p99",
            f"{percentile(delays, 50) * 1000:.0f} ms, {percentile(delays, 99) * 1000:.0f} ms",
        ),
    )


def shop_figures(args: Any, target: Target, report: Report) -> list[Awaitable[None]]:
    work: list[Awaitable[None]] = []
    if {"e", "f"} & set(args.figures):
        if target.database_url is None:
            report.problems.append("e, f: need DATABASE_URL of the stack's database")
        else:
            work.append(reservations(target.database_url, args.stock, report))
    if "g" in args.figures:
        work.append(purchases(target, args.shop_orders, min(args.concurrency, 20), report))
    return work
