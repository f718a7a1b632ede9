"""The API server: `python -m workers.api`."""

from __future__ import annotations

import logging

import uvicorn

from api.main import create_app
from workers.settings import load_settings


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s api %(levelname)s %(message)s")
    settings = load_settings()
    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
