"""The one settings class. Every process reads it from the environment and `.env`."""

from __future__ import annotations

from functools import cached_property

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The key the sandbox accepts: a test-mode key so stripe-python treats it as one.
SANDBOX_STRIPE_KEY = "sk_test_sandbox"
SANDBOX_SUPERDUPERAI_TOKEN = "sandbox-token"
SANDBOX_WEBHOOK_SECRET = "whsec_sandbox"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    temporal_address: str = "127.0.0.1:7233"
    temporal_namespace: str = "default"
    task_queue: str = "orderflow"
    database_url: str | None = None

    public_url: str = "http://127.0.0.1:8000"
    api_host: str = "127.0.0.1"
    api_port: int = 8000

    # Where the local stand-ins for the providers listen (see sandbox/).
    sandbox_url: str = "http://127.0.0.1:8100"
    sandbox_port: int = 8100
    sandbox_video_seconds: float = 8.0

    stripe_api_key: str | None = None
    stripe_webhook_secret: str | None = None
    stripe_api_base: str | None = None

    superduperai_url: str | None = None
    superduperai_token: str | None = None

    video_price: int = Field(default=500, gt=0, description="minor units per video")
    video_currency: str = "usd"
    max_videos_per_order: int = Field(default=4, ge=1, le=20)
    video_duration: int = 5
    video_generation_config: str = "google-cloud/veo3-fast"

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

    admin_token: str | None = None
    data_dir: str = ".data"

    @model_validator(mode="after")
    def _lower_currency(self) -> Settings:
        self.video_currency = self.video_currency.lower()
        return self

    @property
    def stripe_sandboxed(self) -> bool:
        return not self.stripe_api_key

    @property
    def superduperai_sandboxed(self) -> bool:
        return not self.superduperai_token

    @cached_property
    def stripe_key(self) -> str:
        return self.stripe_api_key or SANDBOX_STRIPE_KEY

    @cached_property
    def stripe_base(self) -> str:
        if self.stripe_api_base:
            return self.stripe_api_base.rstrip("/")
        if self.stripe_sandboxed:
            return f"{self.sandbox_url.rstrip('/')}/stripe"
        return "https://api.stripe.com"

    @cached_property
    def webhook_secret(self) -> str:
        return self.stripe_webhook_secret or SANDBOX_WEBHOOK_SECRET

    @cached_property
    def superduperai_base(self) -> str:
        if self.superduperai_sandboxed:
            return f"{self.sandbox_url.rstrip('/')}/superduperai"
        return (self.superduperai_url or "https://editor.superduperai.co").rstrip("/")

    @cached_property
    def superduperai_key(self) -> str:
        return self.superduperai_token or SANDBOX_SUPERDUPERAI_TOKEN
