"""SuperDuperAI video generation over its HTTP API.

One activity per video starts the generation and polls the file until it has a URL or a task
failed. Progress goes out as heartbeat details, not into workflow history, so polling costs
no history events; the file id is heartbeated as soon as it exists, so a retried attempt
resumes polling the same file instead of paying for a second generation.

An attempt polls for at most `poll_window_seconds`, then fails as `GenerationPending` and the
server schedules the next attempt (retry-as-poll): no attempt holds a worker slot for the
whole generation, and the server, not the worker, owns the wait between attempts.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import httpx
from temporalio import activity
from temporalio.exceptions import ApplicationError

# The failure type that ends an attempt whose video is still rendering (retry-as-poll).
GENERATION_PENDING = "GenerationPending"


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


@dataclass
class VideoProgress:
    """Heartbeat details: what a retried attempt and the order page need to know."""

    file_id: str
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
    def __init__(self, http: httpx.AsyncClient) -> None:
        # The client carries base_url and the bearer token.
        self._http = http

    @activity.defn
    async def generate_video(self, req: GenerateVideoRequest) -> VideoResult:
        file_id = self._resumed_file_id()
        if file_id is None:
            file_id = await self._start(req)
        activity.heartbeat(VideoProgress(file_id=file_id, status="pending", progress=0))
        window_ends = time.monotonic() + req.poll_window_seconds
        while True:
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
            if time.monotonic() >= window_ends:
                raise ApplicationError(
                    f"file {file_id} is {status} at {progress}%", type=GENERATION_PENDING
                )
            await asyncio.sleep(req.poll_seconds)

    @staticmethod
    def _resumed_file_id() -> str | None:
        details = activity.info().heartbeat_details
        if not details:
            return None
        last = details[-1]
        return last.get("file_id") if isinstance(last, dict) else getattr(last, "file_id", None)

    async def _start(self, req: GenerateVideoRequest) -> str:
        body = {
            "config": {
                "prompt": req.prompt,
                "aspect_ratio": req.aspect_ratio,
                "duration": req.duration,
                "generation_config_name": req.generation_config_name,
            }
        }
        # The key names this video of this order. A service that honours it dedupes a start
        # whose answer was lost; the heartbeated file id covers one that does not.
        headers = {"Idempotency-Key": f"{req.order_id}:{req.index}"}
        resp = await self._http.post("/api/v1/file/generate-video", json=body, headers=headers)
        _raise_for_status(resp, "generate-video")
        data = resp.json()
        # The API answers with the file, or a list of files for multi-output configs.
        file = data[0] if isinstance(data, list) else data
        return str(file["id"])
