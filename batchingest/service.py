"""`batchingest serve`: the processor, the HTTP API and webhook delivery in one event loop."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import sys
import threading
import time

from starlette.types import ASGIApp
from uvicorn.config import Config as UvicornConfig  # not `uvicorn`: see batchingest.lean
from uvicorn.server import Server

from batchingest import lease
from batchingest.config import Config
from batchingest.connections import Limits, connection_budget, limited_protocol
from batchingest.health import Progress, Readiness
from batchingest.store import SWEEP_AFTER, Store, StoreError

log = logging.getLogger("batchingest")


class StartError(Exception):
    """The service cannot start (root unusable, port taken): exit non-zero, don't retry."""


def bind(host: str, port: int, *, shared: bool = False) -> socket.socket:
    """The listening socket; shared: one of the API processes' (SO_REUSEPORT, see
    batchingest.apiprocs)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets that say so, and
    # without it Nagle holds every small response until the delayed ACK (~40 ms)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if shared:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise StartError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


def http_config(cfg: Config, app: ASGIApp) -> UvicornConfig:
    """uvicorn's settings, with the connection limits of batchingest.connections.

    uvicorn installs its own SIGTERM/SIGINT handlers while it serves; they only make it
    stop serving, and the loop's handlers (see serve) still see every signal and stop
    the rest of the service.
    """
    limits = Limits(
        max_connections=connection_budget(cfg.max_connections, cfg.workers),
        header_timeout=cfg.header_timeout,
        max_header_size=cfg.max_header_size,
        body_timeout=cfg.body_timeout,
    )
    return UvicornConfig(
        app,
        # GET /jobs/{id} answered by the protocol itself (api.app.QuickJobInfo)
        http=limited_protocol(limits, getattr(app, "quick", None)),
        timeout_keep_alive=cfg.keep_alive,  # type: ignore[arg-type]  # a float works
        log_config=None,
        access_log=False,
        lifespan="off",
        # X-Forwarded-For/-Proto would only change scope["client"] and ["scheme"], which
        # nothing here reads (no absolute URLs, no client addresses): one layer less a
        # request
        proxy_headers=False,
        ws="none",  # no WebSocket routes: uvicorn need not look for a library for them
        timeout_graceful_shutdown=5,
    )


def _trim_heap() -> None:
    """Give the C heap's free pages back: glibc keeps freed memory resident, in holes
    below the heap's top, until malloc_trim asks for them."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only
    if trim is not None:
        trim(0)


async def _trim_once_started(processor_started: asyncio.Event | None) -> None:
    """_trim_heap once the start-up's temporaries are gone: after the processor's first
    round (Processor.started) when it runs, else at once. The API's start (the app's
    making) leaves about 1 MiB free in the heap, the processor's (its modules read and
    unmarshalled, its threads, the first look at processing/) 1.3 MiB more: trimmed
    before the processor's start, the default service kept that 1.3 MiB for good."""
    if processor_started is not None:
        await processor_started.wait()
    _trim_heap()


class ServiceFailed(Exception):
    """A part of the service (API, processor, webhooks) ended while nothing asked it to."""


def store_for(cfg: Config) -> Store:
    """The store of a process serving cfg (the main one or an extra API process)."""
    store = Store(cfg.root)
    store.owner = lease.Owner.here(cfg.host_id)  # the host in leases and event spools
    if cfg.force_polling:  # no inotify at all: the state folders are listed when they change
        store.watch_from = sys.maxsize
    return store


def _open_store(cfg: Config) -> Store:
    store = store_for(cfg)
    try:
        store.init(sweep_jobs=False)
    except StoreError as e:
        raise StartError(str(e)) from e
    # the job folders are swept once the service runs: with 100,000 jobs that takes
    # seconds, and nothing needs it first (a leftover `.lock` or temporary in a job
    # stops no claim, upload or listing)
    threading.Thread(target=_sweep_jobs, args=(store, cfg.api), name="sweep", daemon=True).start()
    return store


def _sweep_jobs(store: Store, api: bool) -> None:
    time.sleep(SWEEP_AFTER)  # the first listings and claims come first
    t0 = time.monotonic()
    try:
        swept = store.sweep_jobs()
        if swept:
            log.info("removed %d leftover(s) of interrupted work in job folders", swept)
        if api:
            from batchingest.api.upload import sweep_uploads

            # what uploads cut short by a kill -9 left (where unnamed files are not used)
            sweep_uploads(store)
    except Exception:  # a leftover stays until the next start; nothing depends on it
        log.exception("sweeping the job folders failed")
    else:
        log.info("job folders swept for leftovers in %.1fs", time.monotonic() - t0)


async def serve(cfg: Config) -> None:
    metrics_folder = None
    if cfg.api and cfg.api_processes > 1:
        from batchingest.apiprocs import shared_metrics

        metrics_folder = shared_metrics()  # before anything imports prometheus-client
    try:
        await _serve(cfg)
    finally:
        if metrics_folder is not None:
            metrics_folder.close()


async def _serve(cfg: Config) -> None:
    store = await asyncio.to_thread(_open_store, cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    from batchingest.events import Recorder
    from batchingest.webhooks import Webhooks

    # the heartbeats /readyz looks at: the processor beats "processor", webhook delivery
    # "webhooks"; any other loop joins with progress.beat(name, within=seconds)
    progress = Progress()
    recorder = Recorder(store, cfg.events_keep)
    recorder.notes_at_once = cfg.api and cfg.api_processes > 1
    try:
        recorder.attach()
    except StoreError as e:
        raise StartError(str(e)) from e
    webhooks = Webhooks(cfg, store, progress)
    webhooks.attach()
    readiness = Readiness.for_store(store, cfg.min_free, progress)

    runners: list[asyncio.Task[None]] = []
    server: Server | None = None
    if cfg.api:
        from batchingest.api.app import create_app

        app = create_app(cfg, store, readiness)  # an unusable token file is a StartError
        shared = cfg.api_processes > 1
        if shared:  # a plain bind first: a port taken, by a service of ours too, stops us
            bind(cfg.host, cfg.port).close()
        sock = bind(cfg.host, cfg.port, shared=shared)
        server = Server(http_config(cfg, app))
        runners.append(asyncio.create_task(server.serve(sockets=[sock]), name="api"))
        log.info("HTTP API on http://%s:%d", cfg.host, cfg.port)
        if shared:
            runners.append(_api_processes(cfg, store, progress, stop))
    processor_started = None
    if cfg.processor:
        from batchingest.processor import Processor

        processor = Processor(cfg, store, progress)
        processor_started = processor.started
        runners.append(asyncio.create_task(processor.run(stop), name="processor"))
    runners.append(asyncio.create_task(webhooks.run(stop), name="webhooks"))
    trim = asyncio.create_task(_trim_once_started(processor_started), name="trim")
    log.info("batchingest serving jobs root %s", cfg.root)
    try:
        await _until_stopped(stop, runners, server)
    finally:
        trim.cancel()
        recorder.close()
        log.info("stopped")


def _api_processes(
    cfg: Config, store: Store, progress: Progress, stop: asyncio.Event
) -> asyncio.Task[None]:
    """The extra processes serving the API on the port (see batchingest.apiprocs)."""
    from batchingest import logs
    from batchingest.apiprocs import ApiProcesses

    logs.ACCESS.pid = os.getpid()  # every access line says which process answered
    extras = ApiProcesses(cfg, store, progress)
    return asyncio.create_task(extras.run(stop), name="API processes")


async def _until_stopped(
    stop: asyncio.Event, runners: list[asyncio.Task[None]], server: Server | None
) -> None:
    """Wait for a signal; a part that ends before one stops the rest and is a failure
    (ServiceFailed), so that a supervisor (Restart=on-failure) starts the service again."""
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([stopper, *runners], return_when=asyncio.FIRST_COMPLETED)
    ended = [] if stop.is_set() else [t for t in done if t is not stopper]
    for task in ended:
        why = task.exception() or "it returned"
        log.error("%s stopped unexpectedly: %s", task.get_name(), why)
    stop.set()
    log.info("stopping")
    if server is not None:
        server.should_exit = True
    await asyncio.gather(*runners, return_exceptions=True)
    if ended:
        raise ServiceFailed(", ".join(f"{t.get_name()} stopped unexpectedly" for t in ended))
