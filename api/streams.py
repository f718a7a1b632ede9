"""Order event streams that cost Temporal per watched order, not per visitor.

Each API process keeps one reader per watched order: the first watcher starts it, it reads
the order once per STREAM_POLL_SECONDS and hands each changed view to every watcher, and the
last watcher to leave stops it. Streams are capped per client address and in total, live at
most STREAM_MAX_SECONDS, end once the order's workflow has closed, and end at once when the
server stops, since uvicorn waits for open responses before it stops.

What a stream sends:
- `event: order` with the view, at once and then whenever it changes;
- `event: error` with `{"error": code}` when the order is gone (the page stops);
- `event: end` when the workflow closed without a final status (the page stops);
- `retry:` with `event: reconnect` when the stream reached its lifetime or the server is
  stopping: the browser reconnects after that many milliseconds, to this process or another.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from api.errors import ApiError
from workers.settings import Settings

log = logging.getLogger(__name__)

# Reads the order's view and whether its workflow is still running.
ReadOrder = Callable[[], Awaitable[tuple[dict[str, Any], bool]]]

# Proxies drop connections that stay silent for about a minute; a comment keeps them open.
KEEPALIVE_SECONDS = 15.0
# After a poke, up to this many reads this far apart until the view changes, then the
# normal poll interval again.
QUICK_READS_AFTER_POKE = 10
QUICK_READ_SECONDS = 0.1
# How long a browser waits before reconnecting a stream that ended by design.
RECONNECT_MS = 2000
STREAM_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}


class _Reader:
    """Reads one order for all of its watchers."""

    def __init__(self, hub: OrderStreams, order_id: str, read: ReadOrder) -> None:
        self._hub = hub
        self.order_id = order_id
        self._read = read
        self.watchers = 0
        self.body: str | None = None  # the latest view, as JSON
        self.version = 0  # counts changes of body
        # Set once no view will follow: "closed" (the workflow closed) or "gone" (404).
        self.ended: str | None = None
        self.final = False
        self.error: str | None = None
        self._changed = asyncio.Event()
        # Set by poke(): something just happened to the order (a webhook signalled it).
        self._poked = asyncio.Event()
        self._quick_reads = 0
        self._poked_version = 0
        # The first read, which every watcher waits for: a 404 or 503 answers the request
        # before a stream opens.
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Retrieved here, so that a first failure nobody waits for any more is not logged.
        self.ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.task = asyncio.create_task(self._run(), name=f"order-stream:{order_id}")
        # A task cancelled before its first step never runs its body, so only a callback on
        # the task itself answers the watchers waiting in open() on every path.
        self.task.add_done_callback(self._unready)

    def _unready(self, task: asyncio.Task[None]) -> None:
        if self.ready.done():
            return
        self._hub._drop(self)
        if task.cancelled() or task.exception() is None:
            self.ready.set_exception(_stopping())
        else:
            self.ready.set_exception(task.exception())

    async def _run(self) -> None:
        view, running = await self._fetch()  # a failure answers open() through _unready
        self._publish(view, running)
        self.ready.set_result(None)
        while self.ended is None:
            await self._nap()
            try:
                view, running = await self._fetch()
            except ApiError as err:
                if err.status != 404:
                    # No worker or no Temporal for a moment: the order is safe, so the
                    # watchers wait it out instead of losing the customer's live page.
                    continue
                self.error = err.error
                self._end("gone")
                return
            except Exception:
                log.exception("reading order %s for its watchers", self.order_id)
                continue
            self._publish(view, running)

    async def _nap(self) -> None:
        """One poll interval, cut short by a poke; a few quick reads follow a poke, since
        the workflow may still be acting on what the webhook told it."""
        if self._quick_reads > 0 and self.version == self._poked_version:
            # Until the view shows what the poke announced, or the quick reads run out.
            self._quick_reads -= 1
            await asyncio.sleep(QUICK_READ_SECONDS)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._poked.wait(), self._hub.poll_seconds)
        if self._poked.is_set():
            self._poked.clear()
            self._quick_reads = QUICK_READS_AFTER_POKE
            self._poked_version = self.version

    def poke(self) -> None:
        self._poked.set()

    async def _fetch(self) -> tuple[dict[str, Any], bool]:
        self._hub.order_reads_total += 1
        return await self._read()

    def _publish(self, view: dict[str, Any], running: bool) -> None:
        body = json.dumps(view, sort_keys=True)
        if body != self.body:
            self.body = body
            self.version += 1
        if view.get("final") or not running:
            self.final = bool(view.get("final"))
            self._end("closed")
        else:
            self.wake()

    def _end(self, why: str) -> None:
        self.ended = why
        self._hub._drop(self)
        self.wake()

    def wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait(self, version: int, timeout: float) -> None:
        """Until the view changes from `version`, the reader ends or the hub stops."""
        if self.version != version or self.ended or self._hub.stopping:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), max(timeout, 0))


class _Watch:
    """One open stream: one place under the caps until it closes."""

    def __init__(self, hub: OrderStreams, client: str, deadline: float) -> None:
        self._hub = hub
        self.client = client
        self.deadline = deadline
        self.reader: _Reader | None = None
        self._closed = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._hub._release(self)

    async def events(self) -> AsyncIterator[str]:
        hub, reader = self._hub, self.reader
        assert reader is not None
        loop = asyncio.get_running_loop()
        sent = 0
        quiet_since = loop.time()
        try:
            while True:
                if reader.version != sent:
                    sent = reader.version
                    quiet_since = loop.time()
                    yield f"event: order\ndata: {reader.body}\n\n"
                if reader.ended == "gone":
                    yield f"event: error\ndata: {json.dumps({'error': reader.error})}\n\n"
                    return
                if reader.ended == "closed":
                    if not reader.final:
                        yield 'event: end\ndata: {"reason": "closed"}\n\n'
                    return
                now = loop.time()
                if hub.stopping or now >= self.deadline:
                    reason = "stopping" if hub.stopping else "max_lifetime"
                    data = json.dumps({"reason": reason})
                    yield f"retry: {RECONNECT_MS}\nevent: reconnect\ndata: {data}\n\n"
                    return
                if now - quiet_since >= KEEPALIVE_SECONDS:
                    quiet_since = now
                    yield ": keep-alive\n\n"
                await reader.wait(
                    sent, min(self.deadline - now, KEEPALIVE_SECONDS - (now - quiet_since))
                )
        finally:
            self.close()


class _StreamResponse(StreamingResponse):
    def __init__(self, watch: _Watch) -> None:
        super().__init__(watch.events(), media_type="text/event-stream", headers=STREAM_HEADERS)
        self._watch = watch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # A client gone before the body started never runs the generator's cleanup: the
        # stream's place is given back here in any case.
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._watch.close()


def _stopping() -> ApiError:
    return ApiError(503, "stopping", "the server is restarting; retry", {"Retry-After": "1"})


class OrderStreams:
    """The event streams of one API process (app.state.streams)."""

    def __init__(self, settings: Settings) -> None:
        self.poll_seconds = settings.stream_poll_seconds
        self.max_per_client = settings.stream_max_per_client
        self.max_total = settings.stream_max_total
        self.max_seconds = settings.stream_max_seconds
        self.stopping = False
        self._readers: dict[str, _Reader] = {}
        self._watches: set[_Watch] = set()
        self._per_client: Counter[str] = Counter()
        self.order_reads_total = 0
        self.streams_opened_total = 0
        self.streams_rejected_total = 0

    def metrics(self) -> dict[str, int]:
        return {
            "order_reads_total": self.order_reads_total,
            "streams_open": len(self._watches),
            "stream_readers": len(self._readers),
            "streams_opened_total": self.streams_opened_total,
            "streams_rejected_total": self.streams_rejected_total,
        }

    async def open(self, order_id: str, client: str, read: ReadOrder) -> StreamingResponse:
        """A stream of the order for a client; 429 over the caps, the first read's error
        (404, 503) if it fails. Either way before the stream opens."""
        if self.stopping:
            raise _stopping()
        self._admit(client)
        loop = asyncio.get_running_loop()
        watch = _Watch(self, client, loop.time() + self.max_seconds)
        self._watches.add(watch)
        self._per_client[client] += 1
        try:
            reader = self._readers.get(order_id)
            if reader is None:
                reader = self._readers[order_id] = _Reader(self, order_id, read)
            watch.reader = reader
            reader.watchers += 1
            await asyncio.shield(reader.ready)
        except BaseException:
            watch.close()
            raise
        self.streams_opened_total += 1
        return _StreamResponse(watch)

    def _admit(self, client: str) -> None:
        if self._per_client[client] >= self.max_per_client:
            holding = [w for w in self._watches if w.client == client]
            detail = "too many order pages open from your address"
        elif len(self._watches) >= self.max_total:
            holding = list(self._watches)
            detail = "too many order pages open right now"
        else:
            return
        self.streams_rejected_total += 1
        # Every stream ends by its lifetime: the first of these to end frees a place.
        now = asyncio.get_running_loop().time()
        retry_after = max(1, math.ceil(min((w.deadline for w in holding), default=now) - now))
        raise ApiError(
            429,
            "too_many_streams",
            f"{detail}; the page updates more slowly meanwhile",
            {"Retry-After": str(retry_after)},
        )

    def _release(self, watch: _Watch) -> None:
        self._watches.discard(watch)
        self._per_client[watch.client] -= 1
        if self._per_client[watch.client] <= 0:
            del self._per_client[watch.client]
        reader = watch.reader
        if reader is None:
            return
        reader.watchers -= 1
        if reader.watchers <= 0 and self._readers.get(reader.order_id) is reader:
            self._drop(reader)
            reader.task.cancel()

    def poke(self, order_id: str) -> None:
        """Read the order now if anyone watches it: it has just been signalled."""
        reader = self._readers.get(order_id)
        if reader is not None:
            reader.poke()

    def _drop(self, reader: _Reader) -> None:
        if self._readers.get(reader.order_id) is reader:
            del self._readers[reader.order_id]

    def close(self) -> None:
        """The server is stopping: every stream ends now, with a hint to reconnect."""
        self.stopping = True
        for reader in list(self._readers.values()):
            reader.task.cancel()
        self._readers.clear()
        for watch in list(self._watches):
            if watch.reader is not None:
                watch.reader.wake()
