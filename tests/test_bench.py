"""The benchmark's throughput baseline is a fair one (item 10).

`python -m bench` divides video orders' throughput by that of bench/skeleton.py, run on the
same server. The ratio only means "what everything but orchestration costs" while the
skeleton makes the same Temporal calls as a video order: same update, signal, timer,
activities and search-attribute upserts. Timings are the bench's business, not the suite's.
"""

from __future__ import annotations

import uuid
from collections import Counter

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle

from bench import skeleton
from tests.conftest import Stack
from workflows.video_order import workflow_id

# What a workflow asks of Temporal, by kind; the rest of a history follows from these.
SHAPE = {
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED: "updates",
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED: "signals",
    EventType.EVENT_TYPE_TIMER_STARTED: "timers",
    EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED: "activities",
    EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES: "search attribute upserts",
}


async def _shape(handle: WorkflowHandle) -> Counter[str]:
    history = await handle.fetch_history()
    shape = Counter(SHAPE[e.event_type] for e in history.events if e.event_type in SHAPE)
    shape["activity types"] = len(
        {
            e.activity_task_scheduled_event_attributes.activity_type.name
            for e in history.events
            if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        }
    )
    return shape


async def _skeleton_order(client: Client, videos: int) -> WorkflowHandle:
    task_queue = f"bench-skeleton-{uuid.uuid4().hex[:8]}"
    async with skeleton.skeleton_worker(client, task_queue):
        handle, checkout = await skeleton.start_order(client, task_queue, videos)
        await handle.signal(
            skeleton.SkeletonOrderWorkflow.stripe_event, skeleton.paid_event(checkout)
        )
        assert await handle.result() == "completed"
    return handle


async def test_skeleton_makes_the_same_temporal_calls_as_a_video_order(stack: Stack) -> None:
    """item 10: the throughput baseline has VideoOrderWorkflow's shape."""
    order = await stack.create_order(videos=2)
    view = await stack.order(order["order_id"])
    assert (await stack.pay(view["checkout_session_id"])).status_code == 303
    assert (await stack.wait_for(order["order_id"]))["status"] == "completed"
    video = await _shape(stack.client.get_workflow_handle(workflow_id(order["order_id"])))

    bare = await _shape(await _skeleton_order(stack.client, videos=2))

    assert video == bare
    assert video["activities"] == 2 + 2  # checkout, two videos, notification
    assert video["signals"] == video["timers"] == video["updates"] == 1
