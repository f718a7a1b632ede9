"""Dependencies shared by the routes."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Header, Request
from temporalio.client import Client

from api.errors import ApiError
from workers.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_temporal(request: Request) -> Client:
    client = request.app.state.temporal
    if client is None:
        client = await request.app.state.connect_temporal()
    return client


SettingsDep = Annotated[Settings, Depends(get_settings)]
TemporalClientDep = Annotated[Client, Depends(get_temporal)]


def require_admin(
    settings: SettingsDep, authorization: Annotated[str | None, Header()] = None
) -> None:
    if not settings.admin_token:
        raise ApiError(403, "admin_disabled", "set ADMIN_TOKEN to enable the admin routes")
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(
        token.encode(), settings.admin_token.encode()
    ):
        raise ApiError(401, "unauthorized", "a valid admin bearer token is required")


AdminDep = Annotated[None, Depends(require_admin)]
