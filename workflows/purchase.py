"""One shop purchase: reserve -> payment -> goods, or expire -> release, or refund.

Instant orders hold their units (per-unit rows in Postgres) for the reservation's TTL while
the customer pays; prepaid (made-to-order) orders are paid first and then wait for their
supplier until a deadline. The SQL functions decide every change of stock and money; this
workflow decides when to call them and is the one place that knows about payments: each
Stars charge, Stripe event and balance debit acts once, a payment that comes too late is
used if stock allows and refunded otherwise, and a payment the order cannot use (a doubled
charge, a payment for a closed order) goes back the way it came.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, FailureError

with workflow.unsafe.imports_passed_through():
    from activities.payments import (
        CheckoutRequest,
        CheckoutSession,
        RefundRequest,
        SessionState,
        StripeActivities,
    )
    from activities.shop import (
        BalanceCredit,
        ExternalRefund,
        Fulfilment,
        NewOrder,
        PaymentRecord,
        Reservation,
        ShopActivities,
        ShopOrder,
        StatusChange,
    )
    from activities.telegram import (
        BOT_BLOCKED,
        Button,
        DeliveryResult,
        InvoiceRequest,
        MessageRequest,
        StarRefundRequest,
        TelegramActivities,
    )
    from workflows import search_attributes as sa
    from workflows.video_order import PAID_EVENTS, SERVICE_RETRY, StripeEvent

WORKFLOW_ID_PREFIX = "purchase:"
ORDER_KIND = "shop"
FINAL_STATUSES = frozenset({"delivered", "expired", "refunded", "failed"})
NEEDS_ATTENTION = "needs_attention"
STARS = "XTR"
PAYMENT_METHODS = ("stars", "stripe", "balance")
# An offer placed by the sales assistant: stock held, the way to pay picked on its buttons.
CHOICE = "choice"
# The signal a purchase placed for another workflow (a chat's offer) sends it, once placed
# or refused; its argument is the PurchaseView.
OFFER_PLACED_SIGNAL = "offer_placed"

# Creating the payment link while the customer waits for the order's answer.
PLACEMENT_TIMEOUT = timedelta(minutes=2)
# Telegram may rate-limit a chat for minutes; the goods are the buyer's either way (the
# Mini App shows them), so delivery is retried for a day before it is left to operators.
DELIVERY_TIMEOUT = timedelta(days=1)
NOTICE_TIMEOUT = timedelta(hours=1)
TELEGRAM_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=5),
    non_retryable_error_types=[BOT_BLOCKED],
)
REFUND_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=5),
)
DB_TIMEOUT = timedelta(seconds=30)
# A database that stays down this long fails the step: the payment, if any, is refunded
# and an order that cannot say so fails (a payment arriving later then starts a run that
# refunds it).
DB_PATIENCE = timedelta(hours=6)
FULFIL_PATIENCE = timedelta(minutes=1)

# Runs that began before these rules replay without them (workflow.patched).
EXTEND_ON_APPROVAL = "extend-reservation-on-approval"
GIVE_BACK_UNSURE_DEBIT = "give-back-unsure-balance-debit"
DEBIT_RETURNED = (
    "We could not confirm the payment from your balance, so the amount went back to your "
    "balance. Please try again."
)

# What the customer reads, by stable code.
CUSTOMER_WORDS = {
    "out_of_stock": "Sorry, there is not enough of this in stock right now.",
    "insufficient_balance": "Your balance is too low for this order.",
    "too_many_unpaid_orders": "You have too many unpaid orders; pay or let one expire first.",
    "product_not_found": "This product does not exist.",
    "product_unavailable": "This product is not on sale at the moment.",
    "invalid_quantity": "That quantity cannot be ordered.",
    "payment_unavailable": "We could not prepare the payment. Nothing was charged; please "
    "try again in a moment.",
    "expired": "The order expired before it was paid. Nothing was charged.",
    "sold_out_late": "Your payment arrived after the reservation ended and the item had sold "
    "out, so it was refunded.",
    "price_changed_late": "Your payment arrived after the reservation ended and the item's "
    "price had changed since, so it was refunded.",
    "supplier_late": "The supplier did not deliver in time, so your payment was refunded.",
    "refund_pending": "A refund we owe you could not be sent yet. Our team has been alerted.",
    "order_failed": "The order could not be completed.",
    "payment_method_chosen": "This order is already being paid another way.",
}


def workflow_id(order_id: str) -> str:
    return f"{WORKFLOW_ID_PREFIX}{order_id}"


def order_id_of(wf_id: str) -> str:
    return wf_id.removeprefix(WORKFLOW_ID_PREFIX)


def format_money(amount: int, currency: str) -> str:
    if currency.upper() == STARS:
        return f"{amount} ⭐"
    return f"{amount // 100}.{amount % 100:02d} {currency.upper()}"


@dataclass
class Payment:
    """A payment the order received, in the unit of the way it came."""

    method: str  # stars | stripe | balance
    reference: str  # Telegram charge id | Stripe PaymentIntent | ledger transaction id
    amount: int
    currency: str  # XTR for Stars
    payer_id: int | None = None  # the Telegram user a Star refund goes back to


@dataclass
class StarsPayment:
    """A `successful_payment` message, as the Telegram webhook signals it."""

    charge_id: str
    amount: int
    currency: str
    payer_id: int


@dataclass
class PreCheckout:
    """A `pre_checkout_query` for this order: approved only for exactly what it waits for."""

    amount: int
    currency: str
    payer_id: int


@dataclass
class PaymentChoice:
    """A tap on one of an offer's buttons: how to pay, by whom (only the buyer may)."""

    method: str  # stars | stripe | balance
    telegram_id: int


@dataclass
class FulfilRequest:
    submission_id: int  # the supplier's content, staged in Postgres (never in history)


@dataclass
class ShopRefund:
    method: str  # stars | stripe | balance
    reference: str  # what was refunded
    amount: int
    currency: str
    reason: str
    status: str  # pending | succeeded | failed
    detail: str | None = None  # the provider's words: operators only


@dataclass
class PurchaseView:
    order_id: str
    status: str  # placing, then the statuses of the order's row (db/migrations/0003_shop.sql)
    payment_method: str
    quantity: int
    product_id: int
    created_at: str
    updated_at: str
    order_type: str | None = None
    product_name: str | None = None
    amount: int = 0
    currency: str = ""
    amount_stars: int = 0
    reserved_until: str | None = None
    fulfillment_deadline: str | None = None
    invoice_link: str | None = None
    checkout_url: str | None = None
    checkout_session_id: str | None = None
    payment_reference: str | None = None
    delivery: str | None = None  # sent | blocked, once the goods went to the chat
    error_code: str | None = None
    error: str | None = None  # plain words (CUSTOMER_WORDS)
    refunds: list[ShopRefund] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # operators only


@dataclass
class PurchaseTerms:
    """The settings a purchase keeps for its whole life, for whoever places orders (the API,
    a chat's offers)."""

    reservation_ttl_seconds: int
    stars_per_unit: float
    max_unpaid_orders: int
    max_units: int
    refund_to_balance: bool
    late_payment_seconds: int
    refund_retry_seconds: int
    app_url: str

    def order(self, **order: Any) -> PurchaseInput:
        page = f"{self.app_url}?order={order['order_id']}"
        order.setdefault("success_url", f"{page}&paid=1")
        order.setdefault("cancel_url", page)
        terms = {f.name: getattr(self, f.name) for f in dataclasses.fields(PurchaseTerms)}
        # An order may override a term (a refund-only run takes no late payments).
        return PurchaseInput(**{**terms, **order})


@dataclass(kw_only=True)
class PurchaseInput(PurchaseTerms):
    """One order and its terms."""

    order_id: str
    telegram_id: int
    product_id: int
    quantity: int
    payment_method: str  # stars | stripe | balance | choice
    success_url: str
    cancel_url: str
    # How long an approved Stars checkout keeps the order waiting past its reservation.
    precheckout_grace_seconds: int = 30
    # A new run of an order whose workflow had closed when a payment for it arrived: it
    # starts from the closed run's view and gives back what `refund_payment` signals.
    refund_only: bool = False
    previous_view: PurchaseView | None = None
    # The workflow that placed this order and waits for OFFER_PLACED_SIGNAL (a chat).
    notify_workflow_id: str | None = None


@workflow.defn
class PurchaseWorkflow:
    @workflow.init
    def __init__(self, order: PurchaseInput) -> None:
        self._in = order
        now = workflow.now().isoformat()
        self._view = order.previous_view or PurchaseView(
            order_id=order.order_id,
            status="placing",
            payment_method=order.payment_method,
            quantity=order.quantity,
            product_id=order.product_id,
            created_at=now,
            updated_at=now,
        )
        self._order: ShopOrder | None = None
        self._placed = False
        self._payments: list[Payment] = []
        self._seen: set[str] = set()  # charge ids and Stripe event ids already taken
        self._used: Payment | None = None  # the payment the order is paid with
        self._refunded_refs: set[str] = set()
        self._approved_at: datetime | None = None
        self._stripe_expired = False
        self._fulfilling = False
        self._choosing = False
        self._fulfilled = False
        self._deadline_passed = False
        self._done = False
        self._returned: list[Payment] = []  # payments a refund-only run gives back
        self._window_closed = False  # the wait for an on-time payment is over
        if order.refund_only and order.previous_view is not None:
            # What the closed run took or gave back is never given back again here: a
            # redelivered payment reaches whatever run is open under the order's id.
            earlier = order.previous_view
            taken = {r.reference for r in earlier.refunds}
            if earlier.payment_reference:
                taken.add(earlier.payment_reference)
            self._seen |= taken
            self._refunded_refs |= taken
        self._indexed = workflow.info().typed_search_attributes.get(sa.ORDER_KIND) is not None

    # --- messages -------------------------------------------------------------------

    @workflow.update
    async def place(self) -> PurchaseView:
        """The order as placed, with its payment link (the API's early return)."""
        await workflow.wait_condition(lambda: self._placed or self._view.error_code is not None)
        if not self._placed:
            raise ApplicationError(
                self._view.error or "the order failed", type=self._view.error_code or "failed"
            )
        return self._view

    @workflow.update
    async def approve_stars_checkout(self, query: PreCheckout) -> str:
        """Telegram asks whether to take this Stars payment (answered inside its 10 s).

        The payment may come a little after the reservation's end, so the units stay held
        for the grace too: in the database, not only in this workflow's deadline, else
        another buyer could take them meanwhile."""
        now = self._approved_at = workflow.now()
        view = self._view
        grace = timedelta(seconds=self._in.precheckout_grace_seconds)
        until = datetime.fromisoformat(view.reserved_until) if view.reserved_until else None
        if (
            view.order_type == "instant"
            and grace.total_seconds() >= 1
            and until is not None
            and until < now + grace
            and workflow.patched(EXTEND_ON_APPROVAL)
        ):
            try:
                view.reserved_until = await workflow.execute_activity_method(
                    ShopActivities.reserve_again,
                    self._reservation(self._in.precheckout_grace_seconds),
                    start_to_close_timeout=timedelta(seconds=3),
                    schedule_to_close_timeout=timedelta(seconds=4),
                    retry_policy=SERVICE_RETRY,
                )
            except ActivityError as err:
                self._approved_at = None
                self._problem(f"holding the units for an approved checkout: {_cause(err)}")
                if _code(err, "") == "price_changed":
                    raise ApplicationError(
                        "The price of this item has just changed; please order it again.",
                        type="price_changed",
                    ) from err
                raise ApplicationError(
                    "Sorry, this item has just sold out. Nothing was charged.",
                    type="out_of_stock",
                ) from err
            self._touch()
        return "ok"

    @approve_stars_checkout.validator
    def _check_stars_checkout(self, query: PreCheckout) -> None:
        view = self._view
        if view.status != "awaiting_payment" or self._used is not None or self._closing():
            raise ApplicationError(
                "This order is no longer waiting for a payment.", type="NotAwaitingPayment"
            )
        if view.payment_method != "stars":
            raise ApplicationError("This order is paid another way.", type="WrongPaymentMethod")
        if query.currency != STARS or query.amount != view.amount_stars:
            raise ApplicationError("The amount does not match the order.", type="AmountMismatch")

    @workflow.update
    async def choose_payment(self, choice: PaymentChoice) -> PurchaseView:
        """The buyer of an offer (payment method `choice`) picks how to pay: the Stars
        invoice or the checkout is made now, a balance payment is taken now."""
        view, method = self._view, choice.method
        if view.payment_method == method:
            # The same button again: the answer of the first tap.
            await workflow.wait_condition(lambda: not self._choosing)
            return view
        self._choosing = True
        view.payment_method = method
        try:
            await self._prepare_payment()
        except ActivityError as err:
            view.payment_method = CHOICE  # another button may still work
            code = _code(err, "payment_unavailable")
            if code != "insufficient_balance":
                code = "payment_unavailable"
            self._problem(f"preparing the {method} payment: {_cause(err)}")
            raise ApplicationError(CUSTOMER_WORDS[code], type=code) from err
        finally:
            self._choosing = False
        return view

    @choose_payment.validator
    def _check_choice(self, choice: PaymentChoice) -> None:
        view, method = self._view, choice.method
        if choice.telegram_id != self._in.telegram_id:
            raise ApplicationError("This offer is someone else's.", type="NotYourOrder")
        if method not in PAYMENT_METHODS:
            raise ApplicationError(
                f"{method!r} is not a way to pay (stars, stripe or balance).",
                type="invalid_payment_method",
            )
        if self._in.payment_method != CHOICE:
            raise ApplicationError(
                CUSTOMER_WORDS["payment_method_chosen"], type="payment_method_chosen"
            )
        if (
            not self._placed
            or view.status != "awaiting_payment"
            or self._used is not None
            or self._usable() is not None
            or self._closing()
        ):
            raise ApplicationError(
                "This order is no longer waiting for a payment.", type="NotAwaitingPayment"
            )
        if view.payment_method in (CHOICE, method):
            return
        # A Stars invoice nobody started paying can be left for another way; a checkout
        # session or a balance payment cannot be taken back so simply.
        if self._choosing or view.payment_method != "stars" or self._approved_at is not None:
            raise ApplicationError(
                CUSTOMER_WORDS["payment_method_chosen"], type="payment_method_chosen"
            )

    @workflow.signal
    def stars_paid(self, paid: StarsPayment) -> None:
        if paid.charge_id in self._seen:
            return  # the same successful_payment again: it acts once
        self._seen.add(paid.charge_id)
        self._payments.append(
            Payment("stars", paid.charge_id, paid.amount, paid.currency, paid.payer_id)
        )

    @workflow.signal
    def stripe_event(self, event: StripeEvent) -> None:
        if event.event_id in self._seen:
            return
        self._seen.add(event.event_id)
        if event.session_id != self._view.checkout_session_id:
            workflow.logger.warning("event %s for another session", event.event_id)
            return
        if event.type in PAID_EVENTS and event.payment_status == "paid":
            reference = event.payment_intent or event.session_id
            if reference not in self._seen:
                self._seen.add(reference)
                self._payments.append(
                    Payment("stripe", reference, event.amount_total or 0, self._view.currency)
                )
        elif event.type == "checkout.session.expired":
            self._stripe_expired = True

    @workflow.signal
    def refund_payment(self, payment: Payment) -> None:
        """A payment for this order that arrived after its workflow closed."""
        if payment.reference not in {p.reference for p in self._returned}:
            self._returned.append(payment)

    @workflow.update
    async def fulfil(self, req: FulfilRequest) -> PurchaseView:
        """A supplier's goods for a prepaid order; refused at once past the deadline."""
        self._fulfilling = True
        try:
            await self._db(
                ShopActivities.fulfill_prepaid_order,
                Fulfilment(self._in.order_id, req.submission_id),
                # The supplier waits for the answer; a database that does not answer soon
                # is a "try again", never a fulfilment held open for hours.
                patience=FULFIL_PATIENCE,
            )
            self._fulfilled = True
        except ActivityError as err:
            self._problem(f"fulfilment {req.submission_id}: {_cause(err)}")
            raise ApplicationError(
                "The fulfilment could not be stored; try again.", type="FulfilmentFailed"
            ) from err
        finally:
            self._fulfilling = False
        return self._view

    @fulfil.validator
    def _check_fulfil(self, req: FulfilRequest) -> None:
        if self._fulfilled or self._view.status == "delivered":
            raise ApplicationError("This order is already fulfilled.", type="AlreadyFulfilled")
        if self._fulfilling:
            # Not "already fulfilled": the one being stored may still fail.
            raise ApplicationError(
                "A fulfilment is being stored; try again in a moment.",
                type="FulfilmentInProgress",
            )
        deadline = self._view.fulfillment_deadline
        if self._view.status != "awaiting_supplier" or deadline is None:
            raise ApplicationError(
                f"This order is {self._view.status}, not waiting for its supplier.",
                type="NotAwaitingSupplier",
            )
        if self._deadline_passed or workflow.now() >= datetime.fromisoformat(deadline):
            raise ApplicationError(
                f"The fulfilment deadline ({deadline}) has passed; the order is refunded.",
                type="DeadlinePassed",
            )

    @workflow.query
    def view(self) -> PurchaseView:
        return self._view

    # --- the flow -------------------------------------------------------------------

    @workflow.run
    async def run(self, order: PurchaseInput) -> PurchaseView:
        if order.refund_only:
            await self._give_back_returned()
            return self._view
        extras = asyncio.create_task(self._refund_extra_payments())
        try:
            placed = await self._place()
            await self._notify_placed()
            if placed:
                await self._sell()
        except ActivityError as err:
            # A step that could not be done for hours (the database away): the order stops
            # here for an operator, and every payment it did not use still goes back.
            self._problem(f"the order stopped: {_cause(err)}")
            await self._set_status(NEEDS_ATTENTION, "order_failed", _cause(err))
        finally:
            self._done = True
        await extras
        # Payments that came in after the last wait for one are refunded, never dropped,
        # those arriving while these refunds run included.
        while True:
            await workflow.wait_condition(workflow.all_handlers_finished)
            unused = self._unused_payments()
            if not unused:
                break
            for payment in unused:
                await self._refund(payment, "payment after the order ended", whole=False)
        if any(r.status == "failed" for r in self._view.refunds):
            await self._attention_for_refunds()
        return self._view

    async def _place(self) -> bool:
        o = self._in
        try:
            order: ShopOrder = await self._db(
                ShopActivities.create_shop_order,
                NewOrder(
                    order_id=o.order_id,
                    telegram_id=o.telegram_id,
                    product_id=o.product_id,
                    quantity=o.quantity,
                    payment_method=o.payment_method,
                    ttl_seconds=o.reservation_ttl_seconds,
                    stars_per_unit=o.stars_per_unit,
                    max_unpaid=o.max_unpaid_orders,
                    max_quantity=o.max_units,
                ),
                patience=PLACEMENT_TIMEOUT,
            )
        except ActivityError as err:
            code = _code(err, "order_failed")
            self._refuse(code, _cause(err))
            if code == "order_failed":
                # Not a refusal: the database did not answer in time, so the order may exist
                # after all. Whatever it holds goes back (a no-op if it was never created).
                with contextlib.suppress(ActivityError):
                    await self._db(ShopActivities.expire_order, o.order_id)
            # A refusal held nothing: no order row, no stock, no money.
            return False
        self._take(order)
        try:
            if self._view.payment_method != CHOICE:
                await self._prepare_payment()
        except ActivityError as err:
            code = _code(err, "payment_unavailable")
            if code != "insufficient_balance":
                code = "payment_unavailable"
            refused = isinstance(err.cause, ApplicationError) and err.cause.non_retryable
            if (
                self._view.payment_method == "balance"
                and not refused
                and workflow.patched(GIVE_BACK_UNSURE_DEBIT)
            ):
                # The debit's answer was lost, not refused: it may have committed. The order
                # ends refunded if it did (process_refund refuses an order never debited).
                if await self._give_back_unsure_debit(_cause(err)):
                    return False  # refunded or needs_attention, as the view says
            with contextlib.suppress(ActivityError):  # a lapsed reservation frees itself
                await self._db(ShopActivities.release_reservation, o.order_id)
            await self._set_status("failed", code, _cause(err))
            self._refuse(code, _cause(err))
            return False
        self._placed = True
        self._index_status()
        return True

    async def _give_back_unsure_debit(self, why: str) -> bool:
        """True once the order is refunded to the balance or needs an operator; False when
        nothing was debited (the order can simply fail)."""
        try:
            order = await self._db(
                ShopActivities.refund_to_balance,
                StatusChange(self._in.order_id, "refunded", "payment_unavailable"),
            )
        except ActivityError as err:
            if _code(err, "") == "not_paid":
                return False
            await self._set_status(
                NEEDS_ATTENTION, "payment_unavailable",
                f"a balance debit may have been made ({why}) and refunding it failed: "
                f"{_cause(err)}",
            )  # fmt: skip
            return True
        self._take(order)
        self._view.error_code = "payment_unavailable"
        self._view.error = DEBIT_RETURNED
        self._index_status()
        return True

    async def _notify_placed(self) -> None:
        """Tells the workflow that placed this order (a chat's offer) how placing it went."""
        if self._in.notify_workflow_id is None:
            return
        try:
            await workflow.get_external_workflow_handle(self._in.notify_workflow_id).signal(
                OFFER_PLACED_SIGNAL, self._view
            )
        except FailureError as err:  # the chat has ended: the offer simply expires unpaid
            self._problem(f"telling {self._in.notify_workflow_id} of the order: {err}")

    async def _prepare_payment(self) -> None:
        o, view = self._in, self._view
        if view.payment_method == "balance":
            tx = await self._db(ShopActivities.pay_from_balance, o.order_id)
            self._payments.append(Payment("balance", str(tx), view.amount, view.currency))
        elif view.payment_method == "stars":
            view.invoice_link = await workflow.execute_activity_method(
                TelegramActivities.create_invoice_link,
                InvoiceRequest(
                    order_id=o.order_id,
                    title=view.product_name or "Order",
                    description=f"{view.product_name} x {view.quantity}",
                    amount_stars=view.amount_stars,
                ),
                start_to_close_timeout=timedelta(seconds=20),
                schedule_to_close_timeout=PLACEMENT_TIMEOUT,
                retry_policy=TELEGRAM_RETRY,
            )
        else:
            session: CheckoutSession = await workflow.execute_activity_method(
                StripeActivities.create_checkout_session,
                CheckoutRequest(
                    order_id=o.order_id,
                    idempotency_key=f"{workflow.info().workflow_id}:checkout",
                    product_name=view.product_name or "Order",
                    unit_amount=view.amount,
                    quantity=1,
                    currency=view.currency,
                    success_url=o.success_url,
                    cancel_url=o.cancel_url,
                    # Stripe's shortest; the order itself ends sooner and expires the session.
                    expires_at=int(workflow.now().timestamp()) + 31 * 60,
                    metadata={"kind": ORDER_KIND},
                ),
                start_to_close_timeout=timedelta(seconds=30),
                schedule_to_close_timeout=PLACEMENT_TIMEOUT,
                retry_policy=SERVICE_RETRY,
            )
            view.checkout_url = session.url
            view.checkout_session_id = session.session_id
            self._index(sa.CHECKOUT_SESSION_ID.value_set(session.session_id))
        self._touch()

    async def _sell(self) -> None:
        payment = await self._await_payment()
        if payment is None:
            await self._expire()
            payment = await self._await_late_payment()
            if payment is None:
                return
            if self._view.order_type == "instant":
                refused = await self._reserve_again()
                if refused is not None:
                    await self._refund(payment, refused, whole=True)
                    return
        self._used = payment
        self._view.payment_reference = payment.reference
        if self._view.order_type == "instant":
            await self._complete(payment)
        else:
            await self._prepaid(payment)

    async def _await_payment(self) -> Payment | None:
        """The first usable payment, or None when the order's payment window closed."""
        while True:
            deadline = self._payment_deadline()
            remaining = (deadline - workflow.now()).total_seconds()
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(
                    lambda d=deadline: (
                        self._usable() is not None
                        or self._stripe_expired
                        or self._payment_deadline() != d
                    ),
                    timeout=timedelta(seconds=remaining),
                )
            if self._usable() is not None or self._stripe_expired:
                break
        self._window_closed = True
        if self._usable() is None and self._view.checkout_session_id is not None:
            await self._settle_stripe()
        return self._usable()

    def _payment_deadline(self) -> datetime:
        created = datetime.fromisoformat(self._view.created_at)
        end = created + timedelta(seconds=self._in.reservation_ttl_seconds)
        if self._view.reserved_until is not None:
            end = datetime.fromisoformat(self._view.reserved_until)
        if self._approved_at is not None:
            grace = timedelta(seconds=self._in.precheckout_grace_seconds)
            end = max(end, self._approved_at + grace)
        return end

    async def _settle_stripe(self) -> None:
        """Stripe's record decides at the end of the window (a webhook may have been lost);
        expiring the session there also stops a payment from starting after it."""
        try:
            state: SessionState = await workflow.execute_activity_method(
                StripeActivities.settle_checkout_session,
                self._view.checkout_session_id,
                start_to_close_timeout=timedelta(seconds=30),
                schedule_to_close_timeout=timedelta(minutes=10),
                retry_policy=SERVICE_RETRY,
            )
        except ActivityError as err:
            # The late-payment window still hears a payment that Stripe reports later.
            self._problem(f"reading checkout session: {_cause(err)}")
            return
        if state.payment_status == "paid":
            reference = state.payment_intent or state.session_id
            if reference not in self._seen:
                self._seen.add(reference)
                self._payments.append(
                    Payment("stripe", reference, state.amount_total or 0, self._view.currency)
                )

    async def _expire(self) -> None:
        try:
            order = await self._db(ShopActivities.expire_order, self._in.order_id)
        except ActivityError as err:
            # The units' reservation has lapsed, so they are on sale again whatever the row
            # says; a late payment is still heard (and used or refunded).
            self._problem(f"expiring the order: {_cause(err)}")
            self._view.status = "expired"
        else:
            self._take(order)
        self._view.error_code, self._view.error = "expired", CUSTOMER_WORDS["expired"]
        self._index_status()

    async def _await_late_payment(self) -> Payment | None:
        window = self._in.late_payment_seconds
        if window <= 0 or self._view.payment_method in ("balance", CHOICE):
            return None
        with contextlib.suppress(TimeoutError):
            await workflow.wait_condition(
                lambda: self._usable() is not None, timeout=timedelta(seconds=window)
            )
        return self._usable()

    async def _reserve_again(self) -> str | None:
        """Units again for a payment that outlived its reservation, at the price it paid:
        None when held, else why not (the code of the customer's words)."""
        try:
            until = await self._db(
                ShopActivities.reserve_again, self._reservation(self._in.reservation_ttl_seconds)
            )
        except ActivityError as err:
            self._problem(f"reserving again for a late payment: {_cause(err)}")
            return "price_changed_late" if _code(err, "") == "price_changed" else "sold_out_late"
        self._view.reserved_until = until
        return None

    def _reservation(self, ttl_seconds: int) -> Reservation:
        """This order's units held again for `ttl_seconds`, at the price it was ordered at."""
        v = self._view
        return Reservation(v.order_id, v.product_id, v.quantity, ttl_seconds, v.amount)

    async def _complete(self, payment: Payment) -> None:
        record = PaymentRecord(self._in.order_id, payment.method, payment.reference)
        try:
            try:
                order = await self._db(ShopActivities.complete_purchase, record)
            except ActivityError as err:
                if _code(err, "") != "reservation_lost" or await self._reserve_again():
                    raise
                # The units went to another order after the reservation lapsed; others
                # were free, so the purchase goes ahead with them.
                self._problem(f"completing the purchase: {_cause(err)}")
                order = await self._db(ShopActivities.complete_purchase, record)
        except ActivityError as err:
            # The order cannot have its goods: the payment goes back, never stays taken.
            self._problem(f"completing the purchase: {_cause(err)}")
            await self._refund(payment, "sold_out_late", whole=True)
            return
        self._take(order)
        self._view.error_code = self._view.error = None
        self._index_status()
        await self._deliver()

    async def _prepaid(self, payment: Payment) -> None:
        try:
            order = await self._db(
                ShopActivities.process_prepaid_payment,
                PaymentRecord(self._in.order_id, payment.method, payment.reference),
            )
        except ActivityError as err:
            self._problem(f"recording the prepaid payment: {_cause(err)}")
            await self._refund(payment, "order_failed", whole=True)
            return
        self._take(order)
        self._view.error_code = self._view.error = None
        self._index_status()
        deadline = datetime.fromisoformat(order.fulfillment_deadline or self._view.created_at)
        if order.supplier_chat_id is not None:
            await self._tell(
                order.supplier_chat_id,
                f"New prepaid order {order.order_id}: {order.product_name} x {order.quantity}. "
                f"Deliver before {_when(deadline)} with POST /api/suppliers/orders/"
                f"{order.order_id}/fulfil.",
            )
        await self._tell(
            self._in.telegram_id,
            f"Paid: {order.product_name} x {order.quantity} is made to order. You will get it "
            f"by {_when(deadline)}, or your payment back.",
        )
        with contextlib.suppress(TimeoutError):
            remaining = max((deadline - workflow.now()).total_seconds(), 0.001)
            await workflow.wait_condition(
                lambda: self._fulfilled, timeout=timedelta(seconds=remaining)
            )
        # From here on the validator refuses fulfilments; one already accepted finishes first.
        self._deadline_passed = True
        await workflow.wait_condition(lambda: not self._fulfilling)
        if self._fulfilled:
            try:
                order = await self._db(ShopActivities.get_shop_order, self._in.order_id)
            except ActivityError as err:  # the row says delivered; only our view is behind
                self._problem(f"reading the fulfilled order: {_cause(err)}")
                self._view.status = "delivered"
                order = None
            if order is not None:
                self._take(order)
            self._index_status()
            await self._deliver()
            return
        await self._refund(payment, "supplier_late", whole=True)

    async def _deliver(self) -> None:
        try:
            result: DeliveryResult = await workflow.execute_activity_method(
                TelegramActivities.deliver_order,
                self._in.order_id,
                start_to_close_timeout=timedelta(seconds=60),
                schedule_to_close_timeout=DELIVERY_TIMEOUT,
                retry_policy=TELEGRAM_RETRY,
            )
        except ActivityError as err:
            # Delivered all the same: the goods are the buyer's and the Mini App shows them.
            self._problem(f"sending the goods to the chat: {_cause(err)}")
            return
        self._view.delivery = result.outcome
        self._touch()

    # --- money back -----------------------------------------------------------------

    async def _refund_extra_payments(self) -> None:
        """A second payment for a paid order (a doubled charge) goes back as it came."""
        handled: set[str] = set()
        while True:
            await workflow.wait_condition(
                lambda: (
                    self._done
                    or (
                        self._used is not None
                        and any(self._extra(p, handled) for p in self._payments)
                    )
                )
            )
            if self._done:
                return
            for payment in [p for p in self._payments if self._extra(p, handled)]:
                handled.add(payment.reference)
                await self._refund(payment, "a second payment for a paid order", whole=False)

    async def _give_back_returned(self) -> None:
        """Refunds every payment signalled to a refund-only run, those that arrive while it
        refunds included (a signal-with-start reaches the run that is already going)."""
        while True:
            await workflow.wait_condition(workflow.all_handlers_finished)
            # A payment can also reach this run as stars_paid or stripe_event (the webhook
            # signals whatever run is open under the order's id); each goes back once.
            pending = {
                p.reference: p
                for p in (*self._returned, *self._payments)
                if p.reference not in self._refunded_refs
            }
            if not pending:
                return
            for payment in pending.values():
                await self._refund(payment, "payment for a closed order", whole=False)

    def _extra(self, payment: Payment, handled: set[str]) -> bool:
        return (
            self._used is not None
            and payment.reference != self._used.reference
            and payment.reference not in handled
            and payment.reference not in self._refunded_refs
        )

    def _unused_payments(self) -> list[Payment]:
        used = self._used.reference if self._used else None
        return [
            p
            for p in self._payments
            if p.reference != used and p.reference not in self._refunded_refs
        ]

    def _usable(self) -> Payment | None:
        for payment in self._payments:
            if payment.reference in self._refunded_refs:
                continue
            if self._pays_order(payment):
                return payment
        return None

    def _pays_order(self, payment: Payment) -> bool:
        view = self._view
        if payment.method == "stars":
            return payment.currency == STARS and payment.amount == view.amount_stars
        return payment.amount == view.amount

    async def _refund(self, payment: Payment, reason: str, whole: bool) -> bool:
        """Gives a payment back: the order's own (whole) or one it could not use."""
        o, view = self._in, self._view
        self._refunded_refs.add(payment.reference)
        to_balance = payment.method == "balance" or o.refund_to_balance
        refund = ShopRefund(
            method="balance" if to_balance else payment.method,
            reference=payment.reference,
            amount=view.amount if to_balance else payment.amount,
            currency=view.currency if to_balance else payment.currency,
            reason=reason,
            status="pending",
        )
        view.refunds.append(refund)
        self._touch()
        try:
            if to_balance and whole:
                await self._db(
                    ShopActivities.record_payment,
                    PaymentRecord(o.order_id, payment.method, payment.reference),
                )
                self._take(
                    await self._db(
                        ShopActivities.refund_to_balance,
                        StatusChange(o.order_id, "refunded", reason),
                    )
                )
            elif to_balance:
                await self._db(
                    ShopActivities.credit_balance,
                    BalanceCredit(
                        o.telegram_id,
                        refund.amount,
                        f"refund of {payment.method} payment {payment.reference}: {reason}",
                        f"refund:{o.order_id}:{payment.reference}",
                    ),
                )
            else:
                await self._refund_externally(payment, reason)
                if whole:
                    self._take(
                        await self._db(
                            ShopActivities.record_external_refund,
                            # The order's own amount: what the Stars or card
                            # payment stood for in the shop's currency.
                            ExternalRefund(
                                o.order_id, payment.method, payment.reference, view.amount, reason
                            ),
                        )
                    )
        except ActivityError as err:
            refund.status, refund.detail = "failed", _cause(err)
            self._problem(f"refund of {payment.method} {payment.reference}: {refund.detail}")
            if whole:
                await self._set_status(NEEDS_ATTENTION, "refund_pending", refund.detail)
            # A second payment's refund that failed leaves the order itself alone (a prepaid
            # order still waits for its supplier); the run ends needing an operator.
            return False
        refund.status = "succeeded"
        if whole:
            code = reason if reason in CUSTOMER_WORDS else "order_failed"
            view.error_code, view.error = code, CUSTOMER_WORDS[code]
            self._index_status()
        self._touch()
        await self._tell(
            o.telegram_id,
            f"We refunded {format_money(refund.amount, refund.currency)}"
            + (" to your shop balance." if to_balance else ".")
            + (f" {CUSTOMER_WORDS[reason]}" if reason in CUSTOMER_WORDS else ""),
        )
        return True

    async def _refund_externally(self, payment: Payment, reason: str) -> None:
        policy = dict(
            schedule_to_close_timeout=timedelta(seconds=self._in.refund_retry_seconds),
            retry_policy=REFUND_RETRY,
        )
        if payment.method == "stars":
            await workflow.execute_activity_method(
                TelegramActivities.refund_star_payment,
                StarRefundRequest(payment.payer_id or self._in.telegram_id, payment.reference),
                start_to_close_timeout=timedelta(seconds=20),
                **policy,
            )
        else:
            await workflow.execute_activity_method(
                StripeActivities.refund,
                RefundRequest(
                    payment_intent=payment.reference,
                    amount=payment.amount,
                    idempotency_key=f"{workflow.info().workflow_id}:refund:{payment.reference}",
                    order_id=self._in.order_id,
                    reason=reason,
                ),
                start_to_close_timeout=timedelta(seconds=60),
                **policy,
            )

    async def _attention_for_refunds(self) -> None:
        """Some refund failed for its whole retry period: operators must see the order. The
        row moves to needs_attention unless its goods were delivered (the buyer keeps them
        in the Mini App); the workflow's status and search attribute show it either way."""
        if self._view.status == NEEDS_ATTENTION:
            return
        if self._view.status == "delivered":
            self._problem("a refund is still owed on this delivered order")
            self._view.error_code = "refund_pending"
            self._view.error = CUSTOMER_WORDS["refund_pending"]
            self._index(sa.ORDER_STATUS.value_set(NEEDS_ATTENTION))
            self._touch()
            return
        await self._set_status(NEEDS_ATTENTION, "refund_pending", "a refund is still owed")

    def _closing(self) -> bool:
        """The wait for an on-time payment is over, or is about to be (its deadline passed
        but the workflow has not woken yet): nothing new may start paying."""
        return self._window_closed or workflow.now() >= self._payment_deadline()

    # --- helpers ----------------------------------------------------------------------

    async def _db(self, method: Callable, arg: object, patience: timedelta = DB_PATIENCE):
        return await workflow.execute_activity_method(
            method,
            arg,
            start_to_close_timeout=DB_TIMEOUT,
            schedule_to_close_timeout=patience,
            retry_policy=SERVICE_RETRY,
        )

    async def _tell(self, chat_id: int, text: str) -> None:
        """A notice in the chat; losing one never changes the order."""
        try:
            await workflow.execute_activity_method(
                TelegramActivities.send_message,
                MessageRequest(
                    chat_id, text, [Button("Open the shop", web_app_url=self._in.app_url)]
                ),
                start_to_close_timeout=timedelta(seconds=20),
                schedule_to_close_timeout=NOTICE_TIMEOUT,
                retry_policy=TELEGRAM_RETRY,
            )
        except ActivityError as err:
            self._problem(f"notice to chat {chat_id}: {_cause(err)}")

    async def _set_status(self, status: str, code: str, detail: str) -> None:
        self._problem(detail)
        self._view.error_code, self._view.error = code, CUSTOMER_WORDS.get(code)
        try:
            self._take(
                await self._db(
                    ShopActivities.set_order_status, StatusChange(self._in.order_id, status, code)
                )
            )
        except ActivityError as err:
            self._problem(f"recording status {status}: {_cause(err)}")
            self._view.status = status
        self._index_status()

    def _take(self, order: ShopOrder) -> None:
        """The order row's facts, as the database has them now."""
        self._order = order
        view = self._view
        view.status = order.status
        view.order_type = order.order_type
        view.product_name = order.product_name
        view.amount = order.amount
        view.currency = order.currency
        view.amount_stars = order.amount_stars
        view.reserved_until = order.reserved_until
        view.fulfillment_deadline = order.fulfillment_deadline
        self._touch()

    def _refuse(self, code: str, detail: str) -> None:
        self._problem(detail)
        self._view.error_code = code
        self._view.error = CUSTOMER_WORDS.get(code, CUSTOMER_WORDS["order_failed"])
        self._view.status = "failed"
        self._index_status()

    def _problem(self, detail: str) -> None:
        workflow.logger.warning("purchase %s: %s", self._in.order_id, detail)
        self._view.problems.append(detail)

    def _index_status(self) -> None:
        self._index(sa.ORDER_STATUS.value_set(self._view.status))
        self._touch()

    def _index(self, update) -> None:
        if self._indexed:
            workflow.upsert_search_attributes([update])

    def _touch(self) -> None:
        self._view.updated_at = workflow.now().isoformat()


def _cause(err: ActivityError) -> str:
    cause = err.cause
    return str(cause) if cause is not None else str(err)


def _code(err: ActivityError, default: str) -> str:
    cause = err.cause
    if isinstance(cause, ApplicationError) and cause.type:
        return cause.type
    return default


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")
