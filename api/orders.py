"""Video orders as the API sees them: starting one, reading its view, finding it."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
    WorkflowExecutionDescription,
    WorkflowExecutionStatus,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import (
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
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

log = logging.getLogger(__name__)

ORDER_ID_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
SESSION_ID_RE = re.compile(r"^cs_[A-Za-z0-9_]{1,250}$")
_EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,255}\.[^@\s]{2,63}$")
_IDEMPOTENCY_KEY_RE = re.compile(r"[\x21-\x7e]{1,255}")
# The error type of the checkout update's validator: a key reused with another body.
IDEMPOTENCY_CONFLICT = "IdempotencyConflict"
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


def keyed_digest(settings: Settings, key: str, scope: str = "") -> bytes:
    """What an Idempotency-Key stands for: an HMAC with a server secret, so concurrent
    retries meet on one workflow id, and nobody can compute an order's id from a key without
    the secret. `scope` keeps one client's keys apart from another's (a shop buyer's)."""
    if not _IDEMPOTENCY_KEY_RE.fullmatch(key):
        raise ApiError(
            400,
            "invalid_idempotency_key",
            "Idempotency-Key must be 1-255 visible ASCII characters, such as a UUID",
        )
    secret = settings.idempotency_key_secret.encode()
    return hmac.new(secret, (scope + key).encode(), hashlib.sha256).digest()


def keyed_order_id(settings: Settings, key: str) -> str:
    """A video order's id for an Idempotency-Key: 128 bits of keyed_digest (the order id is
    the order page's only credential)."""
    return base64.urlsafe_b64encode(keyed_digest(settings, key)).decode()[:22]


def request_fingerprint(body: VideoOrderCreate, model: str) -> str:
    """What a keyed request asked for, after validation: a retry that leaves out the default
    model, say, is the same request."""
    canonical = json.dumps(
        {**body.model_dump(), "model": model}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def new_order(
    settings: Settings, body: VideoOrderCreate, idempotency_key: str | None = None
) -> VideoOrderInput:
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
    fingerprint = None
    if idempotency_key is None:
        order_id = secrets.token_urlsafe(16)  # 128 random bits: the order's only credential
    else:
        order_id = keyed_order_id(settings, idempotency_key)
        fingerprint = request_fingerprint(body, model)
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
        request_fingerprint=fingerprint,
    )


@dataclasses.dataclass
class CreatedOrder:
    order_id: str
    checkout_url: str | None  # None once the order is past paying
    replayed: bool  # the order existed before this request (same Idempotency-Key)


async def create_order(
    client: Client,
    settings: Settings,
    order: VideoOrderInput,
    admit: Callable[[], Awaitable[None]] | None = None,
) -> CreatedOrder:
    """Starts the order; for a keyed one that exists already, answers with that order.

    `admit` (the rate limit) runs only when this request may start a workflow: a retry that
    finds its keyed order costs the client nothing, so a double submit is not refused.
    """
    if order.request_fingerprint is None:
        if admit is not None:
            await admit()
        checkout = await start_order(client, settings, order)
        return CreatedOrder(order.order_id, checkout.checkout_url, replayed=False)
    handle = client.get_workflow_handle_for(VideoOrderWorkflow.run, workflow_id(order.order_id))
    try:
        desc: WorkflowExecutionDescription | None = await handle.describe()
    except RPCError as err:
        if err.status != RPCStatusCode.NOT_FOUND:
            raise unavailable(err) from err
        desc = None
    if desc is None and admit is not None:
        await admit()
    if desc is None or desc.status == WorkflowExecutionStatus.RUNNING:
        try:
            # A running order checks the fingerprint in the update's validator.
            checkout = await start_order(client, settings, order)
        except WorkflowAlreadyStartedError:
            pass  # it closed in the meantime
        else:
            status = desc.typed_search_attributes.get(sa.ORDER_STATUS) if desc else None
            paying = status in (None, "awaiting_payment")
            return CreatedOrder(
                order.order_id, checkout.checkout_url if paying else None, desc is not None
            )
    # Closed: the id is never started again (REJECT_DUPLICATE), so a retry gets the order
    # it made, which its status URL shows, or a 409 if it asked for something else.
    try:
        async for event in handle.fetch_history_events(page_size=1):
            started = event.workflow_execution_started_event_attributes
            break
        [earlier] = await client.data_converter.decode(started.input.payloads, [VideoOrderInput])
    except RPCError as err:
        raise unavailable(err) from err
    if earlier.request_fingerprint != order.request_fingerprint:
        raise _idempotency_conflict()
    return CreatedOrder(order.order_id, None, replayed=True)


def _idempotency_conflict() -> ApiError:
    return ApiError(
        409,
        "idempotency_conflict",
        "this Idempotency-Key was already used for a different order; use a new key",
    )


def order_attributes(status: str, kind: str = ORDER_KIND) -> TypedSearchAttributes:
    return sa.order_attributes(status, kind)


async def start_order(client: Client, settings: Settings, order: VideoOrderInput) -> CheckoutInfo:
    start = WithStartWorkflowOperation(
        VideoOrderWorkflow.run,
        order,
        id=workflow_id(order.order_id),
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        # A closed order stays closed: a late retry with its Idempotency-Key must not buy
        # the same videos again (payment_for_closed_order starts its refunding run itself).
        id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
        task_queue=settings.task_queue,
        search_attributes=order_attributes("awaiting_payment"),
    )
    try:
        return await asyncio.wait_for(
            client.execute_update_with_start_workflow(
                VideoOrderWorkflow.checkout,
                order.request_fingerprint,
                start_workflow_operation=start,
            ),
            CHECKOUT_WAIT_SECONDS,
        )
    except WorkflowUpdateFailedError as err:
        cause = err.cause
        if isinstance(cause, ApplicationError) and cause.type == IDEMPOTENCY_CONFLICT:
            raise _idempotency_conflict() from err
        # Stripe's own words stay in the order's view for operators.
        raise ApiError(502, "checkout_failed", CUSTOMER_WORDS["checkout_failed"]) from err
    except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError) as err:
        # Our wait or the server's for the update ran out: the order may still get its
        # checkout, and a retry with the same Idempotency-Key finds it.
        raise ApiError(503, "checkout_unavailable", "payment provider is slow; retry") from err
    except RPCError as err:
        raise unavailable(err) from err


def _unanswered(err: RPCError) -> ApiError:
    if err.status in (RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.CANCELLED):
        # The order is safe in Temporal, but no worker is answering for it right now.
        return ApiError(503, "order_unavailable", "the order is safe but cannot be read now; retry")
    return unavailable(err)


def unavailable(err: RPCError) -> ApiError:
    log.warning("temporal call failed: %s %s", err.status, err.message)
    return ApiError(503, "temporal_unavailable", "order service unreachable; retry shortly")


async def read_order(client: Client, order_id: str, *, admin: bool = False) -> dict[str, Any]:
    return (await read_order_state(client, order_id, admin=admin))[0]


async def read_order_state(
    client: Client, order_id: str, *, admin: bool = False
) -> tuple[dict[str, Any], bool]:
    """The order's view, with live generation progress from the running activities, and
    whether its workflow is still running (a closed one's view changes no more).

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
        raise _unanswered(err) from err
    data = order_json(view, admin=admin)
    if view.status == "generating":
        await _merge_progress(client, desc, data)
    return data, desc.status == WorkflowExecutionStatus.RUNNING


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
    # Orders from before error codes existed kept the provider's words in `error`.
    if data["error"] and not data["error_code"]:
        data["error"] = "This order could not be completed."
    for video in data["videos"]:
        del video["detail"]
        if video["error"] and not video["error_code"]:
            video["error"] = CUSTOMER_WORDS["generation_failed"]
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
        raise _unanswered(err) from err
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
        if event.session_id != view.checkout_session_id:
            log.warning("paid event for order %s names another session", order_id)
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
            search_attributes=order_attributes("refunding"),
        )
    except RPCError as err:
        raise unavailable(err) from err
    return True
