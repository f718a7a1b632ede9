"""SuperDuperAI's video generation API: start a generation, then poll the file until it is done.

A generation's progress is a pure function of the wall-clock time since it started, so it
needs no background work and simply carries on across sandbox restarts. Prompts steer the
outcome for tests: `#fail` fails the task halfway, `#flaky` fails every second generation
asked for with the same prompt (so an order of several videos gets some of each),
`#stall` never finishes. `#lost-start` starts the generation and then loses the answer (a
504, as from a gateway that gave up waiting), every time; `#lost-start-once` only for the
first start with that prompt. Both ignore the Idempotency-Key, as a real API may, so every
call really starts one more generation; `GET /superduperai/_sandbox/files?prompt=` counts them.
"""

from __future__ import annotations

import secrets
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, HTTPException
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from sandbox.config import SandboxConfig
from sandbox.store import JsonStore

ASSETS = Path(__file__).parent / "assets"
# Fractions of video_seconds: queued before it starts, failing at half-way.
PENDING_FRACTION = 0.1
FAIL_FRACTION = 0.5
STALL_PROGRESS = 90


class VideoConfig(BaseModel):
    # The real API takes many more generation options; pass them through unchecked.
    model_config = ConfigDict(extra="allow")

    prompt: str = Field(min_length=1)
    aspect_ratio: Literal["16:9", "9:16", "1:1"] = "16:9"
    duration: int = Field(default=5, gt=0)
    generation_config_name: str | None = None
    seed: int | None = None
    negative_prompt: str | None = None


class GenerateVideo(BaseModel):
    config: VideoConfig


class SuperDuperAISandbox:
    def __init__(self, config: SandboxConfig) -> None:
        self._public_url = config.public_url
        self._seconds = config.video_seconds
        self.store = JsonStore(config.data_dir / "superduperai.json")
        self._files = self.store.collection("files")
        self._idempotency_keys = self.store.collection("idempotency_keys")

    def generate(
        self, config: VideoConfig, idempotency_key: str | None
    ) -> tuple[dict[str, Any], bool]:
        """The new (or, for a known key, first) file, and whether the answer gets lost."""
        earlier = len(self.files_with_prompt(config.prompt))
        loses = "#lost-start" in config.prompt and (
            "#lost-start-once" not in config.prompt or earlier == 0
        )
        if "#lost-start" in config.prompt:
            idempotency_key = None
        # A sandbox courtesy, not a documented feature of the real API: a repeated
        # Idempotency-Key returns the first file. Clients must not rely on it.
        if idempotency_key is not None and idempotency_key in self._idempotency_keys:
            return self.view(self._idempotency_keys[idempotency_key]), False
        now = time.time()
        file_id = str(uuid.uuid4())
        fails = "#fail" in config.prompt or ("#flaky" in config.prompt and earlier % 2 == 1)
        self._files[file_id] = {
            "id": file_id,
            "fails": fails,
            "config": config.model_dump(),
            "created_at": datetime.fromtimestamp(now, UTC).isoformat(),
            "started_at": now,
            "task_id": str(uuid.uuid4()),
        }
        if idempotency_key is not None:
            self._idempotency_keys[idempotency_key] = file_id
        self.store.save()
        return self.view(file_id), loses

    def files_with_prompt(self, prompt: str) -> list[str]:
        return [f["id"] for f in self._files.values() if f["config"]["prompt"] == prompt]

    def view(self, file_id: str) -> dict[str, Any]:
        """The file as the API shows it now; raises KeyError for an unknown id."""
        record = self._files[file_id]
        status, progress, error = self._task_state(record)
        done = status == "completed"
        media = f"{self._public_url}/superduperai/media/{file_id}"
        return {
            "id": file_id,
            "url": f"{media}.mp4" if done else None,
            "thumbnail_url": f"{media}.jpg" if done else None,
            "type": "video",
            "config": record["config"],
            "tasks": [
                {
                    "id": record["task_id"],
                    "type": "video-generation",
                    "status": status,
                    "progress": progress,
                    "error": error,
                }
            ],
            "created_at": record["created_at"],
        }

    def is_ready(self, file_id: str) -> bool:
        return file_id in self._files and self._task_state(self._files[file_id])[0] == "completed"

    def _task_state(self, record: dict[str, Any]) -> tuple[str, int, str | None]:
        elapsed = time.time() - record["started_at"]
        prompt = record["config"]["prompt"]
        pending = PENDING_FRACTION * self._seconds

        def progress_at(seconds: float) -> int:
            return int(100 * (seconds - pending) / (self._seconds - pending))

        if elapsed < pending:
            return "pending", 0, None
        if record.get("fails") and elapsed >= FAIL_FRACTION * self._seconds:
            error = "Video generation failed (sandbox: the prompt asked for a failure)."
            return "failed", progress_at(FAIL_FRACTION * self._seconds), error
        if "#stall" in prompt:
            return "in_progress", min(progress_at(elapsed), STALL_PROGRESS), None
        if elapsed >= self._seconds:
            return "completed", 100, None
        return "in_progress", progress_at(elapsed), None


def create_router(videos: SuperDuperAISandbox, token: str) -> APIRouter:
    def authenticate(authorization: Annotated[str | None, Header()] = None) -> None:
        expected = f"Bearer {token}".encode()
        if authorization is None or not secrets.compare_digest(authorization.encode(), expected):
            raise HTTPException(401, "Invalid or missing token")

    api = APIRouter(prefix="/api/v1", dependencies=[Depends(authenticate)])

    @api.post("/file/generate-video")
    async def generate_video(
        body: GenerateVideo, idempotency_key: Annotated[str | None, Header()] = None
    ) -> dict[str, Any]:
        file, lost = videos.generate(body.config, idempotency_key)
        if lost:
            raise HTTPException(504, "Gateway Timeout")
        return file

    @api.get("/file/{file_id}")
    async def get_file(file_id: str) -> dict[str, Any]:
        try:
            return videos.view(file_id)
        except KeyError:
            raise HTTPException(404, "File not found") from None

    # Media URLs go straight into <video> and <img> tags, which send no Authorization header.
    media = APIRouter(prefix="/media")

    def asset(file_id: str, name: str, media_type: str) -> FileResponse:
        if not videos.is_ready(file_id):
            raise HTTPException(404, "Not found")
        return FileResponse(ASSETS / name, media_type=media_type)

    @media.get("/{file_id}.mp4")
    async def video(file_id: str) -> FileResponse:
        return asset(file_id, "sample.mp4", "video/mp4")

    @media.get("/{file_id}.jpg")
    async def thumbnail(file_id: str) -> FileResponse:
        return asset(file_id, "sample.jpg", "image/jpeg")

    control = APIRouter(prefix="/_sandbox")

    @control.get("/files")
    async def files(prompt: str) -> dict[str, Any]:
        """Test control: the generations started with a prompt, however their answers went."""
        return {"file_ids": videos.files_with_prompt(prompt)}

    router = APIRouter(prefix="/superduperai", tags=["superduperai"])
    router.include_router(api)
    router.include_router(control)
    router.include_router(media)
    return router
