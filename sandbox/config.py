"""Settings of one sandbox instance; `python -m sandbox` fills them from `workers.settings`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.settings import SANDBOX_GEMINI_KEY, SANDBOX_SUPABASE_KEY

if TYPE_CHECKING:
    from workers.settings import Settings


@dataclass(frozen=True)
class SandboxConfig:
    data_dir: Path
    # The sandbox's own external base URL: hosted checkout pages and media URLs point here.
    public_url: str
    # Where Stripe events are POSTed; None keeps events retrievable but undelivered.
    webhook_url: str | None
    webhook_secret: str
    stripe_api_key: str
    superduperai_token: str
    # How long a SuperDuperAI generation takes, from request to finished video.
    video_seconds: float
    # First webhook retry delay; later ones double, capped at a minute.
    webhook_retry_seconds: float = 1.0
    # How long a "bank transfer" takes to settle after the customer submits it.
    async_payment_seconds: float = 3.0
    # Supabase's REST API for the shop's functions (sandbox/postgrest.py): the key its
    # callers must send, and the database whose functions it calls (None: it answers 503).
    supabase_key: str = SANDBOX_SUPABASE_KEY
    database_url: str | None = None
    # Telegram (sandbox/telegram*.py): a chat takes about one message per interval (0: no
    # limit); a failed webhook delivery is retried after this, doubling; a payer waits this
    # long for the bot to answer the pre-checkout query (10 s at Telegram).
    telegram_chat_interval_seconds: float = 1.0
    telegram_webhook_retry_seconds: float = 1.0
    telegram_precheckout_timeout_seconds: float = 10.0
    # Gemini (sandbox/gemini.py): the key its callers must send, and the smallest context
    # cache it accepts, in (estimated) tokens, like a real model's minimum.
    gemini_key: str = SANDBOX_GEMINI_KEY
    gemini_cache_min_tokens: int = 1024

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> SandboxConfig:
        """The sandbox that stands in for the providers these settings point at."""
        from workers.settings import (
            SANDBOX_STRIPE_KEY,
            SANDBOX_SUPERDUPERAI_TOKEN,
            SANDBOX_WEBHOOK_SECRET,
        )

        # A real provider's secrets never reach the sandbox: with the real webhook secret,
        # anyone who could reach it could "pay" here and have the API believe it.
        stripe_sandboxed = settings.stripe_sandboxed
        values: dict[str, Any] = {
            "data_dir": Path(settings.data_dir) / "sandbox",
            "public_url": settings.sandbox_url,
            "webhook_url": settings.public_url.rstrip("/") + "/webhooks/stripe",
            "webhook_secret": (
                settings.webhook_secret if stripe_sandboxed else SANDBOX_WEBHOOK_SECRET
            ),
            "stripe_api_key": SANDBOX_STRIPE_KEY,
            "superduperai_token": SANDBOX_SUPERDUPERAI_TOKEN,
            "video_seconds": settings.sandbox_video_seconds,
            # Only ever the public sandbox key: a real service role key stays with Supabase.
            "supabase_key": SANDBOX_SUPABASE_KEY,
            "database_url": settings.database_url,
            # The model's minimum mirrors what the app was told it is.
            "gemini_cache_min_tokens": settings.gemini_cache_min_tokens,
        }
        return cls(**{**values, **overrides})

    def __post_init__(self) -> None:
        if self.video_seconds <= 0:
            raise ValueError("video_seconds must be positive")
        object.__setattr__(self, "public_url", self.public_url.rstrip("/"))
