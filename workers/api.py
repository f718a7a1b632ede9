"""The API server: `python -m workers.api`."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI
from uvicorn.config import STARTUP_FAILURE

from api.main import create_app
from workers.settings import Settings, load_settings

# Open responses that outlive this on shutdown are cancelled. Event streams end at once on
# their own (ApiServer), so this only bounds a request stuck on Temporal or Stripe.
GRACEFUL_SHUTDOWN_SECONDS = 10


class ApiServer(uvicorn.Server):
    """Ends the app's event streams as soon as the server starts stopping.

    uvicorn stops accepting connections and then waits for open responses to finish; an
    event stream never finishes by itself, so without this every open order page would
    hold a stop for the whole graceful timeout.
    """

    def __init__(self, config: uvicorn.Config, on_stop: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_stop = on_stop

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._on_stop()
        await super().shutdown(sockets)


def api_server(settings: Settings, app: FastAPI | None = None) -> ApiServer:
    app = app or create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.api_host,
        port=settings.api_port,
        log_level="warning",
        access_log=False,
        # The client address that the abuse limits count comes from X-Forwarded-For only
        # when the connection is from one of these proxies; uvicorn decides, not our code.
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
    return ApiServer(config, on_stop=app.state.streams.close)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s api %(levelname)s %(message)s")
    server = api_server(load_settings())
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:
        # As uvicorn.run does: a port in use or a failing startup exits non-zero, so the
        # launcher stops the stack loudly.
        raise SystemExit(STARTUP_FAILURE)


if __name__ == "__main__":
    main()
