"""SuperDuperAI video generation over its HTTP API.

One activity per video starts the generation and polls the file until it has a URL or a task
failed. Progress goes out as heartbeat details, not into workflow history, so polling costs
no history events.

A video is started at most as often as the shop decides. Every generate-video call is
counted in Postgres (activities.postgres.VideoStarts) before it is sent, and the file id is
stored as soon as an answer names it, so a retried attempt resumes polling that file. When
an earlier call's answer never arrived (a timeout, a dropped connection, a gateway's 5xx, a
crash mid-call) nobody knows whether the provider started a generation, and the real API
is not known to honour an idempotency key. The retry then sends the call again, with the
same Idempotency-Key, only while fewer than `max_unconfirmed_starts` calls went unanswered
(VIDEO_START_ATTEMPTS, default 2: one resend, at the risk of paying for one orphaned
generation). Past that the video fails as StartUnconfirmed and the workflow refunds its
share. A call known not to have left (connection refused) or refused (4xx, 429, 503) does
not count.

An attempt polls for at most `poll_window_seconds`, then fails as `GenerationPending` and the
server schedules the next attempt (retry-as-poll): no attempt holds a worker slot for the
whole generation, and the server, not the worker, owns the wait between attempts.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

import httpx
from temporalio import activity
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from activities.postgres import VideoStarts

# The failure type that ends an attempt whose video is still rendering (retry-as-poll).
GENERATION_PENDING = "GenerationPending"
# The failure type of a video whose start calls went unanswered more often than allowed.
START_UNCONFIRMED = "StartUnconfirmed"
# Every call to the provider, the start included, ends within this; the workflow derives
# the activity's heartbeat and start-to-close timeouts from it.
HTTP_TIMEOUT_SECONDS = 15.0
HTTP_TIMEOUT = httpx.Timeout(HTTP_TIMEOUT_SECONDS, connect=5.0)
# Answers that do not tell whether a generation started (a gateway gave up waiting, or the
# service broke mid-request). 503 and 429 say the request was not taken.
_UNCLEAR_STATUSES = frozenset({500, 502, 504})


@dataclass
class GenerateVideoRequest:
    order_id: str
    index: int
    prompt: str
    aspect_ratio: str
    duration: int
    generation_config_name: str
    poll_seconds: float
    poll_window_seconds: float
    max_unconfirmed_starts: int = 2


@dataclass
class VideoProgress:
    """Heartbeat details: what a retried attempt and the order page need to know."""

    file_id: str | None  # None while the start call is under way
    status: str
    progress: int


@dataclass
class VideoResult:
    file_id: str | None
    status: str  # completed | failed
    url: str | None = None
    thumbnail_url: str | None = None
    error: str | None = None


def _task_state(file: dict[str, Any]) -> tuple[str, int, str | None]:
    tasks = file.get("tasks") or []
    failed = [t for t in tasks if t.get("status") == "failed"]
    if failed:
        return "failed", 0, failed[0].get("error") or "generation failed"
    if file.get("url"):
        return "completed", 100, None
    progress = min((int(t.get("progress") or 0) for t in tasks), default=0)
    running = any(t.get("status") == "in_progress" for t in tasks)
    return ("generating" if running else "pending"), min(progress, 99), None


def _raise_for_status(resp: httpx.Response, what: str) -> None:
    if resp.status_code < 400:
        return
    # 4xx other than throttling and auth hiccups mean the request itself is wrong.
    retryable = resp.status_code in (408, 409, 425, 429) or resp.status_code >= 500
    raise ApplicationError(
        f"SuperDuperAI answered {resp.status_code} to {what}: {resp.text[:300]}",
        type="SuperDuperAIHTTPError",
        non_retryable=not retryable,
    )


class SuperDuperAIActivities:
    def __init__(self, http: httpx.AsyncClient, starts: VideoStarts) -> None:
        # The client carries base_url, the bearer token and HTTP_TIMEOUT.
        self._http = http
        self._starts = starts

    @activity.defn
    async def generate_video(self, req: GenerateVideoRequest) -> VideoResult:
        file_id = self._resumed_file_id() or await self._starts.file_id(req.order_id, req.index)
        if file_id is None:
            file_id = await self._start(req)
        activity.heartbeat(VideoProgress(file_id=file_id, status="pending", progress=0))
        window_ends = time.monotonic() + req.poll_window_seconds
        while True:
            async with asyncio.timeout(HTTP_TIMEOUT_SECONDS):
                resp = await self._http.get(f"/api/v1/file/{file_id}")
            _raise_for_status(resp, f"file {file_id}")
            file = resp.json()
            status, progress, error = _task_state(file)
            if status == "completed":
                return VideoResult(
                    file_id=file_id,
                    status="completed",
                    url=file["url"],
                    thumbnail_url=file.get("thumbnail_url"),
                )
            if status == "failed":
                return VideoResult(file_id=file_id, status="failed", error=error)
            activity.heartbeat(VideoProgress(file_id=file_id, status=status, progress=progress))
            # A stopping worker ends the window at once, so the next attempt runs elsewhere
            # instead of this one being cancelled mid-call.
            if time.monotonic() >= window_ends or activity.is_worker_shutdown():
                raise ApplicationError(
                    f"file {file_id} is {status} at {progress}%",
                    type=GENERATION_PENDING,
                    # Part of the polling design, not a fault: no error logs, no failure metrics.
                    category=ApplicationErrorCategory.BENIGN,
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(activity.wait_for_worker_shutdown(), req.poll_seconds)

    @staticmethod
    def _resumed_file_id() -> str | None:
        details = activity.info().heartbeat_details
        if not details:
            return None
        last = details[-1]
        return last.get("file_id") if isinstance(last, dict) else getattr(last, "file_id", None)

    async def _start(self, req: GenerateVideoRequest) -> str:
        claim = await self._starts.claim(req.order_id, req.index, req.max_unconfirmed_starts)
        if claim.file_id is not None:
            return claim.file_id
        if not claim.allowed:
            raise ApplicationError(
                f"generate-video was sent {claim.unconfirmed_starts} time(s) for video "
                f"{req.index} without an answer; not sending it again",
                type=START_UNCONFIRMED,
                non_retryable=True,
            )
        # The record says a start is under way; the order page says so too.
        activity.heartbeat(VideoProgress(file_id=None, status="starting", progress=0))
        body = {
            "config": {
                "prompt": req.prompt,
                "aspect_ratio": req.aspect_ratio,
                "duration": req.duration,
                "generation_config_name": req.generation_config_name,
            }
        }
        # A service that honours the key dedupes a resend; the record above covers one
        # that does not.
        headers = {"Idempotency-Key": f"{req.order_id}:{req.index}"}
        try:
            # httpx bounds each phase of a call (pool, connect, write, read) on its own; this
            # bounds the whole call, so it always ends inside the heartbeat timeout.
            async with asyncio.timeout(HTTP_TIMEOUT_SECONDS):
                resp = await self._http.post(
                    "/api/v1/file/generate-video", json=body, headers=headers
                )
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout):
            # Never reached the provider.
            await self._starts.release(req.order_id, req.index)
            raise
        except (httpx.TransportError, TimeoutError) as err:
            raise ApplicationError(
                f"generate-video went unanswered ({type(err).__name__})",
                type="StartUnanswered",
            ) from err
        if resp.status_code >= 400 and resp.status_code not in _UNCLEAR_STATUSES:
            await self._starts.release(req.order_id, req.index)
        _raise_for_status(resp, "generate-video")
        data = resp.json()
        # The API answers with the file, or a list of files for multi-output configs.
        file = data[0] if isinstance(data, list) else data
        file_id = str(file["id"])
        # Heartbeated first: if the write below fails, the next attempt still resumes it.
        activity.heartbeat(VideoProgress(file_id=file_id, status="pending", progress=0))
        return await self._starts.confirm(req.order_id, req.index, file_id)
