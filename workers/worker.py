"""The Temporal worker: `python -m workers.worker`."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

import asyncpg
import httpx
import stripe
from temporalio.client import Client
from temporalio.worker import Worker

from activities.assistant import AssistantActivities, ContextCache
from activities.embeddings import make_embedder
from activities.gemini import make_genai_client
from activities.payments import StripeActivities
from activities.postgres import OrderStore, VideoStarts
from activities.search import CatalogSearch
from activities.shop import ShopActivities
from activities.shop_db import ShopDb, open_shop_db
from activities.superduperai import HTTP_TIMEOUT, SuperDuperAIActivities
from activities.telegram import TelegramActivities, make_bot
from workers.settings import Settings, load_settings
from workflows.chat import ChatWorkflow
from workflows.purchase import PurchaseWorkflow
from workflows.video_order import VideoOrderWorkflow

WORKFLOWS = [VideoOrderWorkflow, PurchaseWorkflow, ChatWorkflow]
STRIPE_HTTP_TIMEOUT_SECONDS = 10.0
# On SIGTERM the worker stops polling and gives running attempts this long: enough for a
# start call or a Stripe call to finish (generation polls end their window at once).
GRACEFUL_SHUTDOWN = timedelta(seconds=20)


@asynccontextmanager
async def activities(settings: Settings) -> AsyncIterator[list]:
    """The activities, bound to objects that hold the production client of their system."""
    if not settings.database_url:
        raise SystemExit("DATABASE_URL is not set (`make dev` provides one)")
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=5)
    http = httpx.AsyncClient(
        base_url=settings.superduperai_base,
        headers={"Authorization": f"Bearer {settings.superduperai_key}"},
        timeout=HTTP_TIMEOUT,
    )
    # With one network retry a Stripe call ends within ~2x this; a refund attempt makes two
    # calls, inside its 60 s start-to-close timeout (30 s for the one-call activities).
    stripe_http = stripe.HTTPXClient(timeout=STRIPE_HTTP_TIMEOUT_SECONDS)
    stripe_client = stripe.StripeClient(
        settings.stripe_key,
        base_addresses={"api": settings.stripe_base},
        http_client=stripe_http,
        # Temporal owns retries; one quick network retry hides a dropped connection.
        max_network_retries=1,
    )
    payments = StripeActivities(stripe_client)
    store = OrderStore(pool)
    bot = (
        make_bot(settings.telegram_token, settings.telegram_base) if settings.shop_enabled else None
    )
    try:
        async with open_shop_db(settings) as shop_db:
            shop = ShopActivities(shop_db)
            # With the shop off no purchase starts, so no bot is needed.
            telegram = TelegramActivities(bot, shop_db) if bot else None
            yield [
                payments.create_checkout_session,
                payments.settle_checkout_session,
                payments.refund,
                payments.payment_intent_status,
                SuperDuperAIActivities(http, VideoStarts(pool)).generate_video,
                store.record_notification,
                shop.create_shop_order,
                shop.get_shop_order,
                shop.pay_from_balance,
                shop.reserve_again,
                shop.complete_purchase,
                shop.process_prepaid_payment,
                shop.record_payment,
                shop.fulfill_prepaid_order,
                shop.expire_order,
                shop.release_reservation,
                shop.refund_to_balance,
                shop.credit_balance,
                shop.record_external_refund,
                shop.set_order_status,
                *(
                    [
                        telegram.create_invoice_link,
                        telegram.send_message,
                        telegram.deliver_order,
                        telegram.refund_star_payment,
                    ]
                    if telegram
                    else []
                ),
                *(assistant_activities(settings, shop_db, bot) if bot else []),
            ]
    finally:
        await http.aclose()
        await stripe_http.close_async()
        if bot is not None:
            await bot.session.close()
        await pool.close()


def assistant_activities(settings: Settings, db: ShopDb, bot) -> list:
    """The sales assistant's model and tool calls (with the shop's bot for "typing...")."""
    if not settings.assistant_enabled:
        return []
    client = make_genai_client(settings)
    cache = ContextCache(
        client,
        settings.gemini_model,
        ttl_seconds=settings.gemini_cache_ttl_seconds,
        min_tokens=settings.gemini_cache_min_tokens,
    )
    search = CatalogSearch(db, make_embedder(settings), settings.stars_per_unit)
    assistant = AssistantActivities(
        client,
        settings.gemini_model,
        db,
        search,
        bot,
        cache,
        stars_per_unit=settings.stars_per_unit,
        max_units=settings.max_units_per_order,
    )
    return [
        assistant.think,
        assistant.search_products,
        assistant.check_product_availability,
        assistant.get_user_orders,
        assistant.get_balance,
    ]


def build_worker(client: Client, settings: Settings, bound: list) -> Worker:
    return Worker(
        client,
        task_queue=settings.task_queue,
        workflows=WORKFLOWS,
        activities=bound,
        # Generations are long polls that mostly sleep; let many run side by side.
        max_concurrent_activities=200,
        graceful_shutdown_timeout=GRACEFUL_SHUTDOWN,
        # The order page reads progress from heartbeats; by default the SDK would hold them
        # back for most of the heartbeat timeout.
        max_heartbeat_throttle_interval=timedelta(seconds=1),
        default_heartbeat_throttle_interval=timedelta(seconds=1),
    )


async def run_worker(settings: Settings, stop: asyncio.Event) -> None:
    client = await Client.connect(settings.temporal_address, namespace=settings.temporal_namespace)
    async with activities(settings) as bound, build_worker(client, settings, bound):
        await stop.wait()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    # One line per provider poll would drown everything else.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = load_settings()

    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_worker(settings, stop)

    asyncio.run(_main())


if __name__ == "__main__":
    main()
