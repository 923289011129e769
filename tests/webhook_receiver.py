"""Real HTTP webhook receivers on loopback ports, recording every request, for tests,
and the in-process harness running Webhooks on a real Store."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from live_service import wait_for

from batchingest.config import Config
from batchingest.health import Progress
from batchingest.store import Store
from batchingest.webhooks import Webhooks


@dataclass
class Receipt:
    path: str  # with the query
    headers: dict[str, str]  # lower-case names
    body: bytes
    at: float

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body)  # type: ignore[no-any-return]


class Receiver:
    """A threaded HTTP server answering POSTs with scripted statuses (then `default`)."""

    def __init__(
        self,
        statuses: Iterable[int] = (),
        default: int = 200,
        port: int = 0,
        host: str = "127.0.0.1",
        answer: bytes = b"thanks",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.statuses = list(statuses)
        self.default = default
        self.answer = answer
        self.extra_headers = headers or {}
        self.receipts: list[Receipt] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                hdrs = {k.lower(): v for k, v in self.headers.items()}
                with receiver._lock:
                    receiver.receipts.append(Receipt(self.path, hdrs, body, time.monotonic()))
                    status = receiver.statuses.pop(0) if receiver.statuses else receiver.default
                self.send_response(status)
                for k, v in receiver.extra_headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(receiver.answer)))
                self.end_headers()
                self.wfile.write(receiver.answer)

            def log_message(self, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            allow_reuse_address = True
            # socketserver's backlog of 5 drops connections when a burst of deliveries
            # arrives at once (they then fail with a reset and wait for their retry)
            request_queue_size = 128
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        self.server = Server((host, port), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r.json for r in self.receipts]

    def wait(self, count: int, timeout: float = 20) -> list[Receipt]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.receipts) >= count:
                    return list(self.receipts)
            time.sleep(0.01)
        raise AssertionError(f"expected {count} webhook POSTs, got {len(self.receipts)}")

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class Silent:
    """A port that accepts connections (the kernel does) but never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port = int(self.sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}/hook"

    def __enter__(self) -> Silent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


# The receiver recipe of the README, verbatim: tests check it against real POSTs.
def readme_verify(secret: bytes, headers, body: bytes, tolerance: int = 300) -> bool:  # type: ignore[no-untyped-def]
    ts = headers.get("X-Batchingest-Timestamp", "")
    sent = headers.get("X-Batchingest-Signature", "")
    if not ts.isdigit() or abs(time.time() - int(ts)) > tolerance:
        return False
    mac = hmac.new(secret, ts.encode() + b"." + body, hashlib.sha256)
    return hmac.compare_digest(sent, "sha256=" + mac.hexdigest())


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    return readme_verify(secret.encode(), httpx.Headers(headers), body)


# -- in-process harness: a real Store and Webhooks on a loop in a thread -------------------


@contextmanager
def running(
    store: Store, backoff: float = 0.01, progress: Progress | None = None, **cfg: Any
) -> Iterator[Webhooks]:
    """Webhooks attached to the store and delivering on a loop in a background thread.

    The receivers listen on 127.0.0.1, which webhooks refuse unless allowed: tests allow
    it unless they pass their own webhook_allow.
    """
    cfg.setdefault("webhook_allow", ["127.0.0.1"])
    hooks = Webhooks(Config(root=store.root, **cfg), store, progress)
    hooks.backoff = backoff
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop: list[asyncio.Event] = []

    async def main() -> None:
        stop.append(asyncio.Event())
        hooks.attach()
        started.set()
        await hooks.run(stop[0])

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield hooks
    finally:
        loop.call_soon_threadsafe(stop[0].set)
        thread.join(10)
        assert not thread.is_alive(), "webhooks did not stop promptly"
        hooks.close()
        loop.close()


def new_job(store: Store, name: str, webhook: str, job: str | None = None) -> Path:
    path = store.create(name)[0].path
    (path / "WEBHOOK").write_text(webhook)
    if job is not None:
        (path / "JOB").write_text(job)
    return path


def run_through(store: Store, name: str, final: str = "success") -> str:
    """queue -> processing -> final, as the API and a processor would move it."""
    store.queue(name)
    hold = store.claim(name)
    assert hold is not None
    return store.finish(hold, final).name


def outbox(root: Path) -> list[str]:
    return sorted(p.name for p in (root / ".outbox").glob("*.json"))


def failed(root: Path) -> list[dict[str, Any]]:
    return [
        json.loads(p.read_bytes().split(b"\n", 1)[0])
        for p in sorted((root / ".outbox" / "failed").glob("*.json"))
    ]


def job_log(store: Store, name: str, lines: int = 1) -> str:
    """The job's LOG once it has at least `lines` webhook lines (written after a POST)."""

    def read() -> str:
        path = store.get(name).path / "LOG"
        text = path.read_text() if path.exists() else ""
        return text if text.count(" webhook ") >= lines else ""

    return str(wait_for(read, 30, what=f"{lines} webhook lines in the LOG of {name}"))
