"""One video order: checkout -> payment -> N generations -> refunds for what failed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
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
        RefundResult,
        SessionState,
        StripeActivities,
    )
    from activities.postgres import Notification, OrderStore

    # Re-exported for readers of pending activities (the API).
    from activities.superduperai import GENERATION_PENDING as GENERATION_PENDING
    from activities.superduperai import (
        HTTP_TIMEOUT_SECONDS,
        START_UNCONFIRMED,
        GenerateVideoRequest,
        SuperDuperAIActivities,
        VideoResult,
    )
    from workflows import search_attributes as sa

WORKFLOW_ID_PREFIX = "video-order:"
ORDER_KIND = "video"

FINAL_STATUSES = frozenset(
    {"completed", "partially_refunded", "refunded", "expired", "failed", "settled"}
)
# Open, and waiting for an operator (or for the fault to clear by itself): see _await_operator.
NEEDS_ATTENTION = "needs_attention"
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
# Refunds retry for refund_retry_seconds (hours, well inside the day Stripe keeps an
# idempotency key); past that the order needs attention rather than retrying unseen.
REFUND_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=5),
)
# The outbox write at the end; past this the order closes without its note.
NOTIFY_TIMEOUT = timedelta(hours=1)
# workflow.patched() id: a payment left unused when the order ends is refunded.
REFUND_UNCLAIMED_PAYMENT = "refund-unclaimed-payment"
# Reading the session at expiry: past this, the order says it needs attention (it stays
# open and keeps listening for the payment) instead of guessing that nothing was paid.
SETTLE_TIMEOUT = timedelta(minutes=10)
# While Stripe cannot tell us about a payment, ask again after these waits (doubling).
RECHECK_FIRST = timedelta(minutes=5)
RECHECK_MAX = timedelta(hours=6)
# A delayed payment's outcome webhook can be lost: its PaymentIntent is read this often.
ASYNC_PAYMENT_CHECK = timedelta(hours=12)
PAYMENT_FAILED_STATUSES = frozenset({"requires_payment_method", "canceled"})

# What customers read, by stable code. Provider and Stripe messages never go here: they
# stay in the view's `problems` and each item's `detail`, which only operators see.
CUSTOMER_WORDS = {
    "checkout_failed": "We could not open the payment page. Nothing was charged; please try "
    "again in a moment.",
    "payment_failed": "Your payment did not go through, so nothing was charged.",
    "payment_unconfirmed": "We could not confirm your payment with the payment provider yet. "
    "We keep checking: if you paid, your order goes ahead or is refunded.",
    "payment_unresolved": "Your bank payment has still not been confirmed. Our team is "
    "looking into it.",
    "refund_pending": "A refund we owe you could not be sent yet. Our team has been alerted "
    "and will make sure it reaches you.",
    "generation_failed": "This video could not be made.",
    "generation_timed_out": "This video took too long to make.",
    START_UNCONFIRMED: "We could not confirm that this video was started.",
}


def workflow_id(order_id: str) -> str:
    return f"{WORKFLOW_ID_PREFIX}{order_id}"


def order_id_of(wf_id: str) -> str:
    return wf_id.removeprefix(WORKFLOW_ID_PREFIX)


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
    error: str | None = None  # plain words (CUSTOMER_WORDS)
    refunded_amount: int = 0
    error_code: str | None = None
    detail: str | None = None  # the provider's words: operators only


@dataclass
class RefundView:
    key: str  # the refund's idempotency key, also in its Stripe metadata
    amount: int
    reason: str
    status: str  # pending | succeeded | failed | settled
    video_index: int | None = None
    refund_id: str | None = None
    rounds: int = 0
    detail: str | None = None  # why it failed, in Stripe's words: operators only
    may_exist: bool = False  # look for it at Stripe before the first attempt too


@dataclass
class Settlement:
    """An operator's word that what the order still owed was settled outside the workflow."""

    reason: str
    at: str


@dataclass
class SettleRequest:
    reason: str


@dataclass
class _OperatorAction:
    kind: str  # retry | settle
    reason: str = ""


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
    error: str | None = None  # plain words (CUSTOMER_WORDS)
    error_code: str | None = None
    # While status is needs_attention: what is stuck, as a code and in plain words.
    attention_code: str | None = None
    attention: str | None = None
    refunds: list[RefundView] = field(default_factory=list)
    settlement: Settlement | None = None
    problems: list[str] = field(default_factory=list)  # operators only
    # Defaulted so that results saved before it existed still decode.
    model: str | None = None


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
    refund_retry_seconds: int = 6 * 3600
    video_start_attempts: int = 2
    # A new run of an order whose workflow had closed when a payment for it arrived: the
    # run starts from the closed run's view and refunds that payment (see run()).
    stray_payment: StripeEvent | None = None
    previous_view: OrderView | None = None
    # Orders made with an Idempotency-Key: what the request asked for (a hash), so that a
    # retry with the same key but another request is refused (see the checkout validator).
    request_fingerprint: str | None = None



@workflow.defn
class VideoOrderWorkflow:
    @workflow.init
    def __init__(self, order: VideoOrderInput) -> None:
        self._order = order
        now = workflow.now().isoformat()
        self._view = order.previous_view or OrderView(
            order_id=order.order_id,
            status="awaiting_payment",
            prompt=order.prompt,
            aspect_ratio=order.aspect_ratio,
            amount_total=order.unit_amount * order.videos,
            currency=order.currency,
            created_at=now,
            updated_at=now,
            videos=[VideoView(index=i, status="pending") for i in range(order.videos)],
            model=order.generation_config_name,
        )
        self._seen_events: set[str] = set()
        self._payment: StripeEvent | None = None
        self._payment_failed = False
        self._expiry_reported = False
        self._actions: list[_OperatorAction] = []
        # Whether the order acted on self._payment (generated, or refunded it).
        self._payment_claimed = False
        self._awaiting_operator = False
        # The API starts orders with OrderKind set, which proves the namespace defines the
        # order attributes; an order started without it (an operator's manual start on a
        # bare namespace, the time-skipping test server) must not fail its workflow tasks
        # upserting attributes the namespace does not know.
        self._indexed = workflow.info().typed_search_attributes.get(sa.ORDER_KIND) is not None

    # --- messages -------------------------------------------------------------------

    @workflow.update
    async def checkout(self, fingerprint: str | None = None) -> CheckoutInfo:
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

    @checkout.validator
    def _check_checkout(self, fingerprint: str | None = None) -> None:
        # Rejected before it enters history: another request under the same key (the same
        # order id) gets nothing from this order.
        if fingerprint is not None and fingerprint != self._order.request_fingerprint:
            raise ApplicationError(
                "this Idempotency-Key was used for a different order", type="IdempotencyConflict"
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

    # Operators resolve an order that needs attention. Validators reject at once (nothing
    # enters history) unless the order is waiting for exactly that.

    @workflow.update
    async def retry_refunds(self) -> str:
        """Try what is stuck again: the failed refunds, or asking Stripe about the payment."""
        self._take_action(_OperatorAction("retry"))
        return "retrying"

    @retry_refunds.validator
    def _check_retry(self) -> None:
        self._require_attention()

    @workflow.update
    async def mark_settled(self, request: SettleRequest) -> str:
        """Record that an operator settled what is stuck by hand (e.g. in Stripe's dashboard)."""
        self._take_action(_OperatorAction("settle", request.reason.strip()))
        return "settled"

    @mark_settled.validator
    def _check_settle(self, request: SettleRequest) -> None:
        self._require_attention()
        if not request.reason.strip() or len(request.reason) > 500:
            raise ApplicationError("a reason of 1-500 characters is required", type="BadReason")

    def _require_attention(self) -> None:
        if not self._awaiting_operator:
            raise ApplicationError(
                f"the order is {self._view.status}, not waiting for an operator",
                type="NotNeedingAttention",
            )

    def _take_action(self, action: _OperatorAction) -> None:
        self._actions.append(action)
        # A second request before the workflow acts on this one is refused by the validator.
        self._awaiting_operator = False

    # --- the flow -------------------------------------------------------------------

    @workflow.run
    async def run(self, order: VideoOrderInput) -> OrderView:
        if order.stray_payment is not None:
            await self._refund_stray_payment(order.stray_payment)
        elif await self._create_checkout():
            if await self._await_payment():
                await self._generate_all()
            else:
                await self._listen_for_late_payment()
        await self._notify()
        await workflow.wait_condition(workflow.all_handlers_finished)
        # A payment that came in after the last wait for one (the late-payment window over,
        # an operator's settlement, during the notification) is refunded, never dropped: the
        # webhook that brought it was answered 200. Runs that closed before this rule
        # existed replay without it.
        if self._payment is not None and not self._payment_claimed:
            if workflow.patched(REFUND_UNCLAIMED_PAYMENT):
                await self._refund_stray_payment(self._payment)
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
            self._fail("checkout_failed", f"creating the checkout session: {_cause(err)}")
            return False
        self._view.checkout_session_id = session.session_id
        self._view.checkout_url = session.url
        self._view.checkout_expires_at = session.expires_at
        self._index(sa.CHECKOUT_SESSION_ID.value_set(session.session_id))
        self._touch()
        return True

    async def _await_payment(self) -> bool:
        """True once paid; False when the order expired, its payment failed or was settled."""
        assert self._view.checkout_expires_at is not None
        await self._wait_until(
            lambda: self._payment is not None or self._payment_failed or self._expiry_reported,
            self._view.checkout_expires_at,
        )
        if self._payment is None and not self._payment_failed:
            # The window closed or Stripe says the session expired: Stripe's record decides,
            # since the webhook that reported a payment may have been lost.
            state = await self._settle_session_patiently()
            if state is not None:
                if state.payment_status == "paid":
                    self._payment = _payment_from(f"settled:{state.session_id}", state)
                elif state.status == "complete":
                    # Checkout finished with a payment that settles later (a bank debit).
                    return await self._await_async_payment(state)
                else:
                    self._set_status("expired")
                    return False
        return self._payment_outcome()

    async def _await_async_payment(self, state: SessionState) -> bool:
        """Waits, bounded, for a delayed payment; its PaymentIntent decides if events are lost."""
        deadline = workflow.now().timestamp() + ASYNC_PAYMENT_WINDOW.total_seconds()
        while True:
            now = workflow.now().timestamp()
            await self._wait_until(
                lambda: self._payment is not None or self._payment_failed,
                min(deadline, now + ASYNC_PAYMENT_CHECK.total_seconds()),
            )
            if self._payment is not None or self._payment_failed:
                return self._payment_outcome()
            status = await self._payment_intent_status(state.payment_intent)
            if status == "succeeded":
                self._payment = _payment_from(f"intent:{state.payment_intent}", state)
                return self._payment_outcome()
            if status in PAYMENT_FAILED_STATUSES:
                self._payment_failed = True
                return self._payment_outcome()
            if workflow.now().timestamp() < deadline:
                continue
            # Still unsettled after the window (or unreadable): a person has to look.
            action = await self._await_operator(
                "payment_unresolved",
                resume="awaiting_payment",
                recheck=RECHECK_MAX,
                also=lambda: self._payment is not None or self._payment_failed,
            )
            if action is not None and action.kind == "settle":
                return self._payment_outcome()

    async def _payment_intent_status(self, payment_intent: str | None) -> str | None:
        if payment_intent is None:
            return None
        try:
            return await workflow.execute_activity_method(
                StripeActivities.payment_intent_status,
                payment_intent,
                start_to_close_timeout=timedelta(seconds=30),
                schedule_to_close_timeout=SETTLE_TIMEOUT,
                retry_policy=SERVICE_RETRY,
            )
        except ActivityError as err:
            self._problem(f"reading payment {payment_intent}: {_cause(err)}")
            return None

    def _payment_outcome(self) -> bool:
        if self._payment is not None:
            self._mark_paid()
            return True
        if self._payment_failed:
            self._fail("payment_failed", "Stripe reported the payment as failed")
        else:
            self._set_status("settled")
        return False

    async def _settle_session_patiently(self) -> SessionState | None:
        """Stripe's record of the session, asked until it answers.

        None when a payment event or an operator decided first. Meanwhile the order needs
        attention but stays open: a session that cannot be read may still have been paid.
        """
        recheck = RECHECK_FIRST
        while True:
            try:
                return await self._settle_session()
            except ActivityError as err:
                self._problem(f"reading checkout session: {_cause(err)}")
            action = await self._await_operator(
                "payment_unconfirmed",
                resume="awaiting_payment",
                recheck=recheck,
                also=lambda: self._payment is not None or self._payment_failed,
            )
            if self._payment is not None or self._payment_failed:
                return None
            if action is not None and action.kind == "settle":
                return None
            recheck = min(recheck * 2, RECHECK_MAX)

    async def _settle_session(self) -> SessionState:
        return await workflow.execute_activity_method(
            StripeActivities.settle_checkout_session,
            self._view.checkout_session_id,
            start_to_close_timeout=timedelta(seconds=30),
            schedule_to_close_timeout=SETTLE_TIMEOUT,
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
        self._payment_claimed = True
        amount = payment.amount_total or self._view.amount_total
        self._view.payment_intent = payment.payment_intent
        # Money came in: the page must stop saying that nothing was charged. (View only:
        # an extra search-attribute command would not replay orders already in flight.)
        self._view.status = "refunding"
        await self._refund(amount, "late_payment", reason="paid after the order expired")
        self._set_status("settled" if await self._settle_refunds() else "refunded")

    async def _refund_stray_payment(self, payment: StripeEvent) -> None:
        """Stripe took a payment for this order after its previous run had closed (an
        expired or failed order): the customer gets it back in full, never silence."""
        self._payment = payment
        self._payment_claimed = True
        self._seen_events.add(payment.event_id)
        self._view.payment_intent = payment.payment_intent
        self._view.error = self._view.error_code = None
        self._view.status = "refunding"  # the API started this run with that search attribute
        amount = payment.amount_total or self._view.amount_total
        # Another run of this order may have refunded this payment already: look first.
        await self._refund(
            amount,
            f"payment:{payment.payment_intent}",
            reason="paid after the order closed",
            may_exist=True,
        )
        self._set_status("settled" if await self._settle_refunds() else "refunded")

    async def _generate_all(self) -> None:
        self._set_status("generating")
        videos = self._view.videos
        await asyncio.gather(*(self._generate(video) for video in videos))
        if await self._settle_refunds():
            self._set_status("settled")
            return
        refunded = sum(1 for v in videos if v.refunded_amount)
        if refunded == 0:
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
                    max_unconfirmed_starts=order.video_start_attempts,
                ),
                activity_id=f"video-{video.index}",
                # The whole generation, every attempt included, gets one deadline.
                schedule_to_close_timeout=timedelta(seconds=order.generation_timeout_seconds),
                # An attempt: a start call, a poll window, a last poll, each call bounded by
                # the client's timeout; a heartbeat can be silent for one whole call.
                start_to_close_timeout=timedelta(
                    seconds=order.generation_poll_window_seconds
                    + order.generation_poll_seconds
                    + 3 * HTTP_TIMEOUT_SECONDS
                    + 30
                ),
                heartbeat_timeout=timedelta(
                    seconds=max(30, 5 * order.generation_poll_seconds, 2 * HTTP_TIMEOUT_SECONDS)
                ),
                # Attempts end every poll window while the video renders (retry-as-poll), so
                # the next one follows after one poll interval rather than a growing backoff.
                retry_policy=RetryPolicy(
                    initial_interval=poll,
                    backoff_coefficient=1.0,
                    maximum_interval=poll,
                ),
            )
        except ActivityError as err:
            code = _video_error_code(err)
            result = VideoResult(file_id=video.file_id, status="failed", error=_cause(err))
        else:
            code = "generation_failed"
        video.file_id = result.file_id or video.file_id
        video.status = result.status
        video.url = result.url
        video.thumbnail_url = result.thumbnail_url
        self._touch()
        if result.status == "completed":
            video.progress = 100
            return
        video.error_code = code
        video.error = CUSTOMER_WORDS[code]
        video.detail = result.error
        await self._refund(order.unit_amount, f"video-{video.index}", reason=code, video=video)

    async def _refund(
        self,
        amount: int,
        key: str,
        reason: str,
        video: VideoView | None = None,
        may_exist: bool = False,
    ) -> bool:
        refund = RefundView(
            key=f"{workflow.info().workflow_id}:refund:{key}",
            amount=amount,
            reason=reason,
            status="pending",
            video_index=None if video is None else video.index,
            may_exist=may_exist,
        )
        self._view.refunds.append(refund)
        return await self._run_refund(refund)

    async def _run_refund(self, refund: RefundView) -> bool:
        refund.rounds += 1
        refund.status = "pending"
        payment_intent = self._view.payment_intent
        if payment_intent is None:
            refund.status, refund.detail = "failed", "no payment intent to refund"
            return False
        try:
            result: RefundResult = await workflow.execute_activity_method(
                StripeActivities.refund,
                RefundRequest(
                    payment_intent=payment_intent,
                    amount=refund.amount,
                    idempotency_key=refund.key,
                    order_id=self._order.order_id,
                    reason=refund.reason,
                    round=refund.rounds,
                    may_exist=refund.may_exist,
                ),
                # Two Stripe calls (look for an earlier refund, make one), each bounded.
                start_to_close_timeout=timedelta(seconds=60),
                schedule_to_close_timeout=timedelta(seconds=self._order.refund_retry_seconds),
                retry_policy=REFUND_RETRY,
            )
        except ActivityError as err:
            refund.status, refund.detail = "failed", _cause(err)
            self._problem(f"refund of {refund.amount} ({refund.key}): {refund.detail}")
            self._touch()
            return False
        refund.status, refund.refund_id, refund.detail = "succeeded", result.refund_id, None
        self._view.refunded_amount += refund.amount
        if refund.video_index is not None:
            self._view.videos[refund.video_index].refunded_amount = refund.amount
        self._touch()
        return True

    async def _settle_refunds(self) -> bool:
        """Until no refund is left failed; True if an operator settled them by hand."""
        while failed := [r for r in self._view.refunds if r.status == "failed"]:
            action = await self._await_operator("refund_pending", resume="refunding")
            if action is not None and action.kind == "settle":
                for refund in failed:
                    refund.status = "settled"
                return True
            await asyncio.gather(*(self._run_refund(r) for r in failed))
        return False

    async def _await_operator(
        self,
        code: str,
        resume: str,
        recheck: timedelta | None = None,
        also: Callable[[], bool] | None = None,
    ) -> _OperatorAction | None:
        """needs_attention until an operator acts, `also` holds or `recheck` passes.

        Returns the operator's action, if that is what ended the wait. A settlement is
        recorded in the view here; otherwise the order is back in status `resume` while
        it tries again.
        """
        self._view.attention_code, self._view.attention = code, CUSTOMER_WORDS[code]
        self._set_status(NEEDS_ATTENTION)
        self._awaiting_operator = True
        with contextlib.suppress(TimeoutError):
            await workflow.wait_condition(
                lambda: bool(self._actions) or (also is not None and also()), timeout=recheck
            )
        self._awaiting_operator = False
        self._view.attention_code = self._view.attention = None
        action = self._actions.pop(0) if self._actions else None
        if action is not None and action.kind == "settle" and also is not None and also():
            # The payment came in the same moment: it decides, the settlement does not.
            self._problem(f"settlement ignored, a payment arrived with it: {action.reason}")
            action = None
        if action is not None and action.kind == "settle":
            self._view.settlement = Settlement(reason=action.reason, at=workflow.now().isoformat())
            self._touch()
        else:
            self._set_status(resume)
        return action

    async def _notify(self) -> None:
        view = self._view
        try:
            await self._record_notification(view)
        except ActivityError as err:
            # The order's outcome stands; only the note about it is lost.
            self._problem(f"notification not recorded: {_cause(err)}")

    async def _record_notification(self, view: OrderView) -> None:
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
            schedule_to_close_timeout=NOTIFY_TIMEOUT,
            retry_policy=SERVICE_RETRY,
        )

    async def _wait_until(self, condition: Callable[[], bool], deadline: float) -> None:
        remaining = deadline - workflow.now().timestamp()
        if remaining > 0:
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(condition, timeout=timedelta(seconds=remaining))

    # --- state ----------------------------------------------------------------------

    def _mark_paid(self) -> None:
        assert self._payment is not None
        self._payment_claimed = True
        self._view.payment_intent = self._payment.payment_intent
        # Generation starts in this same workflow task, so operators only ever see
        # "generating": the search attribute is not written twice.
        self._view.status = "paid"

    def _fail(self, code: str, detail: str) -> None:
        self._view.error_code, self._view.error = code, CUSTOMER_WORDS[code]
        self._problem(detail)
        self._set_status("failed")

    def _problem(self, detail: str) -> None:
        workflow.logger.warning("order %s: %s", self._order.order_id, detail)
        self._view.problems.append(detail)

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


def _payment_from(event_id: str, state: SessionState) -> StripeEvent:
    """A payment learnt from Stripe's records rather than from a webhook."""
    return StripeEvent(
        event_id=event_id,
        type="checkout.session.completed",
        session_id=state.session_id,
        payment_status="paid",
        payment_intent=state.payment_intent,
        amount_total=state.amount_total,
    )


def _cause(err: ActivityError) -> str:
    cause = err.cause
    return str(cause) if cause is not None else str(err)


def _video_error_code(err: ActivityError) -> str:
    # The deadline can fall inside an attempt (a timeout) or between two attempts of the
    # retry-as-poll loop (the server stops retrying with a TIMEOUT retry state).
    if isinstance(err.cause, ActivityTimeout) or err.retry_state == RetryState.TIMEOUT:
        return "generation_timed_out"
    if isinstance(err.cause, ApplicationError) and err.cause.type == START_UNCONFIRMED:
        return START_UNCONFIRMED
    return "generation_failed"
