"""Telegram's webhook: check the secret, act once per update, answer at once.

Payments go to their purchase workflow (which dedupes charges itself); a pre-checkout query
is answered from the workflow's state, well inside Telegram's 10 s; commands are answered
from the shop's database, each update once (its id is claimed in Postgres first).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from typing import Annotated, Any

from aiogram import Bot
from aiogram.exceptions import TelegramAPIError, TelegramRetryAfter
from aiogram.types import CallbackQuery, Message, PreCheckoutQuery, Update
from fastapi import APIRouter, Header, Request
from pydantic import ValidationError
from temporalio.client import (
    Client,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from activities.telegram import Button, keyboard
from api import chat, shop
from api.deps import SettingsDep
from api.errors import ApiError
from api.orders import QUERY_TIMEOUT, unavailable
from api.routes.webhooks import RecentIds
from workers.settings import Settings
from workflows.chat import ChatMessage, language
from workflows.purchase import (
    STARS,
    Payment,
    PaymentChoice,
    PreCheckout,
    PurchaseView,
    PurchaseWorkflow,
    StarsPayment,
    format_money,
    workflow_id,
)

log = logging.getLogger(__name__)
router = APIRouter(prefix="/webhooks", tags=["webhooks"])

# The updates the shop's bot asks Telegram for (setWebhook's allowed_updates).
ALLOWED_UPDATES = ["message", "callback_query", "pre_checkout_query"]
# Commands the webhook answers itself; other text goes to the assistant (when it is on).
COMMANDS = frozenset({"/start", "/orders", "/balance", "/help"})
REPLY_ATTEMPTS = 4
# Of Telegram's 10 s for answering a pre-checkout query: what asking the order may take.
PRECHECKOUT_BUDGET_SECONDS = 6.0
BUSY = "The shop cannot take payments right now; try again in a minute."
REPLY_MAX_WAIT_SECONDS = 30
HELP = (
    "This shop sells digital goods. /start opens the catalog, /orders lists your orders, "
    "/balance shows your balance."
)


def check_secret(settings: Settings, given: str | None) -> None:
    expected = settings.telegram_secret.encode()
    if given is None or not secrets.compare_digest(given.encode(), expected):
        raise ApiError(401, "unauthorized", "X-Telegram-Bot-Api-Secret-Token is wrong")


@router.post("/telegram")
async def telegram_webhook(
    request: Request,
    settings: SettingsDep,
    x_telegram_bot_api_secret_token: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    shop.require_shop(settings)
    check_secret(settings, x_telegram_bot_api_secret_token)
    try:
        update = Update.model_validate(json.loads(await request.body()))
    except (json.JSONDecodeError, UnicodeDecodeError, ValidationError) as err:
        raise ApiError(400, "invalid_payload", "body is not a Telegram update") from err
    seen: RecentIds = request.app.state.telegram_updates
    if str(update.update_id) in seen:
        return {"ok": True, "duplicate": True}
    state = request.app.state
    if update.pre_checkout_query is not None:
        await _pre_checkout(state, update.pre_checkout_query)
    elif update.message is not None and update.message.successful_payment is not None:
        await _stars_paid(state, update.message)
    elif update.message is not None and update.message.text is not None:
        await _text(state, update.update_id, update.message)
    elif update.callback_query is not None:
        _pay_soon(state, update.callback_query)
    seen.add(str(update.update_id))
    return {"ok": True}


async def _temporal(state: Any) -> Client:
    return state.temporal or await state.connect_temporal()


async def _pre_checkout(state: Any, query: PreCheckoutQuery) -> None:
    """ok only while the order waits for exactly this payment (its update's validator).

    Telegram drops a query unanswered after 10 s, so asking the workflow (connecting to
    Temporal included) gets PRECHECKOUT_BUDGET_SECONDS; a workflow that cannot answer by
    then (no worker, Temporal slow) is a refusal the customer can retry, never silence.
    """
    bot: Bot = state.bot
    try:
        error = await asyncio.wait_for(_ask_order(state, query), PRECHECKOUT_BUDGET_SECONDS)
    except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError):
        error = BUSY
    if error is None:
        await _quietly(bot.answer_pre_checkout_query(query.id, ok=True))
    else:
        await _quietly(bot.answer_pre_checkout_query(query.id, ok=False, error_message=error))


async def _ask_order(state: Any, query: PreCheckoutQuery) -> str | None:
    """None if the order approves this checkout, else the words for the customer."""
    order_id = query.invoice_payload
    try:
        shop.check_order_id(order_id)
        handle = (await _temporal(state)).get_workflow_handle_for(
            PurchaseWorkflow.run, workflow_id(order_id)
        )
        await handle.execute_update(
            PurchaseWorkflow.approve_stars_checkout,
            PreCheckout(query.total_amount, query.currency, query.from_user.id),
            rpc_timeout=QUERY_TIMEOUT,
        )
    except WorkflowUpdateFailedError as err:
        cause = err.cause
        return cause.message if isinstance(cause, ApplicationError) else "Order unavailable."
    except RPCError as err:
        return "This order has expired." if err.status == RPCStatusCode.NOT_FOUND else BUSY
    except ApiError as err:
        return "This order does not exist." if err.status == 404 else BUSY
    return None


async def _stars_paid(state: Any, message: Message) -> None:
    paid = message.successful_payment
    assert paid is not None
    payer = message.from_user.id if message.from_user else message.chat.id
    order_id = paid.invoice_payload
    payment = StarsPayment(paid.telegram_payment_charge_id, paid.total_amount, paid.currency, payer)
    temporal = await _temporal(state)
    try:
        shop.check_order_id(order_id)
        handle = temporal.get_workflow_handle_for(PurchaseWorkflow.run, workflow_id(order_id))
        await handle.signal(PurchaseWorkflow.stars_paid, payment)
        return
    except ApiError:
        log.warning("stars payment %s names no order: %r", payment.charge_id, order_id)
    except RPCError as err:
        if err.status != RPCStatusCode.NOT_FOUND:
            raise unavailable(err) from err  # a 5xx: Telegram delivers the update again
    # Money for an order whose workflow has closed (or that never was) must go back.
    await shop.payment_for_closed_order(
        temporal,
        state.settings,
        order_id,
        Payment("stars", payment.charge_id, payment.amount, STARS, payer),
        payer,
    )


async def _text(state: Any, update_id: int, message: Message) -> None:
    settings: Settings = state.settings
    chat_id = message.chat.id
    user_id = message.from_user.id if message.from_user else chat_id
    command = (message.text or "").split(maxsplit=1)[0].split("@")[0].lower()
    if command not in COMMANDS and settings.assistant_enabled and message.chat.type == "private":
        # The assistant's chat workflow answers (and drops an update id it has seen).
        await chat.send_message(
            await _temporal(state),
            settings,
            chat_id,
            ChatMessage(
                update_id=update_id,
                text=message.text or "",
                user_id=user_id,
                first_name=message.from_user.first_name if message.from_user else "",
            ),
        )
        return
    db: shop.ShopDatabase = state.shop_db
    claimed = await db.call("claim_telegram_update", {"p_update_id": update_id})
    if not claimed.get("claimed"):
        return  # answered when this update came the first time
    buttons: list[Button] = []
    if command == "/start":
        text = "Welcome! Browse the catalog and buy in the shop."
        buttons = [Button("Open the shop", web_app_url=shop.app_url(settings))]
    elif command == "/orders":
        overview = await db.call("user_overview", {"p_telegram_id": user_id, "p_limit": 10})
        orders = overview["orders"]
        text = (
            "Your orders:\n"
            + "\n".join(
                f"• {o['product_name']} x {o['quantity']}: {o['status']} "
                f"({format_money(o['amount'], o['currency'])})"
                for o in orders
            )
            if orders
            else "You have no orders yet."
        )
        buttons = [Button("Open the shop", web_app_url=shop.app_url(settings))]
    elif command == "/balance":
        overview = await db.call("user_overview", {"p_telegram_id": user_id, "p_limit": 1})
        text = f"Your balance: {format_money(overview['balance'], settings.shop_currency)}"
    elif command == "/help":
        text = HELP
    else:
        text = "I can help you buy digital goods. " + HELP
        buttons = [Button("Open the shop", web_app_url=shop.app_url(settings))]
    _reply_soon(state, chat_id, text, buttons)


PAY_WORDS = {
    "en": {
        "stars": "Pay {stars} ⭐",
        "stripe": "Pay by card",
        "balance_paid": "Paid from your balance. Your goods are on their way.",
        "link": "Tap to pay for {name} x {quantity}:",
        "expired": "This offer has ended. Ask me again for a new one.",
        "busy": "The shop is busy; tap again in a moment.",
    },
    "ru": {
        "stars": "Оплатить {stars} ⭐",
        "stripe": "Оплатить картой",
        "balance_paid": "Оплачено с баланса. Товар уже в пути.",
        "link": "Нажмите, чтобы оплатить {name} x {quantity}:",
        "expired": "Это предложение закончилось. Спросите меня снова.",
        "busy": "Магазин занят; нажмите ещё раз чуть позже.",
    },
}


def _pay_soon(state: Any, query: CallbackQuery) -> None:
    """A tap on an offer's payment button: the purchase makes the payment (or takes it
    from the balance), after the webhook has been answered."""
    task = asyncio.create_task(_pay(state, query))
    state.reply_tasks.add(task)
    task.add_done_callback(state.reply_tasks.discard)


async def _pay(state: Any, query: CallbackQuery) -> None:
    bot: Bot = state.bot
    kind, _, rest = (query.data or "").partition(":")
    order_id, _, method = rest.partition(":")
    lang = _lang_of(query)
    words = PAY_WORDS[lang]
    if kind != "pay":
        await _quietly(bot.answer_callback_query(query.id))
        return
    try:
        shop.check_order_id(order_id)
        handle = (await _temporal(state)).get_workflow_handle_for(
            PurchaseWorkflow.run, workflow_id(order_id)
        )
        view: PurchaseView = await handle.execute_update(
            PurchaseWorkflow.choose_payment,
            PaymentChoice(method, query.from_user.id),
            rpc_timeout=QUERY_TIMEOUT,
        )
    except WorkflowUpdateFailedError as err:
        cause = err.cause
        text = cause.message if isinstance(cause, ApplicationError) else words["expired"]
        await _quietly(bot.answer_callback_query(query.id, text=text[:200], show_alert=True))
        return
    except ApiError as err:
        text = words["expired"] if err.status == 404 else words["busy"]
        await _quietly(bot.answer_callback_query(query.id, text=text))
        return
    except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError):
        await _quietly(bot.answer_callback_query(query.id, text=words["busy"], show_alert=True))
        return
    except RPCError as err:
        text = words["expired"] if err.status == RPCStatusCode.NOT_FOUND else words["busy"]
        await _quietly(bot.answer_callback_query(query.id, text=text, show_alert=True))
        return
    await _quietly(bot.answer_callback_query(query.id))
    chat_id = query.message.chat.id if query.message else query.from_user.id
    if view.payment_method == "balance":
        await _send_quietly(state, chat_id, words["balance_paid"], [])
    elif view.invoice_link or view.checkout_url:
        label = (
            words["stars"].format(stars=view.amount_stars) if view.invoice_link else words["stripe"]
        )
        await _send_quietly(
            state,
            chat_id,
            words["link"].format(name=view.product_name, quantity=view.quantity),
            [Button(label, url=view.invoice_link or view.checkout_url)],
        )


def _lang_of(query: CallbackQuery) -> str:
    """The offer's language: that of the message the button is under."""
    message = query.message
    text = getattr(message, "text", None) or ""
    return language(text)


async def _send_quietly(state: Any, chat_id: int, text: str, buttons: list[Button]) -> None:
    for _ in range(REPLY_ATTEMPTS):
        try:
            await state.bot.send_message(chat_id, text, reply_markup=keyboard(buttons))
            return
        except TelegramRetryAfter as err:
            await asyncio.sleep(min(err.retry_after, REPLY_MAX_WAIT_SECONDS))
        except TelegramAPIError as err:
            log.warning("message to chat %s failed: %s", chat_id, err)
            return
    log.warning("message to chat %s dropped: still rate-limited", chat_id)


def _reply_soon(state: Any, chat_id: int, text: str, buttons: list[Button]) -> None:
    """Sends the answer after the webhook has been answered, waiting out Telegram's 429s.

    Telegram allows about one message a second per chat, so a customer who sends commands
    quickly meets its flood control; the answer then waits the `retry_after` it asked for
    instead of being dropped. A few tries only: it is an answer to a command, and the
    customer can ask again.
    """

    task = asyncio.create_task(_send_quietly(state, chat_id, text, buttons))
    state.reply_tasks.add(task)
    task.add_done_callback(state.reply_tasks.discard)


async def _quietly(call: Any) -> None:
    """A reply that fails (Telegram down, the user blocked the bot) changes nothing else."""
    try:
        await call
    except TelegramAPIError as err:
        log.warning("telegram call failed: %s", err)
