"""Stripe events and their webhook deliveries, signed and retried the way Stripe does it.

Each event is stored with a delivery record; the delivery worker POSTs due deliveries
concurrently and reschedules failures with exponential backoff. Records are persisted, so
deliveries that were pending when the sandbox stopped are attempted again after a restart.
Like Stripe, delivery is at least once and in no guaranteed order.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import hmac
import json
import time
from typing import Any

import httpx

from sandbox.store import JsonStore
from sandbox.stripe_ids import new_id

API_VERSION = "2025-01-27.acacia"
MAX_RETRY_DELAY = 60.0
# Stripe keeps retrying a failing endpoint for up to three days.
GIVE_UP_AFTER = 3 * 24 * 3600
DELIVERY_TIMEOUT = 10.0


def sign(payload: str | bytes, secret: str, timestamp: int | None = None) -> str:
    """The `Stripe-Signature` header value for `payload` (scheme v1), signed now by default."""
    if timestamp is None:
        timestamp = int(time.time())
    body = payload.encode() if isinstance(payload, str) else payload
    signed = f"{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


class StripeEvents:
    def __init__(
        self, store: JsonStore, *, url: str | None, secret: str, first_retry: float
    ) -> None:
        self._store = store
        self._events = store.collection("events")
        self._deliveries = store.collection("deliveries")
        self._url = url
        self._secret = secret
        self._first_retry = first_retry
        self._in_flight: set[str] = set()
        self._wake = asyncio.Event()

    def emit(self, event_type: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Record an event about `obj` and queue its delivery; the caller saves the store."""
        now = time.time()
        event = {
            "id": new_id("evt"),
            "object": "event",
            "api_version": API_VERSION,
            "created": int(now),
            "type": event_type,
            "livemode": False,
            "pending_webhooks": 1 if self._url else 0,
            # A snapshot: later changes to the object must not rewrite what was sent.
            "data": {"object": copy.deepcopy(obj)},
            "request": {"id": None, "idempotency_key": None},
        }
        self._events[event["id"]] = event
        if self._url:
            self._deliveries[event["id"]] = {
                "event_id": event["id"],
                "type": event_type,
                "attempts": 0,
                "delivered": False,
                "last_status": None,
                "last_error": None,
                "next_attempt_at": now,
            }
            self._wake.set()
        return event

    def get(self, event_id: str) -> dict[str, Any] | None:
        event = self._events.get(event_id)
        if event is None:
            return None
        delivery = self._deliveries.get(event_id)
        pending = delivery is not None and not delivery["delivered"]
        return {**event, "pending_webhooks": int(pending)}

    def deliveries(self) -> list[dict[str, Any]]:
        return list(self._deliveries.values())

    async def deliver_forever(self) -> None:
        async with httpx.AsyncClient(timeout=DELIVERY_TIMEOUT) as http, asyncio.TaskGroup() as tg:
            while True:
                self._wake.clear()
                now = time.time()
                next_due: float | None = None
                for delivery in self._deliveries.values():
                    due = delivery["next_attempt_at"]
                    if due is None or delivery["event_id"] in self._in_flight:
                        continue
                    if due <= now:
                        self._in_flight.add(delivery["event_id"])
                        tg.create_task(self._attempt(http, delivery))
                    else:
                        next_due = due if next_due is None else min(next_due, due)
                timeout = None if next_due is None else next_due - now
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()

    async def _attempt(self, http: httpx.AsyncClient, delivery: dict[str, Any]) -> None:
        try:
            status, error = await self._post(http, self._events[delivery["event_id"]])
            self._record(delivery, status, error)
        finally:
            self._in_flight.discard(delivery["event_id"])
            # The worker may be asleep until a later deadline than this delivery's retry.
            self._wake.set()

    async def _post(
        self, http: httpx.AsyncClient, event: dict[str, Any]
    ) -> tuple[int | None, str | None]:
        assert self._url is not None
        payload = json.dumps(event)
        # Stripe signs every attempt afresh, so a retry carries a current timestamp.
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "Stripe-Signature": sign(payload, self._secret),
            "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
        }
        try:
            response = await http.post(self._url, content=payload, headers=headers)
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}"
        return response.status_code, None

    def _record(self, delivery: dict[str, Any], status: int | None, error: str | None) -> None:
        now = time.time()
        delivery["attempts"] += 1
        delivery["last_status"] = status
        delivery["last_error"] = error
        delivery["delivered"] = status is not None and 200 <= status < 300
        created = self._events[delivery["event_id"]]["created"]
        if delivery["delivered"] or now - created > GIVE_UP_AFTER:
            delivery["next_attempt_at"] = None
        else:
            # The exponent is capped only to keep the float finite; the delay cap binds first.
            backoff = self._first_retry * 2 ** min(delivery["attempts"] - 1, 32)
            delivery["next_attempt_at"] = now + min(backoff, MAX_RETRY_DELAY)
        self._store.save()
