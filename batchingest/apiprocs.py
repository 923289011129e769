"""Extra processes serving the HTTP API (`--api-processes N`).

The main process binds the port, runs the processor, webhook delivery and the event
recorder as always, and serves the API too; N-1 extra processes serve the API on the
same port, each through a listening socket of its own bound with SO_REUSEPORT, so the
kernel spreads new connections evenly over the processes. One inherited socket shared
by all was tried first: a process woken for a burst of new connections accepts them
all, and with 8 keep-alive connections one process often served every request. The
main process binds plainly once before, so a port already taken (by another service of
ours too) still stops the start with exit status 2. Connections an extra process had
not yet accepted when it dies are reset, not taken by the others.

An API request is answered from the jobs root, so an extra process needs no state of
its own, with three exceptions, each carried over a channel to the main process (a
SOCK_SEQPACKET pair, one JSON object a message, one request at a time):

- **moves** (queueing a job, a cancelled queued job back to data/): the main process
  makes the rename (Store.mover), so its listeners write the QUEUED event and the
  webhook `queue` event before its processor can claim the job, in order, as in one
  process;
- **cancel**: after writing `.cancel`, the extra process wakes the main process's
  watchers (control.WAKE_ELSEWHERE), so a running task is stopped at once rather than
  at the next 50 ms look;
- **readiness**: `GET /readyz` asks the main process which of its loops are late, and
  probes the root itself.

Each extra process also writes its own history and feed events (CREATED,
FILE_UPLOADED, ...) as another service on the root would, and its own access lines.
It stops gracefully (in-flight requests finish) on SIGTERM, and when the main process
is gone (its end of a pipe closes: also after a kill -9). The main process starts an
extra process again when one ends unexpectedly; one that keeps ending within
QUICK_EXIT seconds of its start fails the service (ServiceFailed), for a supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import pickle
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchingest.config import Config
from batchingest.health import Progress
from batchingest.store import Job, State, Store, check_name

if TYPE_CHECKING:
    from batchingest.runner import ControlDir

log = logging.getLogger("batchingest")

MAX_MESSAGE = 1 << 16
# an extra process ending this soon after its start, this many times in a row, is
# not started again: the service fails, for its supervisor to see
QUICK_EXIT = 10.0
QUICK_EXITS = 3
# how long an answer of the main process may take: a move waits for one fsync or two
CALL_TIMEOUT = 30.0
READY_TIMEOUT = 2.0
# SIGTERM to SIGKILL for an extra process: uvicorn's graceful shutdown, plus start-up
STOP_WAIT = 8.0


# -- the extra process's side ---------------------------------------------------------


class Channel:
    """Requests to the main process, from any thread, one at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()
        self._next = 0

    def call(self, request: dict[str, Any], timeout: float = CALL_TIMEOUT) -> dict[str, Any]:
        """The main process's answer; OSError when it is gone or does not answer.

        The wait for the channel counts against timeout too: a short call (a wake, a
        readiness look) must not wait behind a move that waits for an fsync.
        """
        if not self._lock.acquire(timeout=timeout):
            raise TimeoutError(errno.ETIMEDOUT, "the main process is busy with another call")
        try:
            self._next += 1
            ident = self._next
            self.sock.settimeout(timeout)
            self.sock.sendall(json.dumps({**request, "id": ident}).encode())
            while True:
                data = self.sock.recv(MAX_MESSAGE)
                if not data:
                    raise ConnectionError(errno.EPIPE, "the main process is gone")
                answer: dict[str, Any] = json.loads(data)
                if answer.get("id") == ident:  # not a late answer to a call that timed out
                    return answer
        finally:
            self._lock.release()

    def move(self, name: str, src: str, dst: str) -> Job:
        """Store.mover: the main process renames, and its listeners see the move."""
        answer = self.call({"op": "move", "name": name, "src": src, "dst": dst})
        if "errno" in answer:
            raise OSError(answer["errno"], answer["error"])  # FileNotFoundError, ...
        return Job(answer["name"], State(answer["state"]), Path(answer["path"]))

    def wake(self) -> None:
        """A cancel request was written: the main process's watchers look now."""
        with contextlib.suppress(OSError):
            self.call({"op": "wake"}, READY_TIMEOUT)


class MainProgress(Progress):
    """The heartbeats of the main process's loops, for this process's /readyz."""

    def __init__(self, channel: Channel) -> None:
        super().__init__()
        self.channel = channel

    def stale(self, now: float | None = None) -> list[str]:
        try:
            return list(self.channel.call({"op": "stale"}, READY_TIMEOUT)["stale"])
        except (OSError, ValueError, KeyError):
            return ["the main process"]


async def serve_extra(cfg: Config, channel: Channel, sock: socket.socket, death_fd: int) -> None:
    """One extra API process: the app on its socket until told to stop."""
    from uvicorn.server import Server

    from batchingest import control
    from batchingest.api.app import create_app
    from batchingest.events import Recorder
    from batchingest.health import Readiness
    from batchingest.service import http_config, store_for

    store = store_for(cfg)
    store.mover = channel.move
    control.WAKE_ELSEWHERE.append(channel.wake)
    recorder = Recorder(store, cfg.events_keep)
    recorder.attach()
    readiness = Readiness.for_store(store, cfg.min_free, MainProgress(channel))
    server = Server(http_config(cfg, create_app(cfg, store, readiness)))

    def stop() -> None:
        server.should_exit = True

    loop = asyncio.get_running_loop()
    loop.add_reader(death_fd, stop)  # readable once the main process's end is closed
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    try:
        await server.serve(sockets=[sock])
    finally:
        recorder.close()


def main(argv: list[str]) -> int:
    """`python -m batchingest.apiprocs CHANNEL_FD DEATH_FD` (the main process starts
    it; the settings come over the channel)."""
    from batchingest import lean, logs

    lean.service_packages()  # before uvicorn and prometheus-client are imported
    from batchingest.cli import _loop_factory
    from batchingest.service import StartError, bind

    # a process group of its own, so a terminal's Ctrl-C reaches the main process only
    # (which stops us); not a session of its own: with the kernel's autogroups a session
    # is scheduled as one, and one per process starved the rest (p99 of 300 ms and more)
    os.setpgid(0, 0)
    channel_fd, death_fd = (int(a) for a in argv)
    link = socket.socket(fileno=channel_fd)
    cfg: Config = pickle.loads(link.recv(MAX_MESSAGE))
    logs.setup(cfg.log_level, cfg.log_format)
    logs.ACCESS.pid = os.getpid()
    try:
        sock = bind(cfg.host, cfg.port, shared=True)
    except StartError as e:
        log.error("%s", e)
        return 2
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(serve_extra(cfg, Channel(link), sock, death_fd))
    return 0


# -- the main process's side ------------------------------------------------------------


def shared_metrics() -> ControlDir:
    """The folder where every API process keeps its counters (see metrics.exposition).

    A control folder (runner.ControlDir: in /dev/shm, locked while we live, swept at a
    later start if we are killed); named in the environment, which the extra processes
    inherit and tasks do not (runner.base_env). It must be set before prometheus-client
    is first imported, which reads it then.
    """
    from batchingest.runner import METRICS_ENV, ControlDir

    if "prometheus_client.values" in sys.modules:  # where it is read
        raise RuntimeError("prometheus_client was imported before its multiprocess folder was set")
    folder = ControlDir()
    os.environ[METRICS_ENV] = str(folder.path)
    return folder


def move_for(store: Store, name: str, src: str, dst: str) -> Job:
    """A move an extra process asked for, made as the API makes it in this process:
    under the recorder's lock of the job, so a claim's events wait for its QUEUED."""
    from batchingest.events import recorder_for

    check_name(name)
    src, dst = State(src), State(dst)
    recorder = recorder_for(store)
    with recorder.lock_of(name) if recorder is not None else contextlib.nullcontext():
        return store.move_here(name, src, dst)


@dataclass
class _Extra:
    index: int
    process: asyncio.subprocess.Process
    link: socket.socket
    answering: asyncio.Task[None]
    started: float


class ApiProcesses:
    """The extra API processes of this service: started, answered, restarted, stopped."""

    def __init__(self, cfg: Config, store: Store, progress: Progress):
        self.cfg = cfg
        self.store = store
        self.progress = progress
        self._death_r, self._death_w = os.pipe()  # we hold the write end until we go
        self._quick = 0

    async def run(self, stop: asyncio.Event) -> None:
        extras = [await self._start(i) for i in range(1, self.cfg.api_processes)]
        try:
            while not stop.is_set():
                ended = await self._first_ended(extras, stop)
                if ended is None:
                    break
                extras[extras.index(ended)] = await self._restart(ended)
        finally:
            await asyncio.gather(*(self._stop(e) for e in extras))
            os.close(self._death_r)
            os.close(self._death_w)

    async def _first_ended(self, extras: list[_Extra], stop: asyncio.Event) -> _Extra | None:
        """The first extra process to end, or None once the service is stopping."""
        waits = {asyncio.ensure_future(e.process.wait()): e for e in extras}
        stopper = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait([stopper, *waits], return_when=asyncio.FIRST_COMPLETED)
        for pending in [stopper, *waits]:
            pending.cancel()
        if stop.is_set():
            return None
        return next(waits[task] for task in waits if task in done)

    async def _restart(self, extra: _Extra) -> _Extra:
        code = extra.process.returncode
        ran = time.monotonic() - extra.started
        await self._close(extra)
        self._quick = self._quick + 1 if ran < QUICK_EXIT else 0
        if self._quick >= QUICK_EXITS:
            raise RuntimeError(
                f"API process {extra.index} ended {QUICK_EXITS} times within {QUICK_EXIT:.0f}s "
                f"of its start (last: exit status {code})"
            )
        log.error(
            "API process %d (pid %d) ended unexpectedly (exit status %s): starting it again",
            extra.index, extra.process.pid, code,
        )  # fmt: skip
        return await self._start(extra.index)

    async def _start(self, index: int) -> _Extra:
        link, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        fds = (theirs.fileno(), self._death_r)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", __name__, *map(str, fds),
                pass_fds=fds,
            )  # fmt: skip
        finally:
            theirs.close()
        link.sendall(pickle.dumps(self.cfg))
        link.setblocking(False)
        answering = asyncio.create_task(self._answer(link), name=f"api process {index}")
        log.info("API process %d started (pid %d)", index, process.pid)
        return _Extra(index, process, link, answering, time.monotonic())

    async def _stop(self, extra: _Extra) -> None:
        """SIGTERM (in-flight requests finish), SIGKILL if it takes too long."""
        if extra.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                extra.process.terminate()
            try:
                await asyncio.wait_for(extra.process.wait(), STOP_WAIT)
            except TimeoutError:
                log.warning("API process %d did not stop in time: killed", extra.index)
                with contextlib.suppress(ProcessLookupError):
                    extra.process.kill()
                await extra.process.wait()
        await self._close(extra)

    @staticmethod
    async def _close(extra: _Extra) -> None:
        extra.answering.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await extra.answering
        extra.link.close()

    async def _answer(self, link: socket.socket) -> None:
        """Answer one extra process's requests until it closes its end."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await loop.sock_recv(link, MAX_MESSAGE)
            except OSError:
                return
            if not data:
                return
            request = json.loads(data)
            answer = await self._handle(request)
            answer["id"] = request.get("id")
            with contextlib.suppress(OSError):
                await loop.sock_sendall(link, json.dumps(answer).encode())

    async def _handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "stale":
            return {"stale": self.progress.stale()}
        if op == "wake":
            from batchingest import control

            control.wake_watchers()
            return {}
        if op == "move":
            args = (request["name"], request["src"], request["dst"])
            try:
                job = await asyncio.to_thread(move_for, self.store, *args)
            except OSError as e:
                return {"errno": e.errno or errno.EIO, "error": e.strerror or str(e)}
            except ValueError as e:  # not a name or state: a bug, never a client's input
                return {"errno": errno.EINVAL, "error": str(e)}
            return {"name": job.name, "state": str(job.state), "path": str(job.path)}
        return {"error": f"unknown request {op!r}"}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
