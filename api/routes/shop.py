"""The Telegram shop over HTTP: the Mini App's routes, the suppliers' and the operators'."""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from temporalio.client import WorkflowUpdateFailedError, WorkflowUpdateRPCTimeoutOrCancelledError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from api import shop
from api.deps import AdminDep, SettingsDep, TemporalClientDep
from api.errors import ApiError
from api.orders import QUERY_TIMEOUT, unavailable
from workflows.purchase import FulfilRequest, PurchaseWorkflow, workflow_id

MAX_CONTENT_CHARS = 64_000
MAX_STOCK_ITEMS = 1000
# Ids are Postgres bigints: a larger number is a 422, never a database error.
BIGINT = 2**63 - 1
PathId = Annotated[int, Path(ge=1, le=BIGINT)]
Status = Annotated[
    str | None,
    Query(
        pattern="^(awaiting_payment|awaiting_supplier|delivered|expired|refunded|failed"
        "|needs_attention)$"
    ),
]


def get_db(request: Request) -> shop.ShopDatabase:
    return request.app.state.shop_db


DbDep = Annotated[shop.ShopDatabase, Depends(get_db)]


def get_user(
    settings: SettingsDep, authorization: Annotated[str | None, Header()] = None
) -> shop.TelegramUser:
    return shop.miniapp_user(settings, authorization)


UserDep = Annotated[shop.TelegramUser, Depends(get_user)]


# --- Mini App ---------------------------------------------------------------------------

miniapp = APIRouter(prefix="/api/shop", tags=["shop"])


@miniapp.get("/products")
async def products(_: UserDep, db: DbDep, settings: SettingsDep) -> dict[str, Any]:
    catalog = await db.call("shop_catalog", {"p_stars_per_unit": settings.stars_per_unit})
    return {"products": catalog or [], "currency": settings.shop_currency}


@miniapp.post("/orders", status_code=201)
async def create_order(
    body: shop.ShopOrderCreate,
    user: UserDep,
    db: DbDep,
    settings: SettingsDep,
    temporal: TemporalClientDep,
    request: Request,
    response: Response,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    """201 with a new order; 200 with the order an Idempotency-Key of this buyer already
    stands for (the same request again), 409 if that key was used for another request."""
    order = shop.new_purchase(settings, user, body, idempotency_key)
    if idempotency_key is not None:
        existing = await shop.read_view(temporal, order.order_id)
        if existing is not None:
            shop.same_request(existing, body)
            if existing.status != "placing":
                response.status_code = 200
                return shop.placed_json(shop.answer_of(existing))
            # Still being placed: the retry waits for the same placing below.
            view = await shop.place_order(temporal, settings, order)
            return shop.placed_json(shop.same_request(view, body))
    # Per Telegram user (the identity initData proves), before anything else is spent.
    await request.app.state.shop_order_rate.hit(f"tg:{user.id}")
    # Refusals that need no workflow are answered before one starts: a product that does
    # not exist or is off sale, or stock that is plainly short. The SQL function checks
    # all of it again, under locks, inside the workflow.
    catalog = await db.call("shop_catalog", {"p_stars_per_unit": settings.stars_per_unit})
    product = next((p for p in catalog or [] if p["id"] == body.product_id), None)
    if product is None:
        raise ApiError(422, "product_not_found", "product_id: no such product on sale")
    if product["available"] < body.quantity and not product["made_to_order"]:
        raise ApiError(
            409, "out_of_stock", f"only {product['available']} of this product are in stock"
        )
    if body.payment_method == "balance":
        # No unit sells below the product's final price (the view's next unit is the
        # cheapest), so a balance short of that many is short for certain.
        unit = product["price"] if product["available"] < body.quantity else product["final_price"]
        overview = await db.call("user_overview", {"p_telegram_id": user.id, "p_limit": 1})
        if overview["balance"] < unit * body.quantity:
            raise ApiError(
                402,
                "insufficient_balance",
                f"the order costs at least {unit * body.quantity}, the balance is "
                f"{overview['balance']}",
            )
    view = await shop.place_order(temporal, settings, order)
    return shop.placed_json(shop.same_request(view, body))


@miniapp.get("/orders/{order_id}")
async def get_order(
    order_id: str, user: UserDep, db: DbDep, temporal: TemporalClientDep
) -> dict[str, Any]:
    row = await _own_order(db, order_id, user)
    content = None
    if row["status"] == "delivered":
        goods = await db.call("get_order_content", {"p_order_id": order_id})
        content = (goods or {}).get("items")
    data = shop.order_json(row, content)
    data["payment"] = None
    if row["status"] == "awaiting_payment":
        view = await shop.read_view(temporal, order_id)
        if view is not None:
            data["payment"] = shop.placed_json(view)["payment"]
    return data


@miniapp.get("/me")
async def me(user: UserDep, db: DbDep, settings: SettingsDep) -> dict[str, Any]:
    overview = await db.call("user_overview", {"p_telegram_id": user.id, "p_limit": 50})
    return {
        "telegram_id": user.id,
        "balance": overview["balance"],
        "currency": settings.shop_currency,
        "orders": [shop.order_json(o) for o in overview["orders"]],
    }


async def _own_order(db: shop.ShopDatabase, order_id: str, user: shop.TelegramUser) -> dict:
    row = await db.call("get_order", {"p_order_id": shop.check_order_id(order_id)})
    # Someone else's order is answered exactly like one that does not exist.
    if not row or row["telegram_id"] != user.id:
        raise ApiError(404, "order_not_found", "no order with that id")
    return row


# --- suppliers --------------------------------------------------------------------------

suppliers = APIRouter(prefix="/api/suppliers", tags=["suppliers"])


async def get_supplier(
    db: DbDep, authorization: Annotated[str | None, Header()] = None
) -> dict[str, Any]:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "unauthorized", "a supplier bearer token is required")
    supplier = await db.call("supplier_for_token", {"p_token_hash": shop.token_hash(token)})
    if not supplier:
        raise ApiError(401, "unauthorized", "unknown supplier token")
    return supplier


SupplierDep = Annotated[dict[str, Any], Depends(get_supplier)]


@suppliers.get("/orders")
async def supplier_orders(supplier: SupplierDep, db: DbDep, status: Status = None) -> dict:
    rows = await db.call("supplier_orders", {"p_supplier_id": supplier["id"], "p_status": status})
    return {"orders": [shop.order_json(r) for r in rows or []]}


class FulfilBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    content: str = Field(min_length=1, max_length=MAX_CONTENT_CHARS)

    @field_validator("content")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("the goods must not be blank")
        return v


@suppliers.post("/orders/{order_id}/fulfil")
async def fulfil(
    order_id: str,
    body: FulfilBody,
    supplier: SupplierDep,
    db: DbDep,
    temporal: TemporalClientDep,
) -> dict[str, Any]:
    """Stores the goods (staged, so they never enter workflow history), then asks the order's
    workflow to take them: it alone decides whether the deadline has passed."""
    shop.check_order_id(order_id)
    staged = await db.call(
        "submit_fulfilment",
        {"p_order_id": order_id, "p_supplier_id": supplier["id"], "p_content": body.content},
    )
    handle = temporal.get_workflow_handle_for(PurchaseWorkflow.run, workflow_id(order_id))
    try:
        await handle.execute_update(
            PurchaseWorkflow.fulfil,
            FulfilRequest(int(staged["submission_id"])),
            rpc_timeout=QUERY_TIMEOUT * 4,
        )
    except WorkflowUpdateFailedError as err:
        cause = err.cause
        kind = cause.type if isinstance(cause, ApplicationError) else None
        detail = cause.message if isinstance(cause, ApplicationError) else str(err)
        status, code = {
            "DeadlinePassed": (409, "deadline_passed"),
            "AlreadyFulfilled": (409, "already_fulfilled"),
            "NotAwaitingSupplier": (409, "wrong_state"),
            # An earlier request's goods are being stored: retry to learn how that ended.
            "FulfilmentInProgress": (503, "fulfilment_in_progress"),
        }.get(kind or "", (503, "fulfilment_failed"))
        raise ApiError(status, code, detail) from err
    except WorkflowUpdateRPCTimeoutOrCancelledError as err:
        # No worker answered in time; the update may still be taken later, and a retry
        # learns which (409 already_fulfilled once it was).
        raise ApiError(
            503, "order_unavailable", "the order cannot take the goods right now; retry"
        ) from err
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            raise ApiError(409, "wrong_state", "the order has closed") from err
        raise unavailable(err) from err
    row = await db.call("get_order", {"p_order_id": order_id})
    return shop.order_json(row)


# --- operators --------------------------------------------------------------------------

admin = APIRouter(prefix="/api/admin", tags=["admin"])


class ProductBody(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    name: str = Field(min_length=1, max_length=200)
    description: str = Field(default="", max_length=4000)
    price: int = Field(ge=1, le=99_999_999, strict=True)
    made_to_order: bool = False
    fulfillment_time_hours: float = Field(default=48, gt=0, le=24 * 90)
    supplier_id: int | None = Field(default=None, ge=1, le=BIGINT, strict=True)


@admin.post("/products", status_code=201)
async def create_product(
    body: ProductBody, _: AdminDep, db: DbDep, settings: SettingsDep
) -> dict[str, Any]:
    return await db.call(
        "admin_create_product",
        {
            "p_name": body.name,
            "p_description": body.description,
            "p_price": body.price,
            "p_currency": settings.shop_currency,
            "p_made_to_order": body.made_to_order,
            "p_fulfillment_time_hours": body.fulfillment_time_hours,
            "p_supplier_id": body.supplier_id,
        },
    )


class StockBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[Annotated[str, Field(min_length=1, max_length=MAX_CONTENT_CHARS)]] = Field(
        min_length=1, max_length=MAX_STOCK_ITEMS
    )
    discount_percent: int = Field(default=0, ge=0, le=90)


@admin.post("/products/{product_id}/stock")
async def add_stock(product_id: PathId, body: StockBody, _: AdminDep, db: DbDep) -> dict[str, Any]:
    return await db.call(
        "admin_add_stock",
        {
            "p_product_id": product_id,
            "p_items": body.items,
            "p_discount_percent": body.discount_percent,
        },
    )


class SupplierBody(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    name: str = Field(min_length=1, max_length=200)
    # Chats of groups and channels are negative.
    telegram_chat_id: int = Field(ge=-BIGINT, le=BIGINT, strict=True)


@admin.post("/suppliers", status_code=201)
async def create_supplier(body: SupplierBody, _: AdminDep, db: DbDep) -> dict[str, Any]:
    token = secrets.token_urlsafe(32)
    created = await db.call(
        "admin_create_supplier",
        {
            "p_name": body.name,
            "p_telegram_chat_id": body.telegram_chat_id,
            "p_token_hash": shop.token_hash(token),
        },
    )
    # Only its hash is stored: this answer is the one time the token is shown.
    return {"id": created["id"], "token": token}


class BalanceBody(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    amount: int = Field(ge=-99_999_999, le=99_999_999, strict=True)
    reason: str = Field(min_length=1, max_length=500)
    idempotency_key: str = Field(min_length=1, max_length=200)

    @field_validator("amount")
    @classmethod
    def _nonzero(cls, v: int) -> int:
        if v == 0:
            raise ValueError("must not be 0")
        return v


@admin.post("/users/{telegram_id}/balance")
async def adjust_balance(
    telegram_id: PathId, body: BalanceBody, _: AdminDep, db: DbDep
) -> dict[str, Any]:
    result = await db.call(
        "add_to_user_balance",
        {
            "p_telegram_id": telegram_id,
            "p_amount": body.amount,
            "p_reason": body.reason,
            "p_idempotency_key": f"admin:{body.idempotency_key}",
        },
    )
    return {"balance": result["balance"], "applied": result["applied"]}


@admin.get("/shop-orders")
async def shop_orders(
    _: AdminDep,
    db: DbDep,
    status: Status = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> dict[str, Any]:
    rows = await db.call("admin_shop_orders", {"p_status": status, "p_limit": limit})
    return {"orders": rows or []}


@admin.get("/shop-orders/{order_id}")
async def shop_order(
    order_id: str, _: AdminDep, db: DbDep, temporal: TemporalClientDep
) -> dict[str, Any]:
    row = await db.call("get_order", {"p_order_id": shop.check_order_id(order_id)})
    if not row:
        raise ApiError(404, "order_not_found", "no order with that id")
    view = await shop.read_view(temporal, order_id)
    return {"order": row, "workflow": shop.view_json(view) if view else None}


routers = (miniapp, suppliers, admin)
