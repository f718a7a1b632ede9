"""A person on the sandbox's phone page buys through the assistant: writes to the bot in
their own words, taps the offer's Stars button, pays the invoice, and reads the goods.

Uses Debian's chromium; a missing browser fails the test rather than skipping it.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from playwright.async_api import expect

from tests.shopkit import Shop, new_user_id
from tests.test_browser import phone_page


async def test_the_phone_page_buys_through_the_assistant(shop: Shop, tmp_path: Path) -> None:
    code = "zq" + uuid.uuid4().hex[:6]
    await shop.product(stock=2, price=700, name=f"Планер {code} / Planner {code}")
    user = new_user_id()
    async with phone_page(tmp_path / "phone.png") as (page, script_errors):
        await page.goto(f"{shop.stack.sandbox_url}/telegram/phone?user_id={user}")
        await page.locator("#text").fill(f"Хочу планер {code}")
        await page.locator("#text").press("Enter")
        # The shop's offer, with its price from the database, and a button per way to pay.
        offer = page.locator(".msg.bot", has_text="Цена:")
        await expect(offer).to_contain_text("7.00 USD", timeout=30_000)
        await offer.get_by_role("button", name="Оплатить 350 ⭐").click()
        invoice = page.locator(".msg.bot", has_text="Нажмите, чтобы оплатить")
        await invoice.get_by_role("button", name="Pay with Stars").click()
        goods = page.locator(".msg.bot", has_text="KEY-")
        await expect(goods).to_contain_text("Your order", timeout=30_000)
    [order] = (await shop.me(user))["orders"]
    assert order["status"] == "delivered" and order["amount"] == 700
    assert order["payment_method"] == "stars"
    assert not script_errors
