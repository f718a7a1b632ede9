"""The sandbox app: Stripe under /stripe, SuperDuperAI under /superduperai, Telegram's Bot API
under /telegram, Supabase's REST API under /supabase and Gemini under /gemini, on one server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response

from sandbox import (
    gemini,
    postgrest,
    stripe_api,
    stripe_checkout,
    superduperai,
    telegram,
    webapp,
)
from sandbox.config import SandboxConfig
from sandbox.stripe_core import StripeSandbox
from sandbox.telegram_core import TelegramSandbox

__all__ = ["SandboxConfig", "create_app"]


def create_app(config: SandboxConfig) -> FastAPI:
    """An app over the state in `config.data_dir`, loaded now and saved on every change
    before the answer that reports it."""
    stripe = StripeSandbox(config)
    videos = superduperai.SuperDuperAISandbox(config)
    bot_api = TelegramSandbox(config)
    rest = postgrest.PostgrestSandbox(config.database_url)
    model = gemini.GeminiSandbox(config.gemini_key, config.gemini_cache_min_tokens)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            async with stripe.running(), bot_api.running():
                yield
        finally:
            stripe.store.flush()
            videos.store.flush()
            bot_api.store.flush()
            await rest.close()

    app = FastAPI(title="orderflow sandbox", lifespan=lifespan)

    @app.middleware("http")
    async def durable_answers(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        # As at the real services, what a client is told has been stored.
        await stripe.store.written()
        await videos.store.written()
        await bot_api.store.written()
        return response

    app.include_router(stripe_api.create_router(stripe, config.stripe_api_key))
    app.include_router(stripe_checkout.create_router(stripe))
    app.include_router(superduperai.create_router(videos, config.superduperai_token))
    app.include_router(telegram.create_router(bot_api))
    app.include_router(webapp.create_router(bot_api, config.public_url))
    app.include_router(postgrest.create_router(rest, config.supabase_key))
    app.include_router(gemini.create_router(model))

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
