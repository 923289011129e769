"""`batchingest serve`: the processor, the HTTP API and webhook delivery in one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Iterator

import uvicorn

from batchingest.config import Config
from batchingest.store import Store, StoreError

log = logging.getLogger("batchingest")


class StartError(Exception):
    """The service cannot start (root unusable, port taken): exit non-zero, don't retry."""


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the service decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def install_signal_handlers(self) -> None:  # older uvicorn
        pass


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets that say so, and
    # without it Nagle holds every small response until the delayed ACK (~40 ms)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise StartError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


async def serve(cfg: Config) -> None:
    store = Store(cfg.root)
    try:
        store.init()
    except StoreError as e:
        raise StartError(str(e)) from e

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    from batchingest.events import Recorder
    from batchingest.webhooks import Webhooks

    recorder = Recorder(store, cfg.events_keep)
    try:
        recorder.attach()
    except StoreError as e:
        raise StartError(str(e)) from e
    webhooks = Webhooks(cfg, store)
    webhooks.attach()

    runners: list[asyncio.Task[None]] = []
    server: _Server | None = None
    if cfg.api:
        from batchingest.api.app import create_app
        from batchingest.api.auth import TokenError

        try:
            app = create_app(cfg, store)
        except TokenError as e:
            raise StartError(str(e)) from e
        sock = bind(cfg.host, cfg.port)
        server = _Server(
            uvicorn.Config(
                app, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=5
            )
        )
        runners.append(asyncio.create_task(server.serve(sockets=[sock]), name="api"))
        log.info("HTTP API on http://%s:%d", cfg.host, cfg.port)
    if cfg.processor:
        from batchingest.processor import Processor

        processor = Processor(cfg, store)
        runners.append(asyncio.create_task(processor.run(stop), name="processor"))
    runners.append(asyncio.create_task(webhooks.run(stop), name="webhooks"))
    log.info("batchingest serving jobs root %s", cfg.root)

    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([stopper, *runners], return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        if task is not stopper and task.exception() is not None:
            stop.set()
            log.error("%s stopped: %s", task.get_name(), task.exception())
    stop.set()
    log.info("stopping")
    if server is not None:
        server.should_exit = True
    await asyncio.gather(*runners, return_exceptions=True)
    recorder.close()
    log.info("stopped")
