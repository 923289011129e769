"""Webhook delivery: every state change of a job with a WEBHOOK file reaches its URLs.

The store calls our listener right after each move, in whatever thread made it. The
listener reads the job's WEBHOOK (through the folder's descriptor), builds the event and
hands it to the outbox writer thread (outbox.py); a mover other than the event loop waits
until the event is on disk, so the move is reported done only once it is safe, and a slow
receiver never holds up a job.

On the loop, deliveries are grouped in lanes, one per job and URL: a lane sends its
events one after the other, retrying each until it is delivered or finally failed, while
different lanes run in parallel (bounded). An event file is removed once every URL of it
is done; a finally failed delivery is kept in ROOT/.outbox/failed with the reason.
Whatever is left in the outbox when the service stops or dies is delivered on the next
start.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from batchingest import events, fs, logs, metrics
from batchingest.config import Config
from batchingest.health import Progress
from batchingest.jobdir import LOG_FILE
from batchingest.jobfile import now_rfc3339
from batchingest.store import BUSY, InvalidName, Job, Store
from batchingest.webhooks.events import (
    EVENT_STATES,
    WebhookRefused,
    build_body,
    lane_key,
    read_webhook,
)
from batchingest.webhooks.outbox import Event, Outbox, Writer
from batchingest.webhooks.send import AllowList, BadTarget, Result, Target, parse_target, post

if TYPE_CHECKING:
    import httpx  # imported at the first delivery (see Webhooks._http)

log = logging.getLogger("batchingest.webhooks")

MAX_DELAY = 300.0
MAX_RETRY_AFTER = 300.0  # a receiver asking for a longer pause gets the usual backoff
CONCURRENCY = 32
# jobs whose last announced state we remember; only queued and processing jobs are kept,
# so this bounds memory only when many queued jobs are deleted without being processed
ANNOUNCED_MAX = 65536
# a claim that wrote the hand-queued job's `queue` event itself
_CLAIMED_UNANNOUNCED = "processing+queue"


@dataclass(frozen=True)
class Delivery:
    """One event to one of its URLs."""

    event: Event
    index: int

    @property
    def url(self) -> str:
        return self.event.urls[self.index]

    @property
    def order(self) -> tuple[int, int]:
        return (self.event.seq, self.index)


@dataclass
class _Lane:
    items: list[Delivery] = field(default_factory=list)
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
            elif state not in BUSY:
                keep = None
            if keep is not None:
                self._last[name] = keep
                if len(self._last) > self._limit:
                    # the oldest entry goes; at worst its job gets a second queue event
                    del self._last[next(iter(self._last))]
        return events


# Seconds between the delivery loop's heartbeats (see GET /readyz).
HEARTBEAT = 5.0


class Webhooks:
    def __init__(self, cfg: Config, store: Store, progress: Progress | None = None) -> None:
        self.cfg = cfg
        self.store = store
        self.progress = progress
        # seconds before the first retry, doubling: 5 retries of 10 s span ~5-9 min
        self.backoff = cfg.webhook_backoff
        self.allow = AllowList.parse(cfg.webhook_allow)
        self.outbox: Outbox | None = None
        self.writer: Writer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._client: httpx.AsyncClient | None = None  # made at the first delivery
        self._running = False
        self._sem = asyncio.Semaphore(CONCURRENCY)
        self._lanes: dict[tuple[str, str], _Lane] = {}
        # event file -> URL indexes not yet done, for the events queued in lanes
        self._open: dict[str, set[int]] = {}
        # events given a sequence number but not yet in their lanes, by lane key: a lane
        # sends nothing newer for that job until they are in (see _wait_turn)
        self._writing: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self._last_seq = 0
        self._announced = _Announced()
        self._unsubscribe: Callable[[], None] | None = None

    # -- the listener (any thread) ------------------------------------------------

    def attach(self) -> None:
        """Open the outbox, start its writer and listen to the store's moves."""
        self.outbox = Outbox(self.store.service_path("outbox"))
        self.writer = Writer(self.outbox, self._written)
        with contextlib.suppress(RuntimeError):  # not in a loop: run() sets it
            self._set_loop(asyncio.get_running_loop())
        self._unsubscribe = self.store.subscribe(self.on_change)

    def detach(self) -> None:
        """Stop listening (events already submitted are still written)."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def close(self, timeout: float = 5.0) -> None:
        """Stop listening, write what is waiting, end the writer thread, close the outbox."""
        self.detach()
        if self.writer is not None:
            self.writer.stop(timeout)
            self.writer = None
        if self.outbox is not None:
            self.outbox.close()
            self.outbox = None

    def _set_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._loop_thread = threading.get_ident()

    def on_change(self, job: Job, old_state: str | None) -> None:
        """Record the event of a state change in the outbox before the move is reported."""
        # every move counts here, WEBHOOK or not: one may be added before the next move
        events = self._announced.events(job.name, job.state, old_state)
        if job.state not in EVENT_STATES or not events or self.writer is None:
            return
        dir_fd = self._open_job(job)
        if dir_fd is None:
            return
        try:
            items = self._build(job, dir_fd, events)
        finally:
            os.close(dir_fd)
        if items:
            # the event loop must not wait for disk writes; every other mover does
            on_loop = threading.get_ident() == self._loop_thread
            if not self.writer.submit(items, wait=not on_loop):
                log.error("%s: webhook event not yet on disk, kept in memory", job.name)

    def _open_job(self, job: Job) -> int | None:
        """The job folder's descriptor, following it once if it moved on meanwhile."""
        try:
            return self.store.open_job(job)
        except FileNotFoundError:
            pass  # the job moved on before we ran (a processor claimed it at once)
        except OSError:
            return None
        found = self._find(job.name)
        if found is None:
            return None
        try:
            return self.store.open_job(found)
        except OSError:
            return None

    def _build(
        self, job: Job, dir_fd: int, events: list[tuple[str, str | None]]
    ) -> list[tuple[Event, bytes]]:
        try:
            urls = read_webhook(dir_fd)
        except WebhookRefused as e:
            self._note(job.name, dir_fd, f"webhook {job.state} event not sent: {e}")
            return []
        except OSError as e:
            log.warning("%s: cannot read WEBHOOK: %s", job.name, e.strerror or e)
            return []
        if not urls:
            return []  # the common case: no WEBHOOK, nothing to do
        key = lane_key(job.name)
        with self._lock:
            seqs = []
            for _ in events:
                self._last_seq = max(time.time_ns(), self._last_seq + 1)
                seqs.append(self._last_seq)
            self._writing.setdefault(key, []).extend(seqs)
        items = []
        try:
            for seq, (state, previous) in zip(seqs, events, strict=True):
                event_id = str(uuid.uuid4())
                body = build_body(job.name, state, previous, dir_fd, event_id, now_rfc3339())
                name = Event.name_for(seq, event_id)
                event = Event(seq, event_id, job.name, key, state, tuple(urls), name)
                items.append((event, body))
        except BaseException:
            # nothing will be written: the job's later events must not wait for these
            with self._lock:
                writing = self._writing[key]
                for seq in seqs:
                    writing.remove(seq)
                if not writing:
                    del self._writing[key]
            raise
        return items

    def _written(self, events: list[Event]) -> None:
        """Events now on disk (writer thread): into their lanes, on the loop."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # closed: the files wait for a start
                loop.call_soon_threadsafe(self._add, events)
                return
        self._done_writing(events)

    def _done_writing(self, events: list[Event]) -> None:
        with self._lock:
            for event in events:
                writing = self._writing.get(event.key)
                if writing is not None and event.seq in writing:
                    writing.remove(event.seq)
                    if not writing:
                        del self._writing[event.key]

    # -- the loop -------------------------------------------------------------------

    def _beat(self) -> None:
        """The loop is alive; readiness also wants the outbox writer able to write."""
        if self.progress is None:
            return
        if self.writer is None or self.writer.healthy:
            self.progress.beat("webhooks", within=3 * HEARTBEAT)

    async def run(self, stop: asyncio.Event) -> None:
        self._set_loop(asyncio.get_running_loop())
        if self.outbox is None:
            self.attach()
        self._running = True
        self._scan()
        try:
            while not stop.is_set():
                self._beat()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), HEARTBEAT)
        finally:
            self._running = False
            tasks = [lane.task for lane in self._lanes.values() if lane.task is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._lanes.clear()
            self._open.clear()
            if self._client is not None:
                await self._client.aclose()
                self._client = None
            if self.writer is not None:
                # moves made while stopping (requeued jobs) get their events written
                await asyncio.to_thread(self.writer.flush, 5.0)

    def _http(self) -> httpx.AsyncClient:
        """The HTTP client, made at the first delivery: httpx costs the service a few MiB
        of memory, which an install that sends no webhooks need not pay."""
        if self._client is None:
            import httpx

            limits = httpx.Limits(
                max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY
            )
            # trust_env off: no proxy or .netrc from the environment can change where (or
            # with which credentials) an event goes, or get around the allow-list
            self._client = httpx.AsyncClient(
                timeout=self.cfg.webhook_timeout, limits=limits, trust_env=False
            )
        return self._client

    def _scan(self) -> None:
        """Queue every delivery already in the outbox, oldest first."""
        assert self.outbox is not None
        markers = self.outbox.markers()
        names = list(self.outbox.names())
        self.outbox.sweep(markers, set(names))
        events: list[Event] = []
        for name in names:
            found = self.outbox.read(name)
            if found is None:
                self._set_aside(name)
                continue
            events.append(found[0])
        if events:
            log.info("%d webhook events pending in the outbox", len(events))
            self._add(events, markers)

    def _add(self, events: list[Event], markers: dict[str, set[int]] | None = None) -> None:
        """Put events in their lanes (on the loop); markers: URLs done before a restart."""
        self._done_writing(events)
        if not self._running or self.outbox is None:
            return  # not running yet (the start-up scan finds the files) or stopping
        for event in events:
            if event.file in self._open:
                continue
            done = markers.get(event.file, set()) if markers else set()
            todo = set(range(len(event.urls))) - done
            if not todo:
                self.outbox.remove(event.file, range(len(event.urls)))
                continue
            self._open[event.file] = todo
            for index in sorted(todo):
                delivery = Delivery(event, index)
                lane = self._lanes.setdefault((event.key, delivery.url), _Lane())
                bisect.insort(lane.items, delivery, key=lambda d: d.order)
                if lane.task is None:
                    lane.task = asyncio.create_task(self._drain((event.key, delivery.url), lane))

    async def _drain(self, name: tuple[str, str], lane: _Lane) -> None:
        try:
            while lane.items:
                await self._wait_turn(lane.items[0])
                delivery = lane.items.pop(0)  # the first may have changed while waiting
                logs.JOB.set(delivery.event.job)  # this lane's task only: lines name the job
                finished = False
                try:
                    finished = await self._deliver(delivery)
                except Exception as e:
                    # no traceback: its message might quote the URL with its password
                    log.error("webhook delivery of %s failed unexpectedly: %s",
                              delivery.event.file, type(e).__name__)  # fmt: skip
                if finished:
                    self._finish(delivery)
                # else its file stays in the outbox, for the next start
        finally:
            if self._lanes.get(name) is lane:
                del self._lanes[name]

    async def _wait_turn(self, delivery: Delivery) -> None:
        """Wait while an older event of the same job is still being written.

        Two moves of one job can run their listeners at the same time (an API request
        queues a job and a processor thread claims it at once), and an event that could
        not be written yet (a full disk) waits in memory; the later one must not
        overtake the earlier.
        """
        event = delivery.event
        while True:
            with self._lock:
                older = any(s < event.seq for s in self._writing.get(event.key, ()))
            if not older:
                return
            await asyncio.sleep(0.005)

    def _finish(self, delivery: Delivery) -> None:
        """One URL of an event is done: mark it, or remove the event once all are."""
        assert self.outbox is not None
        file = delivery.event.file
        todo = self._open.get(file)
        if todo is None:
            return
        todo.discard(delivery.index)
        try:
            if todo:
                self.outbox.mark_done(file, delivery.index)
            else:
                del self._open[file]
                self.outbox.remove(file, range(len(delivery.event.urls)))
        except OSError as e:
            log.error("cannot update the webhook outbox for %s: %s", file, e.strerror or e)

    # -- one delivery ---------------------------------------------------------------------

    async def _deliver(self, delivery: Delivery) -> bool:
        """Deliver, retrying; True once done (delivered, or kept in failed/)."""
        assert self.outbox is not None
        found = self.outbox.read(delivery.event.file)
        if found is None:
            return True  # removed meanwhile (by an operator, or delivered by another service)
        body = found[1]
        try:
            target = parse_target(delivery.url)
        except BadTarget as e:
            self._record(delivery, None, 1, 1, f"refused: {e}", failed=True)
            return self._bury(delivery, body, str(e))
        attempts = self.cfg.webhook_retries + 1
        for attempt in range(1, attempts + 1):
            result = await self._attempt(delivery, target, body)
            if isinstance(result, BadTarget):
                self._record(delivery, target, 1, 1, f"refused: {result}", failed=True)
                return self._bury(delivery, body, str(result))
            last = attempt == attempts or not result.retryable
            self._record(delivery, target, attempt, attempts, result.describe(), failed=False)
            if result.ok:
                metrics.webhook("delivered")
                return True
            if last:
                reason = result.reason
                self._record(delivery, target, attempt, attempts, f"gave up: {reason}",
                             failed=True)  # fmt: skip
                return self._bury(delivery, body, reason)
            metrics.webhook("retried")
            await asyncio.sleep(self._delay(attempt, result.retry_after))
        return False  # not reached: the last attempt returns

    async def _attempt(self, delivery: Delivery, target: Target, body: bytes) -> Result | BadTarget:
        try:
            address = await self.allow.check(target.host, target.port)
        except BadTarget as e:
            return e
        except OSError as e:
            return Result(error=f"cannot resolve {target.host}: {e.strerror or e}")
        async with self._sem:
            return await post(
                self._http(),
                target,
                body,
                event_id=delivery.event.event_id,
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

    # -- records ----------------------------------------------------------------------

    def _find(self, name: str) -> Job | None:
        try:
            return self.store.find(name)
        except InvalidName:
            return None

    def _record(
        self,
        delivery: Delivery,
        target: Target | None,
        attempt: int,
        attempts: int,
        outcome: str,
        *,
        failed: bool,
    ) -> None:
        """One line in the job's LOG (wherever it is now) and in the service log."""
        event = delivery.event
        shown = target.shown if target is not None else "(unusable URL)"
        what = f"webhook {event.state} event {event.event_id} POST {shown}"
        line = f"{what} attempt {attempt}/{attempts}: {outcome}"
        if failed:
            log.warning("%s: %s", event.job, line)
            events.webhook_failed(self.store, event.job, event.state, shown, outcome)
        elif outcome.startswith("HTTP 2"):
            log.debug("%s: %s", event.job, line)
            events.webhook_delivered(self.store, event.job, event.state, shown, outcome)
        else:
            log.info("%s: %s", event.job, line)
        job = self._find(event.job)
        if job is None:
            return
        try:
            dir_fd = self.store.open_job(job)
        except OSError:
            return  # the job moved or went away meanwhile: the service log has it
        try:
            self._note(event.job, dir_fd, line, quiet=True)
        finally:
            os.close(dir_fd)

    @staticmethod
    def _note(job: str, dir_fd: int, line: str, *, quiet: bool = False) -> None:
        """Append one line to the job's LOG through its folder's descriptor."""
        if not quiet:
            log.warning("%s: %s", job, line)
        text = f"{now_rfc3339()} batchingest: {line}\n"
        try:
            fs.append(dir_fd, LOG_FILE, text.encode(errors="replace"))
        except OSError as e:
            # a LOG planted as a link or FIFO is never written through
            log.warning("%s: LOG not written: %s", job, e.strerror or e)

    def _bury(self, delivery: Delivery, body: bytes, reason: str) -> bool:
        """Keep a finally failed delivery in outbox/failed, with the reason.

        False if that cannot be written (a full disk): the event then stays in the
        outbox and is tried again at the next start, rather than lost.
        """
        metrics.webhook("failed")
        assert self.outbox is not None
        try:
            name = self.outbox.bury(delivery.event, delivery.index, body, reason, now_rfc3339())
        except OSError as e:
            log.error("cannot keep failed webhook delivery of %s: %s", delivery.event.file, e)
            return False
        log.warning("webhook delivery %s failed for good: %s", name, reason)
        return True

    def _set_aside(self, name: str) -> None:
        assert self.outbox is not None
        try:
            self.outbox.set_aside(name)
        except OSError as e:
            log.error("cannot move %s to the failed outbox: %s", name, e.strerror or e)
            return
        log.warning("webhook outbox file %s is not an event: moved to failed/", name)
