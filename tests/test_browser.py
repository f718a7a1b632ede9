"""One customer in a real browser: form -> sandbox checkout -> pay -> the video is ready.

Uses Debian's chromium; `playwright install` is never run. A missing browser fails the
test rather than skipping it, so a broken CI image cannot pass unnoticed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from playwright.async_api import Page, async_playwright, expect

from tests.conftest import Stack

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
READY_TIMEOUT_MS = 60_000
CHROMIUM_PRESENT = CHROMIUM.is_file()


@asynccontextmanager
async def phone_page(screenshot: Path) -> AsyncIterator[tuple[Page, list[str]]]:
    """A phone-sized page in Debian's chromium, and the script errors it raised; the page
    is saved to `screenshot` when the test fails inside."""
    assert CHROMIUM_PRESENT, f"{CHROMIUM} is missing: apt-get install chromium"
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        page = await browser.new_page(viewport={"width": 390, "height": 844})
        script_errors: list[str] = []
        page.on("pageerror", lambda err: script_errors.append(str(err)))
        try:
            yield page, script_errors
        except Exception:
            await page.screenshot(path=screenshot, full_page=True)
            raise
        finally:
            await browser.close()


async def _order_and_pay(page: Page, stack: Stack) -> str:
    await page.goto(f"{stack.api_url}/")
    await page.get_by_label("What should the video show?").fill("a red fox in the snow")
    await page.get_by_label("Number of videos").select_option("1")
    await page.get_by_label("Portrait").check()
    await page.get_by_role("button", name="Continue to payment").click()

    await page.wait_for_url(f"{stack.sandbox_url}/stripe/pay/**")
    await page.click("#pay")

    await page.wait_for_url(f"{stack.api_url}/orders/**")
    return page.url.split("?")[0].rsplit("/", 1)[1]


async def test_browser_order_pay_and_watch(stack: Stack, tmp_path: Path) -> None:
    async with phone_page(tmp_path / "order-page.png") as (page, script_errors):
        order_id = await _order_and_pay(page, stack)

        # The page got there by itself, live: SSE (or polling) replaced the progress bar.
        video = page.locator("video[src]")
        await expect(video).to_have_count(1, timeout=READY_TIMEOUT_MS)
        download = page.locator("a[download][href]")
        await expect(download).to_be_visible()
        await expect(page.locator('[data-notice="completed"]')).to_be_visible()
        src = await video.get_attribute("src")
        href = await download.get_attribute("href")

    view = await stack.order(order_id)
    assert view["status"] == "completed"
    assert src == href == view["videos"][0]["url"]
    assert not script_errors
