"""A worker that stops mid-generation: the order waits, then completes once on a new worker,
and a customer watching the order page sees it through."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import httpx

from api.main import create_app
from tests.conftest import (
    ServiceThread,
    Stack,
    free_port,
    start_worker,
    uvicorn_service,
    wait_http,
)
from workflows.video_order import workflow_id


async def _watch(api: httpx.AsyncClient, order_id: str, opened: asyncio.Event) -> list[str]:
    """The statuses the order page's event stream delivers, until the stream closes."""
    seen: list[str] = []
    async with api.stream("GET", f"/api/video-orders/{order_id}/events", timeout=90) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                data = json.loads(line.removeprefix("data: "))
                if "status" in data:
                    seen.append(data["status"])
                    opened.set()
    return seen


async def test_order_survives_a_worker_restart_mid_generation(stack: Stack) -> None:
    port = free_port()
    settings = stack.settings.model_copy(
        update={"task_queue": f"restart-{uuid.uuid4().hex[:8]}", "api_port": port}
    )
    server = ServiceThread("restart-api", uvicorn_service(create_app(settings), port)).start()
    await wait_http(f"http://127.0.0.1:{port}/healthz")
    worker = start_worker(settings)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as api:
        resp = await api.post("/api/video-orders", json={"prompt": "a slow sunrise", "videos": 2})
        assert resp.status_code == 201, resp.text
        order_id = resp.json()["order_id"]
        view = (await api.get(f"/api/video-orders/{order_id}")).json()
        opened = asyncio.Event()
        watched = asyncio.create_task(_watch(api, order_id, opened))
        # The customer is watching the page before paying, and so before the outage.
        await asyncio.wait_for(opened.wait(), 10)
        await stack.pay(view["checkout_session_id"])

        # Stop the worker as soon as both generations have started.
        deadline = time.monotonic() + 20
        while True:
            view = (await api.get(f"/api/video-orders/{order_id}")).json()
            if view["status"] == "generating" and all(v["file_id"] for v in view["videos"]):
                break
            assert time.monotonic() < deadline, view
            await asyncio.sleep(0.05)
        started_files = [v["file_id"] for v in view["videos"]]
        await asyncio.to_thread(worker.stop)
        assert worker.error is None

        # The videos finish at the provider while no worker runs: the order cannot move, and
        # reading it says so instead of hanging.
        await asyncio.sleep(2)
        resp = await api.get(f"/api/video-orders/{order_id}")
        assert resp.status_code == 503
        assert resp.json()["error"] == "order_unavailable"

        worker = start_worker(settings)
        try:
            # The workflow closes once its last step (the notification) is done.
            handle = stack.client.get_workflow_handle(workflow_id(order_id))
            await asyncio.wait_for(handle.result(), 60)
        finally:
            await asyncio.to_thread(worker.stop)
        # A finished order reads from its history: no worker needed.
        resp = await api.get(f"/api/video-orders/{order_id}")
        assert resp.status_code == 200
        view = resp.json()
        # The event stream opened before the outage stayed open through it to the end.
        seen = await asyncio.wait_for(watched, 10)
    await asyncio.to_thread(server.stop)
    # What it showed during the outage depends on timing; how it ends does not.
    assert seen[0] == "awaiting_payment" and seen[-1] == "completed", seen

    assert view["status"] == "completed"
    # The same files, picked up where they were: nothing generated or paid for twice.
    assert [v["file_id"] for v in view["videos"]] == started_files
    assert all(v["url"] for v in view["videos"])
    assert await stack.scheduled(order_id, "generate_video") == 2
    assert await stack.scheduled(order_id, "refund") == 0
