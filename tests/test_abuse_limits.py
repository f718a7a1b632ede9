"""Abuse limits (issue 5, item 6): order creation per client address, Idempotency-Key on
POST /api/video-orders, and event streams that cost Temporal per order, not per visitor.

Limits that need settings of their own run on an API of their own: a real uvicorn server
built as `python -m workers.api` builds it (workers.api.api_server), on the suite's Temporal
and task queue, so the suite's worker runs its orders.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Page, async_playwright, expect
from temporalio.client import WorkflowExecutionStatus

from api import orders
from api.errors import ApiError
from api.main import create_app
from api.orders import keyed_order_id
from api.ratelimit import client_group
from api.streams import OrderStreams
from tests.conftest import (
    ADMIN_TOKEN,
    ServiceThread,
    Stack,
    checkout_event,
    free_port,
    sign,
    wait_http,
)
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, CHROMIUM_PRESENT
from workers.api import GRACEFUL_SHUTDOWN_SECONDS, api_server
from workers.settings import Settings
from workflows.video_order import workflow_id

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@dataclass
class OwnApi:
    settings: Settings
    http: httpx.AsyncClient
    thread: ServiceThread


@contextlib.asynccontextmanager
async def own_api(stack: Stack, **overrides: Any) -> AsyncIterator[OwnApi]:
    port = free_port()
    settings = stack.settings.model_copy(
        update={
            "api_port": port,
            "public_url": f"http://127.0.0.1:{port}",
            # The suite's bot keeps sending its updates to the suite's API.
            "telegram_set_webhook": False,
            **overrides,
        }
    )
    app = create_app(settings)

    async def serve(stop: asyncio.Event) -> None:
        server = api_server(settings, app)
        task = asyncio.create_task(server.serve())
        await stop.wait()
        server.should_exit = True
        await task

    thread = ServiceThread(f"api-{port}", serve).start()
    try:
        await wait_http(f"{settings.public_url}/healthz")
        async with httpx.AsyncClient(base_url=settings.public_url, timeout=30) as http:
            yield OwnApi(settings, http, thread)
    finally:
        await asyncio.to_thread(thread.stop)
        assert thread.error is None, thread.error


def _body(**extra: Any) -> dict[str, Any]:
    return {"prompt": "a paper boat on a rainy street", "videos": 1, **extra}


async def _order(http: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    resp = await http.post("/api/video-orders", json=_body(**body))
    assert resp.status_code == 201, resp.text
    return resp.json()


async def _executions(stack: Stack, order_id: str) -> int:
    """Runs of the order's workflow id that Temporal holds."""
    query = f"WorkflowId = '{workflow_id(order_id)}'"
    return len([wf async for wf in stack.client.list_workflows(query)])


async def _describe_status(stack: Stack, order_id: str) -> WorkflowExecutionStatus | None:
    handle = stack.client.get_workflow_handle(workflow_id(order_id))
    try:
        return (await handle.describe()).status
    except Exception:
        return None


async def _metrics(http: httpx.AsyncClient) -> dict[str, int]:
    resp = await http.get("/api/admin/metrics", headers=ADMIN)
    assert resp.status_code == 200, resp.text
    return resp.json()


async def _events(resp: httpx.Response, seen: list[dict[str, str]] | None = None) -> list[dict]:
    """The stream's events (their `event`, `data` and `retry` fields) until it closes."""
    events = seen if seen is not None else []
    block: dict[str, str] = {}
    async for line in resp.aiter_lines():
        if not line:
            if block:
                events.append(block)
                block = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            block[name] = value.removeprefix(" ")
    return events


async def _until(condition: Any, timeout: float = 20, what: str = "condition") -> None:
    """Waits until condition() (a bool, or an awaitable of one) holds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


# --- order creation per client address ---------------------------------------------------


async def test_orders_per_address_are_limited_with_a_true_retry_after(stack: Stack) -> None:
    """Item 6: the JSON API and the form answer 429 with a Retry-After that holds."""
    # A window far longer than the orders can take, however loaded the machine is.
    window = 60
    async with own_api(stack, order_rate_limit=f"2 per {window} seconds") as api:
        began = time.monotonic()
        await _order(api.http)
        await _order(api.http)

        key = str(uuid.uuid4())
        refused = await api.http.post(
            "/api/video-orders", json=_body(), headers={"Idempotency-Key": key}
        )
        assert refused.status_code == 429
        assert refused.json()["error"] == "rate_limited"
        first_wait = int(refused.headers["Retry-After"])
        # Until the first order leaves the window, not a constant.
        assert window - (time.monotonic() - began) <= first_wait <= window
        # A refused request started nothing: its order id (fixed by the key) is unknown.
        assert await _describe_status(stack, keyed_order_id(api.settings, key)) is None

        await asyncio.sleep(1)
        typed = "a lantern floating down a dark river"
        form = await api.http.post("/orders", data={"prompt": typed, "videos": "1"})
        assert form.status_code == 429
        assert form.headers["content-type"].startswith("text/html")
        assert typed in form.text  # what the customer typed is still there
        # Counted down, and the refusals did not move the window.
        second_wait = int(form.headers["Retry-After"])
        assert window - (time.monotonic() - began) <= second_wait <= first_wait - 1
        assert (await _metrics(api.http))["orders_rate_limited_total"] == 2


async def test_forwarded_address_is_believed_only_from_allowed_proxies(stack: Stack) -> None:
    """Item 6: X-Forwarded-For counts only when uvicorn trusts the proxy that sent it."""
    # The test connects from 127.0.0.1, which is not the proxy: a header it writes is
    # ignored and both requests are one address.
    async with own_api(stack, order_rate_limit="1/minute", forwarded_allow_ips="10.1.2.3") as api:
        await _order(api.http)
        spoofed = await api.http.post(
            "/api/video-orders", json=_body(), headers={"X-Forwarded-For": "198.51.100.7"}
        )
        assert spoofed.status_code == 429

    # Behind a trusted proxy, each forwarded client has its own allowance.
    async with own_api(stack, order_rate_limit="1/minute", forwarded_allow_ips="127.0.0.1") as api:
        for client in ("198.51.100.7", "198.51.100.8"):
            resp = await api.http.post(
                "/api/video-orders", json=_body(), headers={"X-Forwarded-For": client}
            )
            assert resp.status_code == 201, resp.text
        resp = await api.http.post(
            "/api/video-orders", json=_body(), headers={"X-Forwarded-For": "198.51.100.7"}
        )
        assert resp.status_code == 429


async def test_an_ipv6_client_is_its_64(stack: Stack) -> None:
    """Item 6: a host with a /64 cannot order past the limit by changing its address, and an
    IPv4 client is one client however its address is written."""
    assert client_group("2001:db8:1:2::1") == client_group("2001:db8:1:2:abcd::ffff")
    assert client_group("::ffff:198.51.100.7") == client_group("198.51.100.7")
    # The test stands in for a proxy, so that it can speak for several addresses.
    async with own_api(stack, order_rate_limit="1/minute", forwarded_allow_ips="127.0.0.1") as api:

        async def order_from(client: str) -> int:
            headers = {"X-Forwarded-For": client}
            resp = await api.http.post("/api/video-orders", json=_body(), headers=headers)
            assert resp.status_code in (201, 429), resp.text
            return resp.status_code

        assert await order_from("2001:db8:1:2::1") == 201
        assert await order_from("2001:db8:1:2:ffff:ffff:ffff:fffe") == 429
        assert await order_from("2001:db8:1:3::1") == 201  # the next /64 is another client
        assert await order_from("198.51.100.7") == 201
        assert await order_from("::ffff:198.51.100.7") == 429


async def test_oversized_bodies_are_refused_unread(stack: Stack) -> None:
    """Item 6: a body over the cap is a 413, with a Content-Length or chunked, and starts
    nothing and counts nothing; a webhook may be larger than an order."""
    padding = 100 * 1024
    # Valid orders once parsed: only their size is wrong.
    order = json.dumps(_body()) + " " * padding
    form = {"prompt": "a paper boat on a rainy street", "videos": "1", "notes": "x" * padding}
    json_headers = {"content-type": "application/json"}

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, len(order), 16 * 1024):
            yield order[start : start + 16 * 1024].encode()

    async with own_api(stack, order_rate_limit="1/minute") as api:
        before = await stack.workflows_on_queue()
        sized = await api.http.post("/api/video-orders", content=order, headers=json_headers)
        streamed = await api.http.post("/api/video-orders", content=chunked(), headers=json_headers)
        assert "content-length" not in streamed.request.headers
        assert streamed.request.headers["transfer-encoding"] == "chunked"
        page = await api.http.post("/orders", data=form)
        for resp in (sized, streamed, page):
            assert resp.status_code == 413, resp.text
            assert resp.json()["error"] == "payload_too_large"
        assert await stack.workflows_on_queue() == before

        # A webhook of the same size is read: its signature is what is wrong.
        event = json.dumps({"id": "evt_big", "type": "checkout.session.completed"}) + " " * padding
        hook = await api.http.post(
            "/webhooks/stripe", content=event, headers={"Stripe-Signature": "t=1,v1=0"}
        )
        assert hook.status_code == 400 and hook.json()["error"] == "invalid_signature"

        # None of them used the address's one order a minute.
        await _order(api.http)


# --- Idempotency-Key ---------------------------------------------------------------------


async def test_same_key_and_body_return_the_same_order(stack: Stack) -> None:
    """Item 6: a retried request, one after another or five at once, is one order."""
    key = f"order-{uuid.uuid4()}"
    headers = {"Idempotency-Key": key}
    first = await stack.http.post("/api/video-orders", json=_body(), headers=headers)
    assert first.status_code == 201, first.text
    assert "Idempotent-Replayed" not in first.headers
    # The same request as validated: spacing and the default model spelt out change nothing.
    model = stack.settings.default_video_model
    same = _body(prompt="  a paper boat on a rainy street ", model=model)
    again = await stack.http.post("/api/video-orders", json=same, headers=headers)
    assert again.status_code == 200, again.text
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()

    key = f"order-{uuid.uuid4()}"
    replies = await asyncio.gather(
        *(
            stack.http.post("/api/video-orders", json=_body(), headers={"Idempotency-Key": key})
            for _ in range(5)
        )
    )
    assert {r.status_code for r in replies} <= {200, 201}, [r.text for r in replies]
    assert len({json.dumps(r.json(), sort_keys=True) for r in replies}) == 1
    order_id = replies[0].json()["order_id"]
    assert await _executions(stack, order_id) == 1
    assert await stack.scheduled(order_id, "create_checkout_session") == 1

    # Once paid, a retry still names the order, but no longer offers to pay.
    view = await stack.order(order_id)
    await stack.pay(view["checkout_session_id"])
    await stack.wait_for(order_id, "generating", "completed")
    late = await stack.http.post(
        "/api/video-orders", json=_body(), headers={"Idempotency-Key": key}
    )
    assert late.status_code == 200
    assert late.json()["order_id"] == order_id
    assert late.json()["checkout_url"] is None
    await stack.wait_for(order_id)
    assert await stack.scheduled(order_id, "create_checkout_session") == 1


async def test_same_key_with_another_body_is_409(stack: Stack) -> None:
    """Item 6: a key reused for a different order is refused and changes nothing."""
    headers = {"Idempotency-Key": str(uuid.uuid4())}
    first = await stack.http.post("/api/video-orders", json=_body(), headers=headers)
    assert first.status_code == 201, first.text
    order_id = first.json()["order_id"]
    before = len(await stack.history(order_id))

    for other in (_body(videos=2), _body(prompt="something else"), _body(aspect_ratio="1:1")):
        resp = await stack.http.post("/api/video-orders", json=other, headers=headers)
        assert resp.status_code == 409, resp.text
        assert resp.json()["error"] == "idempotency_conflict"
    # The validator refused before anything entered the order's history.
    assert len(await stack.history(order_id)) == before
    assert await _executions(stack, order_id) == 1
    view = await stack.order(order_id)
    assert view["status"] == "awaiting_payment" and len(view["videos"]) == 1


async def test_malformed_idempotency_keys_are_400(stack: Stack) -> None:
    """Item 6: 1-255 visible ASCII characters, else 400 and no order."""
    before = await stack.workflows_on_queue()
    for bad in (b"", b"has space", "clé".encode(), b"x" * 256, b"tab\there"):
        resp = await stack.http.post(
            "/api/video-orders", json=_body(), headers={"Idempotency-Key": bad}
        )
        assert resp.status_code == 400, (bad, resp.text)
        assert resp.json()["error"] == "invalid_idempotency_key"
    assert await stack.workflows_on_queue() == before


async def test_key_of_a_closed_order_never_starts_it_again(stack: Stack) -> None:
    """Item 6: after the order's workflow closed, its key answers from the closed order."""
    # Expired orders close at once instead of listening a day for a late payment.
    async with own_api(stack, late_payment_window_seconds=0) as api:
        headers = {"Idempotency-Key": str(uuid.uuid4())}
        first = await api.http.post("/api/video-orders", json=_body(), headers=headers)
        assert first.status_code == 201, first.text
        order = first.json()
        view = await stack.order(order["order_id"])
        await stack.stripe.v1.checkout.sessions.expire_async(view["checkout_session_id"])
        await stack.wait_for(order["order_id"], "expired")

        async def closed() -> bool:
            status = await _describe_status(stack, order["order_id"])
            return status == WorkflowExecutionStatus.COMPLETED

        await _until(closed, what="the expired order's workflow to close")

        again = await api.http.post("/api/video-orders", json=_body(), headers=headers)
        assert again.status_code == 200, again.text
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.json() == {**order, "checkout_url": None}
        other = await api.http.post("/api/video-orders", json=_body(videos=2), headers=headers)
        assert other.status_code == 409
        assert other.json()["error"] == "idempotency_conflict"
        assert await _executions(stack, order["order_id"]) == 1
        assert (await stack.order(order["order_id"]))["status"] == "expired"


async def test_a_form_sent_twice_is_one_order(stack: Stack) -> None:
    """Item 6: each form carries a fresh Idempotency-Key, so a double submit is one order
    with one checkout, counted once by the rate limit; once paid, it leads to the order."""
    async with own_api(stack, order_rate_limit="1/minute") as api:

        async def form_key() -> str:
            page = await api.http.get("/")
            found = re.search(r'name="idempotency_key" value="([^"]+)"', page.text)
            assert found, page.text
            return found.group(1)

        key, next_key = await form_key(), await form_key()
        assert key != next_key
        form = {"prompt": "a kite over a windy beach", "videos": "1", "idempotency_key": key}
        first = await api.http.post("/orders", data=form)
        second = await api.http.post("/orders", data=form)
        assert first.status_code == second.status_code == 303, second.text
        assert first.headers["location"] == second.headers["location"]
        order_id = keyed_order_id(api.settings, key)
        assert await _executions(stack, order_id) == 1
        assert await stack.scheduled(order_id, "create_checkout_session") == 1
        view = await stack.order(order_id)
        assert first.headers["location"] == view["checkout_url"]

        # The key is the JSON API's Idempotency-Key: the same request is the same order, and
        # a replay is not refused though the address has used its one order a minute.
        replay = await api.http.post(
            "/api/video-orders",
            json=_body(prompt="a kite over a windy beach"),
            headers={"Idempotency-Key": key},
        )
        assert replay.status_code == 200, replay.text
        assert replay.json()["order_id"] == order_id
        # Another form is another order, which the limit refuses.
        other = await api.http.post("/orders", data={**form, "idempotency_key": next_key})
        assert other.status_code == 429

        await stack.pay(view["checkout_session_id"])
        await stack.wait_for(order_id, "generating", "completed")
        late = await api.http.post("/orders", data=form)
        assert late.status_code == 303
        assert late.headers["location"] == orders.order_page_url(api.settings, order_id)
        await stack.wait_for(order_id)
        assert await stack.scheduled(order_id, "create_checkout_session") == 1


# --- event streams -----------------------------------------------------------------------


async def test_a_stream_opening_as_the_api_stops_is_answered(stack: Stack) -> None:
    """Item 6: a stop that comes before a new reader's first step still answers the request
    waiting for it, instead of leaving it (and the stopping API) hanging."""
    order = await stack.create_order()
    streams = OrderStreams(stack.settings)
    opening = asyncio.create_task(
        streams.open(
            order["order_id"],
            "203.0.113.1",
            lambda: orders.read_order_state(stack.client, order["order_id"]),
        )
    )
    # One turn of the loop: open() has started the reader and waits for its first read; the
    # reader itself has not run yet.
    await asyncio.sleep(0)
    assert streams.metrics()["stream_readers"] == 1
    streams.close()
    with pytest.raises(ApiError) as refused:
        await asyncio.wait_for(opening, 10)
    assert refused.value.error == "stopping"
    metrics = streams.metrics()
    assert metrics["order_reads_total"] == 0  # stopped before reading, as intended
    assert metrics["streams_open"] == 0


async def test_twenty_watchers_share_one_reader(stack: Stack) -> None:
    """Item 6: reads of Temporal follow the watched orders, not the watchers."""
    poll = 0.25
    async with own_api(stack, stream_poll_seconds=poll, stream_max_per_client=50) as api:
        order = await _order(api.http)
        path = f"/api/video-orders/{order['order_id']}/events"
        seen: list[list[dict[str, str]]] = [[] for _ in range(20)]

        async def watch(i: int) -> list[dict]:
            async with api.http.stream("GET", path, timeout=60) as resp:
                assert resp.status_code == 200
                return await _events(resp, seen[i])

        watchers = [asyncio.create_task(watch(i)) for i in range(20)]

        async def all_open() -> bool:
            return all(seen) and (await _metrics(api.http))["streams_open"] == 20

        await _until(all_open, what="20 open streams")
        start = await _metrics(api.http)
        assert start["stream_readers"] == 1
        began = time.monotonic()
        await asyncio.sleep(2)
        end = await _metrics(api.http)
        elapsed = time.monotonic() - began
        reads = end["order_reads_total"] - start["order_reads_total"]
        # One reader polls about elapsed/poll times; twenty would read twenty times as often.
        assert 1 <= reads <= elapsed / poll + 2, reads

        view = await stack.order(order["order_id"])
        await stack.pay(view["checkout_session_id"])
        results = await asyncio.wait_for(asyncio.gather(*watchers), 60)

    finals = {r[-1]["data"] for r in results}
    assert len(finals) == 1  # every watcher saw the same last view
    last = json.loads(finals.pop())
    assert last["status"] == "completed" and last["final"] is True
    assert all(r[0]["event"] == "order" for r in results)


async def test_open_streams_are_capped_per_address_and_in_total(stack: Stack) -> None:
    """Item 6: 429 with Retry-After before a stream opens, per address and in total."""
    settings = {
        "stream_max_per_client": 2,
        "stream_max_total": 3,
        "stream_max_seconds": 60,
        # The test stands in for a proxy, so that it can speak for several addresses.
        "forwarded_allow_ips": "127.0.0.1",
    }
    async with own_api(stack, **settings) as api:
        order = await _order(api.http)
        path = f"/api/video-orders/{order['order_id']}/events"
        async with contextlib.AsyncExitStack() as streams:

            async def open_stream(client: str) -> httpx.Response:
                headers = {"X-Forwarded-For": client}
                return await streams.enter_async_context(
                    api.http.stream("GET", path, headers=headers, timeout=30)
                )

            a1 = await open_stream("203.0.113.1")
            a2 = await open_stream("203.0.113.1")
            assert a1.status_code == a2.status_code == 200
            a3 = await open_stream("203.0.113.1")
            assert a3.status_code == 429
            assert json.loads(await a3.aread())["error"] == "too_many_streams"
            assert 1 <= int(a3.headers["Retry-After"]) <= 60

            b1 = await open_stream("203.0.113.2")
            assert b1.status_code == 200
            b2 = await open_stream("203.0.113.2")  # its own first two, but 3 are open
            assert b2.status_code == 429
            assert json.loads(await b2.aread())["error"] == "too_many_streams"

            metrics = await _metrics(api.http)
            assert metrics["streams_open"] == 3 and metrics["stream_readers"] == 1
            assert metrics["streams_rejected_total"] == 2

            await a1.aclose()

            async def freed() -> bool:
                return (await _metrics(api.http))["streams_open"] == 2

            await _until(freed, what="the closed stream's place")
            b3 = await open_stream("203.0.113.2")
            assert b3.status_code == 200


async def test_stream_ends_at_its_lifetime_with_a_reconnect_hint(stack: Stack) -> None:
    """Item 6: no stream is held for ever; the browser is told to come back."""
    async with own_api(stack, stream_max_seconds=1.5) as api:
        order = await _order(api.http)
        began = time.monotonic()
        async with api.http.stream(
            "GET", f"/api/video-orders/{order['order_id']}/events", timeout=30
        ) as resp:
            events = await _events(resp)
        assert 1.5 <= time.monotonic() - began < 10
        assert events[0]["event"] == "order"
        assert events[-1]["event"] == "reconnect"
        assert int(events[-1]["retry"]) > 0
        assert (await _metrics(api.http))["streams_open"] == 0


async def test_a_webhook_wakes_the_reader_of_its_order(stack: Stack) -> None:
    """Item 6 (and 10c): pages watching an order show its payment as soon as the webhook
    has signalled it, not at the reader's next poll (here a minute away)."""
    async with own_api(stack, stream_poll_seconds=60) as api:
        order = await _order(api.http)
        session_id = order["checkout_url"].rsplit("/", 1)[1]
        seen: list[dict[str, str]] = []
        async with api.http.stream(
            "GET", f"/api/video-orders/{order['order_id']}/events", timeout=30
        ) as resp:
            watching = asyncio.create_task(_events(resp, seen))
            await _until(lambda: seen, what="the first event")
            await stack.pay(session_id)
            session = await stack.stripe.v1.checkout.sessions.retrieve_async(session_id)
            body = json.dumps(checkout_event(session.to_dict(), "checkout.session.completed"))
            delivered = await api.http.post(
                "/webhooks/stripe",
                content=body,
                headers={"Stripe-Signature": sign(body.encode())},
            )
            assert delivered.json()["handled"] is True
            await _until(lambda: len(seen) > 1, timeout=10, what="the paid order on the stream")
            watching.cancel()
        statuses = [json.loads(e["data"])["status"] for e in seen if e.get("event") == "order"]
        assert statuses[0] == "awaiting_payment" and statuses[1] != "awaiting_payment"


async def test_stream_ends_when_the_workflow_closes_without_a_final_status(stack: Stack) -> None:
    """Item 6: a workflow an operator terminated ends its streams too."""
    order = await stack.create_order()
    opened = asyncio.Event()
    seen: list[dict[str, str]] = []

    async def watch() -> list[dict]:
        async with stack.http.stream(
            "GET", f"/api/video-orders/{order['order_id']}/events", timeout=60
        ) as resp:
            opened.set()
            return await _events(resp, seen)

    task = asyncio.create_task(watch())
    await asyncio.wait_for(opened.wait(), 10)
    await _until(lambda: bool(seen), what="the first event")
    await stack.client.get_workflow_handle(workflow_id(order["order_id"])).terminate("test")
    events = await asyncio.wait_for(task, 30)
    assert events[0]["event"] == "order"
    assert events[-1] == {"event": "end", "data": '{"reason": "closed"}'}


async def test_api_stops_promptly_with_streams_open(stack: Stack) -> None:
    """Item 6: open order pages do not hold a stopping API."""
    async with own_api(stack) as api:
        order = await _order(api.http)
        path = f"/api/video-orders/{order['order_id']}/events"
        seen: list[list[dict[str, str]]] = [[] for _ in range(5)]

        async def watch(i: int) -> list[dict]:
            async with api.http.stream("GET", path, timeout=60) as resp:
                return await _events(resp, seen[i])

        watchers = [asyncio.create_task(watch(i)) for i in range(5)]
        await _until(lambda: all(seen), what="5 open streams")

        began = time.monotonic()
        await asyncio.to_thread(api.thread.stop)
        stopped_in = time.monotonic() - began
        results = await asyncio.wait_for(asyncio.gather(*watchers), 10)

    # Well before the graceful-shutdown backstop, which would end them anyway.
    assert stopped_in < GRACEFUL_SHUTDOWN_SECONDS - 2, f"the API took {stopped_in:.1f} s to stop"
    for events in results:
        assert events[-1]["event"] == "reconnect"
        assert json.loads(events[-1]["data"]) == {"reason": "stopping"}


async def test_order_page_reconnects_after_a_stream_ends_and_polls_slowly_when_refused(
    stack: Stack, tmp_path: Path
) -> None:
    """Item 6: order.js follows the stream across its lifetime, and a refused stream (429)
    falls back to slow polling; either way the page reaches the end by itself."""
    assert CHROMIUM_PRESENT, f"{CHROMIUM} is missing: apt-get install chromium"
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            async with own_api(stack, stream_max_seconds=2) as api:
                order = await _order(api.http)
                page = await browser.new_page()
                requests = _record_requests(page, order["order_id"])
                await page.goto(order["status_url"])
                # Two streams in a row: the first ended at its lifetime and was reconnected.
                await _until(lambda: len(requests["events"]) >= 2, what="a reconnected stream")
                await _pay_and_see_it_completed(stack, page, order["order_id"], tmp_path)
                assert requests["json"] == []  # never fell back to polling

            async with own_api(stack, stream_max_per_client=1) as api:
                order = await _order(api.http)
                page = await browser.new_page()
                requests = _record_requests(page, order["order_id"])
                path = f"/api/video-orders/{order['order_id']}/events"
                # Another tab from the same address holds the only stream allowed.
                async with api.http.stream("GET", path, timeout=60) as held:
                    assert held.status_code == 200
                    await page.goto(order["status_url"])
                    await _pay_and_see_it_completed(stack, page, order["order_id"], tmp_path)
                assert len(requests["events"]) == 1  # refused once, not retried in a loop
                polls = requests["json"]
                assert len(polls) >= 2
                assert all(b - a >= 9 for a, b in itertools.pairwise(polls)), polls
        finally:
            await browser.close()


def _record_requests(page: Page, order_id: str) -> dict[str, list[float]]:
    """When the page asked for the order's stream and for its JSON."""
    seen: dict[str, list[float]] = {"events": [], "json": []}
    events, json_url = f"/api/video-orders/{order_id}/events", f"/api/video-orders/{order_id}"

    def on_request(request: Any) -> None:
        if request.url.endswith(events):
            seen["events"].append(time.monotonic())
        elif request.url.endswith(json_url):
            seen["json"].append(time.monotonic())

    page.on("request", on_request)
    return seen


async def _pay_and_see_it_completed(
    stack: Stack, page: Page, order_id: str, tmp_path: Path
) -> None:
    view = await stack.order(order_id)
    await stack.pay(view["checkout_session_id"])
    try:
        await expect(page.locator('[data-notice="completed"]')).to_be_visible(timeout=30_000)
    except AssertionError:
        await page.screenshot(path=tmp_path / "order-page.png", full_page=True)
        raise
