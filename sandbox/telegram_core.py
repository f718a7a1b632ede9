"""The simulated Telegram Bot API for one bot: dispatch, webhook settings and Mini App data.

The state lives in three parts that share one JSON document: the update queue and its
webhook delivery (telegram_updates), the chats with their messages and files
(telegram_chats), and Stars payments (telegram_stars). Only SANDBOX_TELEGRAM_TOKEN is
accepted: the sandbox never holds a real bot's token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

from sandbox.config import SandboxConfig
from sandbox.store import JsonStore
from sandbox.telegram_chats import BOT, Method, TelegramChats
from sandbox.telegram_params import BotApiError, Params, bad_request
from sandbox.telegram_stars import TelegramStars
from sandbox.telegram_updates import DEFAULT_MAX_CONNECTIONS, TelegramUpdates, WebhookActive
from workers.settings import SANDBOX_TELEGRAM_TOKEN

logger = logging.getLogger(__name__)

SECRET_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{1,256}")


@dataclass
class Described:
    """A result that Telegram answers with a description too (setWebhook's "Webhook was set")."""

    result: Any
    description: str


class TelegramSandbox:
    def __init__(self, config: SandboxConfig) -> None:
        self.token = SANDBOX_TELEGRAM_TOKEN
        self.store = JsonStore(config.data_dir / "telegram.json")
        self.updates = TelegramUpdates(
            self.store, first_retry=config.telegram_webhook_retry_seconds
        )
        self.updates.on_reply = self._webhook_reply
        self.chats = TelegramChats(self.store, self.updates, config.telegram_chat_interval_seconds)
        self.stars = TelegramStars(
            self.store, self.chats, self.updates, config.telegram_precheckout_timeout_seconds
        )
        methods: dict[str, Method] = {
            "getMe": self._get_me,
            "setWebhook": self._set_webhook,
            "deleteWebhook": self._delete_webhook,
            "getWebhookInfo": self._get_webhook_info,
            "getUpdates": self._get_updates,
            **self.chats.methods(),
            **self.stars.methods(),
        }
        # Telegram matches method names case-insensitively.
        self._methods = {name.lower(): method for name, method in methods.items()}

    async def call(self, method: str, params: Params) -> Any:
        """Runs a Bot API method; raises BotApiError with Telegram's answer."""
        handler = self._methods.get(method.lower())
        if handler is None:
            raise BotApiError(404, "Not Found: method not found")
        return await handler(params)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Delivers updates to the webhook while the app is up."""
        task = asyncio.create_task(self.updates.deliver_forever(), name="telegram-webhooks")
        task.add_done_callback(_log_crash)
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _webhook_reply(self, body: dict[str, Any]) -> None:
        values = {key: value for key, value in body.items() if key != "method"}
        try:
            await self.call(body["method"], Params(values))
        except BotApiError as err:
            logger.info("webhook reply %s refused: %s", body["method"], err.description)

    async def _get_me(self, _p: Params) -> dict[str, Any]:
        return {
            **BOT,
            "can_join_groups": False,
            "can_read_all_group_messages": False,
            "supports_inline_queries": False,
        }

    async def _set_webhook(self, p: Params) -> Described:
        url = p.text("url") or ""
        if not url:
            return await self._delete_webhook(p)
        parts = urlsplit(url)
        # Telegram wants https on ports 443, 80, 88 or 8443; the local stack serves plain http.
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise bad_request("bad webhook: An HTTPS URL must be provided for webhook")
        secret = p.text("secret_token")
        if secret is not None and not SECRET_TOKEN_RE.fullmatch(secret):
            raise bad_request("secret token contains unallowed characters")
        allowed = p.parsed("allowed_updates")
        if allowed is not None and not (
            isinstance(allowed, list) and all(isinstance(a, str) for a in allowed)
        ):
            raise bad_request("can't parse allowed_updates JSON object")
        connections = p.integer("max_connections") or DEFAULT_MAX_CONNECTIONS
        self.updates.set_webhook(
            url,
            secret,
            allowed,
            max_connections=min(max(connections, 1), 100),
            drop_pending=p.flag("drop_pending_updates"),
        )
        return Described(True, "Webhook was set")

    async def _delete_webhook(self, p: Params) -> Described:
        had = self.updates.delete_webhook(p.flag("drop_pending_updates"))
        return Described(True, "Webhook was deleted" if had else "Webhook is already deleted")

    async def _get_webhook_info(self, _p: Params) -> dict[str, Any]:
        return self.updates.webhook_info()

    async def _get_updates(self, p: Params) -> list[dict[str, Any]]:
        limit = min(max(p.integer("limit") or 100, 1), 100)
        try:
            return await self.updates.get_updates(
                p.integer("offset") or 0,
                limit,
                float(p.integer("timeout") or 0),
                p.parsed("allowed_updates"),
            )
        except WebhookActive:
            raise BotApiError(
                409,
                "Conflict: can't use getUpdates method while webhook is active; "
                "use deleteWebhook to delete the webhook first",
            ) from None

    def init_data(
        self,
        user_id: int,
        auth_date: int | None = None,
        start_param: str | None = None,
        **names: str | None,
    ) -> str:
        """Mini App initData for the user, signed with the bot token as Telegram signs it."""
        user = {**self.chats.user(user_id, **names), "allows_write_to_pm": True}
        user.pop("is_bot", None)
        fields = {
            "query_id": "AAH" + secrets.token_urlsafe(16),
            "user": json.dumps(user, separators=(",", ":"), ensure_ascii=False),
            "auth_date": str(auth_date if auth_date is not None else int(time.time())),
        }
        if start_param:
            fields["start_param"] = start_param
        check = "\n".join(f"{key}={value}" for key, value in sorted(fields.items()))
        secret = hmac.new(b"WebAppData", self.token.encode(), hashlib.sha256).digest()
        fields["hash"] = hmac.new(secret, check.encode(), hashlib.sha256).hexdigest()
        return urlencode(fields)


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("sandbox task %s crashed", task.get_name(), exc_info=task.exception())
