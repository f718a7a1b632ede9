"""The sandbox's persistence: one JSON document per simulated service.

Every change is written within FLUSH_SECONDS, and a request's answer waits for the write
that holds its change (sandbox/app.py), so what a client was told survives even a SIGKILL
and a restarted sandbox carries on where it stopped (open sessions, pending webhooks,
running generations), which is what the durable flows upstream are meant to survive.
Changes are coalesced because the whole
document is rewritten each time: written per change, that cost grew with every order and
became most of the stack's CPU under load. Writes go to a temporary file first and then
replace the document, so a crash mid-write leaves the previous state intact.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from pathlib import Path
from typing import Any

FLUSH_SECONDS = 0.05


class JsonStore:
    """Named collections of JSON objects, keyed by id, saved as one file."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._data: dict[str, dict[str, Any]] = {}
        self._pending: asyncio.TimerHandle | None = None
        self._waiters: list[asyncio.Future[None]] = []
        if path.exists():
            self._data = json.loads(path.read_text())

    def collection(self, name: str) -> dict[str, Any]:
        """The live dict for `name`; mutate it, then call `save()`."""
        return self._data.setdefault(name, {})

    def save(self) -> None:
        """Marks the document changed: written within FLUSH_SECONDS (at once outside a loop)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if self._pending is None:
            self._pending = loop.call_later(FLUSH_SECONDS, self.flush)

    async def written(self) -> None:
        """Returns once every change made so far is on disk."""
        if self._pending is None:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

    def flush(self) -> None:
        # Synchronous on purpose: with no await inside, a write never sees a half-applied
        # change of a concurrent request.
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self._path.parent, prefix=self._path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self._data, f)
            os.replace(tmp, self._path)
        except BaseException as err:
            os.unlink(tmp)
            self._release(err)
            raise
        self._release(None)

    def _release(self, err: BaseException | None) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(err) if err else waiter.set_result(None)
