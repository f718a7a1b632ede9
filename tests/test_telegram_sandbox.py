"""The sandbox's Telegram Bot API over real HTTP, driven by aiogram's Bot as production drives it,
with a small webhook receiver standing in for our API's /webhooks/telegram."""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiogram import Bot
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.exceptions import (
    TelegramBadRequest,
    TelegramForbiddenError,
    TelegramRetryAfter,
    TelegramUnauthorizedError,
)
from aiogram.types import (
    BufferedInputFile,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    LabeledPrice,
    Update,
    WebAppInfo,
)
from aiogram.utils.web_app import safe_parse_webapp_init_data
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from sandbox.app import SandboxConfig, create_app
from tests.conftest import ServiceThread, free_port, uvicorn_service, wait_http
from workers.settings import SANDBOX_TELEGRAM_TOKEN

SECRET = "test-webhook-secret_123"
CHAT_INTERVAL = 0.5
CHECKOUT_TIMEOUT = 1.5
_user_ids = itertools.count(int(time.time()) % 100_000 * 1000 + 1)


def new_user() -> int:
    return next(_user_ids)


def chat_of(update: dict[str, Any]) -> int:
    for key in ("message", "callback_query", "pre_checkout_query"):
        if key in update:
            obj = update[key]
            return obj["chat"]["id"] if key == "message" else obj["from"]["id"]
    raise AssertionError(f"unexpected update {update}")


@dataclass
class Receiver:
    """Our API's webhook route, reduced to recording: answers 500 to a chat's next `fail[chat]`
    deliveries, and can answer a chat's pre-checkout queries in the webhook reply."""

    url: str = ""
    accepted: list[tuple[dict[str, Any], str | None]] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)
    fail: dict[int, int] = field(default_factory=dict)
    reply_ok: set[int] = field(default_factory=set)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/webhooks/telegram", response_model=None)
        async def hook(request: Request) -> Response:
            update = await request.json()
            chat = chat_of(update)
            if self.fail.get(chat, 0) > 0:
                self.fail[chat] -= 1
                self.refused.append(update["update_id"])
                return Response(status_code=500)
            self.accepted.append((update, request.headers.get("x-telegram-bot-api-secret-token")))
            query = update.get("pre_checkout_query")
            if query and chat in self.reply_ok:
                # Telegram runs a method named in the webhook's answer (aiogram's webhook reply).
                return JSONResponse(
                    {
                        "method": "answerPreCheckoutQuery",
                        "pre_checkout_query_id": query["id"],
                        "ok": True,
                    }
                )
            return JSONResponse({"ok": True})

        return app

    def updates(self, chat: int, kind: str | None = None) -> list[Update]:
        found = [Update.model_validate(u) for u, _ in self.accepted if chat_of(u) == chat]
        return [u for u in found if kind is None or getattr(u, kind) is not None]

    async def wait(self, chat: int, kind: str | None = None, count: int = 1) -> list[Update]:
        deadline = time.monotonic() + 10
        while len(found := self.updates(chat, kind)) < count:
            assert time.monotonic() < deadline, f"{count} {kind} update(s) for {chat} not received"
            await asyncio.sleep(0.05)
        return found


@contextmanager
def running_sandbox(data_dir: Path) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = SandboxConfig(
        data_dir=data_dir,
        public_url=url,
        webhook_url=None,
        webhook_secret="whsec_unused",
        stripe_api_key="sk_test_unused",
        superduperai_token="unused",
        video_seconds=1.0,
        telegram_chat_interval_seconds=CHAT_INTERVAL,
        telegram_webhook_retry_seconds=0.2,
        telegram_precheckout_timeout_seconds=CHECKOUT_TIMEOUT,
    )
    service = ServiceThread("telegram-sandbox", uvicorn_service(create_app(config), port)).start()
    try:
        yield url
    finally:
        service.stop()
        assert service.error is None, service.error


@asynccontextmanager
async def make_bot(sandbox_url: str, token: str = SANDBOX_TELEGRAM_TOKEN) -> AsyncIterator[Bot]:
    """Configured as production configures it (activities/telegram.py make_bot)."""
    api = TelegramAPIServer.from_base(f"{sandbox_url}/telegram")
    bot = Bot(token, session=AiohttpSession(api=api))
    try:
        yield bot
    finally:
        await bot.session.close()


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    port = free_port()
    receiver.url = f"http://127.0.0.1:{port}/webhooks/telegram"
    service = ServiceThread("telegram-receiver", uvicorn_service(receiver.app(), port)).start()
    await wait_http(f"http://127.0.0.1:{port}/")
    yield receiver
    service.stop()


@pytest.fixture(scope="module")
async def sandbox_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    with running_sandbox(tmp_path_factory.mktemp("telegram")) as url:
        await wait_http(f"{url}/healthz")
        yield url


@pytest.fixture(scope="module")
async def bot(sandbox_url: str, receiver: Receiver) -> AsyncIterator[Bot]:
    async with make_bot(sandbox_url) as bot:
        assert await bot.set_webhook(receiver.url, secret_token=SECRET)
        yield bot


@pytest.fixture(scope="module")
async def control(sandbox_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"{sandbox_url}/telegram/_sandbox", timeout=30) as http:
        yield http


async def ok(response: Any) -> Any:
    resp = await response
    assert resp.status_code == 200, resp.text
    return resp.json()


# -- The Bot API's basics -------------------------------------------------------------------------


async def test_get_me_and_telegram_errors(bot: Bot, sandbox_url: str) -> None:
    me = await bot.get_me()
    assert (me.id, me.username, me.is_bot) == (1000000001, "orderflow_sandbox_bot", True)

    async with make_bot(sandbox_url, "1000000001:AAwrong-token-for-this-sandbox-bot") as stranger:
        with pytest.raises(TelegramUnauthorizedError):
            await stranger.get_me()

    async with httpx.AsyncClient() as http:
        resp = await http.post(f"{sandbox_url}/telegram/bot{SANDBOX_TELEGRAM_TOKEN}/sendPigeon")
    assert resp.status_code == 404
    assert resp.json() == {
        "ok": False,
        "error_code": 404,
        "description": "Not Found: method not found",
    }

    # Markup Telegram cannot parse is refused as Telegram refuses it.
    with pytest.raises(TelegramBadRequest, match="can't parse entities"):
        await bot.send_message(new_user(), "Buy <Logo pack> now", parse_mode="HTML")


async def test_messages_documents_and_actions_round_trip(
    bot: Bot, control: httpx.AsyncClient
) -> None:
    user = new_user()
    markup = InlineKeyboardMarkup(
        inline_keyboard=[
            [
                InlineKeyboardButton(
                    text="Open the shop", web_app=WebAppInfo(url="https://shop.test/app")
                )
            ],
            [InlineKeyboardButton(text="Docs", url="https://shop.test/docs")],
            [InlineKeyboardButton(text="More", callback_data="more:1")],
        ]
    )
    sent = await bot.send_message(
        user, "<b>Welcome</b> to the shop", parse_mode="HTML", reply_markup=markup
    )
    assert sent.text == "Welcome to the shop" and sent.chat.id == user
    assert sent.entities and sent.entities[0].type == "bold"
    assert sent.reply_markup is not None
    assert sent.reply_markup.model_dump(exclude_none=True) == markup.model_dump(exclude_none=True)

    assert await bot.send_chat_action(user, "upload_document")
    doc = await bot.send_document(
        user,
        BufferedInputFile(b"KEY-1\nKEY-2\n", filename="order-42.txt"),
        caption="Your order 42",
    )
    assert doc.document is not None and doc.document.file_name == "order-42.txt"
    assert (await bot.download(doc.document.file_id)).read() == b"KEY-1\nKEY-2\n"

    listing = await ok(control.get(f"/chats/{user}/messages"))
    assert [m["message_id"] for m in listing] == [sent.message_id, doc.message_id]
    assert listing[0]["text"] == "Welcome to the shop"
    rows = listing[0]["reply_markup"]["inline_keyboard"]
    assert [row[0]["text"] for row in rows] == ["Open the shop", "Docs", "More"]
    assert listing[1]["document"]["content"] == "KEY-1\nKEY-2\n"
    assert listing[1]["document"]["file_name"] == "order-42.txt"
    assert listing[1]["text"] == "Your order 42"
    actions = await ok(control.get(f"/chats/{user}/actions"))
    assert [a["action"] for a in actions] == ["upload_document"]


async def test_flooding_a_chat_gets_429_with_retry_after(
    bot: Bot, control: httpx.AsyncClient
) -> None:
    user = new_user()
    sent = 0
    with pytest.raises(TelegramRetryAfter) as flood:
        for _ in range(10):
            await bot.send_message(user, f"message {sent}")
            sent += 1
    assert 1 <= sent <= 3  # a short burst passes, as at Telegram
    assert flood.value.retry_after >= 1
    await asyncio.sleep(flood.value.retry_after)
    await bot.send_message(user, "after waiting as told")

    # A "429 storm": the next sends are refused whatever the natural limit says.
    storm = new_user()
    await ok(
        control.post(
            "/faults", json={"chat_id": storm, "mode": "rate_limit", "times": 2, "retry_after": 7}
        )
    )
    for _ in range(2):
        with pytest.raises(TelegramRetryAfter) as err:
            await bot.send_message(storm, "hello")
        assert err.value.retry_after == 7
    await bot.send_message(storm, "the storm passed")
    assert [m["text"] for m in await ok(control.get(f"/chats/{storm}/messages"))] == [
        "the storm passed"
    ]


async def test_a_user_who_blocked_the_bot_gets_nothing(
    bot: Bot, control: httpx.AsyncClient
) -> None:
    user = new_user()
    await ok(control.post(f"/chats/{user}/block", json={"blocked": True}))
    with pytest.raises(TelegramForbiddenError, match="bot was blocked by the user"):
        await bot.send_message(user, "are you there?")
    with pytest.raises(TelegramForbiddenError):
        await bot.send_document(user, BufferedInputFile(b"x", filename="x.txt"))
    await ok(control.post(f"/chats/{user}/block", json={"blocked": False}))
    await bot.send_message(user, "welcome back")
    assert [m["text"] for m in await ok(control.get(f"/chats/{user}/messages"))] == ["welcome back"]


# -- Updates and the webhook ----------------------------------------------------------------------


async def test_user_messages_reach_the_webhook_with_the_secret(
    bot: Bot, receiver: Receiver, control: httpx.AsyncClient
) -> None:
    user = new_user()
    first = await ok(
        control.post(
            f"/users/{user}/messages",
            json={"text": "/start", "first_name": "Ada", "username": "ada"},
        )
    )
    second = await ok(control.post(f"/users/{user}/messages", json={"text": "hello"}))
    assert second["update_id"] > first["update_id"]

    updates = await receiver.wait(user, "message", count=2)
    assert [u.update_id for u in updates] == [first["update_id"], second["update_id"]]
    message = updates[0].message
    assert message is not None and message.text == "/start"
    assert message.from_user is not None and message.from_user.first_name == "Ada"
    assert message.chat.id == user and message.chat.type == "private"
    assert message.entities and message.entities[0].type == "bot_command"
    assert {secret for u, secret in receiver.accepted if chat_of(u) == user} == {SECRET}

    info = await bot.get_webhook_info()
    assert info.url == receiver.url
    states = await ok(control.get("/updates", params={"since": first["update_id"] - 1}))
    mine = [s for s in states if s["chat_id"] == user]
    assert [(s["state"], s["last_status"]) for s in mine] == [("delivered", 200)] * 2


async def test_refused_deliveries_are_retried_in_order(
    receiver: Receiver, control: httpx.AsyncClient
) -> None:
    user = new_user()
    other = new_user()
    receiver.fail[user] = 2
    first = await ok(control.post(f"/users/{user}/messages", json={"text": "one"}))
    second = await ok(control.post(f"/users/{user}/messages", json={"text": "two"}))
    # Another chat is not held up by this one's failing delivery.
    await ok(control.post(f"/users/{other}/messages", json={"text": "meanwhile"}))
    await receiver.wait(other, "message")
    assert receiver.updates(user) == []

    updates = await receiver.wait(user, "message", count=2)
    assert [u.message.text for u in updates if u.message] == ["one", "two"]
    assert receiver.refused.count(first["update_id"]) == 2
    assert second["update_id"] not in receiver.refused  # never sent before "one" got through
    states = {s["update_id"]: s for s in await ok(control.get("/updates"))}
    assert states[first["update_id"]]["attempts"] == 3
    assert states[second["update_id"]]["attempts"] == 1


async def test_an_update_can_be_delivered_twice(
    receiver: Receiver, control: httpx.AsyncClient
) -> None:
    user = new_user()
    sent = await ok(control.post(f"/users/{user}/messages", json={"text": "only once?"}))
    await receiver.wait(user, "message")
    again = await ok(control.post(f"/updates/{sent['update_id']}/redeliver"))
    assert again["status"] == 200
    updates = await receiver.wait(user, "message", count=2)
    assert [u.update_id for u in updates] == [sent["update_id"]] * 2


async def test_callback_buttons(bot: Bot, receiver: Receiver, control: httpx.AsyncClient) -> None:
    user = new_user()
    markup = InlineKeyboardMarkup(
        inline_keyboard=[[InlineKeyboardButton(text="Next page", callback_data="page:2")]]
    )
    sent = await bot.send_message(user, "Catalog, page 1", reply_markup=markup)
    resp = await control.post(
        f"/users/{user}/callback", json={"message_id": sent.message_id, "data": "page:9"}
    )
    assert resp.status_code == 404  # there is no such button to press
    pressed = await ok(
        control.post(
            f"/users/{user}/callback", json={"message_id": sent.message_id, "data": "page:2"}
        )
    )
    [update] = await receiver.wait(user, "callback_query")
    query = update.callback_query
    assert query is not None and query.data == "page:2" and query.from_user.id == user
    assert query.message is not None and query.message.message_id == sent.message_id

    assert await bot.answer_callback_query(query.id, text="Loading page 2")
    answer = await ok(control.get(f"/callbacks/{pressed['callback_query_id']}"))
    assert answer["answered"] and answer["text"] == "Loading page 2"
    with pytest.raises(TelegramBadRequest, match="query is too old"):
        await bot.answer_callback_query(query.id)
    edited = await bot.edit_message_text(
        "Catalog, page 2", chat_id=user, message_id=sent.message_id
    )
    assert edited.text == "Catalog, page 2" and edited.edit_date is not None


async def test_pending_updates_survive_a_restart(tmp_path: Path, receiver: Receiver) -> None:
    user = new_user()
    with running_sandbox(tmp_path) as url:
        await wait_http(f"{url}/healthz")
        async with httpx.AsyncClient(base_url=f"{url}/telegram/_sandbox") as http:
            # No webhook yet: the update waits, as at Telegram.
            first = await ok(http.post(f"/users/{user}/messages", json={"text": "before"}))
    with running_sandbox(tmp_path) as url:
        await wait_http(f"{url}/healthz")
        async with (
            make_bot(url) as bot,
            httpx.AsyncClient(base_url=f"{url}/telegram/_sandbox") as http,
        ):
            assert (await bot.get_webhook_info()).pending_update_count == 1
            await bot.set_webhook(receiver.url, secret_token=SECRET)
            [update] = await receiver.wait(user, "message")
            assert update.update_id == first["update_id"]
            second = await ok(http.post(f"/users/{user}/messages", json={"text": "after"}))
            assert second["update_id"] > first["update_id"]
            await receiver.wait(user, "message", count=2)


# -- Telegram Stars -------------------------------------------------------------------------------


async def invoice_link(bot: Bot, payload: str, amount: int = 50) -> str:
    return await bot.create_invoice_link(
        title="Logo pack",
        description="Twelve logos",
        payload=payload,
        currency="XTR",
        prices=[LabeledPrice(label="Logo pack", amount=amount)],
        provider_token="",
    )


async def test_stars_payment_handshake_and_refund(
    bot: Bot, receiver: Receiver, control: httpx.AsyncClient
) -> None:
    user = new_user()
    link = await invoice_link(bot, "order-paid", amount=75)
    assert re.fullmatch(r"https://t\.me/\$[A-Za-z0-9_-]{16,}", link)
    slug = link.rsplit("$", 1)[1]
    assert (await ok(control.get(f"/invoices/{slug}")))["paid"] is False

    paying = asyncio.create_task(ok(control.post(f"/invoices/{slug}/pay", json={"user_id": user})))
    [update] = await receiver.wait(user, "pre_checkout_query")
    query = update.pre_checkout_query
    assert query is not None and query.from_user.id == user
    assert (query.currency, query.total_amount, query.invoice_payload) == ("XTR", 75, "order-paid")
    assert await bot.answer_pre_checkout_query(query.id, ok=True)
    result = await paying
    assert result["status"] == "paid"
    charge_id = result["telegram_payment_charge_id"]
    assert charge_id.startswith("stx")

    [paid] = await receiver.wait(user, "message")
    assert paid.message is not None and paid.message.successful_payment is not None
    payment = paid.message.successful_payment
    assert (payment.currency, payment.total_amount, payment.invoice_payload) == (
        "XTR",
        75,
        "order-paid",
    )
    assert payment.telegram_payment_charge_id == charge_id
    assert paid.message.from_user is not None and paid.message.from_user.id == user
    assert result["update_ids"] == [update.update_id, paid.update_id]
    invoice = await ok(control.get(f"/invoices/{slug}"))
    assert invoice["paid"] and [c["telegram_payment_charge_id"] for c in invoice["charges"]] == [
        charge_id
    ]

    assert await bot.refund_star_payment(user, charge_id)
    with pytest.raises(TelegramBadRequest, match="CHARGE_ALREADY_REFUNDED"):
        await bot.refund_star_payment(user, charge_id)
    with pytest.raises(TelegramBadRequest, match="CHARGE_NOT_FOUND"):
        await bot.refund_star_payment(user, "stxNoSuchCharge")
    refunds = [r for r in await ok(control.get("/refunds")) if r["charge_id"] == charge_id]
    assert refunds == [
        {
            "user_id": user,
            "charge_id": charge_id,
            "amount": 75,
            "currency": "XTR",
            "invoice_payload": "order-paid",
            "date": refunds[0]["date"],
        }
    ]
    history = await bot.get_star_transactions()
    assert [t.amount for t in history.transactions if t.id == charge_id] == [75, 75]


async def test_declined_and_unanswered_checkouts_take_no_money(
    bot: Bot, receiver: Receiver, control: httpx.AsyncClient
) -> None:
    user = new_user()
    link = await invoice_link(bot, "order-declined")
    slug = link.rsplit("$", 1)[1]

    paying = asyncio.create_task(ok(control.post(f"/invoices/{slug}/pay", json={"user_id": user})))
    [update] = await receiver.wait(user, "pre_checkout_query")
    assert update.pre_checkout_query is not None
    await bot.answer_pre_checkout_query(
        update.pre_checkout_query.id, ok=False, error_message="Sold out, sorry."
    )
    assert (await paying) == {
        "status": "declined",
        "error_message": "Sold out, sorry.",
        "update_ids": [update.update_id],
    }

    started = time.monotonic()
    result = await ok(control.post(f"/invoices/{slug}/pay", json={"user_id": user}))
    assert result["status"] == "timeout"
    assert CHECKOUT_TIMEOUT <= time.monotonic() - started < CHECKOUT_TIMEOUT + 2
    late = (await receiver.wait(user, "pre_checkout_query", count=2))[1].pre_checkout_query
    assert late is not None
    with pytest.raises(TelegramBadRequest, match="query is too old"):
        await bot.answer_pre_checkout_query(late.id, ok=True)

    await asyncio.sleep(0.3)
    assert receiver.updates(user, "message") == []
    assert (await ok(control.get(f"/invoices/{slug}")))["paid"] is False


async def test_webhook_reply_answers_the_checkout(
    bot: Bot, receiver: Receiver, control: httpx.AsyncClient
) -> None:
    user = new_user()
    receiver.reply_ok.add(user)
    slug = (await invoice_link(bot, "order-reply")).rsplit("$", 1)[1]
    result = await ok(control.post(f"/invoices/{slug}/pay", json={"user_id": user}))
    assert result["status"] == "paid"
    [paid] = await receiver.wait(user, "message")
    assert paid.message is not None and paid.message.successful_payment is not None


async def test_invoice_rules(bot: Bot) -> None:
    with pytest.raises(TelegramBadRequest, match="CURRENCY_INVALID"):
        await bot.create_invoice_link(
            title="t",
            description="d",
            payload="p",
            currency="USD",
            prices=[LabeledPrice(label="t", amount=5)],
        )
    with pytest.raises(TelegramBadRequest, match="STARS_INVOICE_INVALID"):
        await bot.create_invoice_link(
            title="t",
            description="d",
            payload="p",
            currency="XTR",
            prices=[LabeledPrice(label="a", amount=5), LabeledPrice(label="b", amount=5)],
        )


# -- Mini App -------------------------------------------------------------------------------------


async def test_init_data_verifies_with_aiogram(control: httpx.AsyncClient) -> None:
    user = new_user()
    data = (
        await ok(
            control.get(
                "/init-data", params={"user_id": user, "first_name": "Ada", "username": "ada"}
            )
        )
    )["init_data"]
    parsed = safe_parse_webapp_init_data(SANDBOX_TELEGRAM_TOKEN, data)
    assert parsed.user is not None
    assert (parsed.user.id, parsed.user.first_name, parsed.user.username) == (user, "Ada", "ada")
    assert abs(parsed.auth_date.timestamp() - time.time()) < 60
    with pytest.raises(ValueError):
        safe_parse_webapp_init_data("1000000001:AAsome-other-bot-token-entirely", data)

    stale = (
        await ok(control.get("/init-data", params={"user_id": user, "auth_date": 1_700_000_000}))
    )["init_data"]
    assert safe_parse_webapp_init_data(SANDBOX_TELEGRAM_TOKEN, stale).auth_date.timestamp() == (
        1_700_000_000
    )


async def test_pages_render(sandbox_url: str, bot: Bot) -> None:
    user = new_user()
    await bot.send_message(user, "Hello from the bot")
    async with httpx.AsyncClient(base_url=sandbox_url) as http:
        chats = await http.get("/telegram/")
        chat = await http.get(f"/telegram/chats/{user}")
    assert chats.status_code == 200 and f"/telegram/chats/{user}" in chats.text
    assert "Hello from the bot" in chats.text
    assert chat.status_code == 200 and "Pay with Stars" in chat.text
