"""Telegram: invoices in Stars, messages, deliveries and Star refunds, through aiogram's Bot.

Telegram's typed errors decide what a retry means. A 429 (`TelegramRetryAfter`) is retried
after exactly the `retry_after` Telegram asked for: the activity fails with that as its
next retry delay, so the wait is a server-side timer, not a sleep holding a worker slot. A
403 (`TelegramForbiddenError`: the user blocked the bot) will fail the same way every time,
so it is never retried; a delivery that meets it is recorded as such, and the goods stay
readable in the Mini App. Other 4xx are bugs or bad data: non-retryable. Network errors and
5xx are retried by the caller's policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from aiogram import Bot
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.exceptions import (
    TelegramAPIError,
    TelegramBadRequest,
    TelegramForbiddenError,
    TelegramNetworkError,
    TelegramRetryAfter,
    TelegramServerError,
)
from aiogram.types import (
    BufferedInputFile,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    LabeledPrice,
    WebAppInfo,
)
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.shop_db import ShopDb

# Telegram's limit on one text message.
MAX_MESSAGE_CHARS = 4096
BOT_BLOCKED = "BotBlocked"
# A charge refunded before (by an earlier attempt whose answer was lost) is refunded.
_ALREADY_REFUNDED = "CHARGE_ALREADY_REFUNDED"


@dataclass
class Button:
    text: str
    url: str | None = None
    web_app_url: str | None = None
    callback_data: str | None = None


@dataclass
class MessageRequest:
    chat_id: int
    text: str
    buttons: list[Button] = field(default_factory=list)


@dataclass
class InvoiceRequest:
    order_id: str
    title: str
    description: str
    amount_stars: int


@dataclass
class StarRefundRequest:
    user_id: int
    charge_id: str


@dataclass
class DeliveryResult:
    outcome: str  # sent | blocked | nothing (no delivered goods for the order)


def make_bot(token: str, api_base: str, timeout: float = 15.0) -> Bot:
    """aiogram's Bot on a Bot API server: Telegram's, a local one, or the sandbox."""
    session = AiohttpSession(api=TelegramAPIServer.from_base(api_base), timeout=timeout)
    return Bot(token, session=session)


def keyboard(buttons: list[Button]) -> InlineKeyboardMarkup | None:
    """One button per row, as Telegram renders them best on a phone."""
    if not buttons:
        return None
    rows = []
    for b in buttons:
        if b.web_app_url:
            rows.append([InlineKeyboardButton(text=b.text, web_app=WebAppInfo(url=b.web_app_url))])
        elif b.url:
            rows.append([InlineKeyboardButton(text=b.text, url=b.url)])
        else:
            rows.append([InlineKeyboardButton(text=b.text, callback_data=b.callback_data or "-")])
    return InlineKeyboardMarkup(inline_keyboard=rows)


def as_activity_error(err: TelegramAPIError, what: str) -> Exception:
    """Telegram's answer as the failure Temporal should act on (see the module docstring)."""
    if isinstance(err, TelegramRetryAfter):
        return ApplicationError(
            f"Telegram rate-limited {what}: retry after {err.retry_after} s",
            type="TelegramRetryAfter",
            next_retry_delay=timedelta(seconds=max(1, err.retry_after)),
        )
    if isinstance(err, TelegramForbiddenError):
        return ApplicationError(
            f"Telegram refused {what}: {err.message}", type=BOT_BLOCKED, non_retryable=True
        )
    if isinstance(err, TelegramServerError | TelegramNetworkError):
        return err
    return ApplicationError(
        f"Telegram rejected {what}: {err.message}", type=type(err).__name__, non_retryable=True
    )


class TelegramActivities:
    def __init__(self, bot: Bot, db: ShopDb) -> None:
        self._bot = bot
        self._db = db

    @activity.defn
    async def create_invoice_link(self, req: InvoiceRequest) -> str:
        """An invoice in Stars whose payload is the order id (pre-checkout matches on it)."""
        try:
            return await self._bot.create_invoice_link(
                title=req.title[:32],
                description=req.description[:255] or req.title[:32],
                payload=req.order_id,
                currency="XTR",
                prices=[LabeledPrice(label=req.title[:32], amount=req.amount_stars)],
                provider_token="",
            )
        except TelegramAPIError as err:
            raise as_activity_error(err, "the invoice") from err

    @activity.defn
    async def send_message(self, req: MessageRequest) -> str:
        """Sends a message; 'blocked' when the user blocked the bot (not retried)."""
        try:
            await self._bot.send_message(
                req.chat_id, req.text[:MAX_MESSAGE_CHARS], reply_markup=keyboard(req.buttons)
            )
        except TelegramForbiddenError:
            activity.logger.info("chat %s blocked the bot; message dropped", req.chat_id)
            return "blocked"
        except TelegramAPIError as err:
            raise as_activity_error(err, "a message") from err
        return "sent"

    @activity.defn
    async def deliver_order(self, order_id: str) -> DeliveryResult:
        """Sends a delivered order's goods to its buyer, read here so they never enter history.

        A text that fits one message goes as one; longer goods go as a file.
        """
        goods: dict[str, Any] | None = await self._db.rpc(
            "get_order_content", {"p_order_id": order_id}
        )
        if not goods:
            return DeliveryResult("nothing")
        order = await self._db.rpc("get_order", {"p_order_id": order_id})
        if order and order.get("telegram_delivery") in ("sent", "blocked"):
            return DeliveryResult(order["telegram_delivery"])
        items = [str(item) for item in goods.get("items") or []]
        heading = f"Your order: {goods.get('product_name')} (order {order_id[:8]})"
        text = heading + "\n\n" + "\n\n".join(items)
        try:
            if len(text) <= MAX_MESSAGE_CHARS:
                await self._bot.send_message(goods["telegram_id"], text)
            else:
                await self._bot.send_document(
                    goods["telegram_id"],
                    BufferedInputFile(
                        ("\n\n".join(items) + "\n").encode(), filename=f"order-{order_id}.txt"
                    ),
                    caption=heading[:1024],
                )
            outcome = "sent"
        except TelegramForbiddenError:
            outcome = "blocked"
        except TelegramAPIError as err:
            raise as_activity_error(err, "the delivery") from err
        await self._db.rpc(
            "record_telegram_delivery", {"p_order_id": order_id, "p_outcome": outcome}
        )
        return DeliveryResult(outcome)

    @activity.defn
    async def refund_star_payment(self, req: StarRefundRequest) -> str:
        try:
            await self._bot.refund_star_payment(
                user_id=req.user_id, telegram_payment_charge_id=req.charge_id
            )
        except TelegramBadRequest as err:
            if _ALREADY_REFUNDED in err.message:
                return "already_refunded"
            raise as_activity_error(err, f"the refund of {req.charge_id}") from err
        except TelegramAPIError as err:
            raise as_activity_error(err, f"the refund of {req.charge_id}") from err
        return "refunded"
