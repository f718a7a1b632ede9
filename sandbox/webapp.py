"""A stand-in for Telegram's WebApp script, so the Mini App runs in a plain browser.

`GET /webapp/telegram-web-app.js?user_id=N` defines `window.Telegram.WebApp` with the parts
of Telegram's API a shop uses, and `initData` signed for user N with the sandbox bot's token
exactly as Telegram signs it (the same signer as `/telegram/_sandbox/init-data`). Its
`openInvoice` shows a payment sheet whose Pay runs the sandbox's Stars handshake, so the bot
sees `pre_checkout_query` and then `successful_payment` as it would in Telegram.

The page runs on the shop's origin and this script talks to the sandbox, so the JSON routes
under /webapp answer cross-origin requests; nothing else in the sandbox does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from sandbox.telegram_core import TelegramSandbox

SCRIPT = (Path(__file__).resolve().parent / "assets" / "telegram-web-app.js").read_text()
CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "Content-Type",
    "Access-Control-Max-Age": "600",
}


class Pay(BaseModel):
    user_id: int = Field(gt=0)


def create_router(tg: TelegramSandbox, public_url: str) -> APIRouter:
    router = APIRouter(prefix="/webapp", include_in_schema=False)

    @router.get("/telegram-web-app.js")
    async def script(
        user_id: int = Query(default=1001, gt=0),
        first_name: str = Query(default="Sandbox", max_length=64),
    ) -> Response:
        config = {
            "initData": tg.init_data(user_id, first_name=first_name),
            "api": f"{public_url}/webapp",
            "userId": user_id,
        }
        body = f"window.__sandboxWebApp = {json.dumps(config)};\n{SCRIPT}"
        return Response(
            body,
            media_type="application/javascript",
            headers={"Cache-Control": "no-store", **CORS},
        )

    @router.options("/{path:path}")
    async def preflight(path: str) -> Response:
        return Response(status_code=204, headers=CORS)

    @router.get("/invoices/{slug}")
    async def invoice(slug: str) -> JSONResponse:
        try:
            found: dict[str, Any] = tg.stars.invoice(slug)
        except KeyError:
            return JSONResponse({"error": "not_found"}, status_code=404, headers=CORS)
        shown = {k: found[k] for k in ("title", "description", "amount", "currency")}
        return JSONResponse(shown, headers=CORS)

    @router.post("/invoices/{slug}/pay")
    async def pay(slug: str, body: Pay, request: Request) -> JSONResponse:
        try:
            outcome = await tg.stars.pay(slug, body.user_id)
        except KeyError:
            return JSONResponse({"error": "not_found"}, status_code=404, headers=CORS)
        return JSONResponse(outcome, headers=CORS)

    return router
