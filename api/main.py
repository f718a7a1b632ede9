"""The FastAPI application."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from temporalio.client import Client

from activities.telegram import make_bot
from api.bodylimit import BodyLimit
from api.errors import ApiError, install_error_handlers
from api.ratelimit import OrderRateLimit
from api.routes import admin, chats, pages, shop, telegram, video_orders, webhooks
from api.shop import ShopDatabase
from api.streams import OrderStreams
from workers.settings import Settings

log = logging.getLogger(__name__)


# A request that finds Temporal unreachable fails fast with 503 rather than hanging.
CONNECT_TIMEOUT_SECONDS = 5.0
# About a day of events at a busy shop; each id costs well under 200 bytes.
ACKNOWLEDGED_EVENTS_KEPT = 50_000
# Request bodies over these are a 413 before anything reads them (api/bodylimit.py): an
# order, the form or an admin action is well under a kilobyte, a Stripe event well under a
# megabyte.
MAX_BODY_BYTES = 64 * 1024
MAX_WEBHOOK_BODY_BYTES = 1024 * 1024
# Goods: a supplier's delivery, an operator's batch of stock (api/routes/shop.py caps items).
MAX_GOODS_BODY_BYTES = 4 * 1024 * 1024
# Telegram update ids remembered per process (a fast path; see api/routes/telegram.py).
TELEGRAM_UPDATES_KEPT = 50_000
# setWebhook is retried at start until the Bot API server answers, at most this far apart.
SET_WEBHOOK_MAX_DELAY_SECONDS = 30.0


def create_app(settings: Settings, temporal: Client | None = None) -> FastAPI:
    """Builds the app; without a client it connects to Temporal when first needed.

    The API starts and answers even while Temporal is down: requests that need it get a
    503 (so Stripe redelivers webhooks) and the next one tries to connect again.
    """
    lock = asyncio.Lock()

    async def connect_temporal() -> Client:
        async with lock:
            if app.state.temporal is None:
                try:
                    app.state.temporal = await asyncio.wait_for(
                        Client.connect(
                            settings.temporal_address, namespace=settings.temporal_namespace
                        ),
                        CONNECT_TIMEOUT_SECONDS,
                    )
                except (RuntimeError, TimeoutError) as err:
                    log.warning("temporal at %s unreachable: %s", settings.temporal_address, err)
                    raise ApiError(
                        503, "temporal_unavailable", "order service unreachable; retry shortly"
                    ) from err
            return app.state.temporal

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        with contextlib.suppress(ApiError):
            await connect_temporal()
        webhook = asyncio.create_task(
            _set_webhook(app)
            if app.state.bot and settings.telegram_set_webhook
            else asyncio.sleep(0)
        )
        try:
            yield
        finally:
            app.state.streams.close()
            for task in (webhook, *app.state.reply_tasks):
                task.cancel()
            await asyncio.gather(webhook, *app.state.reply_tasks, return_exceptions=True)
            if app.state.bot is not None:
                await app.state.bot.session.close()
            await app.state.shop_db.close()

    app = FastAPI(title="orderflow", lifespan=lifespan)
    app.state.settings = settings
    app.state.temporal = temporal
    app.state.connect_temporal = connect_temporal
    app.state.acknowledged_events = webhooks.RecentIds(ACKNOWLEDGED_EVENTS_KEPT)
    app.state.order_rate = OrderRateLimit(settings.order_rate_limits)
    app.state.shop_order_rate = OrderRateLimit(settings.shop_order_rate_limits, "your account")
    app.state.streams = OrderStreams(settings)
    app.state.shop_db = ShopDatabase(settings)
    # No bot at all while the shop is off (real providers, no TELEGRAM_BOT_TOKEN).
    app.state.bot = (
        make_bot(settings.telegram_token, settings.telegram_base) if settings.shop_enabled else None
    )
    app.state.telegram_updates = webhooks.RecentIds(TELEGRAM_UPDATES_KEPT)
    app.state.reply_tasks = set()  # command answers still being sent (api/routes/telegram.py)
    install_error_handlers(app)
    app.add_middleware(
        BodyLimit,
        default=MAX_BODY_BYTES,
        by_prefix={
            "/webhooks/": MAX_WEBHOOK_BODY_BYTES,
            "/api/suppliers/": MAX_GOODS_BODY_BYTES,
            "/api/admin/products/": MAX_GOODS_BODY_BYTES,
        },
    )
    for router in (
        video_orders.router,
        webhooks.router,
        telegram.router,
        admin.router,
        chats.router,
        *shop.routers,
        pages.router,
    ):
        app.include_router(router)
    pages.mount_static(app)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, bool]:
        return {"ok": True}

    return app


async def _set_webhook(app: FastAPI) -> None:
    """Points the bot's updates at this API (PUBLIC_URL/webhooks/telegram, with the secret),
    retrying until the Bot API server answers: it may start after the API."""
    settings: Settings = app.state.settings
    url = f"{settings.public_url.rstrip('/')}/webhooks/telegram"
    delay = 0.5
    while True:
        try:
            await app.state.bot.set_webhook(
                url,
                secret_token=settings.telegram_secret,
                allowed_updates=telegram.ALLOWED_UPDATES,
            )
            log.info("telegram webhook set to %s", url)
            return
        except Exception as err:  # any failure: the server is not there yet, or refused
            log.warning("setWebhook failed (retrying in %.0f s): %s", delay, err)
        await asyncio.sleep(delay)
        delay = min(delay * 2, SET_WEBHOOK_MAX_DELAY_SECONDS)
