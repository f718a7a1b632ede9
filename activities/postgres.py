"""Postgres: the notification outbox (see db/migrations)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from temporalio import activity


@dataclass
class Notification:
    order_id: str
    kind: str
    channel: str
    recipient: str | None
    payload: dict[str, Any] = field(default_factory=dict)


class OrderStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @activity.defn
    async def record_notification(self, note: Notification) -> bool:
        """Queues a notification once per (order, kind); True if this call queued it."""
        row = await self._pool.fetchrow(
            """
            INSERT INTO notifications (order_id, kind, channel, recipient, payload)
            VALUES ($1, $2, $3, $4, $5::jsonb)
            ON CONFLICT (order_id, kind) DO NOTHING
            RETURNING id
            """,
            note.order_id,
            note.kind,
            note.channel,
            note.recipient,
            json.dumps(note.payload),
        )
        return row is not None
