"""Is the service able to do its work: heartbeats of its loops and the readiness check.

`GET /healthz` only says the process answers (liveness). `GET /readyz` says whether it
can take and run jobs now: every loop that promised a heartbeat has beaten recently, the
jobs root takes a new file, and it has at least `--min-free` bytes free. A load balancer
or orchestrator polls it; the reasons go to the service log, never into the answer.

A loop joins by beating: `progress.beat("webhooks", within=60)` says "I made progress,
expect my next beat within 60 s". A loop that stops on purpose calls `retire(name)`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("batchingest.health")


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
