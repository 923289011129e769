"""Idempotency keys: a client's key -> the request id it got, kept for 24 hours.

One small JSON file per key, named by the key's SHA-256, in a hidden service folder of
the jobs root (never a job, never served). Plain storage: the HTTP side (which header,
which status) is the caller's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

TTL = 24 * 3600.0
SWEEP_EVERY = 3600.0
# a record is a request id, a time and a SHA-256: anything bigger is not ours
RECORD_LIMIT = 4096


class KeyContested(Exception):
    """The key's record keeps changing under us (expired records being replaced)."""


class Idempotency:
    """Key -> record, created with link(2), which never replaces an existing name.

    So two requests racing with the same key agree on one request id. Records older
    than TTL count as absent and are swept at most once every SWEEP_EVERY seconds.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._swept = 0.0
        self._lock = threading.Lock()

    def _path(self, key: str) -> Path:
        return self.folder / hashlib.sha256(key.encode()).hexdigest()

    def lookup(self, key: str) -> dict[str, Any] | None:
        """The live record of key, or None."""
        try:
            with open(self._path(key), "rb") as f:
                record = json.loads(f.read(RECORD_LIMIT + 1))
        except (OSError, ValueError, RecursionError):
            return None
        if not isinstance(record, dict) or not isinstance(record.get("created"), (int, float)):
            return None
        if time.time() - record["created"] > TTL:
            return None
        return record

    def claim(self, key: str, request_id: str, fingerprint: str) -> dict[str, Any] | None:
        """Record key -> request_id; if another live record holds the key, return it.

        fingerprint identifies what was asked (a hash of the request), so that a replay
        can be told from a reuse of the key for something else.
        """
        self.folder.mkdir(exist_ok=True)
        self._sweep()
        record = {"request_id": request_id, "created": time.time(), "body_sha256": fingerprint}
        fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=self.folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps(record).encode())
                f.flush()
                os.fsync(f.fileno())
            for _ in range(3):
                try:
                    os.link(tmp, self._path(key))
                    return None
                except FileExistsError:
                    existing = self.lookup(key)
                    if existing is not None:
                        return existing
                    with contextlib.suppress(FileNotFoundError):
                        self._path(key).unlink()  # expired or unreadable
            raise KeyContested(key)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def forget(self, key: str, request_id: str) -> None:
        """Drop key's record if it still names request_id (whose creation failed)."""
        record = self.lookup(key)
        if record is not None and record.get("request_id") == request_id:
            with contextlib.suppress(FileNotFoundError):
                self._path(key).unlink()

    def _sweep(self) -> None:
        with self._lock:
            if self._swept and time.monotonic() - self._swept < SWEEP_EVERY:
                return
            self._swept = time.monotonic()
        cutoff = time.time() - TTL
        with os.scandir(self.folder) as it:
            for entry in it:
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.unlink(entry.path)
