"""Webhook delivery: every state change of a job with a WEBHOOK file reaches its URLs.

The store calls our listener right after each move, from whatever thread made it. The
listener only writes the event to the outbox (ROOT/.outbox, one file per event and URL,
written atomically and fsync-ed) and hands it to the event loop, so the move is reported
done only once the event is safe on disk, and a slow receiver never holds up a job.

On the loop, deliveries are grouped in lanes, one per job and URL: a lane sends its
events one after the other, retrying each until it is delivered or finally failed, while
different lanes run in parallel (bounded). A delivered event's file is removed; a finally
failed one is moved to ROOT/.outbox/failed with the reason. Whatever is left in the outbox
when the service stops or dies is delivered on the next start.

A job an operator moves into queue/ by hand makes no store move, so no `queue` event.
When such a job is claimed we notice that this service has not announced it as queued
and write a `queue` event (previous_state null) just before the `processing` one. What
was last announced is kept in memory only (see _Announced): one dict look-up per move,
no I/O, so the listener stays cheap for the many jobs without a WEBHOOK file.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import os
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from batchingest.config import Config
from batchingest.jobfile import now_rfc3339, write_atomic
from batchingest.runner import append_log
from batchingest.store import InvalidName, Job, Store
from batchingest.webhooks.events import (
    EVENT_STATES,
    WEBHOOK_FILE,
    Record,
    build_body,
    lane_key,
    read_body,
    read_record,
    read_urls,
)
from batchingest.webhooks.send import AllowList, BadTarget, Result, Target, parse_target, post

__all__ = ["Webhooks"]

log = logging.getLogger("batchingest.webhooks")

BACKOFF_ENV = "BATCHINGEST_WEBHOOK_BACKOFF"
DEFAULT_BACKOFF = 10.0  # seconds before the first retry, doubling: 5 retries span ~5-9 min
MAX_DELAY = 300.0
MAX_RETRY_AFTER = 300.0  # a receiver asking for a longer pause gets the usual backoff
CONCURRENCY = 32
# jobs whose last announced state we remember; only queued and processing jobs are kept,
# so this bounds memory only when many queued jobs are deleted without being processed
ANNOUNCED_MAX = 65536
# a claim that wrote the hand-queued job's `queue` event itself
_CLAIMED_UNANNOUNCED = "processing+queue"


@dataclass
class _Lane:
    items: list[Record] = field(default_factory=list)
    task: asyncio.Task[None] | None = None


class _Announced:
    """Job name -> the state this service last announced for it (any thread).

    Only `queue` matters: a claim of a job not announced as queued means the job came in
    by hand. Final states and data/ drop the entry, which keeps the map to active jobs.
    """

    def __init__(self, limit: int = ANNOUNCED_MAX) -> None:
        self._last: dict[str, str] = {}
        self._limit = limit
        self._lock = threading.Lock()

    def events(self, name: str, state: str, old_state: str | None) -> list[tuple[str, str | None]]:
        """The events (state, previous state) a move of `name` calls for, oldest first."""
        events: list[tuple[str, str | None]] = [(state, old_state)]
        with self._lock:
            last = self._last.pop(name, None)
            keep: str | None = state
            if state == "processing" and old_state == "queue" and last != "queue":
                events.insert(0, ("queue", None))
                keep = _CLAIMED_UNANNOUNCED
            elif state == "queue" and old_state != "processing" and last == _CLAIMED_UNANNOUNCED:
                # The listener of a store.queue() ran only after a processor had claimed
                # the job and announced its queueing already: do not announce it twice.
                events, keep = [], last
            elif state not in ("queue", "processing"):
                keep = None
            if keep is not None:
                self._last[name] = keep
                if len(self._last) > self._limit:
                    # the oldest entry goes; at worst its job gets a second queue event
                    del self._last[next(iter(self._last))]
        return events


def _backoff_base(cfg: Config) -> float:
    value = getattr(cfg, "webhook_backoff", None)
    if value is None:
        raw = os.environ.get(BACKOFF_ENV, "")
        try:
            value = float(raw) if raw else DEFAULT_BACKOFF
        except ValueError:
            log.warning("ignoring %s=%r: not a number of seconds", BACKOFF_ENV, raw)
            value = DEFAULT_BACKOFF
    return max(0.0, float(value))


class Webhooks:
    def __init__(self, cfg: Config, store: Store) -> None:
        self.cfg = cfg
        self.store = store
        self.outbox = store.service_path("outbox")
        self.failed = self.outbox / "failed"
        self.backoff = _backoff_base(cfg)
        self.allow = AllowList.parse(cfg.webhook_allow)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: httpx.AsyncClient | None = None
        self._sem = asyncio.Semaphore(CONCURRENCY)
        self._lanes: dict[tuple[str, str], _Lane] = {}
        self._known: set[str] = set()
        # events being written by a listener right now, by lane key: a lane does not
        # send anything newer for that job until they are in (see _wait_turn)
        self._writing: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self._last_seq = 0
        self._announced = _Announced()

    # -- the listener (any thread) ------------------------------------------------

    def attach(self) -> None:
        self.outbox.mkdir(exist_ok=True)
        self.failed.mkdir(exist_ok=True)
        with contextlib.suppress(RuntimeError):  # not in a loop: run() sets it
            self._loop = asyncio.get_running_loop()
        self.store.listeners.append(self.on_change)

    def on_change(self, job: Job, old_state: str | None) -> None:
        """Record the event of a state change in the outbox before the move is reported."""
        # every move counts here, WEBHOOK or not: one may be added before the next move
        events = self._announced.events(job.name, job.state, old_state)
        if job.state not in EVENT_STATES or not events:
            return
        path = job.path
        try:
            raw = (path / WEBHOOK_FILE).read_bytes()
        except FileNotFoundError:
            if path.is_dir():
                return  # the common case: no WEBHOOK, nothing to do
            # the job moved on before we ran (a processor claimed it at once)
            found = self._find(job.name)
            if found is None:
                return
            path = found.path
            try:
                raw = (path / WEBHOOK_FILE).read_bytes()
            except OSError:
                return
        except OSError as e:
            log.warning("%s: cannot read %s: %s", job.name, WEBHOOK_FILE, e.strerror or e)
            return
        urls = read_urls(raw)
        if not urls:
            return
        key = lane_key(job.name)
        with self._lock:
            seqs = []
            for _ in events:
                self._last_seq = max(time.time_ns(), self._last_seq + 1)
                seqs.append(self._last_seq)
            self._writing.setdefault(key, []).extend(seqs)
        records: list[Record] = []
        try:
            for seq, (state, previous) in zip(seqs, events, strict=True):
                event_id = str(uuid.uuid4())
                body = build_body(job.name, state, previous, path, event_id, now_rfc3339())
                for i, url in enumerate(urls):
                    rec = Record(seq, i, event_id, job.name, key, state, url)
                    write_atomic(self.outbox / rec.file, rec.dumps(body))
                    records.append(rec)
        except OSError as e:
            log.error("%s: cannot write webhook event to the outbox: %s", job.name, e)
        finally:
            with self._lock:
                writing = self._writing[key]
                for seq in seqs:
                    writing.remove(seq)
                if not writing:
                    del self._writing[key]
        loop = self._loop
        if loop is not None and records:
            # a closed loop (stopping): the files wait for the next start
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._add, records)

    # -- the loop -------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self.outbox.mkdir(exist_ok=True)
        self.failed.mkdir(exist_ok=True)
        httpx_log = logging.getLogger("httpx")
        if httpx_log.level == logging.NOTSET:
            # our own line per attempt says more; httpx would add one per request at info
            httpx_log.setLevel(logging.WARNING)
        limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
        # trust_env off: no proxy or .netrc from the environment can change where (or
        # with which credentials) an event goes, or get around the allow-list
        async with httpx.AsyncClient(
            timeout=self.cfg.webhook_timeout, limits=limits, trust_env=False
        ) as client:
            self._client = client
            self._scan()
            try:
                await stop.wait()
            finally:
                self._client = None
                tasks = [lane.task for lane in self._lanes.values() if lane.task is not None]
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                self._lanes.clear()
                self._known.clear()

    def _scan(self) -> None:
        """Queue every delivery already in the outbox, oldest first."""
        records: list[Record] = []
        for entry in sorted(os.scandir(self.outbox), key=lambda e: e.name):
            if entry.name.startswith(".") or not entry.name.endswith(".json"):
                continue
            rec = read_record(Path(entry.path))
            if rec is None or rec.file != entry.name:
                self._bury(Path(entry.path), None, "not a readable outbox file")
                continue
            records.append(rec)
        if records:
            log.info("%d webhook deliveries pending in the outbox", len(records))
            self._add(records)

    def _add(self, records: list[Record]) -> None:
        if self._client is None:
            return  # not running yet (the start-up scan finds the files) or stopping
        for rec in records:
            if rec.file in self._known:
                continue
            self._known.add(rec.file)
            lane = self._lanes.setdefault((rec.key, rec.url), _Lane())
            bisect.insort(lane.items, rec, key=lambda r: r.order)
            if lane.task is None:
                lane.task = asyncio.create_task(self._drain((rec.key, rec.url), lane))

    async def _drain(self, name: tuple[str, str], lane: _Lane) -> None:
        try:
            while lane.items:
                await self._wait_turn(lane.items[0])
                rec = lane.items.pop(0)  # the first may have changed while waiting
                try:
                    await self._deliver(rec)
                except Exception as e:
                    # no traceback: its message might quote the URL with its password
                    log.error("webhook delivery of %s failed unexpectedly: %s", rec.file,
                              type(e).__name__)  # fmt: skip
                finally:
                    self._known.discard(rec.file)
        finally:
            if self._lanes.get(name) is lane:
                del self._lanes[name]

    async def _wait_turn(self, rec: Record) -> None:
        """Wait while an older event of the same job is still being written.

        Two moves of one job can run their listeners at the same time (an API request
        queues a job and a processor thread claims it at once); the later one must not
        overtake the earlier.
        """
        while True:
            with self._lock:
                older = any(s < rec.seq for s in self._writing.get(rec.key, ()))
            if not older:
                return
            await asyncio.sleep(0.005)

    # -- one delivery ---------------------------------------------------------------------

    async def _deliver(self, rec: Record) -> None:
        path = self.outbox / rec.file
        try:
            body = read_body(path)
        except (FileNotFoundError, ValueError):
            return  # removed meanwhile (by an operator, or delivered by another service)
        try:
            target = parse_target(rec.url)
        except BadTarget as e:
            self._record(rec, None, 1, 1, f"refused: {e}", failed=True)
            self._bury(path, rec, str(e))
            return
        attempts = self.cfg.webhook_retries + 1
        for attempt in range(1, attempts + 1):
            result = await self._attempt(rec, target, body)
            if result is None:
                return  # refused by the allow-list: recorded and moved already
            last = attempt == attempts or not result.retryable
            self._record(rec, target, attempt, attempts, self._describe(result), failed=False)
            if result.ok:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                return
            if last:
                reason = self._describe(result, snippet=False)
                self._record(rec, target, attempt, attempts, f"gave up: {reason}", failed=True)
                self._bury(path, rec, reason)
                return
            await asyncio.sleep(self._delay(attempt, result.retry_after))

    async def _attempt(self, rec: Record, target: Target, body: bytes) -> Result | None:
        address = None
        if self.allow is not None:
            try:
                address = await self.allow.check(target.host, target.port)
            except BadTarget as e:
                self._record(rec, target, 1, 1, f"refused: {e}", failed=True)
                self._bury(self.outbox / rec.file, rec, str(e))
                return None
            except OSError as e:
                return Result(error=f"cannot resolve {target.host}: {e.strerror or e}")
        assert self._client is not None
        async with self._sem:
            return await post(
                self._client,
                target,
                body,
                event_id=rec.event_id,
                secret=self.cfg.webhook_secret,
                timeout=self.cfg.webhook_timeout,
                address=address,
            )

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter (0.5-1.5x), or the receiver's Retry-After."""
        delay: float = min(MAX_DELAY, self.backoff * 2.0 ** (attempt - 1)) * (0.5 + random.random())
        if retry_after is not None and retry_after <= MAX_RETRY_AFTER:
            delay = max(retry_after, min(delay, retry_after + self.backoff))
        return delay

    @staticmethod
    def _describe(result: Result, snippet: bool = True) -> str:
        text = f"HTTP {result.status}" if result.status is not None else result.error
        if snippet and result.snippet:
            text += " " + repr(result.snippet)
        return text

    # -- records ----------------------------------------------------------------------

    def _find(self, name: str) -> Job | None:
        try:
            return self.store.find(name)
        except InvalidName:
            return None

    def _record(
        self,
        rec: Record,
        target: Target | None,
        attempt: int,
        attempts: int,
        outcome: str,
        *,
        failed: bool,
    ) -> None:
        """One line in the job's LOG (wherever it is now) and in the service log."""
        shown = target.shown if target is not None else "(unusable URL)"
        what = f"webhook {rec.state} event {rec.event_id} POST {shown}"
        line = f"{what} attempt {attempt}/{attempts}: {outcome}"
        if failed:
            log.warning("%s: %s", rec.job, line)
        elif outcome.startswith("HTTP 2"):
            log.debug("%s: %s", rec.job, line)
        else:
            log.info("%s: %s", rec.job, line)
        job = self._find(rec.job)
        if job is None:
            return
        try:
            append_log(job.path, line)
        except OSError:
            return  # the job moved or went away meanwhile: the service log has it

    def _bury(self, path: Path, rec: Record | None, reason: str) -> None:
        """Keep a finally failed delivery in outbox/failed, with the reason."""
        try:
            if rec is not None:
                body = read_body(path)
                write_atomic(
                    self.failed / path.name,
                    rec.dumps(body, failure=reason, failed_at=now_rfc3339()),
                )
                path.unlink()
            else:
                os.replace(path, self.failed / path.name)
        except (OSError, ValueError) as e:
            log.error("cannot move %s to %s: %s", path.name, self.failed, e)
            return
        log.warning("webhook delivery %s failed for good: %s", path.name, reason)
