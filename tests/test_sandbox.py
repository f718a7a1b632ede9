"""The sandbox over real HTTP, driven by the production clients (stripe-python, httpx)."""

from __future__ import annotations

import asyncio
import inspect
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import stripe
import uvicorn

from sandbox.app import SandboxConfig, create_app

API_KEY = "sk_test_sandbox"
TOKEN = "sandbox-token"
WEBHOOK_SECRET = "whsec_test_sandbox"
VIDEO_SECONDS = 1.0

T = TypeVar("T")


class WebhookReceiver:
    """Stands in for our API's webhook route; can answer 500 to a chosen object's first event."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.fail_once_for: set[str] = set()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                object_id = json.loads(body)["data"]["object"]["id"]
                with receiver._lock:
                    status = 500 if object_id in receiver.fail_once_for else 200
                    receiver.fail_once_for.discard(object_id)
                    receiver.requests.append(
                        {
                            "signature": self.headers["Stripe-Signature"],
                            "body": body,
                            "status": status,
                        }
                    )
                self.send_response(status)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}/webhooks/stripe"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def events(self, event_type: str, object_id: str) -> list[stripe.Event]:
        """Accepted events of a type about an object, each verified as our webhook route does."""
        with self._lock:
            accepted = [r for r in self.requests if r["status"] == 200]
        events = [
            stripe.Webhook.construct_event(r["body"], r["signature"], WEBHOOK_SECRET)
            for r in accepted
        ]
        return [e for e in events if e.type == event_type and _concerns(e, object_id)]

    async def wait_for(self, event_type: str, object_id: str) -> stripe.Event:
        return (await eventually(lambda: self.events(event_type, object_id)))[0]


def _concerns(event: stripe.Event, object_id: str) -> bool:
    """Whether the event is about the object, or (a charge's event) its payment intent."""
    obj = event.data.object
    return object_id in (obj.id, getattr(obj, "payment_intent", None))


async def eventually(check: Callable[[], T | Awaitable[T]], timeout: float = 10.0) -> T:
    """The first truthy result of `check`, polled until `timeout` runs out."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def free_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def running_sandbox(data_dir: Path, webhook_url: str) -> Iterator[str]:
    """A sandbox on a free port in a background thread; yields its base URL."""
    sock = free_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = SandboxConfig(
        data_dir=data_dir,
        public_url=url,
        webhook_url=webhook_url,
        webhook_secret=WEBHOOK_SECRET,
        stripe_api_key=API_KEY,
        superduperai_token=TOKEN,
        video_seconds=VIDEO_SECONDS,
        webhook_retry_seconds=0.2,
        async_payment_seconds=0.3,
    )
    server = uvicorn.Server(uvicorn.Config(create_app(config), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "sandbox did not start"
        time.sleep(0.01)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@asynccontextmanager
async def stripe_client(sandbox_url: str) -> AsyncIterator[stripe.StripeClient]:
    """Configured as production configures it for the sandbox."""
    http_client = stripe.HTTPXClient()
    try:
        yield stripe.StripeClient(
            API_KEY, base_addresses={"api": f"{sandbox_url}/stripe"}, http_client=http_client
        )
    finally:
        await http_client.close_async()


@pytest.fixture(scope="module")
def receiver() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="module")
def sandbox_url(
    tmp_path_factory: pytest.TempPathFactory, receiver: WebhookReceiver
) -> Iterator[str]:
    with running_sandbox(tmp_path_factory.mktemp("sandbox"), receiver.url) as url:
        yield url


@pytest.fixture(scope="module")
async def client(sandbox_url: str) -> AsyncIterator[stripe.StripeClient]:
    async with stripe_client(sandbox_url) as client:
        yield client


@pytest.fixture(scope="module")
async def http(sandbox_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sandbox_url) as http:
        yield http


def session_params(**overrides: Any) -> dict[str, Any]:
    return {
        "mode": "payment",
        "line_items": [
            {
                "price_data": {
                    "currency": "usd",
                    "unit_amount": 500,
                    "product_data": {"name": "Video"},
                },
                "quantity": 2,
            }
        ],
        "success_url": "https://shop.test/done?session={CHECKOUT_SESSION_ID}",
        "cancel_url": "https://shop.test/cancelled",
        "client_reference_id": "order-1",
        "customer_email": "buyer@example.com",
        "metadata": {"order_id": "order-1"},
        "payment_intent_data": {"metadata": {"order_id": "order-1"}},
        **overrides,
    }


async def paid_session(client: stripe.StripeClient, http: httpx.AsyncClient) -> Any:
    session = await client.v1.checkout.sessions.create_async(session_params())
    response = await http.post(f"/stripe/pay/{session.id}/pay")
    assert response.status_code == 303
    return await client.v1.checkout.sessions.retrieve_async(session.id)


# -- Stripe ---------------------------------------------------------------------------------------


async def test_session_create_retrieve_expire(
    client: stripe.StripeClient, sandbox_url: str, receiver: WebhookReceiver
) -> None:
    expires_at = int(time.time()) + 3600
    session = await client.v1.checkout.sessions.create_async(session_params(expires_at=expires_at))
    assert session.id.startswith("cs_test_")
    assert session.object == "checkout.session"
    assert (session.amount_subtotal, session.amount_total, session.currency) == (1000, 1000, "usd")
    assert (session.status, session.payment_status, session.payment_intent) == (
        "open",
        "unpaid",
        None,
    )
    assert session.metadata.to_dict() == {"order_id": "order-1"}
    assert session.client_reference_id == "order-1"
    assert session.expires_at == expires_at
    assert session.url == f"{sandbox_url}/stripe/pay/{session.id}"
    assert session.success_url == "https://shop.test/done?session={CHECKOUT_SESSION_ID}"
    assert session.livemode is False

    retrieved = await client.v1.checkout.sessions.retrieve_async(session.id)
    assert retrieved.to_dict() == session.to_dict()

    expired = await client.v1.checkout.sessions.expire_async(session.id)
    assert (expired.status, expired.url) == ("expired", None)
    with pytest.raises(stripe.InvalidRequestError, match=r'status in \["open"\]'):
        await client.v1.checkout.sessions.expire_async(session.id)

    event = await receiver.wait_for("checkout.session.expired", session.id)
    assert event.data.object.status == "expired"
    stored = await client.v1.events.retrieve_async(event.id)
    assert stored.data.object.id == session.id


async def test_stripe_errors(client: stripe.StripeClient) -> None:
    for expires_in in (60, 25 * 3600):
        with pytest.raises(stripe.InvalidRequestError) as error:
            await client.v1.checkout.sessions.create_async(
                session_params(expires_at=int(time.time()) + expires_in)
            )
        assert (error.value.http_status, error.value.param) == (400, "expires_at")

    with pytest.raises(stripe.InvalidRequestError) as error:
        await client.v1.checkout.sessions.create_async(session_params(locale="fr"))
    assert error.value.param == "locale"

    with pytest.raises(stripe.InvalidRequestError) as error:
        await client.v1.checkout.sessions.retrieve_async("cs_test_missing")
    assert (error.value.http_status, error.value.code) == (404, "resource_missing")

    with pytest.raises(stripe.AuthenticationError):
        await client.v1.checkout.sessions.retrieve_async(
            "cs_test_missing", options={"api_key": "sk_test_wrong"}
        )


async def test_idempotent_create(client: stripe.StripeClient) -> None:
    options: Any = {"idempotency_key": "video-order:idem-1"}
    first = await client.v1.checkout.sessions.create_async(session_params(), options=options)
    again = await client.v1.checkout.sessions.create_async(session_params(), options=options)
    assert again.to_dict() == first.to_dict()

    with pytest.raises(stripe.IdempotencyError):
        await client.v1.checkout.sessions.create_async(
            session_params(client_reference_id="order-2"), options=options
        )


async def test_hosted_pay_sends_signed_webhook(
    client: stripe.StripeClient, http: httpx.AsyncClient, receiver: WebhookReceiver
) -> None:
    session = await client.v1.checkout.sessions.create_async(session_params())
    page = await http.get(f"/stripe/pay/{session.id}")
    assert page.status_code == 200
    for needle in ('id="pay"', 'id="pay-delayed"', 'id="cancel"', "10.00 USD", "Video"):
        assert needle in page.text

    cancelled = await http.post(f"/stripe/pay/{session.id}/cancel")
    assert (cancelled.status_code, cancelled.headers["location"]) == (
        303,
        "https://shop.test/cancelled",
    )

    response = await http.post(f"/stripe/pay/{session.id}/pay")
    assert response.status_code == 303
    assert response.headers["location"] == f"https://shop.test/done?session={session.id}"

    paid = await client.v1.checkout.sessions.retrieve_async(session.id)
    assert (paid.status, paid.payment_status, paid.url) == ("complete", "paid", None)
    intent = await client.v1.payment_intents.retrieve_async(paid.payment_intent)
    assert (intent.status, intent.amount, intent.amount_received) == ("succeeded", 1000, 1000)
    assert intent.metadata.to_dict() == {"order_id": "order-1"}

    event = await receiver.wait_for("checkout.session.completed", session.id)
    assert event.data.object.payment_status == "paid"
    assert event.data.object.metadata["order_id"] == "order-1"
    signed = next(r for r in receiver.requests if event.id in r["body"])
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(signed["body"] + " ", signed["signature"], WEBHOOK_SECRET)

    closed = await http.get(f"/stripe/pay/{session.id}")
    assert 'id="pay"' not in closed.text and "complete" in closed.text


@pytest.mark.parametrize(
    ("email", "outcome"),
    [
        ("buyer@example.com", "checkout.session.async_payment_succeeded"),
        ("buyer+fail@example.com", "checkout.session.async_payment_failed"),
    ],
)
async def test_delayed_payment(
    client: stripe.StripeClient,
    http: httpx.AsyncClient,
    receiver: WebhookReceiver,
    email: str,
    outcome: str,
) -> None:
    session = await client.v1.checkout.sessions.create_async(session_params(customer_email=email))
    response = await http.post(f"/stripe/pay/{session.id}/pay-delayed")
    assert response.status_code == 303

    completed = await receiver.wait_for("checkout.session.completed", session.id)
    assert completed.data.object.payment_status == "unpaid"
    settled = await receiver.wait_for(outcome, session.id)
    paid = outcome.endswith("succeeded")
    assert settled.data.object.payment_status == ("paid" if paid else "unpaid")


async def test_webhook_retried_after_500(
    client: stripe.StripeClient, http: httpx.AsyncClient, receiver: WebhookReceiver
) -> None:
    session = await client.v1.checkout.sessions.create_async(session_params())
    receiver.fail_once_for.add(session.id)
    await http.post(f"/stripe/pay/{session.id}/pay")

    event = await receiver.wait_for("checkout.session.completed", session.id)
    statuses = [r["status"] for r in receiver.requests if event.id in r["body"]]
    assert statuses == [500, 200]

    # The receiver can see the retry before the sandbox has recorded its answer.
    async def delivered() -> dict[str, Any] | None:
        deliveries = (await http.get("/stripe/_sandbox/deliveries")).json()
        delivery = next(d for d in deliveries if d["event_id"] == event.id)
        return delivery if delivery["delivered"] else None

    delivery = await eventually(delivered)
    assert (delivery["attempts"], delivery["last_status"]) == (2, 200)


async def test_refunds(
    client: stripe.StripeClient, http: httpx.AsyncClient, receiver: WebhookReceiver
) -> None:
    session = await paid_session(client, http)
    intent = session.payment_intent

    partial = await client.v1.refunds.create_async(
        {"payment_intent": intent, "amount": 300, "metadata": {"video": "1"}},
        options={"idempotency_key": f"refund:{intent}:1"},
    )
    assert (partial.object, partial.amount, partial.status) == ("refund", 300, "succeeded")
    assert partial.id.startswith("re_") and partial.payment_intent == intent

    with pytest.raises(stripe.InvalidRequestError) as error:
        await client.v1.refunds.create_async({"payment_intent": intent, "amount": 800})
    assert error.value.code == "amount_too_large"

    rest = await client.v1.refunds.create_async({"payment_intent": intent})
    assert rest.amount == 700
    assert (await client.v1.refunds.retrieve_async(rest.id)).to_dict() == rest.to_dict()

    with pytest.raises(stripe.InvalidRequestError) as error:
        await client.v1.refunds.create_async({"payment_intent": intent, "amount": 1})
    assert error.value.code == "charge_already_refunded"

    def fully_refunded() -> list[stripe.Event]:
        return [
            e
            for e in receiver.events("charge.refunded", intent)
            if e.data.object.amount_refunded == 1000
        ]

    (event,) = await eventually(fully_refunded)
    assert event.data.object.refunded is True


# -- SuperDuperAI ---------------------------------------------------------------------------------


def video_request(prompt: str) -> dict[str, Any]:
    return {
        "config": {
            "prompt": prompt,
            "aspect_ratio": "16:9",
            "duration": 5,
            "generation_config_name": "google-cloud/veo3-fast",
        }
    }


AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def wait_for_task(http: httpx.AsyncClient, file_id: str, status: str) -> dict[str, Any]:
    async def reached() -> dict[str, Any] | None:
        response = await http.get(f"/superduperai/api/v1/file/{file_id}", headers=AUTH)
        assert response.status_code == 200
        file = response.json()
        return file if file["tasks"][0]["status"] == status else None

    return await eventually(reached)


async def test_video_generation_completes(http: httpx.AsyncClient, sandbox_url: str) -> None:
    headers = {**AUTH, "Idempotency-Key": "video-order:v1:0"}
    response = await http.post(
        "/superduperai/api/v1/file/generate-video", json=video_request("a cat"), headers=headers
    )
    assert response.status_code == 200
    file = response.json()
    assert (file["type"], file["url"], file["thumbnail_url"]) == ("video", None, None)
    assert file["config"]["prompt"] == "a cat"
    assert file["tasks"][0]["type"] == "video-generation"
    assert (file["tasks"][0]["status"], file["tasks"][0]["progress"]) == ("pending", 0)

    repeated = await http.post(
        "/superduperai/api/v1/file/generate-video", json=video_request("a cat"), headers=headers
    )
    assert repeated.json()["id"] == file["id"]

    done = await wait_for_task(http, file["id"], "completed")
    assert done["tasks"][0]["progress"] == 100
    assert done["url"] == f"{sandbox_url}/superduperai/media/{file['id']}.mp4"

    video = await http.get(done["url"])
    assert video.status_code == 200
    assert video.headers["content-type"] == "video/mp4"
    assert video.content[4:8] == b"ftyp"
    ranged = await http.get(done["url"], headers={"Range": "bytes=0-99"})
    assert (ranged.status_code, len(ranged.content)) == (206, 100)
    thumbnail = await http.get(done["thumbnail_url"])
    assert thumbnail.headers["content-type"] == "image/jpeg"


async def test_video_generation_fails_and_stalls(http: httpx.AsyncClient) -> None:
    url = "/superduperai/api/v1/file/generate-video"
    failing = (await http.post(url, json=video_request("a dog #fail"), headers=AUTH)).json()
    stalling = (await http.post(url, json=video_request("a fox #stall"), headers=AUTH)).json()

    failed = await wait_for_task(http, failing["id"], "failed")
    assert failed["tasks"][0]["error"]
    assert failed["url"] is None
    media = await http.get(f"/superduperai/media/{failing['id']}.mp4")
    assert media.status_code == 404

    await asyncio.sleep(VIDEO_SECONDS)
    stalled = await wait_for_task(http, stalling["id"], "in_progress")
    assert stalled["tasks"][0]["progress"] < 100 and stalled["url"] is None


async def test_video_api_rejects_bad_requests(http: httpx.AsyncClient) -> None:
    url = "/superduperai/api/v1/file/generate-video"
    unauthorized = await http.post(url, json=video_request("x"))
    assert unauthorized.status_code == 401 and "detail" in unauthorized.json()
    no_prompt = await http.post(url, json={"config": {"duration": 5}}, headers=AUTH)
    assert no_prompt.status_code == 422
    missing = await http.get("/superduperai/api/v1/file/00000000-0000-0000-0000-000000000000")
    assert missing.status_code == 401
    missing = await http.get(
        "/superduperai/api/v1/file/00000000-0000-0000-0000-000000000000", headers=AUTH
    )
    assert missing.status_code == 404


# -- Persistence ----------------------------------------------------------------------------------


async def test_state_survives_restart(tmp_path: Path, receiver: WebhookReceiver) -> None:
    unreachable = free_socket()  # bound but not listening: deliveries are refused
    dead_url = f"http://127.0.0.1:{unreachable.getsockname()[1]}/webhooks/stripe"
    with running_sandbox(tmp_path, dead_url) as url:
        async with stripe_client(url) as client, httpx.AsyncClient(base_url=url) as http:
            paid = await paid_session(client, http)
            overdue = await client.v1.checkout.sessions.create_async(session_params())
            video = (
                await http.post(
                    "/superduperai/api/v1/file/generate-video",
                    json=video_request("a restart"),
                    headers=AUTH,
                )
            ).json()
    unreachable.close()

    # Stand in for the clock running past expiry while the sandbox was down.
    state_file = tmp_path / "stripe.json"
    state = json.loads(state_file.read_text())
    state["checkout_sessions"][overdue.id]["session"]["expires_at"] = int(time.time()) - 1
    state_file.write_text(json.dumps(state))

    with running_sandbox(tmp_path, receiver.url) as url:
        async with stripe_client(url) as client:
            restored = await client.v1.checkout.sessions.retrieve_async(paid.id)
        assert restored.to_dict() == paid.to_dict()
        # The delivery refused before the restart is retried to the new webhook URL.
        await receiver.wait_for("checkout.session.completed", paid.id)
        await receiver.wait_for("checkout.session.expired", overdue.id)
        async with httpx.AsyncClient(base_url=url) as http:
            done = await wait_for_task(http, video["id"], "completed")
        assert done["url"].startswith(url)
