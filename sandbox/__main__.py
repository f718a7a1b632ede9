"""`python -m sandbox`: the provider stand-ins, configured from the shared settings."""

from __future__ import annotations

from pathlib import Path

import uvicorn

from sandbox.app import SandboxConfig, create_app
from workers.settings import Settings


def main() -> None:
    settings = Settings()
    config = SandboxConfig(
        data_dir=Path(settings.data_dir) / "sandbox",
        public_url=settings.sandbox_url,
        webhook_url=settings.public_url.rstrip("/") + "/webhooks/stripe",
        webhook_secret=settings.webhook_secret,
        stripe_api_key=settings.stripe_key,
        superduperai_token=settings.superduperai_key,
        video_seconds=settings.sandbox_video_seconds,
    )
    uvicorn.run(create_app(config), host="127.0.0.1", port=settings.sandbox_port)


if __name__ == "__main__":
    main()
