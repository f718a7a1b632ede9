"""Telegram's chats with the bot: users, messages, files, and the limits Telegram enforces.

Every chat here is a private chat with a user (chat id == user id); any positive chat id is a
user who has started the bot, so the bot may write to anyone (suppliers included). Messages
are kept in the Bot API's Message shape so they can be returned and embedded in updates as
they are. No method awaits between its checks and its change, so no request observes, or
persists, a half-applied change.

As at Telegram: more than about one message a second to a chat is refused with 429 and
`retry_after` (a token bucket per chat holds CHAT_BURST messages and refills one per
`telegram_chat_interval_seconds`; 0 turns the limit off), and a fault can force a run of
429s; a chat whose user blocked the bot answers 403 "Forbidden: bot was blocked by the user".
"""

from __future__ import annotations

import base64
import hashlib
import math
import mimetypes
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx

from sandbox.store import JsonStore
from sandbox.telegram_params import (
    BotApiError,
    Params,
    Upload,
    bad_request,
    formatted,
    reply_markup,
    too_many_requests,
    utf16_len,
)
from sandbox.telegram_updates import TelegramUpdates
from workers.settings import SANDBOX_TELEGRAM_TOKEN

BOT = {
    "id": int(SANDBOX_TELEGRAM_TOKEN.split(":", 1)[0]),
    "is_bot": True,
    "first_name": "Orderflow Sandbox",
    "username": "orderflow_sandbox_bot",
}
CHAT_BURST = 3
MAX_TEXT_CHARS = 4096
MAX_CAPTION_CHARS = 1024
MAX_CALLBACK_ANSWER_CHARS = 200
# Telegram takes uploads up to 50 MB; the sandbox keeps files in its JSON document.
MAX_FILE_BYTES = 10 * 1024 * 1024
KEPT_CHAT_ACTIONS = 100
CHAT_ACTIONS = {
    "typing", "upload_photo", "record_video", "upload_video", "record_voice", "upload_voice",
    "upload_document", "choose_sticker", "find_location", "record_video_note",
    "upload_video_note",
}  # fmt: skip
QUERY_EXPIRED = "query is too old and response timeout expired or query ID is invalid"
BLOCKED = "Forbidden: bot was blocked by the user"

Method = Callable[[Params], Awaitable[Any]]


class TelegramChats:
    def __init__(self, store: JsonStore, updates: TelegramUpdates, interval: float) -> None:
        self.store = store
        self._updates = updates
        self._interval = interval
        self.users = store.collection("users")
        # str(chat id) -> {"id", "blocked", "next_message_id", "messages": [...], "actions": [...]}
        self._chats = store.collection("chats")
        self._files = store.collection("files")
        self._callbacks = store.collection("callback_queries")
        # str(chat id) -> {"mode": "rate_limit", "times", "retry_after"}
        self._faults = store.collection("faults")
        self._buckets: dict[int, tuple[float, float]] = {}  # chat -> (tokens, at)

    def methods(self) -> dict[str, Method]:
        return {
            "sendMessage": self._send_message,
            "sendDocument": self._send_document,
            "sendChatAction": self._send_chat_action,
            "editMessageText": self._edit_message_text,
            "editMessageReplyMarkup": self._edit_message_reply_markup,
            "answerCallbackQuery": self._answer_callback_query,
            "getFile": self._get_file,
        }

    # -- Messages ------------------------------------------------------------------------------

    async def _send_message(self, p: Params) -> dict[str, Any]:
        chat_id = p.chat_id()
        text, entities = self._text(p, "text", MAX_TEXT_CHARS, "message text is empty")
        if text is None:
            raise bad_request("message text is empty")
        markup = reply_markup(p.parsed("reply_markup"))
        chat = self._admit_send(chat_id)
        record = self.add_message(
            chat, from_bot=True, text=text, entities=entities, reply_markup=markup
        )
        return self.wire(chat, record)

    async def _send_document(self, p: Params) -> dict[str, Any]:
        chat_id = p.chat_id()
        source = p.input_file("document")
        if source is None:
            raise bad_request("there is no document in the request")
        caption, caption_entities = self._text(p, "caption", MAX_CAPTION_CHARS, None)
        markup = reply_markup(p.parsed("reply_markup"))
        upload = source if isinstance(source, Upload) else None
        file_id = source if isinstance(source, str) and source in self._files else None
        if upload is None and file_id is None:
            upload = await _download(source)  # a URL, which Telegram fetches itself
        if upload is not None and len(upload.content) > MAX_FILE_BYTES:
            raise BotApiError(413, "Request Entity Too Large")
        chat = self._admit_send(chat_id)
        if upload is not None:
            file_id = self._store_file(upload)["file_id"]
        record = self.add_message(
            chat,
            from_bot=True,
            document=file_id,
            caption=caption,
            caption_entities=caption_entities,
            reply_markup=markup,
        )
        return self.wire(chat, record)

    async def _send_chat_action(self, p: Params) -> bool:
        chat = self.chat(p.chat_id())
        action = p.text("action", required=True)
        if action not in CHAT_ACTIONS:
            raise bad_request("wrong parameter action in request")
        if chat["blocked"]:
            raise BotApiError(403, BLOCKED)
        chat["actions"] = [*chat["actions"], {"action": action, "date": int(time.time())}][
            -KEPT_CHAT_ACTIONS:
        ]
        self.store.save()
        return True

    async def _edit_message_text(self, p: Params) -> dict[str, Any]:
        chat, record = self._message_to_edit(p)
        text, entities = self._text(p, "text", MAX_TEXT_CHARS, "message text is empty")
        if text is None:
            raise bad_request("message text is empty")
        if record.get("text") is None:
            raise bad_request("there is no text in the message to edit")
        markup = reply_markup(p.parsed("reply_markup"))
        return self._edit(chat, record, text=text, entities=entities, reply_markup=markup)

    async def _edit_message_reply_markup(self, p: Params) -> dict[str, Any]:
        chat, record = self._message_to_edit(p)
        return self._edit(chat, record, reply_markup=reply_markup(p.parsed("reply_markup")))

    def _message_to_edit(self, p: Params) -> tuple[dict[str, Any], dict[str, Any]]:
        if p.text("inline_message_id") is not None:
            raise bad_request("the sandbox has no inline messages")
        chat = self._chats.get(str(p.chat_id()))
        message_id = p.integer("message_id", required=True)
        record = chat and next(
            (m for m in chat["messages"] if m["message_id"] == message_id and m["from_bot"]),
            None,
        )
        if not chat or not record:
            raise bad_request("message to edit not found")
        if chat["blocked"]:
            raise BotApiError(403, BLOCKED)
        return chat, record

    def _edit(self, chat: dict[str, Any], record: dict[str, Any], **changes: Any) -> dict[str, Any]:
        # An absent field and an empty one are the same content.
        if all((record.get(key) or None) == (value or None) for key, value in changes.items()):
            raise bad_request(
                "message is not modified: specified new message content and reply markup are "
                "exactly the same as a current content and reply markup of the message"
            )
        record.update(changes, edit_date=int(time.time()))
        self.store.save()
        return self.wire(chat, record)

    def _text(
        self, p: Params, name: str, limit: int, empty: str | None
    ) -> tuple[str | None, list[dict[str, Any]]]:
        raw = p.text(name)
        if raw is None:
            return None, []
        text, entities = formatted(raw, p.text("parse_mode"))
        if not text.strip():
            if empty is None:
                return None, []
            raise bad_request(empty)
        if utf16_len(text) > limit:
            raise bad_request(
                "message is too long" if name == "text" else "message caption is too long"
            )
        return text, entities

    async def _answer_callback_query(self, p: Params) -> bool:
        query = self._callbacks.get(p.text("callback_query_id", required=True) or "")
        if query is None or query["answer"] is not None:
            raise bad_request(QUERY_EXPIRED)
        text = p.text("text")
        if text is not None and len(text) > MAX_CALLBACK_ANSWER_CHARS:
            raise bad_request("MESSAGE_TOO_LONG")
        query["answer"] = {"text": text, "show_alert": p.flag("show_alert"), "url": p.text("url")}
        self.store.save()
        return True

    # -- Files ---------------------------------------------------------------------------------

    def _store_file(self, upload: Upload) -> dict[str, Any]:
        number = len(self._files) + 1
        name = upload.filename or f"file_{number}"
        mime = upload.content_type
        if not mime or mime == "application/octet-stream":
            mime = mimetypes.guess_type(name)[0] or "application/octet-stream"
        record = {
            "file_id": "BQACAgIAAxkBAAI" + secrets.token_urlsafe(30),
            "file_unique_id": "AgAD" + secrets.token_urlsafe(9),
            "file_name": name,
            "mime_type": mime,
            "file_size": len(upload.content),
            "file_path": f"documents/file_{number}{PurePosixPath(name).suffix}",
            "content": base64.b64encode(upload.content).decode(),
        }
        self._files[record["file_id"]] = record
        self.store.save()
        return record

    async def _get_file(self, p: Params) -> dict[str, Any]:
        record = self._files.get(p.text("file_id", required=True) or "")
        if record is None:
            raise bad_request("invalid file_id")
        return {key: record[key] for key in ("file_id", "file_unique_id", "file_size", "file_path")}

    def file_content(self, *, file_id: str | None = None, path: str | None = None) -> Upload:
        """A stored file's bytes, by id or by getFile's path; raises KeyError."""
        if file_id is None:
            found = (r["file_id"] for r in self._files.values() if r["file_path"] == path)
            file_id = next(found, "")
        record = self._files[file_id]
        return Upload(record["file_name"], base64.b64decode(record["content"]), record["mime_type"])

    # -- Chats and users -----------------------------------------------------------------------

    def user(self, user_id: int, **names: str | None) -> dict[str, Any]:
        user = self.users.get(str(user_id))
        if user is None:
            user = {"id": user_id, "is_bot": False, "first_name": f"User {user_id}"}
            self.users[str(user_id)] = user
        for key, value in names.items():
            if value:
                user[key] = value
        self.store.save()
        return user

    def chat(self, chat_id: int) -> dict[str, Any]:
        if chat_id <= 0:
            raise bad_request("chat not found")  # groups and channels are not simulated
        chat = self._chats.get(str(chat_id))
        if chat is None:
            self.user(chat_id)
            chat = {
                "id": chat_id,
                "blocked": False,
                "next_message_id": 1,
                "messages": [],
                "actions": [],
            }
            self._chats[str(chat_id)] = chat
            self.store.save()
        return chat

    def _wire_chat(self, chat_id: int) -> dict[str, Any]:
        user = self.users[str(chat_id)]
        chat = {"id": chat_id, "type": "private", "first_name": user["first_name"]}
        for key in ("last_name", "username"):
            if user.get(key):
                chat[key] = user[key]
        return chat

    def _admit_send(self, chat_id: int) -> dict[str, Any]:
        """The chat a message may be sent to now, or the 403/429 Telegram would answer."""
        chat = self.chat(chat_id)
        if chat["blocked"]:
            raise BotApiError(403, BLOCKED)
        fault = self._faults.get(str(chat_id))
        if fault is not None:
            fault["times"] -= 1
            if fault["times"] <= 0:
                del self._faults[str(chat_id)]
            self.store.save()
            raise too_many_requests(fault["retry_after"])
        if self._interval > 0:
            now = time.monotonic()
            tokens, at = self._buckets.get(chat_id, (CHAT_BURST, now))
            tokens = min(CHAT_BURST, tokens + (now - at) / self._interval)
            if tokens < 1:
                raise too_many_requests(max(1, math.ceil((1 - tokens) * self._interval)))
            self._buckets[chat_id] = (tokens - 1, now)
        return chat

    def add_message(self, chat: dict[str, Any], *, from_bot: bool, **fields: Any) -> dict[str, Any]:
        record = {
            "message_id": chat["next_message_id"],
            "date": int(time.time()),
            "from_bot": from_bot,
            **{key: value for key, value in fields.items() if value not in (None, [])},
        }
        chat["next_message_id"] += 1
        chat["messages"].append(record)
        self.store.save()
        return record

    def wire(self, chat: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
        """A stored message as the Bot API's Message."""
        sender = BOT if record["from_bot"] else self.users[str(chat["id"])]
        message = {
            "message_id": record["message_id"],
            "from": sender,
            "chat": self._wire_chat(chat["id"]),
            "date": record["date"],
        }
        for key in (
            "edit_date",
            "text",
            "entities",
            "caption",
            "caption_entities",
            "successful_payment",
            "reply_markup",
        ):
            if record.get(key) not in (None, []):
                message[key] = record[key]
        if record.get("document"):
            file = self._files[record["document"]]
            message["document"] = {
                key: file[key]
                for key in ("file_id", "file_unique_id", "file_name", "mime_type", "file_size")
            }
        return message

    # -- Test and person control (not Telegram's API) ------------------------------------------

    def send_as_user(self, user_id: int, text: str, **names: str | None) -> dict[str, int]:
        """A user writes to the bot in their private chat."""
        self.user(user_id, **names)
        chat = self.chat(user_id)
        entities = []
        if text.startswith("/"):
            command = text.split(maxsplit=1)[0]
            entities = [{"type": "bot_command", "offset": 0, "length": utf16_len(command)}]
        record = self.add_message(chat, from_bot=False, text=text, entities=entities)
        update_id = self._updates.push("message", self.wire(chat, record), user_id)
        return {"update_id": update_id, "message_id": record["message_id"]}

    def press(self, user_id: int, message_id: int, data: str) -> dict[str, Any]:
        """A user presses a callback button; raises LookupError when there is no such button."""
        chat = self._chats.get(str(user_id))
        record = chat and next(
            (m for m in chat["messages"] if m["message_id"] == message_id and m["from_bot"]),
            None,
        )
        if not chat or not record:
            raise LookupError(f"no message {message_id} from the bot in chat {user_id}")
        rows = (record.get("reply_markup") or {}).get("inline_keyboard") or []
        if not any(b.get("callback_data") == data for row in rows for b in row):
            raise LookupError(f"message {message_id} has no button with callback_data {data!r}")
        query_id = str(secrets.randbits(62))
        self._callbacks[query_id] = {
            "id": query_id,
            "user_id": user_id,
            "message_id": message_id,
            "data": data,
            "answer": None,
        }
        instance = int(hashlib.sha256(str(user_id).encode()).hexdigest()[:15], 16)
        query = {
            "id": query_id,
            "from": self.users[str(user_id)],
            "message": self.wire(chat, record),
            "chat_instance": str(instance),
            "data": data,
        }
        update_id = self._updates.push("callback_query", query, user_id)
        return {"update_id": update_id, "callback_query_id": query_id}

    def callback_answer(self, query_id: str) -> dict[str, Any]:
        query = self._callbacks[query_id]
        return {
            "callback_query_id": query_id,
            "answered": query["answer"] is not None,
            **(query["answer"] or {}),
        }

    def messages(self, chat_id: int, include_user: bool = False) -> list[dict[str, Any]]:
        """What the bot sent to a chat, oldest first (and the user's side too if asked)."""
        chat = self._chats.get(str(chat_id))
        if chat is None:
            return []
        return [self._view(m) for m in chat["messages"] if include_user or m["from_bot"]]

    def _view(self, record: dict[str, Any]) -> dict[str, Any]:
        document = None
        if record.get("document"):
            file = self._files[record["document"]]
            content = base64.b64decode(file["content"])
            try:
                text: str | None = content.decode()
            except UnicodeDecodeError:
                text = None
            document = {
                "file_id": file["file_id"],
                "file_name": file["file_name"],
                "mime_type": file["mime_type"],
                "size": file["file_size"],
                "content": text,
            }
        return {
            "message_id": record["message_id"],
            "date": record["date"],
            "from_bot": record["from_bot"],
            # A document's caption is the text its reader sees.
            "text": record.get("text") if record.get("text") is not None else record.get("caption"),
            "caption": record.get("caption"),
            "reply_markup": record.get("reply_markup"),
            "document": document,
            "successful_payment": record.get("successful_payment"),
            "edit_date": record.get("edit_date"),
        }

    def chat_actions(self, chat_id: int) -> list[dict[str, Any]]:
        chat = self._chats.get(str(chat_id))
        return list(chat["actions"]) if chat else []

    def chats(self) -> list[dict[str, Any]]:
        result = []
        for chat in self._chats.values():
            last = chat["messages"][-1] if chat["messages"] else None
            view = self._wire_chat(chat["id"])
            view["blocked"] = chat["blocked"]
            view["messages"] = len(chat["messages"])
            view["last_message"] = self._view(last) if last else None
            result.append(view)
        result.sort(
            key=lambda c: c["last_message"]["date"] if c["last_message"] else 0, reverse=True
        )
        return result

    def set_blocked(self, chat_id: int, blocked: bool) -> dict[str, Any]:
        chat = self.chat(chat_id)
        chat["blocked"] = blocked
        self.store.save()
        return {"chat_id": chat_id, "blocked": blocked}

    def set_fault(self, chat_id: int, mode: str, times: int, retry_after: int) -> dict[str, Any]:
        """The next `times` sends to the chat answer 429 with `retry_after`; mode off clears."""
        if mode == "off":
            self._faults.pop(str(chat_id), None)
        else:
            self._faults[str(chat_id)] = {"mode": mode, "times": times, "retry_after": retry_after}
        self.store.save()
        return {"chat_id": chat_id, **self._faults.get(str(chat_id), {"mode": "off"})}


async def _download(url: str) -> Upload:
    """A document given by URL, fetched as Telegram fetches it."""
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"}:
        raise bad_request("wrong remote file identifier specified: Wrong string length")
    try:
        async with httpx.AsyncClient(timeout=10, follow_redirects=True) as http:
            response = await http.get(url)
            response.raise_for_status()
    except httpx.HTTPError:
        raise bad_request("failed to get HTTP URL content") from None
    name = unquote(PurePosixPath(parts.path).name) or "file"
    return Upload(name, response.content, response.headers.get("content-type", "").split(";")[0])
