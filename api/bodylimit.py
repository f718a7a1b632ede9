"""Request body caps: a body over its path's cap is a 413 before the app reads it.

A declared Content-Length over the cap is answered before the app runs at all; a chunked
body is counted as it arrives and refused once it passes the cap, so no request holds more
than the cap in memory. What the client still sends after the answer, uvicorn discards.

Not FastAPI's own `max_body_size`: it replaces whatever the app answers to an over-declared
body with a plain-text 413, after the route has run, where we want the route never to run
and the answer to be our JSON error.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response


class BodyTooLarge(HTTPException):
    """Raised by receive() inside the app. An HTTPException, so that FastAPI passes it on
    instead of calling it a malformed body, and the app's handler answers the 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than {limit // 1024} KiB")


class BodyLimit:
    """Pure ASGI middleware: `default` bytes for any path, or the cap of the longest prefix
    in `by_prefix` that the path starts with."""

    def __init__(self, app: ASGIApp, default: int, by_prefix: dict[str, int]) -> None:
        self.app = app
        self._default = default
        self._by_prefix = sorted(by_prefix.items(), key=lambda item: -len(item[0]))

    def limit(self, path: str) -> int:
        return next((n for p, n in self._by_prefix if path.startswith(p)), self._default)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit(scope["path"])
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _refuse(BodyTooLarge(limit), scope, receive, send)
            return

        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def watching_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except BodyTooLarge as err:
            # Only if no handler of the app answered it already.
            if started:
                raise
            await _refuse(err, scope, receive, send)


async def _refuse(err: BodyTooLarge, scope: Scope, receive: Receive, send: Send) -> None:
    response = error_response(err.status_code, "payload_too_large", err.detail)
    await response(scope, receive, send)
