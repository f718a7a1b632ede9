"""What the shop's tests do as its users: an operator, a supplier, Telegram and its customers.

Everything goes over HTTP: the API with its tokens and signed initData, the sandbox's Bot
API control surface as a customer, and updates posted to the webhook as Telegram posts
them (with the secret header).
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx

from tests.conftest import Stack

_user_ids = itertools.count(int(time.time()) % 1_000_000 * 1000 + 7_000_000_000)
_update_ids = itertools.count(int(time.time() * 1000) % 10**12 * 10)


def new_user_id() -> int:
    """A Telegram user no other test uses."""
    return next(_user_ids)


@dataclass
class Shop:
    stack: Stack
    sandbox: httpx.AsyncClient

    @property
    def api(self) -> httpx.AsyncClient:
        return self.stack.http

    # --- operator -------------------------------------------------------------------

    async def product(
        self,
        stock: int = 5,
        price: int = 499,
        made_to_order: bool = False,
        hours: float = 48,
        discount: int = 0,
        supplier_id: int | None = None,
        name: str | None = None,
    ) -> int:
        resp = await self.stack.admin(
            "POST",
            "/products",
            json={
                "name": name or f"Template pack {uuid.uuid4().hex[:6]}",
                "description": "A test product",
                "price": price,
                "made_to_order": made_to_order,
                "fulfillment_time_hours": hours,
                "supplier_id": supplier_id,
            },
        )
        assert resp.status_code == 201, resp.text
        product_id = resp.json()["id"]
        if stock:
            await self.add_stock(product_id, stock, discount)
        return product_id

    async def add_stock(self, product_id: int, count: int, discount: int = 0) -> None:
        items = [f"KEY-{product_id}-{uuid.uuid4().hex[:10]}" for _ in range(count)]
        resp = await self.stack.admin(
            "POST",
            f"/products/{product_id}/stock",
            json={"items": items, "discount_percent": discount},
        )
        assert resp.status_code == 200 and resp.json()["added"] == count, resp.text

    async def supplier(self, chat_id: int | None = None) -> tuple[int, str, int]:
        chat_id = chat_id or new_user_id()
        resp = await self.stack.admin(
            "POST", "/suppliers", json={"name": "Studio", "telegram_chat_id": chat_id}
        )
        assert resp.status_code == 201, resp.text
        return resp.json()["id"], resp.json()["token"], chat_id

    async def credit(self, telegram_id: int, amount: int) -> int:
        resp = await self.stack.admin(
            "POST",
            f"/users/{telegram_id}/balance",
            json={"amount": amount, "reason": "test top-up", "idempotency_key": uuid.uuid4().hex},
        )
        assert resp.status_code == 200, resp.text
        return resp.json()["balance"]

    # --- customer in the Mini App ---------------------------------------------------

    async def init_data(self, user_id: int, **extra: Any) -> str:
        resp = await self.sandbox.get(
            "/telegram/_sandbox/init-data", params={"user_id": user_id, **extra}
        )
        assert resp.status_code == 200, resp.text
        return resp.json()["init_data"]

    async def as_user(self, user_id: int) -> dict[str, str]:
        return {"Authorization": f"tma {await self.init_data(user_id)}"}

    async def order(
        self, user_id: int, product_id: int, method: str = "stars", quantity: int = 1
    ) -> httpx.Response:
        return await self.api.post(
            "/api/shop/orders",
            json={"product_id": product_id, "quantity": quantity, "payment_method": method},
            headers=await self.as_user(user_id),
        )

    async def get(self, user_id: int, order_id: str) -> httpx.Response:
        return await self.api.get(
            f"/api/shop/orders/{order_id}", headers=await self.as_user(user_id)
        )

    async def wait_status(
        self, user_id: int, order_id: str, *statuses: str, timeout: float = 30
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = False
        while True:
            resp = await self.get(user_id, order_id)
            if resp.status_code == 404 and not seen and time.monotonic() < deadline:
                # A workflow started a moment ago may not have written its order row yet.
                await asyncio.sleep(0.1)
                continue
            assert resp.status_code == 200, resp.text
            seen = True
            order = resp.json()
            if order["status"] in statuses:
                return order
            if time.monotonic() > deadline:
                raise AssertionError(f"order stayed {order['status']}, wanted {statuses}")
            await asyncio.sleep(0.2)

    async def me(self, user_id: int) -> dict[str, Any]:
        resp = await self.api.get("/api/shop/me", headers=await self.as_user(user_id))
        assert resp.status_code == 200, resp.text
        return resp.json()

    # --- customer in Telegram -------------------------------------------------------

    async def pay_invoice(self, link: str, user_id: int, delay: float = 0) -> dict[str, Any]:
        """The customer pays a Stars invoice; `delay` holds the payment after the approval."""
        slug = link.rsplit("$", 1)[1]
        resp = await self.sandbox.post(
            f"/telegram/_sandbox/invoices/{slug}/pay",
            json={"user_id": user_id, "payment_delay_seconds": delay},
        )
        assert resp.status_code == 200, resp.text
        return resp.json()

    async def messages(self, chat_id: int) -> list[dict[str, Any]]:
        resp = await self.sandbox.get(f"/telegram/_sandbox/chats/{chat_id}/messages")
        assert resp.status_code == 200, resp.text
        return resp.json()

    async def wait_message(
        self, chat_id: int, contains: str, timeout: float = 30
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for message in await self.messages(chat_id):
                text = (message.get("text") or "") + str(message.get("document") or "")
                if contains in text:
                    return message
            if time.monotonic() > deadline:
                raise AssertionError(f"no message containing {contains!r} in chat {chat_id}")
            await asyncio.sleep(0.2)

    async def star_refunds(self) -> list[dict[str, Any]]:
        resp = await self.sandbox.get("/telegram/_sandbox/refunds")
        assert resp.status_code == 200, resp.text
        return resp.json()

    async def post_update(
        self, update: dict[str, Any], secret: str | None = None
    ) -> httpx.Response:
        """An update as Telegram posts it to the webhook."""
        update.setdefault("update_id", next(_update_ids))
        secret = secret if secret is not None else self.stack.settings.telegram_secret
        return await self.api.post(
            "/webhooks/telegram",
            json=update,
            headers={"X-Telegram-Bot-Api-Secret-Token": secret},
        )

    async def fault(self, chat_id: int, times: int, retry_after: int = 1) -> None:
        resp = await self.sandbox.post(
            "/telegram/_sandbox/faults",
            json={
                "chat_id": chat_id,
                "mode": "rate_limit",
                "times": times,
                "retry_after": retry_after,
            },
        )
        assert resp.status_code == 200, resp.text

    async def block(self, chat_id: int, blocked: bool = True) -> None:
        resp = await self.sandbox.post(
            f"/telegram/_sandbox/chats/{chat_id}/block", json={"blocked": blocked}
        )
        assert resp.status_code == 200, resp.text
