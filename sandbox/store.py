"""The sandbox's persistence: one JSON document per simulated service.

Every change is written straight away, so a restarted sandbox carries on where it stopped
(open sessions, pending webhooks, running generations), which is what the durable flows
upstream are meant to survive. Writes go to a temporary file first and then replace the
document, so a crash mid-write leaves the previous state intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


class JsonStore:
    """Named collections of JSON objects, keyed by id, saved as one file."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._data: dict[str, dict[str, Any]] = {}
        if path.exists():
            self._data = json.loads(path.read_text())

    def collection(self, name: str) -> dict[str, Any]:
        """The live dict for `name`; mutate it, then call `save()`."""
        return self._data.setdefault(name, {})

    def save(self) -> None:
        # Synchronous on purpose: the documents are small, and with no await between a
        # mutation and its save, concurrent requests can never interleave half-applied changes.
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self._path.parent, prefix=self._path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self._data, f)
            os.replace(tmp, self._path)
        except BaseException:
            os.unlink(tmp)
            raise
