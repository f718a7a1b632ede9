"""One video order: checkout -> payment -> N generations -> refunds for what failed."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeUpdate
from temporalio.exceptions import ActivityError, ApplicationError, RetryState
from temporalio.exceptions import TimeoutError as ActivityTimeout

with workflow.unsafe.imports_passed_through():
    from activities.payments import (
        CheckoutRequest,
        CheckoutSession,
        RefundRequest,
        SessionState,
        StripeActivities,
    )
    from activities.postgres import Notification, OrderStore

    # Re-exported for readers of pending activities (the API).
    from activities.superduperai import GENERATION_PENDING as GENERATION_PENDING
    from activities.superduperai import (
        GenerateVideoRequest,
        SuperDuperAIActivities,
        VideoResult,
    )
    from workflows import search_attributes as sa

WORKFLOW_ID_PREFIX = "video-order:"
ORDER_KIND = "video"

FINAL_STATUSES = frozenset({"completed", "partially_refunded", "refunded", "expired", "failed"})
PAID_EVENTS = frozenset(
    {"checkout.session.completed", "checkout.session.async_payment_succeeded"}
)

# Payment methods that settle later (bank debits) may take days after checkout completes.
ASYNC_PAYMENT_WINDOW = timedelta(days=14)

# Stripe and Postgres calls: transient faults clear within minutes.
SERVICE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=1),
)
# Money must move in the end, so refunds retry for as long as Stripe is unreachable.
REFUND_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=5),
)


def workflow_id(order_id: str) -> str:
    return f"{WORKFLOW_ID_PREFIX}{order_id}"


def order_id_of(wf_id: str) -> str:
    return wf_id.removeprefix(WORKFLOW_ID_PREFIX)


@dataclass
class VideoOrderInput:
    order_id: str
    prompt: str
    videos: int
    aspect_ratio: str
    unit_amount: int
    currency: str
    success_url: str
    cancel_url: str
    generation_config_name: str
    duration: int
    checkout_expires_seconds: int
    generation_timeout_seconds: int
    generation_poll_seconds: float
    generation_poll_window_seconds: float
    late_payment_window_seconds: int
    email: str | None = None


@dataclass
class StripeEvent:
    """The part of a verified Stripe event that an order acts on."""

    event_id: str
    type: str
    session_id: str
    payment_status: str | None = None
    payment_intent: str | None = None
    amount_total: int | None = None


@dataclass
class CheckoutInfo:
    order_id: str
    checkout_url: str
    checkout_session_id: str


@dataclass
class VideoView:
    index: int
    status: str  # pending | generating | completed | failed
    file_id: str | None = None
    progress: int = 0
    url: str | None = None
    thumbnail_url: str | None = None
    error: str | None = None
    refunded_amount: int = 0


@dataclass
class OrderView:
    order_id: str
    status: str
    prompt: str
    aspect_ratio: str
    amount_total: int
    currency: str
    created_at: str
    updated_at: str
    videos: list[VideoView]
    refunded_amount: int = 0
    checkout_session_id: str | None = None
    checkout_url: str | None = None
    checkout_expires_at: int | None = None
    payment_intent: str | None = None
    error: str | None = None


@workflow.defn
class VideoOrderWorkflow:
    @workflow.init
    def __init__(self, order: VideoOrderInput) -> None:
        self._order = order
        now = workflow.now().isoformat()
        self._view = OrderView(
            order_id=order.order_id,
            status="awaiting_payment",
            prompt=order.prompt,
            aspect_ratio=order.aspect_ratio,
            amount_total=order.unit_amount * order.videos,
            currency=order.currency,
            created_at=now,
            updated_at=now,
            videos=[VideoView(index=i, status="pending") for i in range(order.videos)],
        )
        self._seen_events: set[str] = set()
        self._payment: StripeEvent | None = None
        self._payment_failed = False
        self._expiry_reported = False
        # The API starts orders with OrderKind set, which proves the namespace defines the
        # order attributes; an order started without it (an operator's manual start on a
        # bare namespace, the time-skipping test server) must not fail its workflow tasks
        # upserting attributes the namespace does not know.
        self._indexed = workflow.info().typed_search_attributes.get(sa.ORDER_KIND) is not None

    # --- messages -------------------------------------------------------------------

    @workflow.update
    async def checkout(self) -> CheckoutInfo:
        """Returns the Checkout URL as soon as the session exists (the API's early return)."""
        await workflow.wait_condition(
            lambda: self._view.checkout_url is not None or self._view.status == "failed"
        )
        if self._view.checkout_url is None:
            raise ApplicationError(self._view.error or "checkout failed", type="CheckoutFailed")
        return CheckoutInfo(
            order_id=self._order.order_id,
            checkout_url=self._view.checkout_url,
            checkout_session_id=self._view.checkout_session_id or "",
        )

    @workflow.signal
    def stripe_event(self, event: StripeEvent) -> None:
        # Stripe delivers at least once and in any order: each event acts once, and an
        # event only ever moves the order forward.
        if event.event_id in self._seen_events:
            return
        self._seen_events.add(event.event_id)
        session_id = self._view.checkout_session_id
        if session_id is not None and event.session_id != session_id:
            workflow.logger.warning(
                "ignoring event %s for session %s", event.event_id, event.session_id
            )
            return
        # checkout.session.completed with payment_status unpaid is a delayed method (a bank
        # debit): nothing changes until its async_payment_* event arrives.
        if event.type in PAID_EVENTS and event.payment_status == "paid":
            if self._payment is None:
                self._payment = event
        elif event.type == "checkout.session.async_payment_failed":
            self._payment_failed = True
        elif event.type == "checkout.session.expired":
            self._expiry_reported = True

    @workflow.query
    def view(self) -> OrderView:
        return self._view

    # --- the flow -------------------------------------------------------------------

    @workflow.run
    async def run(self, order: VideoOrderInput) -> OrderView:
        if await self._create_checkout():
            if await self._await_payment():
                await self._generate_all()
            else:
                await self._listen_for_late_payment()
        await self._notify()
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self._view

    async def _create_checkout(self) -> bool:
        order = self._order
        now = workflow.now().timestamp()
        try:
            session: CheckoutSession = await workflow.execute_activity_method(
                StripeActivities.create_checkout_session,
                CheckoutRequest(
                    order_id=order.order_id,
                    idempotency_key=f"{workflow.info().workflow_id}:checkout",
                    product_name=_product_name(order),
                    unit_amount=order.unit_amount,
                    quantity=order.videos,
                    currency=order.currency,
                    success_url=order.success_url,
                    cancel_url=order.cancel_url,
                    expires_at=_checkout_expiry(now, order.checkout_expires_seconds),
                    customer_email=order.email,
                ),
                start_to_close_timeout=timedelta(seconds=30),
                schedule_to_close_timeout=timedelta(minutes=5),
                retry_policy=SERVICE_RETRY,
            )
        except ActivityError as err:
            self._fail(f"could not create the checkout session: {_cause(err)}")
            return False
        self._view.checkout_session_id = session.session_id
        self._view.checkout_url = session.url
        self._view.checkout_expires_at = session.expires_at
        self._index(sa.CHECKOUT_SESSION_ID.value_set(session.session_id))
        self._touch()
        return True

    async def _await_payment(self) -> bool:
        """True once paid; False when the order expired or its payment failed."""
        assert self._view.checkout_expires_at is not None
        deadline = self._view.checkout_expires_at
        while True:
            remaining = deadline - workflow.now().timestamp()
            if remaining > 0:
                try:
                    await workflow.wait_condition(
                        lambda: self._payment is not None
                        or self._payment_failed
                        or self._expiry_reported,
                        timeout=timedelta(seconds=remaining),
                    )
                except TimeoutError:
                    pass
            if self._payment is not None:
                self._mark_paid()
                return True
            if self._payment_failed:
                self._fail("the payment did not go through")
                return False
            # The window closed or Stripe says the session expired: Stripe's record decides,
            # since the webhook that reported a payment may have been lost.
            try:
                state = await self._settle_session()
            except ActivityError as err:
                self._fail(f"could not confirm the payment with Stripe: {_cause(err)}")
                return False
            if state.payment_status == "paid":
                self._payment = StripeEvent(
                    event_id=f"settled:{state.session_id}",
                    type="checkout.session.completed",
                    session_id=state.session_id,
                    payment_status=state.payment_status,
                    payment_intent=state.payment_intent,
                    amount_total=state.amount_total,
                )
                self._mark_paid()
                return True
            if state.status == "complete":
                # Checkout finished with a payment that settles later; wait for its outcome.
                self._expiry_reported = False
                deadline = int(workflow.now().timestamp() + ASYNC_PAYMENT_WINDOW.total_seconds())
                continue
            self._set_status("expired")
            return False

    async def _settle_session(self) -> SessionState:
        return await workflow.execute_activity_method(
            StripeActivities.settle_checkout_session,
            self._view.checkout_session_id,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=SERVICE_RETRY,
        )

    async def _listen_for_late_payment(self) -> None:
        """A payment that raced the expiry still arrives; it is refunded in full."""
        if self._view.status != "expired" or self._order.late_payment_window_seconds <= 0:
            return
        try:
            await workflow.wait_condition(
                lambda: self._payment is not None,
                timeout=timedelta(seconds=self._order.late_payment_window_seconds),
            )
        except TimeoutError:
            return
        payment = self._payment
        assert payment is not None
        amount = payment.amount_total or self._view.amount_total
        self._view.payment_intent = payment.payment_intent
        if await self._refund(amount, "late_payment", reason="paid after the order expired"):
            self._set_status("refunded")

    async def _generate_all(self) -> None:
        self._set_status("generating")
        videos = self._view.videos
        await asyncio.gather(*(self._generate(video) for video in videos))
        refunded = sum(1 for v in videos if v.refunded_amount)
        if any(v.status == "failed" and not v.refunded_amount for v in videos):
            self._fail("a refund could not be made; an operator must settle it")
        elif refunded == 0:
            self._set_status("completed")
        elif refunded == len(videos):
            self._set_status("refunded")
        else:
            self._set_status("partially_refunded")

    async def _generate(self, video: VideoView) -> None:
        order = self._order
        video.status = "generating"
        poll = timedelta(seconds=max(order.generation_poll_seconds, 1.0))
        try:
            result: VideoResult = await workflow.execute_activity_method(
                SuperDuperAIActivities.generate_video,
                GenerateVideoRequest(
                    order_id=order.order_id,
                    index=video.index,
                    prompt=order.prompt,
                    aspect_ratio=order.aspect_ratio,
                    duration=order.duration,
                    generation_config_name=order.generation_config_name,
                    poll_seconds=order.generation_poll_seconds,
                    poll_window_seconds=order.generation_poll_window_seconds,
                ),
                activity_id=f"video-{video.index}",
                # The whole generation, every attempt included, gets one deadline.
                schedule_to_close_timeout=timedelta(seconds=order.generation_timeout_seconds),
                heartbeat_timeout=timedelta(seconds=max(30, 5 * order.generation_poll_seconds)),
                # Attempts end every poll window while the video renders (retry-as-poll), so
                # the next one follows after one poll interval rather than a growing backoff.
                retry_policy=RetryPolicy(
                    initial_interval=poll,
                    backoff_coefficient=1.0,
                    maximum_interval=poll,
                ),
            )
        except ActivityError as err:
            result = VideoResult(file_id=video.file_id, status="failed", error=_video_error(err))
        video.file_id = result.file_id or video.file_id
        video.status = result.status
        video.error = result.error
        video.url = result.url
        video.thumbnail_url = result.thumbnail_url
        self._touch()
        if result.status == "completed":
            video.progress = 100
            return
        if await self._refund(order.unit_amount, f"video-{video.index}", reason=video.error or ""):
            video.refunded_amount = order.unit_amount

    async def _refund(self, amount: int, key: str, reason: str) -> bool:
        payment_intent = self._view.payment_intent
        if payment_intent is None:
            self._view.error = "no payment intent to refund"
            return False
        try:
            await workflow.execute_activity_method(
                StripeActivities.refund,
                RefundRequest(
                    payment_intent=payment_intent,
                    amount=amount,
                    idempotency_key=f"{workflow.info().workflow_id}:refund:{key}",
                    order_id=self._order.order_id,
                    reason=reason,
                ),
                start_to_close_timeout=timedelta(seconds=30),
                retry_policy=REFUND_RETRY,
            )
        except ActivityError as err:
            self._view.error = f"refund of {amount} failed: {_cause(err)}"
            return False
        self._view.refunded_amount += amount
        self._touch()
        return True

    async def _notify(self) -> None:
        view = self._view
        await workflow.execute_activity_method(
            OrderStore.record_notification,
            Notification(
                order_id=view.order_id,
                kind=f"video_order_{view.status}",
                channel="email" if self._order.email else "web",
                recipient=self._order.email,
                payload={
                    "status": view.status,
                    "urls": [v.url for v in view.videos if v.url],
                    "refunded_amount": view.refunded_amount,
                    "currency": view.currency,
                },
            ),
            start_to_close_timeout=timedelta(seconds=15),
            retry_policy=SERVICE_RETRY,
        )

    # --- state ----------------------------------------------------------------------

    def _mark_paid(self) -> None:
        assert self._payment is not None
        self._view.payment_intent = self._payment.payment_intent
        # Generation starts in this same workflow task, so operators only ever see
        # "generating": the search attribute is not written twice.
        self._view.status = "paid"

    def _fail(self, message: str) -> None:
        self._view.error = message
        self._set_status("failed")

    def _set_status(self, status: str) -> None:
        self._view.status = status
        self._index(sa.ORDER_STATUS.value_set(status))
        self._touch()

    def _index(self, update: SearchAttributeUpdate) -> None:
        if self._indexed:
            workflow.upsert_search_attributes([update])

    def _touch(self) -> None:
        self._view.updated_at = workflow.now().isoformat()


def _product_name(order: VideoOrderInput) -> str:
    noun = "video" if order.videos == 1 else "videos"
    return f"AI {noun} ({order.aspect_ratio}, {order.duration}s)"


def _checkout_expiry(now: float, seconds: int) -> int:
    # Stripe refuses an expires_at under 30 minutes from when it receives the request; a
    # minute of slack keeps a request that waited for a retry from being refused.
    return int(now) + max(seconds, 30 * 60 + 60)


def _cause(err: ActivityError) -> str:
    cause = err.cause
    return str(cause) if cause is not None else str(err)


def _video_error(err: ActivityError) -> str:
    # The deadline can fall inside an attempt (a timeout) or between two attempts of the
    # retry-as-poll loop (the server stops retrying with a TIMEOUT retry state).
    if isinstance(err.cause, ActivityTimeout) or err.retry_state == RetryState.TIMEOUT:
        return "generation timed out"
    return _cause(err)
