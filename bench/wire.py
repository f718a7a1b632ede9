"""HTTP/1.1 over plain sockets, for requests and event streams the bench times.

httpx costs a few milliseconds of client CPU per request under concurrency; with 50
requests in flight on the same cores as the stack, that alone came to p50 ~120 ms against
a bare health check that answers in ~6 ms, and 500 streams read through it would load the
machine more than the server they measure. The figures must be the server's, so the
bench writes requests and reads answers itself, one keep-alive connection per concurrent
sender as Stripe's or a browser's would be.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx


class RawConnection:
    """One keep-alive HTTP/1.1 connection with nothing between the socket and the timer."""

    def __init__(self, url: str) -> None:
        parts = httpx.URL(url)
        self.host = parts.host
        self.port = parts.port or 80
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        reused = self.writer is not None and not self.writer.is_closing()
        try:
            return await self._exchange(method, path, body, headers or {})
        except (asyncio.IncompleteReadError, ConnectionError):
            if not reused:
                raise
        # The server closed an idle keep-alive connection: send again on a new one, as
        # browsers and HTTP clients do.
        await self.close()
        return await self._exchange(method, path, body, headers or {})

    async def _exchange(
        self, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        head += [f"Content-Length: {len(body)}", "", ""]
        self.writer.write("\r\n".join(head).encode() + body)
        await self.writer.drain()
        status, fields = await _read_head(self.reader)
        if fields.get("transfer-encoding", "").lower() == "chunked":
            content = b"".join([chunk async for chunk in _chunks(self.reader)])
        else:
            content = await self.reader.readexactly(int(fields.get("content-length", "0")))
        if fields.get("connection", "").lower() == "close":
            await self.close()
        return status, content

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> int:
        status, _ = await self.request("POST", path, body, headers)
        return status

    async def post_json(self, path: str, payload: Any) -> tuple[int, Any]:
        status, content = await self.request(
            "POST",
            path,
            json.dumps(payload).encode(),
            {"Content-Type": "application/json"},
        )
        return status, json.loads(content) if content else None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
            self.writer = None


class OrderStream:
    """One page watching an order: GET /api/video-orders/{id}/events, read as it arrives.

    Keeps the arrival time of every status the stream shows, so that the delay from a
    change (a payment) to this watcher can be read off afterwards.
    """

    def __init__(self, api_url: str, order_id: str) -> None:
        self.api_url = api_url
        self.order_id = order_id
        self.statuses: list[tuple[float, str]] = []
        self.opened = asyncio.Event()  # the first event arrived (or the stream failed)
        self.error: str | None = None
        self.ended = False
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._changed = asyncio.Condition()

    def start(self) -> OrderStream:
        self._task = asyncio.create_task(self._run())
        return self

    def first_past(self, status: str) -> float | None:
        """When the stream first showed a status other than `status`."""
        return next((t for t, s in self.statuses if s != status), None)

    async def wait_past(self, status: str, timeout: float) -> float | None:
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._changed.wait_for(
                        lambda: self.first_past(status) is not None or self.ended
                    ),
                    timeout,
                )
        return self.first_past(status)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await self._task

    async def _run(self) -> None:
        try:
            await self._read()
        except (OSError, asyncio.IncompleteReadError, ValueError) as err:
            self.error = self.error or f"{type(err).__name__}: {err}"
        finally:
            self.ended = True
            self.opened.set()
            async with self._changed:
                self._changed.notify_all()

    async def _read(self) -> None:
        url = httpx.URL(self.api_url)
        reader, self._writer = await asyncio.open_connection(url.host, url.port or 80)
        request = (
            f"GET /api/video-orders/{self.order_id}/events HTTP/1.1\r\n"
            f"Host: {url.host}:{url.port}\r\nAccept: text/event-stream\r\n\r\n"
        )
        self._writer.write(request.encode())
        await self._writer.drain()
        status, fields = await _read_head(reader)
        if status != 200:
            body = await reader.read(500)
            self.error = f"HTTP {status}: {body.decode(errors='replace')}"
            return
        chunked = fields.get("transfer-encoding", "").lower() == "chunked"
        pieces = _chunks(reader) if chunked else _until_closed(reader)
        # Bytes until an event is whole: a chunk may end inside a UTF-8 character.
        buffer = b""
        async for piece in pieces:
            buffer = (buffer + piece).replace(b"\r\n", b"\n")
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                await self._on_event(event.decode())

    async def _on_event(self, event: str) -> None:
        data = "\n".join(
            line.removeprefix("data:").removeprefix(" ")
            for line in event.split("\n")
            if line.startswith("data:")
        )
        if not data:
            return  # a comment (keep-alive) or an event without data
        arrived = time.perf_counter()
        payload = json.loads(data)
        status = payload.get("status") if isinstance(payload, dict) else None
        if not isinstance(status, str):
            return
        if not self.statuses or self.statuses[-1][1] != status:
            self.statuses.append((arrived, status))
        self.opened.set()
        async with self._changed:
            self._changed.notify_all()


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line, *header_lines = (
        (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    )
    fields = dict(
        (k.strip().lower(), v.strip())
        for k, _, v in (line.partition(":") for line in header_lines if line)
    )
    return int(status_line.split()[1]), fields


async def _chunks(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
        yield (await reader.readexactly(size + 2))[:-2]
    await reader.readuntil(b"\r\n")


async def _until_closed(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while piece := await reader.read(65536):
        yield piece
