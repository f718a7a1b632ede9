"""The baseline for the throughput figure: VideoOrderWorkflow's shape with nothing inside.

Same messages, timer, activities and search attributes as a video order (an
update-with-start `checkout` that returns as soon as the checkout activity has run, a
`stripe_event` signal awaited under a timer, N activities in parallel, a notify activity,
OrderStatus/CheckoutSessionId upserts), same timeouts and retry policies, but every
activity returns at once. Run on the same Temporal server at the same concurrency, it
shows what the orchestration alone costs, so the video orders' throughput can be read as
a ratio of it rather than as a number without a scale.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.client import Client, WithStartWorkflowOperation, WorkflowHandle
from temporalio.common import (
    RetryPolicy,
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
)
from temporalio.worker import Worker

with workflow.unsafe.imports_passed_through():
    from workflows import search_attributes as sa
    from workflows.video_order import SERVICE_RETRY, StripeEvent

WORKFLOW_ID_PREFIX = "bench-skeleton:"
# Its own OrderKind, so skeleton runs never show up among the shop's orders.
ORDER_KIND = "bench-skeleton"
# As VideoOrderWorkflow's generation retry (one poll interval apart).
POLL_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=1.0,
    maximum_interval=timedelta(seconds=1),
)


@dataclass
class SkeletonInput:
    order_id: str
    videos: int
    checkout_expires_seconds: int = 1800


@dataclass
class SkeletonCheckout:
    order_id: str
    checkout_url: str
    checkout_session_id: str


@activity.defn(name="skeleton_create_checkout_session")
async def create_checkout_session(order_id: str) -> SkeletonCheckout:
    return SkeletonCheckout(order_id, f"skeleton://{order_id}", f"cs_skeleton_{order_id}")


@activity.defn(name="skeleton_generate_video")
async def generate_video(index: int) -> str:
    return f"file-{index}"


@activity.defn(name="skeleton_record_notification")
async def record_notification(order_id: str) -> bool:
    return True


ACTIVITIES = [create_checkout_session, generate_video, record_notification]


@workflow.defn
class SkeletonOrderWorkflow:
    @workflow.init
    def __init__(self, order: SkeletonInput) -> None:
        self._checkout: SkeletonCheckout | None = None
        self._paid = False
        self._seen_events: set[str] = set()
        self._status = "awaiting_payment"

    @workflow.update
    async def checkout(self) -> SkeletonCheckout:
        await workflow.wait_condition(lambda: self._checkout is not None)
        assert self._checkout is not None
        return self._checkout

    @workflow.signal
    def stripe_event(self, event: StripeEvent) -> None:
        if event.event_id in self._seen_events:
            return
        self._seen_events.add(event.event_id)
        if event.payment_status == "paid":
            self._paid = True

    @workflow.query
    def status(self) -> str:
        return self._status

    @workflow.run
    async def run(self, order: SkeletonInput) -> str:
        self._checkout = await workflow.execute_activity(
            create_checkout_session,
            order.order_id,
            start_to_close_timeout=timedelta(seconds=30),
            schedule_to_close_timeout=timedelta(minutes=5),
            retry_policy=SERVICE_RETRY,
        )
        workflow.upsert_search_attributes(
            [sa.CHECKOUT_SESSION_ID.value_set(self._checkout.checkout_session_id)]
        )
        try:
            await workflow.wait_condition(
                lambda: self._paid, timeout=timedelta(seconds=order.checkout_expires_seconds)
            )
        except TimeoutError:
            self._set_status("expired")
        else:
            self._set_status("generating")
            await asyncio.gather(
                *(
                    workflow.execute_activity(
                        generate_video,
                        index,
                        activity_id=f"video-{index}",
                        start_to_close_timeout=timedelta(minutes=2),
                        schedule_to_close_timeout=timedelta(minutes=15),
                        heartbeat_timeout=timedelta(seconds=30),
                        retry_policy=POLL_RETRY,
                    )
                    for index in range(order.videos)
                )
            )
            self._set_status("completed")
        await workflow.execute_activity(
            record_notification,
            order.order_id,
            start_to_close_timeout=timedelta(seconds=15),
            retry_policy=SERVICE_RETRY,
        )
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self._status

    def _set_status(self, status: str) -> None:
        self._status = status
        workflow.upsert_search_attributes([sa.ORDER_STATUS.value_set(status)])


def workflow_id(order_id: str) -> str:
    return f"{WORKFLOW_ID_PREFIX}{order_id}"


def skeleton_worker(client: Client, task_queue: str) -> Worker:
    """Tuned as workers/worker.py tunes the order worker."""
    return Worker(
        client,
        task_queue=task_queue,
        workflows=[SkeletonOrderWorkflow],
        activities=ACTIVITIES,
        max_concurrent_activities=200,
        graceful_shutdown_timeout=timedelta(seconds=5),
    )


async def start_order(
    client: Client, task_queue: str, videos: int
) -> tuple[WorkflowHandle, SkeletonCheckout]:
    """What the API does for a video order: update-with-start, returning at checkout."""
    order_id = uuid.uuid4().hex
    start = WithStartWorkflowOperation(
        SkeletonOrderWorkflow.run,
        SkeletonInput(order_id=order_id, videos=videos),
        id=workflow_id(order_id),
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        task_queue=task_queue,
        search_attributes=TypedSearchAttributes(
            [
                SearchAttributePair(sa.ORDER_KIND, ORDER_KIND),
                SearchAttributePair(sa.ORDER_STATUS, "awaiting_payment"),
            ]
        ),
    )
    checkout = await client.execute_update_with_start_workflow(
        SkeletonOrderWorkflow.checkout, start_workflow_operation=start
    )
    return await start.workflow_handle(), checkout


def paid_event(checkout: SkeletonCheckout) -> StripeEvent:
    """The signal the webhook would send for a paid checkout."""
    return StripeEvent(
        event_id=f"evt_skeleton_{uuid.uuid4().hex}",
        type="checkout.session.completed",
        session_id=checkout.checkout_session_id,
        payment_status="paid",
        payment_intent=f"pi_skeleton_{checkout.order_id}",
        amount_total=0,
    )
