"""A Telegram customer in a real browser: the Mini App, with the sandbox's stand-in for
Telegram's WebApp script, buys an in-stock item with Stars and sees the goods.

Uses Debian's chromium; a missing browser fails the test rather than skipping it.
"""

from __future__ import annotations

from pathlib import Path

from playwright.async_api import expect

from tests.shopkit import Shop, new_user_id
from tests.test_browser import phone_page


async def test_miniapp_buys_with_stars_and_shows_the_goods(shop: Shop, tmp_path: Path) -> None:
    name = f"Icon set {new_user_id()}"
    product = await shop.product(stock=2, price=1000, discount=20, name=name)
    user = new_user_id()
    async with phone_page(tmp_path / "miniapp.png") as (page, script_errors):
        await page.goto(f"{shop.stack.api_url}/app?user={user}")
        card = page.locator(f'[data-product="{product}"]')
        # The final price, the old one struck through, the discount and the stock.
        await expect(card).to_contain_text("8.00 USD")
        await expect(card.locator(".old")).to_have_text("10.00 USD")
        await expect(card).to_contain_text("-20%")
        await expect(card).to_contain_text("2 in stock")
        await card.get_by_role("button", name="Buy").click()

        await page.get_by_label("Telegram Stars").check()
        await page.locator("#buy-go").click()
        # The stand-in's invoice sheet, as Telegram's openInvoice shows it.
        sheet = page.locator("[data-sandbox-invoice]")
        await expect(sheet.locator(".sbx-pay")).to_have_text("Pay 400 \u2b50")
        await sheet.locator(".sbx-pay").click()

        await expect(page.locator("#order-status")).to_have_attribute(
            "data-status", "delivered", timeout=30_000
        )
        goods = page.locator("#order-content li")
        await expect(goods).to_have_count(1)
        content = await goods.first.inner_text()
        order_id_short = await page.locator("#order-id").inner_text()

    assert content.startswith(f"KEY-{product}-")
    me = await shop.me(user)
    [order] = me["orders"]
    assert order["order_id"].startswith(order_id_short)
    assert order["status"] == "delivered" and order["amount"] == 800
    await shop.wait_message(user, content)
    assert not script_errors
