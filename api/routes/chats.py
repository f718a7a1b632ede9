"""Operators and the assistant's chats, behind ADMIN_TOKEN: answer as the shop, turn the
assistant back on after a handoff, read a chat."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Path
from pydantic import BaseModel, ConfigDict, Field

from api import chat, shop
from api.deps import AdminDep, SettingsDep, TemporalClientDep
from api.errors import ApiError
from workflows.chat import OperatorReply

router = APIRouter(prefix="/api/admin/chats", tags=["admin"])

ChatId = Annotated[int, Path(ge=-(2**52), le=2**52)]


class ReplyBody(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    text: str = Field(min_length=1, max_length=4000)
    # The same id twice sends once (a retried request); one is made when it is left out.
    reply_id: str | None = Field(default=None, min_length=1, max_length=100)


class AssistantBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool


@router.post("/{chat_id}/reply")
async def reply(
    _: AdminDep,
    settings: SettingsDep,
    temporal: TemporalClientDep,
    chat_id: ChatId,
    body: ReplyBody,
) -> dict[str, Any]:
    shop.require_shop(settings)
    reply_id = body.reply_id or str(uuid.uuid4())
    try:
        outcome = await chat.operator_reply(
            temporal, settings, chat_id, OperatorReply(reply_id=reply_id, text=body.text)
        )
    except ApiError as err:
        if err.status != 503 or body.reply_id:
            raise
        # The reply may still go out: a retry with this id sends it once.
        raise ApiError(503, err.error, f"{err.detail} with reply_id {reply_id!r}") from err
    return {"chat_id": chat_id, "reply_id": reply_id, "delivery": outcome}


@router.post("/{chat_id}/assistant")
async def assistant(
    _: AdminDep,
    settings: SettingsDep,
    temporal: TemporalClientDep,
    chat_id: ChatId,
    body: AssistantBody,
) -> dict[str, Any]:
    shop.require_shop(settings)
    view = await chat.set_assistant(temporal, settings, chat_id, body.enabled)
    return {"chat_id": chat_id, "assistant_enabled": view.assistant_enabled}


@router.get("/{chat_id}")
async def read(_: AdminDep, temporal: TemporalClientDep, chat_id: ChatId) -> dict[str, Any]:
    return dataclasses.asdict(await chat.read_chat(temporal, chat_id))
