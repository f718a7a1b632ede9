"""Video orders as the API sees them: starting one, reading its view, finding it."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import secrets
from datetime import timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
    WorkflowExecutionDescription,
    WorkflowExecutionStatus,
    WorkflowUpdateFailedError,
)
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from api.errors import ApiError
from workers.settings import Settings
from workflows import search_attributes as sa
from workflows.video_order import (
    CUSTOMER_WORDS,
    FINAL_STATUSES,
    GENERATION_PENDING,
    ORDER_KIND,
    CheckoutInfo,
    OrderView,
    StripeEvent,
    VideoOrderInput,
    VideoOrderWorkflow,
    order_id_of,
    workflow_id,
)

ORDER_ID_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
SESSION_ID_RE = re.compile(r"^cs_[A-Za-z0-9_]{1,250}$")
_EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,255}\.[^@\s]{2,63}$")
# A query needs a worker; without one, answer soon instead of holding the request.
QUERY_TIMEOUT = timedelta(seconds=5)
# Bounds how long POST /api/video-orders waits for Stripe before telling the client to retry.
CHECKOUT_WAIT_SECONDS = 20.0


class VideoOrderCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    prompt: str = Field(min_length=1, max_length=2000)
    videos: int = Field(ge=1)
    aspect_ratio: Literal["16:9", "9:16", "1:1"] = "16:9"
    # One of settings.video_model_prices (checked in new_order); absent means the default.
    model: str | None = Field(default=None, max_length=100)
    email: str | None = None

    @field_validator("model")
    @classmethod
    def _model(cls, v: str | None) -> str | None:
        return v or None

    @field_validator("email")
    @classmethod
    def _email(cls, v: str | None) -> str | None:
        if v and not _EMAIL_RE.match(v):
            raise ValueError("not a valid email address")
        return v or None


def check_order_id(order_id: str) -> str:
    if not ORDER_ID_RE.match(order_id):
        raise ApiError(404, "order_not_found", "no order with that id")
    return order_id


def order_page_url(settings: Settings, order_id: str) -> str:
    return f"{settings.public_url.rstrip('/')}/orders/{order_id}"


def new_order(settings: Settings, body: VideoOrderCreate) -> VideoOrderInput:
    if body.videos > settings.max_videos_per_order:
        raise ApiError(
            422,
            "invalid_request",
            f"videos: at most {settings.max_videos_per_order} videos per order",
        )
    prices = settings.video_model_prices
    model = body.model or settings.default_video_model
    if model not in prices:
        raise ApiError(422, "invalid_request", f"model: choose one of {', '.join(prices)}")
    order_id = secrets.token_urlsafe(16)  # 128 random bits: the order's only credential
    page = order_page_url(settings, order_id)
    return VideoOrderInput(
        order_id=order_id,
        prompt=body.prompt,
        videos=body.videos,
        aspect_ratio=body.aspect_ratio,
        unit_amount=prices[model],
        currency=settings.video_currency,
        success_url=f"{page}?session_id={{CHECKOUT_SESSION_ID}}",
        cancel_url=f"{page}?cancelled=1",
        generation_config_name=model,
        duration=settings.video_duration,
        checkout_expires_seconds=settings.checkout_expires_seconds,
        generation_timeout_seconds=settings.generation_timeout_seconds,
        generation_poll_seconds=settings.generation_poll_seconds,
        generation_poll_window_seconds=settings.generation_poll_window_seconds,
        late_payment_window_seconds=settings.late_payment_window_seconds,
        refund_retry_seconds=settings.refund_retry_seconds,
        video_start_attempts=settings.video_start_attempts,
        email=body.email,
    )


async def start_order(client: Client, settings: Settings, order: VideoOrderInput) -> CheckoutInfo:
    start = WithStartWorkflowOperation(
        VideoOrderWorkflow.run,
        order,
        id=workflow_id(order.order_id),
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        task_queue=settings.task_queue,
        search_attributes=TypedSearchAttributes(
            [
                SearchAttributePair(sa.ORDER_KIND, ORDER_KIND),
                SearchAttributePair(sa.ORDER_STATUS, "awaiting_payment"),
            ]
        ),
    )
    try:
        return await asyncio.wait_for(
            client.execute_update_with_start_workflow(
                VideoOrderWorkflow.checkout, start_workflow_operation=start
            ),
            CHECKOUT_WAIT_SECONDS,
        )
    except WorkflowUpdateFailedError as err:
        # Stripe's own words stay in the order's view for operators.
        raise ApiError(502, "checkout_failed", CUSTOMER_WORDS["checkout_failed"]) from err
    except TimeoutError as err:
        raise ApiError(503, "checkout_unavailable", "payment provider is slow; retry") from err
    except RPCError as err:
        raise unavailable(err) from err


def unavailable(err: RPCError) -> ApiError:
    return ApiError(503, "temporal_unavailable", f"order service unreachable: {err.message}")


async def read_order(client: Client, order_id: str, *, admin: bool = False) -> dict[str, Any]:
    """The order's view, with live generation progress from the running activities.

    Progress is heartbeated by the activities rather than signalled, so that polling adds
    nothing to the workflow's history; describe() exposes those heartbeats.
    """
    handle = client.get_workflow_handle_for(
        VideoOrderWorkflow.run, workflow_id(check_order_id(order_id))
    )
    try:
        desc = await handle.describe()
        if desc.status == WorkflowExecutionStatus.COMPLETED:
            # A finished order's view is its workflow's result: read from history, no
            # worker has to replay it.
            view: OrderView = await handle.result(rpc_timeout=QUERY_TIMEOUT)
        else:
            view = await handle.query(VideoOrderWorkflow.view, rpc_timeout=QUERY_TIMEOUT)
    except RPCError as err:
        if err.status in (RPCStatusCode.NOT_FOUND, RPCStatusCode.INVALID_ARGUMENT):
            raise ApiError(404, "order_not_found", "no order with that id") from err
        if err.status in (RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.CANCELLED):
            # The order is safe in Temporal, but no worker is answering for it right now.
            raise ApiError(
                503, "order_unavailable", "the order is safe but cannot be read now; retry"
            ) from err
        raise unavailable(err) from err
    data = order_json(view, admin=admin)
    if view.status == "generating":
        await _merge_progress(client, desc, data)
    return data


async def _merge_progress(client: Client, desc: WorkflowExecutionDescription, data: dict) -> None:
    videos = {f"video-{v['index']}": v for v in data["videos"]}
    for pending in desc.raw_description.pending_activities:
        video = videos.get(pending.activity_id)
        if video is None or video["status"] != "generating":
            continue
        # Attempts end every poll window by design (GenerationPending); any other failure
        # means the provider or our call is in trouble and the attempt is a real retry.
        failure = pending.last_failure
        video["retrying"] = pending.attempt > 1 and (
            failure.application_failure_info.type != GENERATION_PENDING
        )
        if not pending.heartbeat_details.payloads:
            continue
        details = await client.data_converter.decode(pending.heartbeat_details.payloads)
        last = details[-1] if details else None
        if isinstance(last, dict):
            video["file_id"] = last.get("file_id") or video["file_id"]
            video["progress"] = int(last.get("progress") or 0)


def order_json(view: OrderView, *, admin: bool = False) -> dict[str, Any]:
    """The order as JSON. Customers get plain words and stable codes; what providers and
    Stripe said (problems, details, refund keys, an operator's reason) is for operators."""
    data = dataclasses.asdict(view)
    data["final"] = view.status in FINAL_STATUSES
    if view.status != "awaiting_payment":
        data["checkout_url"] = None
    if admin:
        return data
    del data["problems"]
    for video in data["videos"]:
        del video["detail"]
    data["refunds"] = [
        {k: r[k] for k in ("amount", "reason", "status", "video_index")} for r in data["refunds"]
    ]
    if data["settlement"] is not None:
        data["settlement"] = {"at": data["settlement"]["at"]}
    return data


async def find_order_by_session(client: Client, session_id: str) -> str | None:
    if not SESSION_ID_RE.match(session_id):
        return None
    query = f"{sa.CHECKOUT_SESSION_ID.name} = '{session_id}'"
    try:
        async for wf in client.list_workflows(query, limit=1):
            return order_id_of(wf.id)
    except RPCError as err:
        raise unavailable(err) from err
    return None


async def list_recent_orders(client: Client, limit: int) -> list[dict[str, Any]]:
    query = f"{sa.ORDER_KIND.name} = '{ORDER_KIND}'"
    try:
        ids = [wf.id async for wf in client.list_workflows(query, limit=limit)]
    except RPCError as err:
        raise unavailable(err) from err
    # Closed orders answer queries by replay on a worker: bound how many run at once.
    gate = asyncio.Semaphore(8)

    async def one(wid: str) -> dict[str, Any] | None:
        async with gate:
            try:
                return await read_order(client, order_id_of(wid), admin=True)
            except ApiError:
                return None

    views = await asyncio.gather(*(one(wid) for wid in ids))
    return [v for v in views if v is not None]


async def operate(client: Client, order_id: str, update: Any, *args: Any) -> dict[str, Any]:
    """Runs an operator's update on an order that needs attention; returns the admin view."""
    handle = client.get_workflow_handle_for(
        VideoOrderWorkflow.run, workflow_id(check_order_id(order_id))
    )
    try:
        await handle.execute_update(update, *args, rpc_timeout=QUERY_TIMEOUT)
    except WorkflowUpdateFailedError as err:
        cause = err.cause
        if isinstance(cause, ApplicationError) and cause.type == "BadReason":
            raise ApiError(422, "invalid_request", f"reason: {cause.message}") from err
        detail = cause.message if isinstance(cause, ApplicationError) else str(err)
        raise ApiError(409, "not_needing_attention", detail) from err
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            # No such order, or it has closed: the read below tells which.
            await read_order(client, order_id, admin=True)
            raise ApiError(409, "not_needing_attention", "the order has closed") from err
        if err.status in (RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.CANCELLED):
            raise ApiError(
                503, "order_unavailable", "no worker answered for the order; retry"
            ) from err
        raise unavailable(err) from err
    return await read_order(client, order_id, admin=True)


async def payment_for_closed_order(client: Client, order_id: str, event: StripeEvent) -> bool:
    """A paid event whose order's workflow has closed. True if the order knows it now.

    A redelivery of the payment the order already took is a no-op. Any other payment
    starts a new run of the order (same workflow id, so the same page) that refunds it.
    False when no such order exists here at all.
    """
    handle = client.get_workflow_handle_for(VideoOrderWorkflow.run, workflow_id(order_id))
    try:
        desc = await handle.describe()
        if desc.status == WorkflowExecutionStatus.RUNNING:
            # Another delivery already started the refunding run: it dedupes the event.
            await handle.signal(VideoOrderWorkflow.stripe_event, event)
            return True
        if desc.status == WorkflowExecutionStatus.COMPLETED:
            view: OrderView = await handle.result(rpc_timeout=QUERY_TIMEOUT)
        else:
            # Failed, terminated or timed out: its last state comes from a replay.
            view = await handle.query(VideoOrderWorkflow.view, rpc_timeout=QUERY_TIMEOUT)
        if event.payment_intent is not None and view.payment_intent == event.payment_intent:
            return True
        history = await handle.fetch_history()
        started = history.events[0].workflow_execution_started_event_attributes
        [order] = await client.data_converter.decode(started.input.payloads, [VideoOrderInput])
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            return False
        raise unavailable(err) from err
    order = dataclasses.replace(order, stray_payment=event, previous_view=view)
    try:
        await client.start_workflow(
            VideoOrderWorkflow.run,
            order,
            id=workflow_id(order_id),
            task_queue=desc.task_queue,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            search_attributes=TypedSearchAttributes(
                [
                    SearchAttributePair(sa.ORDER_KIND, ORDER_KIND),
                    SearchAttributePair(sa.ORDER_STATUS, "refunding"),
                ]
            ),
        )
    except RPCError as err:
        raise unavailable(err) from err
    return True
