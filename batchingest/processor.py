"""The processor: watch queue/, claim jobs, run their task lists, finish them.

Coordination happens on the event loop (waking on file-system events or the poll
timer, handing names to workers); each job runs in a worker thread, since a job is
mostly waiting on a child process and a few small synchronous file operations.

Safety rests on the store: a claim is a rename guarded by the job's lock, so any number
of processors, on one machine or several, can share a root and each job runs once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import deque

import watchfiles

from batchingest import events, jobdir, jobfile
from batchingest.config import Config
from batchingest.runner import ControlDir, TaskProcess, base_env, log_line, run_task
from batchingest.store import Hold, Store

log = logging.getLogger("batchingest.processor")


class Processor:
    def __init__(self, cfg: Config, store: Store) -> None:
        self.cfg = cfg
        self.store = store
        self.env = base_env(cfg.task_env())
        # --workers bounds the jobs running tasks; a few more threads let finished jobs do
        # their last JOB fsync and final rename while the next tasks already run, which
        # is what keeps a disk with slow fsync busy rather than idle
        self._threads = 2 * cfg.workers + 2
        self._slots = threading.BoundedSemaphore(cfg.workers)
        # what the worker threads share, all under _cond
        self._cond = threading.Condition()
        self._pending: deque[str] = deque()
        self._in_flight: set[str] = set()
        # names we could not claim though they sit in queue/ (held by an orphaned task,
        # say): not retried before the given monotonic time, so we never spin on them
        self._backoff: dict[str, float] = {}
        self._rescan = True
        self._scanning = False
        self._stopping = threading.Event()
        self._running: dict[str, TaskProcess] = {}
        self._running_lock = threading.Lock()
        # also removes the control folders of services that were killed
        self._control = ControlDir()

    # -- the loop ---------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Process jobs until stop is set, then stop gracefully (see --grace)."""
        recovered = await asyncio.to_thread(self.store.recover)
        if recovered:
            log.info("recovered %d job(s) left in processing/", len(recovered))
        helpers = [
            asyncio.create_task(self._watch(stop), name="watch-queue"),
            asyncio.create_task(self._tick(stop), name="poll-queue"),
        ]
        # Plain threads rather than one event-loop round trip per job: a job is mostly
        # blocking system calls, and handing each one back to the loop costs more than
        # the job itself when tasks are short.
        threads = [
            threading.Thread(target=self._work, name=f"batchingest-worker-{i}", daemon=True)
            for i in range(self._threads)
        ]
        for thread in threads:
            thread.start()
        log.info(
            "processor running with %d worker(s), tasks in %s", self.cfg.workers, self.cfg.tasks_dir
        )
        await stop.wait()
        self._stopping.set()
        self._wake()

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
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        self._control.close()

    def _wake(self) -> None:
        with self._cond:
            self._rescan = True
            self._cond.notify_all()

    async def _watch(self, stop: asyncio.Event) -> None:
        """Wake the workers when something arrives in queue/ (inotify, or polling)."""
        queue_dir = self.store.state_dir("queue")

        def arrivals(change: watchfiles.Change, path: str) -> bool:
            return change != watchfiles.Change.deleted

        while not stop.is_set():
            try:
                async for _ in watchfiles.awatch(
                    queue_dir,
                    watch_filter=arrivals,
                    recursive=False,
                    debounce=200,
                    step=1,
                    stop_event=stop,
                    force_polling=self.cfg.force_polling or None,
                    poll_delay_ms=max(50, int(self.cfg.poll_interval * 1000)),
                ):
                    self._wake()
            except Exception as e:  # the poll timer still covers us
                log.warning("watching %s failed (%s); relying on polling", queue_dir, e)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), 10)

    async def _tick(self, stop: asyncio.Event) -> None:
        """Rescan on a timer (events can be missed, NFS has none) and recover dead holders."""
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.cfg.poll_interval)
            if stop.is_set():
                return
            try:
                await asyncio.to_thread(self.store.recover)
            except OSError as e:
                log.warning("recovery scan failed: %s", e)
            self._wake()

    def _next(self) -> str | None:
        """The next queued name for this worker thread; None once stopping."""
        with self._cond:
            while not self._stopping.is_set():
                while self._pending:
                    name = self._pending.popleft()
                    if name not in self._in_flight:
                        self._in_flight.add(name)
                        return name
                if self._rescan and not self._scanning:
                    self._rescan = False
                    self._scanning = True
                    self._cond.release()  # others may take work while we list the folder
                    try:
                        names = self.store.queued()
                        events.seen_queued(self.store, names)
                    finally:
                        self._cond.acquire()
                        self._scanning = False
                    now = time.monotonic()
                    fresh = [
                        n
                        for n in names
                        if n not in self._in_flight and self._backoff.get(n, 0) <= now
                    ]
                    self._pending.extend(fresh)
                    # more may arrive while we work through these: look again after
                    self._rescan = self._rescan or bool(fresh)
                    self._cond.notify_all()
                    continue
                self._cond.wait()
        return None

    def _work(self) -> None:
        while True:
            name = self._next()
            if name is None:
                return
            try:
                claimed = self.process(name)
            except Exception:
                log.exception("processing %s failed", name)
                claimed = True
            retry_later = not claimed and (self.store.state_dir("queue") / name).is_dir()
            with self._cond:
                self._in_flight.discard(name)
                if retry_later:
                    self._backoff[name] = time.monotonic() + self.cfg.poll_interval
                else:
                    self._backoff.pop(name, None)

    # -- one job (worker thread) ----------------------------------------------------

    def process(self, name: str) -> bool:
        """Claim and run one queued job; False if it was not ours to take."""
        with _Slot(self._slots) as slot:
            if self._stopping.is_set():
                return False
            hold = self.store.claim(name)
            if hold is None:
                return False
            self._run(hold, slot)
        return True

    def _run(self, hold: Hold, slot: _Slot) -> None:
        name = hold.name
        t0 = time.monotonic()
        log.info("job %s picked up", name)
        state = "error"
        try:
            state = self._run_job(hold, slot)
        except Exception as e:
            log.exception("job %s: internal error", name)
            with contextlib.suppress(OSError, jobdir.LogError):
                jobdir.append_log(hold.dir_fd, f"internal error, job stopped: {e}")
        finally:
            events.finishing(self.store, name)
            job = self.store.finish(hold, state)
        log.info(
            "job %s finished: %s in %.3fs%s",
            name,
            job.status,
            time.monotonic() - t0,
            f" (as {job.name})" if job.name != name else "",
        )

    def _run_job(self, hold: Hold, slot: _Slot) -> str:
        """Run the job's remaining tasks; return the state it should go to."""
        path = hold.path
        try:
            log_fd = jobdir.open_log(hold.dir_fd)
        except jobdir.LogError as e:
            log.warning("job %s: %s", hold.name, e)
            jobdir.record_failure(hold.dir_fd, str(e))
            return "error"
        try:
            try:
                job = jobdir.load_job(hold.dir_fd)
            except jobfile.JobFileError as e:
                log_line(
                    log_fd,
                    f"cannot run this job: {e}. JOB was left as it is; fix it "
                    "and queue the job again.",
                )
                log.warning("job %s: %s", hold.name, e)
                return "error"
            while job.todo:
                if self._stopping.is_set():
                    log_line(
                        log_fd, f"service stopping: job goes back to queue/ at task {job.todo[0]}"
                    )
                    return "queue"
                task = job.todo[0]
                process = TaskProcess()
                with self._running_lock:
                    self._running[hold.name] = process
                events.task_started(self.store, hold, task)
                try:
                    result = run_task(
                        task,
                        job_dir=path,
                        job_name=hold.name,
                        tasks_dir=self.cfg.tasks_dir,
                        control=self._control.file(threading.get_ident()),
                        env=self.env,
                        log_fd=log_fd,
                        hold_fd=hold.fd,
                        timeout=self.cfg.task_timeout,
                        process=process,
                    )
                finally:
                    with self._running_lock:
                        self._running.pop(hold.name, None)
                events.task_ended(self.store, hold, result)
                if result.interrupted:
                    log_line(log_fd, f"service stopping: job goes back to queue/ at task {task}")
                    return "queue"
                job.finished.append(jobdir.finished_record(result))
                if result.ok:
                    job.todo.pop(0)
                    job.todo.extend(result.added)
                if not result.ok or not job.todo:
                    slot.release()  # the job runs no more tasks: its slot is free
                jobdir.save_job(hold.dir_fd, job)
                if not result.ok:
                    return "error"
            return "success"
        finally:
            os.close(log_fd)


class _Slot:
    """One of the --workers task slots; released early once a job runs no more tasks."""

    def __init__(self, slots: threading.BoundedSemaphore) -> None:
        self._slots = slots
        self._held = False

    def __enter__(self) -> _Slot:
        self._slots.acquire()
        self._held = True
        return self

    def release(self) -> None:
        if self._held:
            self._held = False
            self._slots.release()

    def __exit__(self, *exc: object) -> None:
        self.release()
