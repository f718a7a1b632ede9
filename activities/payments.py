"""Stripe: Checkout Sessions and refunds, through stripe-python's StripeClient."""

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
    idempotency_key: str
    order_id: str
    reason: str


@dataclass
class RefundResult:
    refund_id: str
    amount: int
    status: str


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
        try:
            refund = await self._client.v1.refunds.create_async(
                {
                    "payment_intent": req.payment_intent,
                    "amount": req.amount,
                    "reason": "requested_by_customer",
                    "metadata": {"order_id": req.order_id, "reason": req.reason},
                },
                {"idempotency_key": req.idempotency_key},
            )
        except stripe.StripeError as err:
            if _non_retryable(err):
                raise _application_error(err, f"a refund of {req.amount}") from err
            raise
        return RefundResult(refund_id=refund.id, amount=refund.amount, status=refund.status or "")

