"""The shop as the API sees it: its database, Mini App identities, purchases and their JSON.

The API reads the catalog, balances and orders through the same SQL functions (and the
same transport, asyncpg or Supabase) as the workflows' activities; it changes nothing there
but what a request of an admin or a supplier names. Purchases are started as workflows.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from aiogram.utils.web_app import safe_parse_webapp_init_data
from pydantic import BaseModel, ConfigDict, Field
from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
    WorkflowExecutionStatus,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import (
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from activities.shop_db import DB_OUTAGES, ShopDb, ShopError, open_shop_db
from api.errors import ApiError
from api.orders import QUERY_TIMEOUT, keyed_digest, order_attributes, unavailable
from workers.settings import Settings
from workflows.purchase import (
    ORDER_KIND,
    Payment,
    PurchaseInput,
    PurchaseTerms,
    PurchaseView,
    PurchaseWorkflow,
    workflow_id,
)

log = logging.getLogger(__name__)

SHOP_ORDER_ID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# How long POST /api/shop/orders waits for the order to be placed (stock, payment link).
PLACE_WAIT_SECONDS = 20.0
# A clock a little ahead of Telegram's still signs fresh initData.
INITDATA_FUTURE_SKEW_SECONDS = 60

# A refusal by a SQL function, as HTTP: (status, error code).
REFUSALS: dict[str, int] = {
    "product_not_found": 422,
    "invalid_quantity": 422,
    "invalid_amount": 422,
    "invalid_payment_method": 422,
    "product_unavailable": 409,
    "out_of_stock": 409,
    "insufficient_balance": 402,
    "too_many_unpaid_orders": 429,
    "order_not_found": 404,
    "supplier_not_found": 422,
    "wrong_state": 409,
    "reservation_lost": 409,
    "deadline_passed": 409,
    "already_fulfilled": 409,
    "idempotency_conflict": 409,
    "not_paid": 409,
    "payment_unavailable": 503,
    # The database did not answer the workflow in time: nothing was placed; retry.
    "order_failed": 503,
}


def refusal(code: str, detail: str) -> ApiError:
    return ApiError(REFUSALS.get(code, 409), code, detail)


class ShopDatabase:
    """The shop's SQL functions for the API, opened on first use so that the API starts (and
    answers 503 for the shop) while the database is down."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._stack = contextlib.AsyncExitStack()
        self._db: ShopDb | None = None
        self._lock = asyncio.Lock()

    async def _open(self) -> ShopDb:
        async with self._lock:
            if self._db is None:
                try:
                    self._db = await self._stack.enter_async_context(open_shop_db(self._settings))
                except (*DB_OUTAGES, ValueError, RuntimeError) as err:
                    log.warning("shop database unreachable: %s", err)
                    raise ApiError(
                        503, "database_unavailable", "the shop is unavailable; retry shortly"
                    ) from err
            return self._db

    async def call(self, function: str, params: dict[str, Any]) -> Any:
        """The function's JSON result; a refusal as its HTTP error, an outage as a 503."""
        db = await self._open()
        try:
            return await db.rpc(function, params)
        except ShopError as err:
            raise refusal(err.code, err.detail) from err
        except DB_OUTAGES as err:
            log.warning("shop database call %s failed: %s", function, err)
            raise ApiError(
                503, "database_unavailable", "the shop is unavailable; retry shortly"
            ) from err

    async def close(self) -> None:
        await self._stack.aclose()


# --- Mini App identity ----------------------------------------------------------------


@dataclass(frozen=True)
class TelegramUser:
    id: int
    first_name: str | None
    username: str | None


def require_shop(settings: Settings) -> None:
    if not settings.shop_enabled:
        raise ApiError(
            503,
            "shop_disabled",
            "the Telegram shop needs TELEGRAM_BOT_TOKEN when a provider's key is set",
        )


def miniapp_user(settings: Settings, authorization: str | None) -> TelegramUser:
    """The Telegram user that signed `Authorization: tma <initData>`, checked with aiogram's
    helper against the bot token; the identity never comes from anywhere else."""
    require_shop(settings)
    scheme, _, init_data = (authorization or "").partition(" ")
    if scheme.lower() != "tma" or not init_data.strip():
        raise ApiError(401, "unauthorized", "Authorization: tma <initData> is required")
    try:
        data = safe_parse_webapp_init_data(settings.telegram_token, init_data.strip())
    except (ValueError, TypeError) as err:
        # TypeError: hmac.compare_digest refuses a hash that is not ASCII.
        raise ApiError(401, "unauthorized", "initData is not signed by this bot") from err
    age = time.time() - data.auth_date.timestamp()
    if age > settings.miniapp_initdata_max_age or age < -INITDATA_FUTURE_SKEW_SECONDS:
        raise ApiError(401, "unauthorized", "initData is too old; reopen the Mini App")
    if data.user is None:
        raise ApiError(401, "unauthorized", "initData names no user")
    return TelegramUser(data.user.id, data.user.first_name, data.user.username)


# --- shapes ---------------------------------------------------------------------------

ORDER_FIELDS = (
    "order_id",
    "order_type",
    "status",
    "product_id",
    "quantity",
    "amount",
    "currency",
    "amount_stars",
    "payment_method",
    "reserved_until",
    "fulfillment_deadline",
)


def order_json(row: dict[str, Any], content: list[str] | None = None) -> dict[str, Any]:
    """An order as the Mini App and suppliers read it (content only once delivered)."""
    data = {name: row.get(name) for name in ORDER_FIELDS}
    data["product_name"] = row.get("product_name")
    data["content"] = content
    return data


class ShopOrderCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # strict: `true` or "2" is not a number of anything.
    product_id: int = Field(ge=1, le=2**62, strict=True)
    quantity: int = Field(default=1, ge=1, strict=True)
    payment_method: Literal["stars", "stripe", "balance"]


def check_order_id(order_id: str) -> str:
    if not SHOP_ORDER_ID_RE.match(order_id):
        raise ApiError(404, "order_not_found", "no order with that id")
    return order_id


def token_hash(token: str) -> str:
    # Supplier tokens are 256 random bits: a plain hash is enough to keep a database leak
    # from handing them out, and lets a request find its supplier with one lookup.
    return hashlib.sha256(token.encode()).hexdigest()


# --- purchases ------------------------------------------------------------------------


def app_url(settings: Settings) -> str:
    return f"{settings.public_url.rstrip('/')}/app"


def new_purchase(
    settings: Settings, user: TelegramUser, body: ShopOrderCreate, key: str | None = None
) -> PurchaseInput:
    if body.quantity > settings.max_units_per_order:
        raise ApiError(
            422,
            "invalid_request",
            f"quantity: at most {settings.max_units_per_order} per order",
        )
    return purchase_terms(settings).order(
        order_id=shop_order_id(settings, user, key),
        telegram_id=user.id,
        product_id=body.product_id,
        quantity=body.quantity,
        payment_method=body.payment_method,
    )


def shop_order_id(settings: Settings, user: TelegramUser, key: str | None) -> str:
    """A new order's id: random (122 bits), or the one the buyer's Idempotency-Key stands
    for, so that a retried request (a timeout, a double tap) is the same order. Keys are
    the buyer's own: another user's same key is another order. The id is never a
    credential alone (orders are read by their owner's initData)."""
    if key is None:
        return str(uuid.uuid4())
    digest = keyed_digest(settings, key, scope=f"shop:{user.id}:")
    return str(uuid.UUID(bytes=digest[:16], version=4))


def purchase_terms(settings: Settings) -> PurchaseTerms:
    """What a purchase keeps of the settings for its whole life."""
    return PurchaseTerms(
        reservation_ttl_seconds=settings.reservation_ttl_seconds,
        stars_per_unit=settings.stars_per_unit,
        max_unpaid_orders=settings.max_unpaid_orders_per_user,
        max_units=settings.max_units_per_order,
        refund_to_balance=settings.refund_to_balance,
        late_payment_seconds=settings.shop_late_payment_seconds,
        refund_retry_seconds=settings.refund_retry_seconds,
        app_url=app_url(settings),
    )


async def place_order(client: Client, settings: Settings, order: PurchaseInput) -> PurchaseView:
    """Starts the purchase and waits for it to be placed: stock held, payment link made."""
    start = WithStartWorkflowOperation(
        PurchaseWorkflow.run,
        order,
        id=workflow_id(order.order_id),
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
        task_queue=settings.task_queue,
        search_attributes=order_attributes("placing", ORDER_KIND),
    )
    try:
        return await asyncio.wait_for(
            client.execute_update_with_start_workflow(
                PurchaseWorkflow.place, start_workflow_operation=start
            ),
            PLACE_WAIT_SECONDS,
        )
    except WorkflowUpdateFailedError as err:
        cause = err.cause
        if isinstance(cause, ApplicationError):
            raise refusal(cause.type or "order_failed", cause.message) from err
        raise ApiError(502, "order_failed", "the order could not be placed") from err
    except WorkflowAlreadyStartedError:
        # A keyed order that has closed already (its id is never started again): the
        # retry is answered with what became of it.
        view = await read_view(client, order.order_id)
        if view is None:
            raise ApiError(503, "order_unavailable", "the shop is slow to answer; retry") from None
        return answer_of(view)
    except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError) as err:
        # The order may still be placed (and, unpaid, expire by itself): a retry with the
        # same Idempotency-Key finds it.
        raise ApiError(
            503,
            "order_unavailable",
            "the shop is slow to answer; retry with the same Idempotency-Key",
        ) from err
    except RPCError as err:
        raise unavailable(err) from err


def answer_of(view: PurchaseView) -> PurchaseView:
    """An existing order's view as the answer to its placing: its refusal, if it was one."""
    if view.status == "failed" and view.error_code and view.payment_reference is None:
        raise refusal(view.error_code, view.error or "the order could not be placed")
    return view


def same_request(view: PurchaseView, body: ShopOrderCreate) -> PurchaseView:
    """An order an Idempotency-Key already stands for answers only the request it was."""
    if (view.product_id, view.quantity, view.payment_method) != (
        body.product_id,
        body.quantity,
        body.payment_method,
    ):
        raise ApiError(
            409,
            "idempotency_conflict",
            "this Idempotency-Key was already used for a different order; use a new key",
        )
    return view


def placed_json(view: PurchaseView) -> dict[str, Any]:
    data = {
        "order_id": view.order_id,
        "order_type": view.order_type,
        "status": view.status,
        "product_id": view.product_id,
        "product_name": view.product_name,
        "quantity": view.quantity,
        "amount": view.amount,
        "currency": view.currency,
        "amount_stars": view.amount_stars,
        "payment_method": view.payment_method,
        "payment": _payment_json(view),
        "reserved_until": view.reserved_until,
        "fulfillment_deadline": view.fulfillment_deadline,
    }
    return data


def _payment_json(view: PurchaseView) -> dict[str, str] | None:
    if view.status != "awaiting_payment":
        return None
    if view.invoice_link:
        return {"invoice_link": view.invoice_link}
    if view.checkout_url:
        return {"checkout_url": view.checkout_url}
    return None


async def read_view(client: Client, order_id: str) -> PurchaseView | None:
    """The purchase workflow's view (None if there is no such workflow)."""
    handle = client.get_workflow_handle_for(PurchaseWorkflow.run, workflow_id(order_id))
    try:
        desc = await handle.describe()
        if desc.status == WorkflowExecutionStatus.COMPLETED:
            return await handle.result(rpc_timeout=QUERY_TIMEOUT)
        return await handle.query(PurchaseWorkflow.view, rpc_timeout=QUERY_TIMEOUT)
    except RPCError as err:
        if err.status in (RPCStatusCode.NOT_FOUND, RPCStatusCode.INVALID_ARGUMENT):
            return None
        raise unavailable(err) from err


async def payment_for_closed_order(
    client: Client, settings: Settings, order_id: str, payment: Payment, telegram_id: int
) -> None:
    """A payment whose purchase workflow has closed: unless it is the payment the order
    took (a redelivery), a refund-only run of the order (same workflow id) gives it back.

    Signal-with-start, so payments that race each other all reach the one run.
    """
    view = await read_view(client, order_id)
    if view is not None and (
        view.payment_reference == payment.reference
        or any(r.reference == payment.reference for r in view.refunds)
    ):
        return
    order = purchase_terms(settings).order(
        order_id=order_id,
        telegram_id=telegram_id,
        product_id=view.product_id if view else 0,
        quantity=view.quantity if view else 1,
        payment_method=payment.method,
        late_payment_seconds=0,
        success_url="",
        cancel_url="",
        refund_only=True,
        previous_view=view,
    )
    try:
        await client.start_workflow(
            PurchaseWorkflow.run,
            order,
            id=workflow_id(order_id),
            task_queue=settings.task_queue,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            start_signal="refund_payment",
            start_signal_args=[payment],
            search_attributes=order_attributes("refunding", ORDER_KIND),
        )
    except RPCError as err:
        raise unavailable(err) from err


def view_json(view: PurchaseView) -> dict[str, Any]:
    """The workflow's view for operators (problems and refunds included)."""
    return dataclasses.asdict(view)
