"""Telegram's update queue: increasing ids, durable storage, webhook delivery as Telegram does it.

Every update is stored with the change that caused it (the app waits for the store before it
answers), then POSTed as JSON to the URL from setWebhook with the `X-Telegram-Bot-Api-Secret-Token`
header. Telegram keeps one chat's updates in order: the oldest pending update of a chat blocks
that chat until the webhook accepts it (any 2xx), while different chats are delivered
concurrently, up to the webhook's max_connections (40 by default). A non-2xx answer or a
connection failure is retried after `first_retry` seconds, doubling up to MAX_RETRY_DELAY.
Without a webhook, updates wait (getUpdates can fetch them) and are dropped after a day, as at
Telegram. A webhook answer that names a `method` is executed as a Bot API call, as Telegram does.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import httpx

from sandbox.store import JsonStore

logger = logging.getLogger(__name__)

# Telegram's update ids are large numbers; any start works as long as they only grow.
FIRST_UPDATE_ID = 700_000_001
MAX_RETRY_DELAY = 30.0
KEEP_SECONDS = 24 * 3600
DELIVERY_TIMEOUT = 10.0
DEFAULT_MAX_CONNECTIONS = 40
# Delivered unless allowed_updates names others (Telegram leaves these out by default).
NOT_DEFAULT = {"chat_member", "message_reaction", "message_reaction_count"}

ReplyHandler = Callable[[dict[str, Any]], Awaitable[None]]


class NoWebhook(Exception):
    """A delivery was asked for while no webhook is set."""


class WebhookActive(Exception):
    """getUpdates was called while a webhook is set (Telegram answers 409)."""


class TelegramUpdates:
    def __init__(self, store: JsonStore, *, first_retry: float) -> None:
        self._store = store
        # str(update_id) -> {"update_id", "type", "chat_key", "update", "created", "state":
        # "pending" | "delivered" | "dropped", "attempts", "last_status", "last_error",
        # "next_attempt_at", "redeliveries"}
        self._updates = store.collection("updates")
        # "webhook" -> setWebhook's settings; "last_error" -> {"date", "message"}; "next_id"
        self._meta = store.collection("webhook")
        self._first_retry = first_retry
        self._wake = asyncio.Event()
        self._arrived = asyncio.Event()
        self._in_flight: set[str] = set()
        # chat key -> pending update ids, oldest first: the head of each list is the next due.
        self._pending: dict[str, list[int]] = {}
        for record in sorted(self._updates.values(), key=lambda r: r["update_id"]):
            if record["state"] == "pending":
                self._pending.setdefault(record["chat_key"], []).append(record["update_id"])
        self.on_reply: ReplyHandler | None = None

    # -- Queueing ----------------------------------------------------------------------------

    def push(self, update_type: str, payload: dict[str, Any], chat_id: int) -> int:
        """Stores a new update about `chat_id` (a user's private chat) and queues its delivery."""
        update_id = self._meta.get("next_id", FIRST_UPDATE_ID)
        self._meta["next_id"] = update_id + 1
        chat_key = str(chat_id)
        self._updates[str(update_id)] = {
            "update_id": update_id,
            "type": update_type,
            "chat_key": chat_key,
            # A snapshot: later changes (a user renamed, a message edited) must not rewrite it.
            "update": {"update_id": update_id, update_type: copy.deepcopy(payload)},
            "created": time.time(),
            "state": "pending",
            "attempts": 0,
            "last_status": None,
            "last_error": None,
            "next_attempt_at": time.time(),
            "redeliveries": 0,
        }
        self._pending.setdefault(chat_key, []).append(update_id)
        self._store.save()
        self._wake.set()
        self._arrived.set()
        return update_id

    def view(self, record: dict[str, Any]) -> dict[str, Any]:
        return {
            "update_id": record["update_id"],
            "type": record["type"],
            "chat_id": int(record["chat_key"]),
            "state": record["state"],
            "delivered": record["state"] == "delivered",
            "attempts": record["attempts"],
            "last_status": record["last_status"],
            "last_error": record["last_error"],
            "redeliveries": record["redeliveries"],
            "update": record["update"],
        }

    def list(self, since: int = 0) -> list[dict[str, Any]]:
        """Updates with an id greater than `since`, oldest first, with their delivery state."""
        records = [r for r in self._updates.values() if r["update_id"] > since]
        return [self.view(r) for r in sorted(records, key=lambda r: r["update_id"])]

    def pending_count(self) -> int:
        return sum(len(ids) for ids in self._pending.values())

    # -- Webhook settings --------------------------------------------------------------------

    @property
    def webhook(self) -> dict[str, Any] | None:
        return self._meta.get("webhook")

    def set_webhook(
        self,
        url: str,
        secret_token: str | None,
        allowed_updates: list[str] | None,
        max_connections: int,
        drop_pending: bool,
    ) -> None:
        if drop_pending:
            self._drop_all_pending()
        if allowed_updates is None:  # as at Telegram: the previous setting is kept
            allowed_updates = self._meta.get("allowed_updates", [])
        self._meta["allowed_updates"] = allowed_updates
        self._meta["webhook"] = {
            "url": url,
            "secret_token": secret_token,
            "allowed_updates": allowed_updates or [],
            "max_connections": max_connections,
            "set_at": time.time(),
        }
        self._meta.pop("last_error", None)
        self._store.save()
        self._wake.set()

    def delete_webhook(self, drop_pending: bool) -> bool:
        """Forgets the webhook; whether there was one."""
        if drop_pending:
            self._drop_all_pending()
        had = self._meta.pop("webhook", None) is not None
        self._store.save()
        return had

    def webhook_info(self) -> dict[str, Any]:
        hook = self.webhook
        info: dict[str, Any] = {
            "url": hook["url"] if hook else "",
            "has_custom_certificate": False,
            "pending_update_count": self.pending_count(),
        }
        if hook:
            info["max_connections"] = hook["max_connections"]
            if hook["allowed_updates"]:
                info["allowed_updates"] = hook["allowed_updates"]
            error = self._meta.get("last_error")
            if error:
                info["last_error_date"] = error["date"]
                info["last_error_message"] = error["message"]
        return info

    def _drop_all_pending(self) -> None:
        for ids in self._pending.values():
            for update_id in ids:
                self._updates[str(update_id)]["state"] = "dropped"
                self._updates[str(update_id)]["next_attempt_at"] = None
        self._pending.clear()

    # -- getUpdates (only without a webhook, as at Telegram) -----------------------------------

    async def get_updates(
        self, offset: int, limit: int, timeout: float, allowed: list[str] | None
    ) -> list[dict[str, Any]]:
        if self.webhook is not None:
            raise WebhookActive
        if offset:
            # A positive offset confirms every update before it; a negative one counts from
            # the end of the queue.
            pending = sorted(i for ids in self._pending.values() for i in ids)
            if offset < 0:
                offset = pending[offset] if -offset <= len(pending) else 0
            for update_id in pending:
                if update_id < offset:
                    self._finish(self._updates[str(update_id)], "delivered")
        found = self._fetchable(offset, limit, allowed)
        if not found and timeout > 0:
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._arrived.wait()
            found = self._fetchable(offset, limit, allowed)
        return [r["update"] for r in found]

    def _fetchable(
        self, offset: int, limit: int, allowed: list[str] | None
    ) -> list[dict[str, Any]]:
        ids = sorted(i for ids in self._pending.values() for i in ids if i >= offset)
        records = [self._updates[str(i)] for i in ids]
        return [r for r in records if _allowed(r["type"], allowed)][:limit]

    # -- Delivery ----------------------------------------------------------------------------

    async def deliver_forever(self) -> None:
        async with httpx.AsyncClient(timeout=DELIVERY_TIMEOUT) as http, asyncio.TaskGroup() as tg:
            while True:
                self._wake.clear()
                next_due = self._start_due(http, tg)
                timeout = None if next_due is None else max(0.0, next_due - time.time())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()

    def _start_due(self, http: httpx.AsyncClient, tg: asyncio.TaskGroup) -> float | None:
        """Starts the due head update of every idle chat; the next time one falls due."""
        hook = self.webhook
        if hook is None:
            return None
        now = time.time()
        next_due: float | None = None
        for chat_key, ids in list(self._pending.items()):
            if chat_key in self._in_flight:
                continue
            while ids:
                record = self._updates[str(ids[0])]
                if now - record["created"] > KEEP_SECONDS:
                    self._finish(record, "dropped", "not delivered within a day")
                elif not _allowed(record["type"], hook["allowed_updates"]):
                    self._finish(record, "dropped", "not in the webhook's allowed_updates")
                else:
                    break
            if not ids:
                continue
            due = record["next_attempt_at"]
            if due > now:
                next_due = due if next_due is None else min(next_due, due)
            elif len(self._in_flight) < hook["max_connections"]:
                self._in_flight.add(chat_key)
                tg.create_task(self._attempt(http, chat_key, record, hook))
        return next_due

    async def _attempt(
        self,
        http: httpx.AsyncClient,
        chat_key: str,
        record: dict[str, Any],
        hook: dict[str, Any],
    ) -> None:
        try:
            status, error, reply = await self._post(http, hook, record["update"])
            if record["state"] == "pending":  # not dropped while the request ran
                self._record(record, status, error)
            if reply is not None:
                await self._reply(reply)
        finally:
            self._in_flight.discard(chat_key)
            self._wake.set()

    async def redeliver(self, update_id: int) -> dict[str, Any]:
        """Test control: POSTs a stored update to the webhook once more, as Telegram sometimes
        does after a lost answer; answers how the webhook took it. Raises KeyError, NoWebhook."""
        record = self._updates[str(update_id)]
        hook = self.webhook
        if hook is None:
            raise NoWebhook
        async with httpx.AsyncClient(timeout=DELIVERY_TIMEOUT) as http:
            status, error, reply = await self._post(http, hook, record["update"])
        record["redeliveries"] += 1
        if record["state"] == "pending":
            self._record(record, status, error)
        else:
            record["attempts"] += 1
            record["last_status"] = status
            record["last_error"] = error
            self._store.save()
        if reply is not None:
            await self._reply(reply)
        return {"update_id": update_id, "status": status, "error": error}

    async def _post(
        self, http: httpx.AsyncClient, hook: dict[str, Any], update: dict[str, Any]
    ) -> tuple[int | None, str | None, dict[str, Any] | None]:
        headers = {"Content-Type": "application/json"}
        if hook["secret_token"]:
            headers["X-Telegram-Bot-Api-Secret-Token"] = hook["secret_token"]
        try:
            response = await http.post(hook["url"], content=json.dumps(update), headers=headers)
        except httpx.HTTPError as exc:
            return None, f"Connection failed: {type(exc).__name__}: {exc}", None
        if not 200 <= response.status_code < 300:
            phrase = _phrase(response.status_code)
            return response.status_code, f"Wrong response from the webhook: {phrase}", None
        reply = None
        if response.headers.get("content-type", "").startswith("application/json"):
            with contextlib.suppress(ValueError):
                body = response.json()
                if isinstance(body, dict) and isinstance(body.get("method"), str):
                    reply = body
        return response.status_code, None, reply

    async def _reply(self, body: dict[str, Any]) -> None:
        if self.on_reply is None:
            return
        try:
            await self.on_reply(body)
        except Exception:  # a bad reply is the bot's problem, never the queue's
            logger.warning("webhook reply %r failed", body.get("method"), exc_info=True)

    def _record(self, record: dict[str, Any], status: int | None, error: str | None) -> None:
        now = time.time()
        record["attempts"] += 1
        record["last_status"] = status
        record["last_error"] = error
        if status is not None and 200 <= status < 300:
            self._finish(record, "delivered")
        else:
            # The exponent is capped only to keep the float finite; the delay cap binds first.
            backoff = self._first_retry * 2 ** min(record["attempts"] - 1, 32)
            record["next_attempt_at"] = now + min(backoff, MAX_RETRY_DELAY)
            self._meta["last_error"] = {"date": int(now), "message": error}
        self._store.save()

    def _finish(self, record: dict[str, Any], state: str, error: str | None = None) -> None:
        record["state"] = state
        record["next_attempt_at"] = None
        if error:
            record["last_error"] = error
        ids = self._pending.get(record["chat_key"], [])
        if record["update_id"] in ids:
            ids.remove(record["update_id"])
        if not ids:
            self._pending.pop(record["chat_key"], None)
        self._store.save()


def _allowed(update_type: str, allowed: list[str] | None) -> bool:
    return update_type in allowed if allowed else update_type not in NOT_DEFAULT


def _phrase(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)
