"""A worker that stops mid-generation: the order waits, then completes once on a new worker."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx

from api.main import create_app
from tests.conftest import Stack, start_worker


async def test_order_survives_a_worker_restart_mid_generation(stack: Stack) -> None:
    settings = stack.settings.model_copy(update={"task_queue": f"restart-{uuid.uuid4().hex[:8]}"})
    app = create_app(settings, stack.client)
    worker = start_worker(settings)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://api"
    ) as api:
        resp = await api.post("/api/video-orders", json={"prompt": "a slow sunrise", "videos": 2})
        assert resp.status_code == 201, resp.text
        order_id = resp.json()["order_id"]
        view = (await api.get(f"/api/video-orders/{order_id}")).json()
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
            deadline = time.monotonic() + 60
            while (view := (await api.get(f"/api/video-orders/{order_id}")).json())[
                "status"
            ] == "generating":
                assert time.monotonic() < deadline, view
                await asyncio.sleep(0.2)
        finally:
            await asyncio.to_thread(worker.stop)
        # A finished order reads from its history: no worker needed.
        resp = await api.get(f"/api/video-orders/{order_id}")
        assert resp.status_code == 200 and resp.json()["status"] == "completed"

    assert view["status"] == "completed"
    # The same files, picked up where they were: nothing generated or paid for twice.
    assert [v["file_id"] for v in view["videos"]] == started_files
    assert all(v["url"] for v in view["videos"])
    assert await stack.scheduled(order_id, "generate_video") == 2
    assert await stack.scheduled(order_id, "refund") == 0
