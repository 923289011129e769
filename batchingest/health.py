"""Is the service able to do its work: heartbeats of its loops and the readiness check.

`GET /healthz` only says the process answers (liveness). `GET /readyz` says whether it
can take and run jobs now: every loop that promised a heartbeat has beaten recently, the
jobs root takes a new file, and it has at least `--min-free` bytes free. A load balancer
or orchestrator polls it; the reasons go to the service log, never into the answer.

A loop joins by beating: `progress.beat("webhooks", within=60)` says "I made progress,
expect my next beat within 60 s". A loop that stops on purpose calls `retire(name)`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from batchingest.store import Store

log = logging.getLogger("batchingest.health")

# how long one probe of the root may take before the root counts as not responding
PROBE_TIMEOUT = 5.0
# answers within this many seconds reuse the last probe, so a busy poller costs nothing
PROBE_CACHE = 1.0


class Progress:
    """Heartbeats of the service's loops; beat() may be called from any thread."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._due: dict[str, float] = {}  # name -> monotonic time the next beat is due by

    def beat(self, name: str, within: float = 60.0) -> None:
        """`name` made progress; it is stale if it does not beat again within `within` s."""
        due = self._clock() + within
        with self._lock:
            self._due[name] = due

    def retire(self, name: str) -> None:
        """`name` stops on purpose: no longer expected to beat."""
        with self._lock:
            self._due.pop(name, None)

    def stale(self, now: float | None = None) -> list[str]:
        """Names whose next beat is overdue, sorted."""
        now = self._clock() if now is None else now
        with self._lock:
            return sorted(name for name, due in self._due.items() if due < now)


@dataclass
class Backoff:
    """Exponential back-off for a step that keeps failing: base, 2 base, 4 base ... cap."""

    base: float = 0.5
    cap: float = 30.0
    failures: int = 0

    def failed(self) -> float:
        """Count one more failure; the seconds to wait before trying again."""
        self.failures += 1
        return float(min(self.cap, self.base * 2 ** min(self.failures - 1, 30)))

    def reset(self) -> None:
        self.failures = 0


def probe_root(probe: Path, root: Path, min_free: int) -> list[str]:
    """Why the root cannot take jobs now ([] if it can): not writable, or too little space.

    Creates and removes the hidden file `probe` (hidden names are the service's own, so
    no listing or processor ever sees it).
    """
    reasons = []
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.write(fd, b"ok\n")
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as e:
        reasons.append(f"jobs root {root} is not writable: {e.strerror or e}")
    try:
        st = os.statvfs(root)
    except OSError as e:
        reasons.append(f"cannot read the free space of {root}: {e.strerror or e}")
    else:
        free = st.f_bavail * st.f_frsize
        if free < min_free:
            reasons.append(f"{free} bytes free in {root}, below --min-free {min_free}")
    return reasons


class Readiness:
    """The answer of GET /readyz: the reasons the service is not ready ([] when ready).

    The file-system probe runs in a thread, at most one at a time, and is given
    PROBE_TIMEOUT seconds: a hung NFS server makes the service "not ready", it never
    blocks the event loop or piles up threads.
    """

    def __init__(self, root: Path, probe: Path, min_free: int, progress: Progress) -> None:
        """`probe` is a hidden file name in root, used by this instance only."""
        self.root = root
        self.probe = probe
        self.min_free = min_free
        self.progress = progress
        self._probing: asyncio.Future[list[str]] | None = None
        self._last: tuple[float, list[str]] | None = None
        self._was_ready: bool | None = None

    @classmethod
    def for_store(cls, store: Store, min_free: int, progress: Progress) -> Readiness:
        # a probe name of its own: services sharing a root must not remove each other's
        probe = store.service_path(f"readyz-{uuid.uuid4().hex[:12]}")
        return cls(store.root, probe, min_free, progress)

    async def reasons(self) -> list[str]:
        # off the loop: in an extra API process the look asks the main process
        stale = await asyncio.to_thread(self.progress.stale)
        reasons = [f"{name} is not making progress" for name in stale]
        reasons += await self._probe()
        self._report(reasons)
        return reasons

    async def _probe(self) -> list[str]:
        now = time.monotonic()
        if self._last is not None and now - self._last[0] < PROBE_CACHE:
            return self._last[1]
        if self._probing is None:
            self._probing = asyncio.ensure_future(
                asyncio.to_thread(probe_root, self.probe, self.root, self.min_free)
            )
            self._probing.add_done_callback(self._probed)
        try:
            return await asyncio.wait_for(asyncio.shield(self._probing), PROBE_TIMEOUT)
        except TimeoutError:
            return [f"jobs root {self.root} does not respond (probe still running)"]

    def _probed(self, future: asyncio.Future[list[str]]) -> None:
        self._probing = None
        if future.cancelled():
            return
        error = future.exception()
        result = [f"probing {self.root} failed: {error}"] if error else future.result()
        self._last = (time.monotonic(), result)

    def _report(self, reasons: list[str]) -> None:
        """Log when readiness changes, with the reasons (the HTTP answer has none)."""
        ready = not reasons
        if ready == self._was_ready:
            return
        self._was_ready = ready
        if ready:
            log.info("ready")
        else:
            log.warning("not ready: %s", "; ".join(reasons))
