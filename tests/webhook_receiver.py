"""Real HTTP webhook receivers on loopback ports, recording every request, for tests."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx


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

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
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
