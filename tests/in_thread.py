"""uvicorn with a given HTTP protocol, in a thread of the test process: for the tests of
the service's protocol (batchingest.connections), which watch it send by send."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn


@contextlib.contextmanager
def uvicorn_in_thread(
    app: Any, protocol: type[asyncio.Protocol], **settings: Any
) -> Iterator[tuple[int, uvicorn.Server, threading.Thread]]:
    """app served with protocol on a free loopback port: (port, server, thread)."""
    sock = socket.create_server(("127.0.0.1", 0))
    config = uvicorn.Config(app, http=protocol, log_config=None, lifespan="off", **settings)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=asyncio.run, args=(server.serve(sockets=[sock]),))
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        yield sock.getsockname()[1], server, thread
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
