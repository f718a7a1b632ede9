"""Postgres: the notification outbox and the record of video starts (see db/migrations)."""

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


@dataclass
class StartClaim:
    """What the record says before a generate-video call."""

    file_id: str | None  # the provider's file, if an earlier attempt learnt it
    allowed: bool  # whether one more call may go out
    unconfirmed_starts: int  # calls sent so far without an answer, this one included


class VideoStarts:
    """Per video: generate-video calls sent without an answer, and the file id once known.

    Each call is counted before it is sent, in its own transaction, so that what a crash or
    a lost answer leaves behind is known to the next attempt.
    """

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def claim(self, order_id: str, index: int, max_unconfirmed: int) -> StartClaim:
        row = await self._pool.fetchrow(
            """
            INSERT INTO video_starts AS v (order_id, video_index, unconfirmed_starts)
            VALUES ($1, $2, 1)
            ON CONFLICT (order_id, video_index) DO UPDATE
                SET unconfirmed_starts = v.unconfirmed_starts + 1, updated_at = now()
                WHERE v.file_id IS NULL AND v.unconfirmed_starts < $3
            RETURNING file_id, unconfirmed_starts
            """,
            order_id,
            index,
            max_unconfirmed,
        )
        if row is not None:
            return StartClaim(None, True, row["unconfirmed_starts"])
        # Nothing updated: the file is known, or the policy allows no more calls.
        row = await self._pool.fetchrow(
            "SELECT file_id, unconfirmed_starts FROM video_starts"
            " WHERE order_id = $1 AND video_index = $2",
            order_id,
            index,
        )
        return StartClaim(row["file_id"], False, row["unconfirmed_starts"])

    async def release(self, order_id: str, index: int) -> None:
        """The call is known not to have started anything (never sent, or refused)."""
        await self._pool.execute(
            """
            UPDATE video_starts SET unconfirmed_starts = unconfirmed_starts - 1, updated_at = now()
            WHERE order_id = $1 AND video_index = $2 AND file_id IS NULL
              AND unconfirmed_starts > 0
            """,
            order_id,
            index,
        )

    async def confirm(self, order_id: str, index: int, file_id: str) -> str:
        """Stores the file an answer named; returns the video's file, the first one stored."""
        return await self._pool.fetchval(
            """
            UPDATE video_starts SET file_id = coalesce(file_id, $3), updated_at = now()
            WHERE order_id = $1 AND video_index = $2
            RETURNING file_id
            """,
            order_id,
            index,
            file_id,
        )

    async def file_id(self, order_id: str, index: int) -> str | None:
        return await self._pool.fetchval(
            "SELECT file_id FROM video_starts WHERE order_id = $1 AND video_index = $2",
            order_id,
            index,
        )
