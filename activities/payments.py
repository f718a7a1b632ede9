"""Stripe: Checkout Sessions, payments and refunds, through stripe-python's StripeClient.

Refunds must never double. Every attempt of one round sends the same idempotency key, so
a request still in flight at Stripe (a timeout, a cancelled attempt) answers a retry with
409 or replays its outcome instead of refunding again. Stripe replays a key's first answer
for about a day, a 500 included: once a 500 comes back marked as replayed, the request it
replays has finished, so the next attempt moves to a fresh key (its generation is kept in
the attempt's heartbeat details). Every attempt after the first, and every operator's
round, first looks for the refund an earlier one may already have made (its metadata
carries the refund's key) and returns it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import stripe
from temporalio import activity
from temporalio.exceptions import ApplicationError


@dataclass
class CheckoutRequest:
    order_id: str
    idempotency_key: str
    product_name: str
    unit_amount: int
    quantity: int
    currency: str
    success_url: str
    cancel_url: str
    expires_at: int
    customer_email: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class CheckoutSession:
    session_id: str
    url: str
    expires_at: int
    amount_total: int
    currency: str


@dataclass
class SessionState:
    session_id: str
    status: str  # open | complete | expired
    payment_status: str  # unpaid | paid | no_payment_required
    payment_intent: str | None
    amount_total: int | None
    currency: str | None


@dataclass
class RefundRequest:
    payment_intent: str
    amount: int
    # Names this refund of this order; stays the same for every attempt and every round.
    idempotency_key: str
    order_id: str
    reason: str
    # How many times the workflow has scheduled this refund (an operator's retry adds one).
    round: int = 1
    # Look for an earlier refund before the first attempt too (another run may have made it).
    may_exist: bool = False


@dataclass
class RefundResult:
    refund_id: str
    amount: int
    status: str


# Metadata key holding the refund's idempotency_key, so a later attempt can find it.
REFUND_KEY_METADATA = "refund_key"
# Refunds Stripe reports as these did not move money; the refund may be made again.
_DEAD_REFUND_STATUSES = frozenset({"failed", "canceled"})


def _replayed(err: stripe.StripeError) -> bool:
    headers = err.headers or {}
    return any(k.lower() == "idempotent-replayed" and v == "true" for k, v in headers.items())


def _non_retryable(err: stripe.StripeError) -> bool:
    # 4xx answers other than rate limiting will fail the same way every time; lock and
    # idempotency-in-flight conflicts clear up by themselves, so those are retried.
    if isinstance(err, stripe.RateLimitError | stripe.APIConnectionError):
        return False
    status = err.http_status or 0
    return 400 <= status < 500 and status not in (409, 429)


def _application_error(err: stripe.StripeError, what: str) -> ApplicationError:
    return ApplicationError(
        f"Stripe rejected {what}: {err.user_message or err}",
        type=f"Stripe{type(err).__name__}",
        non_retryable=True,
    )


class StripeActivities:
    def __init__(self, client: stripe.StripeClient) -> None:
        self._client = client

    @activity.defn
    async def create_checkout_session(self, req: CheckoutRequest) -> CheckoutSession:
        params: stripe.checkout.SessionCreateParams = {
            "mode": "payment",
            "line_items": [
                {
                    "quantity": req.quantity,
                    "price_data": {
                        "currency": req.currency,
                        "unit_amount": req.unit_amount,
                        "product_data": {"name": req.product_name},
                    },
                }
            ],
            "success_url": req.success_url,
            "cancel_url": req.cancel_url,
            "client_reference_id": req.order_id,
            "expires_at": req.expires_at,
            "metadata": {"order_id": req.order_id, **req.metadata},
            "payment_intent_data": {"metadata": {"order_id": req.order_id}},
        }
        if req.customer_email:
            params["customer_email"] = req.customer_email
        try:
            session = await self._client.v1.checkout.sessions.create_async(
                params, {"idempotency_key": req.idempotency_key}
            )
        except stripe.StripeError as err:
            if _non_retryable(err):
                raise _application_error(err, "the checkout session") from err
            raise
        return CheckoutSession(
            session_id=session.id,
            url=session.url or "",
            expires_at=session.expires_at,
            amount_total=session.amount_total or 0,
            currency=session.currency or req.currency,
        )

    @activity.defn
    async def settle_checkout_session(self, session_id: str) -> SessionState:
        """Reads the session as Stripe has it and, if it is still open, expires it.

        Called when the order's payment window closes: a webhook may have been lost, so
        Stripe's record decides whether the customer paid.
        """
        sessions = self._client.v1.checkout.sessions
        try:
            session = await sessions.retrieve_async(session_id)
            if session.status == "open":
                try:
                    session = await sessions.expire_async(session_id)
                except stripe.InvalidRequestError:
                    # Completed between our read and the expire call: read the outcome.
                    session = await sessions.retrieve_async(session_id)
        except stripe.StripeError as err:
            if _non_retryable(err):
                raise _application_error(err, f"session {session_id}") from err
            raise
        payment_intent = session.payment_intent
        if payment_intent is not None and not isinstance(payment_intent, str):
            payment_intent = payment_intent.id
        return SessionState(
            session_id=session.id,
            status=session.status or "open",
            payment_status=session.payment_status,
            payment_intent=payment_intent,
            amount_total=session.amount_total,
            currency=session.currency,
        )

    @activity.defn
    async def refund(self, req: RefundRequest) -> RefundResult:
        info = activity.info()
        generation = int(info.heartbeat_details[0]) if info.heartbeat_details else 0
        try:
            if info.attempt > 1 or req.round > 1 or req.may_exist:
                # An earlier attempt may have made the refund and lost the answer.
                found = await self._find_refund(req.payment_intent, req.idempotency_key)
                if found is not None:
                    return found
            refund = await self._client.v1.refunds.create_async(
                {
                    "payment_intent": req.payment_intent,
                    "amount": req.amount,
                    "reason": "requested_by_customer",
                    "metadata": {
                        "order_id": req.order_id,
                        "reason": req.reason[:500],
                        REFUND_KEY_METADATA: req.idempotency_key,
                    },
                },
                {"idempotency_key": f"{req.idempotency_key}:{req.round}:{generation}"},
            )
        except stripe.StripeError as err:
            if _non_retryable(err):
                raise _application_error(err, f"a refund of {req.amount}") from err
            if (err.http_status or 0) >= 500 and _replayed(err):
                # That key is spent on a finished failure: the next attempt, after looking
                # for a refund it may have made after all, uses a fresh one.
                activity.heartbeat(generation + 1)
            raise
        return RefundResult(refund_id=refund.id, amount=refund.amount, status=refund.status or "")

    async def _find_refund(self, payment_intent: str, key: str) -> RefundResult | None:
        page = await self._client.v1.refunds.list_async(
            {"payment_intent": payment_intent, "limit": 100}
        )
        async for refund in page.auto_paging_iter():
            metadata = refund.metadata.to_dict() if refund.metadata else {}
            if metadata.get(REFUND_KEY_METADATA) == key and (
                refund.status not in _DEAD_REFUND_STATUSES
            ):
                activity.logger.info("refund %s already made as %s", key, refund.id)
                return RefundResult(
                    refund_id=refund.id, amount=refund.amount, status=refund.status or ""
                )
        return None

    @activity.defn
    async def payment_intent_status(self, payment_intent: str) -> str:
        """Stripe's status of a payment: succeeded, processing, requires_payment_method..."""
        try:
            intent = await self._client.v1.payment_intents.retrieve_async(payment_intent)
        except stripe.StripeError as err:
            if _non_retryable(err):
                raise _application_error(err, f"payment {payment_intent}") from err
            raise
        return intent.status

