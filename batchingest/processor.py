"""The processor: watch queue/, claim jobs, run their task lists, finish them.

Coordination happens on the event loop (waking on file-system events or the poll
timer); each job runs in a worker thread, since a job is mostly waiting on a child
process and a few small synchronous file operations. Which queued name a worker takes
next is the Scheduler's business; a worker then does one job in three steps:

    take      Scheduler.take(): the oldest queued name nobody here works on
    perform   claim it (rename into processing/), run its tasks, move it out again
    handle    Scheduler.done(): forget it, or keep it back for a while if it stayed queued

Safety rests on the store: a claim is a rename guarded by the job's lock, so any number
of processors, on one machine or several, can share a root and each job runs once.

No loop here may die of an error: every step that can fail (listing queue/, recovery,
claiming, finishing) is caught, logged and retried with back-off, and the heartbeat
that GET /readyz looks at is withheld while something keeps failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from batchingest import arrivals, control, events, jobdir, jobfile, lease, logs, metrics
from batchingest.config import Config
from batchingest.health import Backoff, Progress
from batchingest.runner import (
    CannotSpawn,
    ControlDir,
    EncodedEnv,
    TaskProcess,
    TaskResult,
    base_env,
    log_line,
    run_task,
)
from batchingest.store import SHORTAGE, Hold, Job, JobNotFound, Store, StoreError

# A finish that keeps failing while the service stops is given up after this many tries:
# the job stays in processing/ and the next start returns it to queue/.
_FINISH_TRIES_WHEN_STOPPING = 3
# After a shortage of descriptors or memory, the jobs in flight stay capped (see
# Scheduler.shortage) until this many seconds pass without another.
SHORTAGE_CAP_FOR = 30.0
# A claim that failed for another reason (a job folder whose .lock cannot be opened, say)
# is not tried again sooner than this, so a bad job costs a log line now and then.
_CLAIM_RETRY = 30.0

log = logging.getLogger("batchingest.processor")


class LeaseLost(Exception):
    """Another host took the job over (this one was frozen or cut off): hands off."""


def out_of_resources(e: BaseException) -> bool:
    """The process is out of descriptors, memory or buffers: no fault of the job's. Such a
    job goes back to queue/ and the processor pauses; no job content causes these."""
    return isinstance(e, CannotSpawn) or (isinstance(e, OSError) and e.errno in SHORTAGE)


class Scheduler:
    """Which queued job a worker thread takes next.

    It keeps the names waiting to be taken (pending), those being worked on (in flight)
    and those not to be tried again before a given time, all under one condition. The
    listing of queue/ runs outside the lock, in the one worker that found nothing
    pending after a wake, so the others can take work meanwhile. A failing listing is
    logged and retried with back-off; it never reaches the worker.
    """

    def __init__(self, scan: Callable[[], list[str]], clock: Callable[[], float] = time.monotonic):
        self._scan = scan
        self._clock = clock
        self._cond = threading.Condition()
        self._pending: deque[str] = deque()
        self._in_flight: set[str] = set()
        self._not_before: dict[str, float] = {}
        self._rescan = True
        self._scanning = False
        self._scan_backoff = Backoff()
        self._scan_not_before = 0.0
        self._paused_until = 0.0
        # jobs in flight at most since the process last ran short (None: no cap): every
        # worker taking a job at once after a pause would run short again together
        self._most: int | None = None
        self._most_until = 0.0
        self._closed = False
        self._idle = 0  # workers waiting for something to take
        self.scan_error: str | None = None  # the last listing failed with this

    def wake(self) -> None:
        """Something may have arrived in queue/: list it again.

        One idle worker is enough to list it; the listing wakes the others if it finds
        work. A listing already due wakes nobody: a burst of arrivals (one inotify
        read each) costs no thread switches.
        """
        with self._cond:
            if self._rescan:
                return
            self._rescan = True
            self._cond.notify()

    def close(self) -> None:
        """Hand out nothing more; take() returns None to every worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def pause(self, seconds: float) -> None:
        """Hand out nothing new for a while (the process is out of resources)."""
        with self._cond:
            self._paused_until = max(self._paused_until, self._clock() + seconds)

    def shortage(self) -> None:
        """The process ran short of descriptors or memory: half as many jobs at once as
        are in flight now (at least one), one more for each job that goes through, and
        no cap once SHORTAGE_CAP_FOR seconds pass without another shortage."""
        with self._cond:
            self._most = max(1, len(self._in_flight) // 2)
            self._most_until = self._clock() + SHORTAGE_CAP_FOR

    def went_through(self) -> None:
        """A job went through: one more may be in flight at once."""
        with self._cond:
            if self._most is not None:
                self._most += 1
                self._cond.notify_all()

    @property
    def idle(self) -> int:
        """Workers waiting for something to take (read without the lock: a hint)."""
        return self._idle

    @property
    def blind(self) -> bool:
        """The last listing of queue/ failed and a worker waits for work it cannot see.

        With every worker busy nobody lists queue/, so an old failure is not held
        against the processor then.
        """
        with self._cond:
            return self.scan_error is not None and self._idle > 0

    def paused_for(self) -> float:
        """Seconds the current pause still lasts (0 if none)."""
        with self._cond:
            return max(0.0, self._paused_until - self._clock())

    def take(self) -> str | None:
        """The next queued name for this worker, oldest first; None once closed."""
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return None
                    name = self._pop()
                    if name is not None:
                        return name
                    wait = self._wait_time()
                    if wait == 0.0:
                        break  # our turn to list queue/
                    self._idle += 1
                    try:
                        self._cond.wait(wait)
                    finally:
                        self._idle -= 1
                self._rescan = False
                self._scanning = True
            names = self._list()
            with self._cond:
                self._scanning = False
                self._add(names)
                self._cond.notify_all()

    def done(self, name: str, retry_in: float | None = None) -> None:
        """The worker is through with name; if it may still be queued, wait retry_in s."""
        with self._cond:
            self._in_flight.discard(name)
            if self._most is not None:
                self._cond.notify_all()  # a worker waiting under the cap may go on
            if retry_in is None:
                self._not_before.pop(name, None)
            else:
                self._not_before[name] = self._clock() + retry_in

    # -- under the lock -----------------------------------------------------------

    def _pop(self) -> str | None:
        now = self._clock()
        if now < self._paused_until:
            return None
        if self._most is not None and now >= self._most_until:
            self._most = None
        if self._most is not None and len(self._in_flight) >= self._most:
            return None
        while self._pending:
            name = self._pending.popleft()
            if name not in self._in_flight:
                self._in_flight.add(name)
                return name
        return None

    def _wait_time(self) -> float | None:
        """0 if this worker should list queue/ now, else how long to wait (None: a wake)."""
        now = self._clock()
        if now < self._paused_until:
            return self._paused_until - now
        if not self._rescan or self._scanning:
            return None
        if now < self._scan_not_before:
            return self._scan_not_before - now
        return 0.0

    def _add(self, names: list[str]) -> None:
        now = self._clock()
        # expired back-offs go, so names claimed elsewhere do not pile up here
        for name, when in list(self._not_before.items()):
            if when <= now:
                del self._not_before[name]
        queued = set(self._pending)
        fresh = [
            n
            for n in names
            if n not in self._in_flight and n not in self._not_before and n not in queued
        ]
        self._pending.extend(fresh)
        # more may arrive while we work through these: look again after
        self._rescan = self._rescan or bool(fresh)

    # -- outside the lock ------------------------------------------------------------

    def _list(self) -> list[str]:
        try:
            names = self._scan()
        except Exception as e:
            delay = self._scan_backoff.failed()
            self.scan_error = str(e)
            log.warning("listing queue/ failed: %s; trying again in %.1fs", e, delay)
            with self._cond:
                self._scan_not_before = self._clock() + delay
                self._rescan = True
            return []
        if self.scan_error is not None:
            log.info("listing queue/ works again")
        self._scan_backoff.reset()
        self.scan_error = None
        return names


class Processor:
    def __init__(self, cfg: Config, store: Store, progress: Progress | None = None) -> None:
        self.cfg = cfg
        self.store = store
        self.env = EncodedEnv.of(base_env(cfg.task_env()))
        self.progress = progress if progress is not None else Progress()
        # the heartbeat for /readyz comes from the poll loop, once per --poll-interval
        self.stale_after = max(10.0, 5 * cfg.poll_interval)
        self.scheduler = Scheduler(self._queued)
        # --workers bounds the jobs running tasks; a few more threads let finished jobs do
        # their last JOB fsync and final rename while the next tasks already run, which
        # is what keeps a disk with slow fsync busy rather than idle. They are started as
        # work comes (_more_workers): an idle service has one.
        self._threads: list[threading.Thread] = []
        self._threads_lock = threading.Lock()
        self._thread_count = 2 * cfg.workers + 2
        self._slots = threading.BoundedSemaphore(cfg.workers)
        self._stopping = threading.Event()
        self._running: dict[str, TaskProcess] = {}
        self._running_lock = threading.Lock()
        # the latest listing of queue/ whose hand-queued jobs await their QUEUED event
        self._seen_next: list[str] | None = None
        self._seen_lock = threading.Lock()
        self._seen_pool = ThreadPoolExecutor(1, thread_name_prefix="batchingest-seen")
        # steps failing right now (a job that cannot be finished, say): no heartbeat
        self._failing: set[str] = set()
        self._resources = Backoff(base=0.5, cap=30.0)
        # also removes the control folders of services that were killed
        self._control = ControlDir()
        # cancel requests and deadlines: of running tasks, and of queued jobs every poll
        self._watcher = control.Watcher(cfg.cancel_grace)
        self._deadlines = control.QueuedDeadlines(store, cfg.default_deadline, cfg.poll_interval)
        store.owner = lease.Owner.here(cfg.host_id)
        store.lease_timeout = cfg.lease_timeout
        store.leases = True if cfg.shared_root else None
        self._leases = lease.Renewer(cfg.lease_renew, self._lost)
        # set once the processor has gone round once (threads started, processing/
        # recovered, queue/ to be listed): its start-up work is done
        self.started = asyncio.Event()

    # -- the loops ----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Process jobs until stop is set, then stop gracefully (see --grace)."""
        # expected from now on: a processor that never gets going is not ready either
        self.progress.beat("processor", self.stale_after)
        await asyncio.to_thread(self._warn_if_exported)
        helpers = [
            asyncio.create_task(self._watch(stop), name="watch-queue"),
            asyncio.create_task(self._tick(stop), name="poll-queue"),
        ]
        # Plain threads rather than one event-loop round trip per job: a job is mostly
        # blocking system calls, and handing each one back to the loop costs more than
        # the job itself when tasks are short.
        # the renewer runs only where leases are made (a local root makes none), and starts
        # before any worker: started with a job's first lease instead, a thread that
        # cannot be had would leave that job held and never run
        if self.store.uses_leases:
            self._leases.start()
        with self._threads_lock:  # a first worker quick to take a job counts itself
            self._start_worker()
        log.info(
            "processor running with %d worker(s), tasks in %s", self.cfg.workers, self.cfg.tasks_dir
        )
        await stop.wait()
        self._stopping.set()
        self.scheduler.close()
        await self._join()
        await asyncio.to_thread(self._leases.stop)
        self.progress.retire("processor")
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        self._watcher.close()
        self._control.close()
        self._seen_pool.shutdown(wait=False, cancel_futures=True)

    def _warn_if_exported(self) -> None:
        """Say so when a local root shows other hosts at work in it without --shared-root:
        it is exported (over NFS or SMB), and without leases here the others would take
        this service's running jobs over at once."""
        if self.cfg.shared_root or not self.store.local:
            return
        others = self.store.other_hosts()
        if others:
            log.warning(
                "the jobs root %s is on a local file system, but other hosts have used it "
                "(%s): if other machines mount it, start every service on this machine "
                "with --shared-root, or they will take over the jobs it runs",
                self.store.root, ", ".join(others[:5]),
            )  # fmt: skip

    def _start_worker(self) -> None:
        """One more worker thread (under _threads_lock, or before any runs)."""
        thread = threading.Thread(
            target=self._work, name=f"batchingest-worker-{len(self._threads)}", daemon=True
        )
        thread.start()
        self._threads.append(thread)

    def _more_workers(self) -> None:
        """A worker took a job: start another if none is left waiting for work, up to
        2 x --workers + 2, so that the next job finds one at once.

        An idle service keeps one thread (each costs ~17 KiB of stack, glibc arena and
        interpreter state); a burst starts the rest within its first jobs, and they stay.
        """
        if len(self._threads) >= self._thread_count or self.scheduler.idle:
            return  # the usual case once started: no lock taken
        with self._threads_lock:
            if self._stopping.is_set() or len(self._threads) >= self._thread_count:
                return
            try:
                self._start_worker()
            except RuntimeError as e:  # no thread to be had: the next job tries again
                log.warning("cannot start another worker thread: %s", e)

    async def _join(self) -> None:
        """Let running tasks finish for --grace seconds, then stop them; wait for all."""
        with self._threads_lock:  # _stopping is set: no thread is started after this
            threads = list(self._threads)

        def join_all(deadline: float | None) -> bool:
            for thread in threads:
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            return not any(thread.is_alive() for thread in threads)

        grace = time.monotonic() + self.cfg.grace
        if not await asyncio.to_thread(join_all, grace):
            with self._running_lock:
                running = list(self._running.items())
            for name, process in running:
                log.warning("stopping task of %s: grace of %gs is over", name, self.cfg.grace)
                process.stop(interrupted=True)
            await asyncio.to_thread(join_all, None)

    async def _watch(self, stop: asyncio.Event) -> None:
        """Wake the workers when something arrives in queue/ (inotify, or polling)."""
        queue_dir = self.store.state_dir("queue")
        why = lease.watch_mode(self.store.shared_fs, self.cfg.force_polling)
        if why is not None:
            # _tick lists queue/ in full every --poll-interval: pickup never waits for a
            # folder's mtime to change (coarse on network file systems)
            log.info("polling queue/ every %gs: %s", self.cfg.poll_interval, why)
            return
        try:
            watch = arrivals.Arrivals(queue_dir)
        except OSError as e:  # no inotify instances left, say: the poll timer covers us
            log.warning("cannot watch %s (%s); relying on polling", queue_dir, e.strerror or e)
            return
        log.info("watching queue/ with inotify, and listing it every %gs", self.cfg.poll_interval)
        loop = asyncio.get_running_loop()
        gone = asyncio.Event()

        def readable() -> None:
            try:
                if watch.drain():
                    self.scheduler.wake()
            except OSError as e:
                log.warning("watching %s failed (%s); relying on polling", queue_dir, e)
                watch.gone = True
            if watch.gone:
                gone.set()

        loop.add_reader(watch.fd, readable)
        try:
            waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(gone.wait())]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for waiting in waits:
                waiting.cancel()
            if gone.is_set() and not stop.is_set():
                log.warning("%s is no longer watched (moved or removed); relying on polling",
                            queue_dir)  # fmt: skip
        finally:
            loop.remove_reader(watch.fd)
            watch.close()

    async def _tick(self, stop: asyncio.Event) -> None:
        """Recover jobs of dead holders and rescan, at start and every --poll-interval.

        Events can be missed and NFS has none, so the timer is what guarantees pickup.
        Each round that went well is the processor's heartbeat.
        """
        backoff = Backoff(base=self.cfg.poll_interval or 0.5, cap=60.0)
        # the deadlines of a long queue take a while to read: not before the first claims
        # (each claim checks its own job's deadline)
        first = True
        while not stop.is_set():
            delay = self.cfg.poll_interval
            try:
                recovered = await asyncio.to_thread(self.store.recover)
            except Exception as e:
                delay = backoff.failed()
                log.warning("recovery scan of processing/ failed: %s; next in %.1fs", e, delay)
            else:
                backoff.reset()
                if recovered:
                    log.info("recovered %d job(s) left in processing/", len(recovered))
                self._beat()
            try:
                if not first:
                    await asyncio.to_thread(self._deadlines.expire)
            except Exception as e:  # the next poll tries again; claims check deadlines too
                log.warning("looking for queued jobs past their deadline failed: %s", e)
            self.scheduler.wake()
            if first:
                self.started.set()
            first = False
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    def _beat(self) -> None:
        healthy = (
            not self._failing
            and not self.scheduler.blind
            and all(thread.is_alive() for thread in self._threads)
        )
        if healthy:
            self.progress.beat("processor", self.stale_after)

    def _work(self) -> None:
        """One worker thread: take, perform, handle the result, until closed."""
        while True:
            try:
                name = self.scheduler.take()
            except Exception:  # never expected; a worker must not die of it all the same
                log.exception("worker: taking the next job failed")
                time.sleep(1.0)
                continue
            if name is None:
                return
            retry_in: float | None = self.cfg.poll_interval
            try:
                self._more_workers()
                with logs.about_job(name):  # every line logged meanwhile names the job
                    retry_in = self.perform(name)
            except Exception:
                log.exception("job %s: unexpected error", name)
            self.scheduler.done(name, retry_in)

    # -- one job (worker thread) ---------------------------------------------------------

    def perform(self, name: str) -> float | None:
        """Claim and run one queued job; if it stays in queue/, seconds before trying again."""
        try:
            return self._perform_job(name)
        finally:
            events.unready(self.store, name)  # (a claim took over any it made ready)

    def _perform_job(self, name: str) -> float | None:
        def ready() -> None:  # while this thread waits for a slot: the claim's history
            if not self._stopping.is_set():
                events.ready(self.store, name)

        with _Slot(self._slots, ready) as slot:
            if self._stopping.is_set():
                return None
            # --default-deadline counts from the job's entry into queue/: its folder's
            # ctime, read before the claim's rename resets it (the history made ready
            # while this thread waited for the slot not counted)
            entered = None
            if self.cfg.default_deadline:
                now = control.entered_queue(self.store, name)
                entered = events.entered_before_ready(self.store, name, now)
            try:
                hold = self.store.claim(name)
            except OSError as e:
                # nothing was moved: the job waits in queue/ for the next try
                delay = self._trouble(e) if out_of_resources(e) else _CLAIM_RETRY
                delay = max(delay, self.cfg.poll_interval)
                log.warning("job %s: cannot claim it: %s; next try in %.1fs", name, e, delay)
                return delay
            if hold is None:
                return self.cfg.poll_interval  # held elsewhere, or taken by another processor
            t0 = time.monotonic()
            metrics.picked_up(hold.ctime)
            log.info("job %s picked up", name)
            if hold.lease is not None:
                self._leases.add(name, hold.dir_fd, hold.lease)
            state = self._run(hold, slot, entered)
        self._finish(hold, state, t0)
        if state != "queue":
            self._resources.reset()
            self.scheduler.went_through()
        return None

    def _trouble(self, e: BaseException) -> float:
        """The process is out of resources: claim nothing for a while, longer each time."""
        self.scheduler.shortage()
        delay = self.scheduler.paused_for()
        if delay > 0:
            return delay  # the same shortage seen by another worker: one pause counts once
        delay = self._resources.failed()
        log.warning("out of resources (%s): taking no new job for %.1fs", e, delay)
        self.scheduler.pause(delay)
        return delay

    def _run(self, hold: Hold, slot: _Slot, entered: float | None = None) -> str:
        """Run the job's tasks; the state it goes to. Errors are the job's or go to the log."""
        try:
            return self._run_tasks(hold, slot, entered)
        except LeaseLost:
            return "lost"
        except Exception as e:
            if out_of_resources(e):
                self._trouble(e)
                message = f"service out of resources ({e}): job goes back to queue/"
                state = "queue"
            else:
                log.exception("job %s: internal error", hold.name)
                message = f"internal error, job stopped: {e}"
                state = "error"
            with contextlib.suppress(OSError, jobdir.LogError):
                jobdir.append_log(hold.dir_fd, message)
            return state

    def _queued(self) -> list[str]:
        """Names in queue/, oldest first; jobs moved there by hand get their QUEUED event.

        Those events are written by one helper thread, not on the way to the first
        claim: 10,000 jobs moved in by hand take seconds to record, and a job claimed
        before its turn gets its QUEUED from the claim (events.Recorder._claimed).
        """
        names = self.store.queued()
        with self._seen_lock:
            idle = self._seen_next is None
            self._seen_next = names
        if idle:
            self._seen_pool.submit(self._record_seen)
        return names

    def _record_seen(self) -> None:
        with self._seen_lock:
            names, self._seen_next = self._seen_next, None
        if names is not None:
            try:
                events.seen_queued(self.store, names)
            except Exception:  # the claims write what is missing
                log.exception("recording jobs queued by hand failed")

    def _finish(self, hold: Hold, state: str, t0: float) -> None:
        """Move the job out of processing/ and release it; log how it went."""
        name = hold.name
        if state == "lost":
            self._leases.remove(name)
            log.warning("job %s: left alone, another host holds it now", name)
            events.let_go(self.store, name)
            hold.abandon()
            return
        reason = failure_reason(hold.dir_fd) if state == "error" else ""
        try:
            events.finishing(self.store, name)
            job = self._move_out(hold, state)
            if job is not None and job.state != "queue":
                control.clear(hold.dir_fd)  # a request is done with once the job is out
        finally:
            # renewed until here: a final move retried for long must not lose its lease
            self._leases.remove(name)
            self._failing.discard(f"finish {name}")
            # a job lost meanwhile is another's now, its .lock included: remove nothing
            if hold.lease is not None and hold.lease.lost:
                hold.abandon()
            else:
                hold.release()
        if job is None:  # not moved (removed by hand, lost, stopping): not held here now
            events.let_go(self.store, name)
            return
        metrics.job_finished(job.state)
        log.info(
            "job %s finished: %s in %.3fs%s%s",
            name,
            job.status,
            time.monotonic() - t0,
            f" (as {job.name})" if job.name != name else "",
            f": {reason}" if reason else "",
        )

    def _move_out(self, hold: Hold, state: str) -> Job | None:
        """Rename processing/NAME to state/, trying until it works (the job stays held).

        While the job is held no recovery takes it back, so a failing rename (no
        descriptors left, a sick NFS server) delays the job but never loses it or runs
        it twice. None if it cannot be moved: gone, or the service stops meanwhile.
        """
        name = hold.name
        backoff = Backoff(base=0.2, cap=30.0)
        while True:
            try:
                if not hold.owned():
                    log.warning("job %s: lost its lease before it could finish; left alone", name)
                    return None
                return self.store.move(name, "processing", state)
            except JobNotFound:
                log.error("job %s: gone from processing/ before it could finish", name)
                return None
            except FileExistsError:
                # only a move back to queue/ can meet a namesake; final states cannot
                log.warning("job %s: a namesake waits in queue/; this one goes to error/", name)
                state = "error"
            except (OSError, StoreError) as e:
                delay = backoff.failed()
                self._failing.add(f"finish {name}")
                if self._stopping.is_set() and backoff.failures >= _FINISH_TRIES_WHEN_STOPPING:
                    log.error("job %s: cannot move it to %s/ (%s); left in processing/ for "
                              "the next start to return to queue/", name, state, e)  # fmt: skip
                    return None
                log.warning("job %s: cannot move it to %s/ (%s); trying again in %.1fs",
                            name, state, e, delay)  # fmt: skip
                time.sleep(delay)

    def _run_tasks(self, hold: Hold, slot: _Slot, entered: float | None = None) -> str:
        """Run the job's remaining tasks; return the state it should go to.

        Each task the rq way: take it (unless the job must stop first), perform it (with
        its events), handle its result (JOB saved durably before the next one).
        """
        try:
            log_fd = jobdir.open_log(hold.dir_fd)
        except jobdir.LogError as e:
            log.warning("job %s: %s", hold.name, e)
            self._check_lease(hold)
            jobdir.record_failure(hold.dir_fd, str(e))
            return "error"
        try:
            run = self._start(hold, slot, log_fd, entered)
            if run is None:
                return "error"
            while run.job.todo:
                stopped = self._take(run)
                if stopped is not None:
                    return stopped
                ended = self._handle(run, self._perform(run))
                if ended is not None:
                    return ended
            return "success"
        finally:
            os.close(log_fd)

    def _start(self, hold: Hold, slot: _Slot, log_fd: int, entered: float | None) -> _Run | None:
        """The job's JOB and deadline; None (said in LOG) if JOB cannot be run."""
        try:
            job = jobdir.load_job(hold.dir_fd)
            deadline = control.deadline_of(job, entered, self.cfg.default_deadline)
        except jobfile.JobFileError as e:
            log_line(
                log_fd,
                f"cannot run this job: {e}. JOB was left as it is; fix it and queue the job again.",
            )
            log.warning("job %s: %s", hold.name, e)
            return None
        if not job.todo:
            # queued again after it finished: say why nothing happens
            log_line(log_fd, "nothing to run: every task in JOB is finished (add tasks to "
                     "its Todo, or delete JOB to start over from start)")  # fmt: skip
        return _Run(hold, slot, log_fd, job, deadline, len(job.finished))

    def _take(self, run: _Run) -> str | None:
        """None to go on with the next task; else the state the job goes to instead."""
        if self._stopping.is_set():
            log_line(
                run.log_fd, f"service stopping: job goes back to queue/ at task {run.job.todo[0]}"
            )
            return "queue"
        stop = control.check(run.hold.dir_fd, run.deadline)
        if stop is None:
            return None
        ran = len(run.job.finished) > run.finished_before
        return control.stop_job(self.store, run.hold.name, run.hold.dir_fd, run.job, stop, ran)

    def _perform(self, run: _Run) -> TaskResult:
        """Run the job's first task, with its events and metrics."""
        hold, task = run.hold, run.job.todo[0]
        events.task_started(self.store, hold, task)
        result = self._run_task(hold, task, run.log_fd, run.deadline)
        if not result.ok or (len(run.job.todo) == 1 and not result.added):
            # the job runs no more tasks: its slot is free before this task's event is
            # written and JOB saved, so the next job does not wait for them
            run.slot.release()
        events.task_ended(self.store, hold, result)
        metrics.task_done(result)
        return result

    def _handle(self, run: _Run, result: TaskResult) -> str | None:
        """Record the task's result in JOB (durably); the state the job ends in, if it does."""
        job = run.job
        if result.interrupted:
            log_line(run.log_fd, f"service stopping: job goes back to queue/ at task {result.task}")
            return "queue"
        if result.canceled:
            control.task_stopped(self.store, run.hold.name, run.hold.dir_fd, job, result,
                                 run.deadline)  # fmt: skip
        else:
            job.finished.append(jobdir.finished_record(result))
        if result.ok:
            job.todo.pop(0)
            job.todo.extend(result.added)
        self._check_lease(run.hold)
        jobdir.save_job(run.hold.dir_fd, job)
        return None if result.ok else "error"

    def _check_lease(self, hold: Hold) -> None:
        """Before the job is changed: it must still be ours (LeaseLost if not)."""
        if not hold.owned():
            raise LeaseLost(hold.name)

    def _lost(self, name: str) -> None:
        """The renewer found a job's lease taken over: stop its task, touch nothing."""
        log.error("job %s: its lease was taken over by another host (this one was frozen "
                  "or cut off); stopping its task and leaving the job alone", name)  # fmt: skip
        with self._running_lock:
            process = self._running.get(name)
        if process is not None:
            process.stop()

    def _run_task(
        self, hold: Hold, task: str, log_fd: int, deadline: control.Deadline | None = None
    ) -> TaskResult:
        process = TaskProcess()
        with self._running_lock:
            self._running[hold.name] = process
        watch = self._watcher.watch(hold.dir_fd, process, deadline)
        copy_mark = metrics.progress_mark(hold.dir_fd, task)
        metrics.WORKERS_BUSY.inc()
        try:
            return run_task(
                task,
                job_dir=hold.path,
                job_name=hold.name,
                tasks_dir=self.cfg.tasks_dir,
                control=self._control.file(threading.get_ident()),
                env=self.env,
                log_fd=log_fd,
                hold_fd=hold.lock_fd,
                timeout=self.cfg.task_timeout,
                process=process,
                control_fd=self._control.fd,
            )
        finally:
            self._watcher.unwatch(watch)
            metrics.WORKERS_BUSY.dec()
            metrics.task_copied(hold.dir_fd, task, copy_mark)
            with self._running_lock:
                self._running.pop(hold.name, None)


def failure_reason(dir_fd: int) -> str:
    """Why a job goes to error/, for its "finished: error" log line: the Reason of its
    last Finished record, or what is wrong with its JOB file."""
    try:
        job = jobdir.load_job(dir_fd)
    except jobfile.JobFileError as e:
        return str(e)
    except OSError as e:
        return f"cannot read JOB: {e.strerror or e}"
    last = job.finished[-1] if job.finished else None
    if isinstance(last, dict) and last.get("Status") == "error" and last.get("Reason"):
        return str(last["Reason"])[:500]  # JOB is the job's: a line, not a novel
    return "internal error, see the job's LOG"


@dataclass
class _Run:
    """One job's run in a worker: what each step of its task loop needs."""

    hold: Hold
    slot: _Slot
    log_fd: int
    job: jobfile.JobFile
    deadline: control.Deadline | None
    finished_before: int  # Finished records when the claim took it


class _Slot:
    """One of the --workers task slots; released early once a job runs no more tasks."""

    def __init__(
        self, slots: threading.BoundedSemaphore, waiting: Callable[[], None] | None = None
    ) -> None:
        self._slots = slots
        self._held = False
        self._waiting = waiting  # called first when there is no slot free at once

    def __enter__(self) -> _Slot:
        if not self._slots.acquire(blocking=False):
            if self._waiting is not None:
                self._waiting()
            self._slots.acquire()
        self._held = True
        return self

    def release(self) -> None:
        if self._held:
            self._held = False
            self._slots.release()

    def __exit__(self, *exc: object) -> None:
        self.release()
