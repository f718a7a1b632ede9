"""The shop's SQL functions as activities (db/migrations/0003_shop.sql holds the rules).

Stock and money change only inside those functions, each one transaction that refuses a
wrong state with a stable code; here a refusal becomes a non-retryable ApplicationError
whose type is that code, and anything else (a dropped connection, a 5xx from Supabase) is
retried. Every function is idempotent for the same order, so a retried activity whose first
answer was lost changes nothing twice. Goods content never leaves this module through a
result: it would land in workflow history.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.shop_db import ShopDb, ShopError


@dataclass
class ShopOrder:
    """What the workflow needs of an order row (get_order's JSON, content never included)."""

    order_id: str
    order_type: str  # instant | prepaid
    status: str
    product_id: int
    product_name: str
    quantity: int
    amount: int
    currency: str
    amount_stars: int
    payment_method: str
    telegram_id: int
    reserved_until: str | None = None
    fulfillment_deadline: str | None = None
    supplier_chat_id: int | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShopOrder:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class NewOrder:
    order_id: str
    telegram_id: int
    product_id: int
    quantity: int
    payment_method: str
    ttl_seconds: int
    stars_per_unit: float
    max_unpaid: int
    max_quantity: int


@dataclass
class PaymentRecord:
    order_id: str
    method: str  # stars | stripe | balance
    reference: str


@dataclass
class ExternalRefund:
    order_id: str
    method: str  # stars | stripe
    reference: str
    amount: int
    reason: str


@dataclass
class Reservation:
    order_id: str
    product_id: int
    quantity: int
    ttl_seconds: int
    # What the order costs: units that would cost another amount are not taken. None (runs
    # that began before this check) takes whatever units are free.
    amount: int | None = None


@dataclass
class StatusChange:
    order_id: str
    status: str
    reason: str


@dataclass
class Fulfilment:
    order_id: str
    submission_id: int


@dataclass
class BalanceCredit:
    telegram_id: int
    amount: int
    reason: str
    idempotency_key: str


class ShopActivities:
    def __init__(self, db: ShopDb) -> None:
        self._db = db

    async def _call(self, function: str, params: dict[str, Any]) -> Any:
        try:
            return await self._db.rpc(function, params)
        except ShopError as err:
            raise ApplicationError(
                err.detail or err.code, type=err.code, non_retryable=True
            ) from err

    async def _order(self, function: str, params: dict[str, Any]) -> ShopOrder:
        result = await self._call(function, params)
        return ShopOrder.from_json(result.get("order", result))

    @activity.defn
    async def create_shop_order(self, req: NewOrder) -> ShopOrder:
        return await self._order(
            "create_order_with_availability_check",
            {
                "p_order_id": req.order_id,
                "p_telegram_id": req.telegram_id,
                "p_product_id": req.product_id,
                "p_quantity": req.quantity,
                "p_payment_method": req.payment_method,
                "p_ttl_seconds": req.ttl_seconds,
                "p_stars_per_unit": req.stars_per_unit,
                "p_max_unpaid": req.max_unpaid,
                "p_max_quantity": req.max_quantity,
            },
        )

    @activity.defn
    async def get_shop_order(self, order_id: str) -> ShopOrder | None:
        result = await self._call("get_order", {"p_order_id": order_id})
        return ShopOrder.from_json(result) if result else None

    @activity.defn
    async def pay_from_balance(self, order_id: str) -> str:
        """Debits the order's amount from its buyer's balance; the ledger entry's id."""
        result = await self._call("pay_order_from_balance", {"p_order_id": order_id})
        return str(result["transaction_id"])

    @activity.defn
    async def reserve_again(self, req: Reservation) -> str:
        """Units again for an order whose reservation lapsed or is about to (a late payment,
        an approved checkout): the reservation's new end, or out_of_stock, or price_changed
        when the units now free cost another amount than the order (the payment was for
        that amount). Retried, it finds the units it holds and decides the same."""
        result = await self._call(
            "reserve_product_for_purchase",
            {
                "p_order_id": req.order_id,
                "p_product_id": req.product_id,
                "p_quantity": req.quantity,
                "p_ttl_seconds": req.ttl_seconds,
            },
        )
        if req.amount is not None and int(result["amount"]) != req.amount:
            await self._call("release_reservation", {"p_order_id": req.order_id})
            raise ApplicationError(
                f"the units free now cost {result['amount']}, the order {req.amount}",
                type="price_changed",
                non_retryable=True,
            )
        return str(result["reserved_until"])

    @activity.defn
    async def complete_purchase(self, req: PaymentRecord) -> ShopOrder:
        # The function returns the units' content too; it stays here.
        return await self._order(
            "complete_purchase",
            {
                "p_order_id": req.order_id,
                "p_payment_method": req.method,
                "p_payment_reference": req.reference,
            },
        )

    @activity.defn
    async def process_prepaid_payment(self, req: PaymentRecord) -> ShopOrder:
        return await self._order(
            "process_prepaid_payment",
            {
                "p_order_id": req.order_id,
                "p_payment_method": req.method,
                "p_payment_reference": req.reference,
            },
        )

    @activity.defn
    async def record_payment(self, req: PaymentRecord) -> ShopOrder:
        return await self._order(
            "record_payment",
            {
                "p_order_id": req.order_id,
                "p_payment_method": req.method,
                "p_payment_reference": req.reference,
            },
        )

    @activity.defn
    async def fulfill_prepaid_order(self, req: Fulfilment) -> ShopOrder:
        return await self._order(
            "fulfill_prepaid_order",
            {"p_order_id": req.order_id, "p_submission_id": req.submission_id},
        )

    @activity.defn
    async def expire_order(self, order_id: str) -> ShopOrder:
        return await self._order("expire_order", {"p_order_id": order_id})

    @activity.defn
    async def release_reservation(self, order_id: str) -> int:
        result = await self._call("release_reservation", {"p_order_id": order_id})
        return int(result["released"])

    @activity.defn
    async def refund_to_balance(self, req: StatusChange) -> ShopOrder:
        """process_refund: the order's amount back to the buyer's balance, once per order."""
        return await self._order(
            "process_refund", {"p_order_id": req.order_id, "p_reason": req.reason}
        )

    @activity.defn
    async def credit_balance(self, req: BalanceCredit) -> int:
        result = await self._call(
            "add_to_user_balance",
            {
                "p_telegram_id": req.telegram_id,
                "p_amount": req.amount,
                "p_reason": req.reason,
                "p_idempotency_key": req.idempotency_key,
            },
        )
        return int(result["balance"])

    @activity.defn
    async def record_external_refund(self, req: ExternalRefund) -> ShopOrder:
        return await self._order(
            "record_external_refund",
            {
                "p_order_id": req.order_id,
                "p_method": req.method,
                "p_reference": req.reference,
                "p_amount": req.amount,
                "p_reason": req.reason,
            },
        )

    @activity.defn
    async def set_order_status(self, req: StatusChange) -> ShopOrder:
        return await self._order(
            "set_order_status",
            {"p_order_id": req.order_id, "p_status": req.status, "p_reason": req.reason},
        )
