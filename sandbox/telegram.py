"""Telegram under /telegram: the Bot API, a test-control surface, and pages to chat with the bot.

Bot API (what aiogram's `Bot` calls with `TelegramAPIServer.from_base(<sandbox>/telegram)`):
`GET|POST /telegram/bot<token>/<method>` and `GET /telegram/file/bot<token>/<file_path>`,
answering Telegram's envelope with Telegram's status codes.

Control (not Telegram's API; JSON, errors as {"error", "detail"}), under /telegram/_sandbox:
  POST /users/{user_id}/messages {text, first_name?, last_name?, username?}
       -> {update_id, message_id}: the user writes to the bot (private chat id == user id)
  POST /users/{user_id}/callback {message_id, data} -> {update_id, callback_query_id}:
       the user presses a callback button of one of the bot's messages (404 if no such button)
  GET  /callbacks/{callback_query_id} -> {callback_query_id, answered, text?, show_alert?, url?}
  POST /invoices/{slug}/pay {user_id, first_name?, username?, payment_delay_seconds?}
       -> {status: paid | declined | timeout, telegram_payment_charge_id?, error_message?,
       update_ids}: waits for the handshake
  GET  /invoices/{slug} -> {slug, link, title, description, payload, currency, amount, prices,
       created, paid, charges: [...], attempts: [...]}
  GET  /chats -> [{id, type, first_name, username?, blocked, messages, last_message}]
  GET  /chats/{chat_id}/messages[?include_user=true] -> what the bot sent, oldest first:
       [{message_id, date, from_bot, text (a document's caption), caption, reply_markup,
         document: {file_id, file_name, mime_type, size, content (utf-8 text or null)} | null,
         successful_payment, edit_date}]; include_user adds the user's messages
  GET  /chats/{chat_id}/actions -> [{action, date}]: sendChatAction calls, oldest first
  POST /chats/{chat_id}/block {blocked} -> {chat_id, blocked}
  POST /faults {chat_id, mode: rate_limit | off, times, retry_after}: the next `times` sends
       to the chat answer 429 with that retry_after, whatever the natural rate limit says
  GET  /updates[?since=N] -> updates with update_id > N, oldest first, with their delivery:
       [{update_id, type, chat_id, state: pending | delivered | dropped, delivered, attempts,
         last_status, last_error, redeliveries, update}]
  POST /updates/{update_id}/redeliver -> {update_id, status, error}: POSTs it to the webhook
       again (Telegram's duplicate delivery); 409 without a webhook
  GET  /refunds -> [{user_id, charge_id, amount, currency, invoice_payload, date}]
  GET  /init-data?user_id=&first_name=&last_name=&username=&language_code=&auth_date=
       &start_param= -> {"init_data": "<query string>"}: Mini App initData signed with the token
  GET  /webhook -> getWebhookInfo's result;  GET /files/{file_id} -> a sent document's bytes
Pages: GET /telegram/ (chats) and GET /telegram/chats/{chat_id} (a conversation).
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile

from sandbox.telegram_chats import MAX_FILE_BYTES, MAX_TEXT_CHARS
from sandbox.telegram_core import Described, TelegramSandbox
from sandbox.telegram_params import BotApiError, Params, Upload, bad_request
from sandbox.telegram_updates import NoWebhook

UserId = Annotated[int, PathParam(gt=0)]


class UserMessage(BaseModel):
    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    first_name: str | None = None
    last_name: str | None = None
    username: str | None = None


class CallbackPress(BaseModel):
    message_id: int
    data: str = Field(min_length=1)


class PayInvoice(BaseModel):
    user_id: int = Field(gt=0)
    # Seconds between the bot's ok and the payment (a slow payment step at Telegram).
    payment_delay_seconds: float = Field(default=0.0, ge=0, le=120)
    first_name: str | None = None
    username: str | None = None


class Block(BaseModel):
    blocked: bool


class Fault(BaseModel):
    chat_id: int = Field(gt=0)
    mode: Literal["rate_limit", "off"]
    times: int = Field(default=1, ge=1)
    retry_after: int = Field(default=1, ge=1)


def create_router(tg: TelegramSandbox) -> APIRouter:
    router = APIRouter(prefix="/telegram", tags=["telegram"])
    router.include_router(_bot_api(tg))
    router.include_router(_control(tg))
    router.include_router(_pages(tg))
    return router


def _bot_api(tg: TelegramSandbox) -> APIRouter:
    api = APIRouter(include_in_schema=False)

    def authorized(token: str) -> bool:
        return secrets.compare_digest(token.encode(), tg.token.encode())

    @api.api_route("/bot{token}/{method}", methods=["GET", "POST"])
    async def call(request: Request, token: str, method: str) -> JSONResponse:
        try:
            if not authorized(token):
                raise BotApiError(401, "Unauthorized")
            result = await tg.call(method, await _read_params(request))
        except BotApiError as err:
            return JSONResponse(err.body, status_code=err.status)
        if isinstance(result, Described):
            return JSONResponse(
                {"ok": True, "result": result.result, "description": result.description}
            )
        return JSONResponse({"ok": True, "result": result})

    @api.get("/file/bot{token}/{path:path}")
    async def download(token: str, path: str) -> Response:
        if not authorized(token):
            return JSONResponse(BotApiError(401, "Unauthorized").body, status_code=401)
        try:
            file = tg.chats.file_content(path=path)
        except KeyError:
            return JSONResponse(BotApiError(404, "Not Found").body, status_code=404)
        return Response(file.content, media_type=file.content_type)

    return api


async def _read_params(request: Request) -> Params:
    """Parameters from the query string and a JSON, urlencoded or multipart body."""
    values: dict[str, Any] = dict(request.query_params)
    files: dict[str, Upload] = {}
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        body = await request.body()
        try:
            data = json.loads(body) if body else {}
        except ValueError:
            raise bad_request("can't parse JSON encoded request") from None
        if not isinstance(data, dict):
            raise bad_request("can't parse JSON encoded request")
        values.update(data)
    elif content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        try:
            form = await request.form()
        except HTTPException as err:
            raise bad_request(f"can't parse request: {err.detail}") from None
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                content = await value.read()
                if len(content) > MAX_FILE_BYTES:
                    raise BotApiError(413, "Request Entity Too Large")
                files[key] = Upload(value.filename or key, content, value.content_type)
            else:
                values[key] = value
    return Params(values, files)


def _error(status: int, error: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


def _control(tg: TelegramSandbox) -> APIRouter:
    control = APIRouter(prefix="/_sandbox")

    @control.post("/users/{user_id}/messages")
    async def user_message(user_id: UserId, body: UserMessage) -> dict[str, int]:
        names = body.model_dump(exclude={"text"})
        return tg.chats.send_as_user(user_id, body.text, **names)

    @control.post("/users/{user_id}/callback", response_model=None)
    async def press(user_id: UserId, body: CallbackPress) -> dict[str, Any] | JSONResponse:
        try:
            return tg.chats.press(user_id, body.message_id, body.data)
        except LookupError as err:
            return _error(404, "not_found", str(err.args[0]))

    @control.get("/callbacks/{query_id}", response_model=None)
    async def callback_answer(query_id: str) -> dict[str, Any] | JSONResponse:
        try:
            return tg.chats.callback_answer(query_id)
        except KeyError:
            return _error(404, "not_found", "no such callback query")

    @control.post("/invoices/{slug}/pay", response_model=None)
    async def pay(slug: str, body: PayInvoice) -> dict[str, Any] | JSONResponse:
        names = {"first_name": body.first_name, "username": body.username}
        try:
            # The whole link works too: https://t.me/$<slug>
            return await tg.stars.pay(
                slug.rsplit("$", 1)[-1], body.user_id, body.payment_delay_seconds, **names
            )
        except KeyError:
            return _error(404, "not_found", "no such invoice")

    @control.get("/invoices/{slug}", response_model=None)
    async def invoice(slug: str) -> dict[str, Any] | JSONResponse:
        try:
            return tg.stars.invoice(slug.rsplit("$", 1)[-1])
        except KeyError:
            return _error(404, "not_found", "no such invoice")

    @control.get("/chats")
    async def chats() -> list[dict[str, Any]]:
        return tg.chats.chats()

    @control.get("/chats/{chat_id}/messages")
    async def messages(chat_id: UserId, include_user: bool = False) -> list[dict[str, Any]]:
        return tg.chats.messages(chat_id, include_user)

    @control.get("/chats/{chat_id}/actions")
    async def actions(chat_id: UserId) -> list[dict[str, Any]]:
        return tg.chats.chat_actions(chat_id)

    @control.post("/chats/{chat_id}/block")
    async def block(chat_id: UserId, body: Block) -> dict[str, Any]:
        return tg.chats.set_blocked(chat_id, body.blocked)

    @control.post("/faults")
    async def fault(body: Fault) -> dict[str, Any]:
        return tg.chats.set_fault(body.chat_id, body.mode, body.times, body.retry_after)

    @control.get("/updates")
    async def updates(since: int = 0) -> list[dict[str, Any]]:
        return tg.updates.list(since)

    @control.post("/updates/{update_id}/redeliver", response_model=None)
    async def redeliver(update_id: int) -> dict[str, Any] | JSONResponse:
        try:
            return await tg.updates.redeliver(update_id)
        except KeyError:
            return _error(404, "not_found", "no such update")
        except NoWebhook:
            return _error(409, "no_webhook", "no webhook is set (setWebhook)")

    @control.get("/refunds")
    async def refunds() -> list[dict[str, Any]]:
        return tg.stars.refunds()

    @control.get("/init-data")
    async def init_data(
        user_id: Annotated[int, Query(gt=0)],
        first_name: str | None = None,
        last_name: str | None = None,
        username: str | None = None,
        language_code: str | None = None,
        auth_date: int | None = None,
        start_param: str | None = None,
    ) -> dict[str, str]:
        names = {
            "first_name": first_name,
            "last_name": last_name,
            "username": username,
            "language_code": language_code,
        }
        data = tg.init_data(user_id, auth_date=auth_date, start_param=start_param, **names)
        return {"init_data": data}

    @control.get("/webhook")
    async def webhook() -> dict[str, Any]:
        return tg.updates.webhook_info()

    @control.get("/files/{file_id}", response_model=None)
    async def file(file_id: str) -> Response:
        try:
            upload = tg.chats.file_content(file_id=file_id)
        except KeyError:
            return _error(404, "not_found", "no such file")
        disposition = f"attachment; filename*=UTF-8''{quote(upload.filename, safe='')}"
        return Response(
            upload.content,
            media_type=upload.content_type,
            headers={"Content-Disposition": disposition},
        )

    return control


def _pages(tg: TelegramSandbox) -> APIRouter:
    pages = APIRouter(include_in_schema=False)
    templates = Jinja2Templates(directory=Path(__file__).parent / "templates")

    @pages.get("/", response_class=HTMLResponse)
    async def chats_page(request: Request) -> HTMLResponse:
        return templates.TemplateResponse(
            request,
            "telegram_chats.html",
            {"chats": tg.chats.chats(), "webhook": tg.updates.webhook_info()},
        )

    @pages.get("/phone", include_in_schema=False)
    async def phone(user_id: Annotated[int | None, Query(gt=0)] = None) -> RedirectResponse:
        """A phone for a person to try the bot: the chat of the user named, or of a new one."""
        chosen = user_id or secrets.randbelow(900_000_000) + 100_000_000
        return RedirectResponse(f"/telegram/chats/{chosen}", status_code=303)

    @pages.get("/chats/{chat_id}", response_class=HTMLResponse)
    async def chat_page(request: Request, chat_id: UserId) -> HTMLResponse:
        return templates.TemplateResponse(request, "telegram_chat.html", {"chat_id": chat_id})

    return pages
