"""Uploads' receiving end (api/transfer.receive_into): whatever pieces a body arrives in,
the file holds exactly the body and the SHA-256 is the body's; limits and write errors
surface as errors, with the worker threads done before the call returns. And the
installed uvicorn offers the body stream and the socket body (batchingest.connections)
uploads read from, and a connection goes on after a socket body only if it was read to
its end."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import itertools
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from hypothesis import given, settings
from hypothesis import strategies as st
from in_thread import uvicorn_in_thread
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from batchingest.api import transfer
from batchingest.api.errors import ApiError
from batchingest.api.transfer import Upload
from batchingest.connections import (
    BODY_SOCKET,
    BODY_STREAM,
    Limits,
    SocketBody,
    _content_length,
    limited_protocol,
)


async def pieces(parts: list[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part
        await asyncio.sleep(0)  # let the worker threads' results in between


def split(body: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(body) + 1) for c in cuts} | {0, len(body)})
    return [body[a:b] for a, b in itertools.pairwise(points)]


def receive(path: Path, parts: list[bytes], max_upload: int = 0, batch: int = 64) -> Upload:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        return asyncio.run(transfer.receive_into(fd, pieces(parts), max_upload, batch))
    finally:
        os.close(fd)


@settings(max_examples=60, deadline=None)
@given(
    body=st.binary(max_size=2000),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=20),
    batch=st.integers(min_value=1, max_value=300),
    empties=st.booleans(),
)
def test_any_pieces_give_the_body_and_its_digest(
    tmp_path_factory: pytest.TempPathFactory, body: bytes, cuts: list[int], batch: int,
    empties: bool,
) -> None:  # fmt: skip
    parts = split(body, cuts)
    if empties:
        parts = [b"", *(p for part in parts for p in (part, b""))]
    path = tmp_path_factory.mktemp("up") / "f"
    got = receive(path, parts, batch=batch)
    assert path.read_bytes() == body
    assert got.size == len(body)
    assert got.sha256 == hashlib.sha256(body).digest()


def test_many_batches_of_real_size(tmp_path: Path) -> None:
    """More buffers' worth than exist (BUFFERS), in pieces that straddle them."""
    body = os.urandom(transfer.BATCH * (transfer.BUFFERS + 2) + 12345)
    parts = split(body, list(range(0, len(body), 300_007)))
    got = receive(tmp_path / "f", parts, batch=transfer.BATCH)
    assert (tmp_path / "f").read_bytes() == body
    assert got.sha256 == hashlib.sha256(body).digest()


def test_over_the_limit_is_413(tmp_path: Path) -> None:
    with pytest.raises(ApiError) as caught:
        receive(tmp_path / "f", [b"x" * 600, b"x" * 600], max_upload=1000)
    assert caught.value.status == 413
    assert (tmp_path / "f").stat().st_size <= 1000  # nothing past the limit was written


def test_a_write_error_surfaces(tmp_path: Path) -> None:
    """A file the writes fail on (as a full disk would): the error comes back, at once."""
    path = tmp_path / "f"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as caught:
            asyncio.run(transfer.receive_into(fd, pieces([b"y" * 500] * 10), 0, 64))
    finally:
        os.close(fd)
    assert caught.value.errno == errno.EBADF


@contextlib.contextmanager
def running(
    app: ASGIApp, protocol: type[asyncio.Protocol] | None = None, **settings: Any
) -> Iterator[tuple[int, uvicorn.Server, threading.Thread]]:
    """app on uvicorn with the service's protocol, in a thread: (port, server, thread)."""
    with uvicorn_in_thread(app, protocol or limited_protocol(Limits()), **settings) as running:
        yield running


@contextlib.contextmanager
def serving(app: ASGIApp) -> Iterator[int]:
    """app on uvicorn with the service's protocol, in a thread; yields the port."""
    with running(app) as (port, _, _):
        yield port


def test_the_installed_uvicorn_offers_the_body_stream() -> None:
    """The stream relies on uvicorn's request cycle; were it not offered, uploads would
    still work (through receive()) but slower, so say so here."""
    seen: dict[str, object] = {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        first = await receive()
        stream = scope.get("extensions", {}).get(BODY_STREAM, lambda: None)()
        seen["stream"] = type(stream).__name__
        rest = [piece async for piece in stream] if stream is not None else []
        seen["body"] = first["body"] + b"".join(rest)
        await Response(b"ok")(scope, receive, send)

    body = os.urandom(5 << 20)
    with serving(app) as port:
        assert httpx.put(f"http://127.0.0.1:{port}/", content=body, timeout=30).status_code == 200
    assert seen["stream"] == "BodyStream"
    assert seen["body"] == body


def read_socket_body(body: SocketBody) -> bytes:
    got = bytearray()
    buf = memoryview(bytearray(100_000))
    while n := body.read_into(buf):
        got += buf[:n]
    return bytes(got)


async def socket_body_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers a PUT with how its body was read and the body's SHA-256."""
    if scope["type"] != "http":
        return
    first = await receive()
    body = None
    if first.get("more_body"):
        body = scope["extensions"][BODY_SOCKET]()
    if body is None:
        how, data = "receive", first["body"]
        while first.get("more_body"):
            first = await receive()
            data += first["body"]
    else:
        try:
            how = "socket"
            data = first["body"] + body.head + await asyncio.to_thread(read_socket_body, body)
        finally:
            body.release()
    answer = f"{scope['method']} {how} {len(data)} {hashlib.sha256(data).hexdigest()}"
    await Response(answer.encode())(scope, receive, send)


def responses(sock: socket.socket, count: int) -> list[bytes]:
    """The bodies of count answers with a Content-Length, in order."""
    data, bodies = b"", []
    while len(bodies) < count:
        while b"\r\n\r\n" not in data:
            more = sock.recv(65536)
            assert more, "connection closed"
            data += more
        head, _, data = data.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        while len(data) < length:
            data += sock.recv(65536)
        bodies.append(data[:length])
        data = data[length:]
    return bodies


def test_a_content_length_body_is_read_from_the_socket_and_the_connection_goes_on() -> None:
    """The body the server had not parsed is read from the socket; a request sent right
    behind it (pipelined, in the same packets) is then parsed by a new parser."""
    body = os.urandom((6 << 20) + 3)
    put = b"PUT /a HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    chunked = (
        b"PUT /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )
    with serving(socket_body_app) as port, socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(30)
        sock.sendall(put + body + b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n")
        first, second = responses(sock, 2)
        sock.sendall(chunked + put + body)
        third, fourth = responses(sock, 2)
    digest = hashlib.sha256(body).hexdigest()
    assert first.decode() == f"PUT socket {len(body)} {digest}"
    assert second.decode() == f"GET receive 0 {hashlib.sha256(b'').hexdigest()}"
    assert third.decode() == f"PUT receive 3 {hashlib.sha256(b'abc').hexdigest()}"
    assert fourth.decode() == f"PUT socket {len(body)} {digest}"


def test_a_socket_body_not_read_to_its_end_closes_the_connection() -> None:
    """The parser never saw the bytes read from the socket: a body given up half-way
    (as when the handler was cancelled) ends the connection, answer and all."""
    read: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await receive()
        body = scope["extensions"][BODY_SOCKET]()
        read.append(await asyncio.to_thread(body.read_into, memoryview(bytearray(1000))))
        body.release()
        await Response(b"too late")(scope, receive, send)

    got = b""
    with serving(app) as port, socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(30)
        sock.sendall(b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nx")
        time.sleep(0.3)
        with contextlib.suppress(ConnectionError):
            sock.sendall(b"x" * 99_999)
            while more := sock.recv(65536):
                got += more
    assert 0 < read[0] <= 1000
    assert got == b""


@pytest.mark.parametrize(
    ("headers", "length"),
    [
        ([(b"content-length", b"12")], 12),
        ([(b"host", b"x"), (b"content-length", b"0")], 0),
        ([], None),
        ([(b"content-length", b"12"), (b"content-length", b"12")], None),
        ([(b"content-length", b"12"), (b"transfer-encoding", b"chunked")], None),
        ([(b"transfer-encoding", b"chunked")], None),
        ([(b"content-length", b"-1")], None),
        ([(b"content-length", b"1 2")], None),
    ],
)
def test_only_one_plain_content_length_lets_a_body_be_read_from_the_socket(
    headers: list[tuple[bytes, bytes]], length: int | None
) -> None:
    """The socket is read for exactly the declared bytes; anything ambiguous is left to
    the parser, which knows the framing."""
    assert _content_length(headers) == length


def test_stop_ends_a_read_the_client_keeps_feeding() -> None:
    """A client sending faster than the body is written never leaves the socket empty:
    stop() still ends the read at its next read, and the client learns at once that
    the connection is over (it is abandoned), not once the thread is done."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    server.setblocking(False)
    body = SocketBody(os.dup(server.fileno()), b"", 1 << 40, lambda _: None)
    sending = threading.Event()
    sending.set()

    def send() -> None:
        with contextlib.suppress(OSError):
            while sending.is_set():
                client.sendall(b"x" * 65536)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        buf = memoryview(bytearray(1 << 16))
        read = 0
        while read < 4 << 20:
            read += body.read_into(buf)
        time.sleep(0.2)  # the socket's buffers fill up: a read would not wait
        body.stop()
        with pytest.raises(ClientDisconnect):
            body.read_into(buf)
        client.settimeout(10)
        assert client.recv(1) == b""  # the end of the stream, not a timeout
    finally:
        sending.clear()
        body.release()
        server.close()
        client.close()
        sender.join(10)


class SlowDisk:
    """The write end of a pipe drained slowly: an upload's file on a disk slower than
    the network, so the socket it is read from never runs empty."""

    def __init__(self) -> None:
        self.out, self.fd = os.pipe()
        self.drained = 0
        self.thread = threading.Thread(target=self._drain)
        self.thread.start()

    def _drain(self) -> None:
        while data := os.read(self.out, 65536):
            self.drained += len(data)
            time.sleep(0.005)  # about 12 MB/s

    def close(self) -> None:
        os.close(self.fd)
        self.thread.join(30)
        os.close(self.out)


def send_forever(port: int, stop: threading.Event) -> None:
    """A PUT of a body far larger than is ever sent, as fast as the server takes it."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"PUT /f HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (1 << 40))
        while not stop.is_set():
            s.sendall(b"z" * (1 << 20))


@pytest.mark.parametrize("end", ["connection lost", "graceful shutdown over"])
def test_an_upload_abandoned_while_the_client_sends_ends_without_its_body(end: str) -> None:
    """An upload read from the socket, slower than the client sends, whose connection is
    lost (closed by the server) or whose task is cancelled (uvicorn's grace period
    over): the read ends at once and the upload is not completed, however much more
    the client would send."""
    outcome: list[str] = []
    protocols: list[asyncio.Protocol] = []
    disk = SlowDisk()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        try:
            got = await transfer.receive_body(Request(scope, receive), disk.fd, 0)
            outcome.append(f"completed {got.size}")
        except BaseException as e:
            outcome.append(type(e).__name__)
            raise

    class Noted(limited_protocol(Limits())):  # type: ignore[misc]
        def connection_made(self, transport: asyncio.Transport) -> None:
            protocols.append(self)
            super().connection_made(transport)

    stop = threading.Event()
    with running(app, Noted, timeout_graceful_shutdown=0.5) as (port, server, thread):
        client = threading.Thread(target=send_forever, args=(port, stop))
        client.start()
        try:
            while disk.drained < 2 << 20:
                time.sleep(0.01)
            if end == "connection lost":
                transport = protocols[0].transport  # type: ignore[attr-defined]
                protocols[0].loop.call_soon_threadsafe(transport.close)  # type: ignore[attr-defined]
            else:
                server.should_exit = True
            deadline = time.monotonic() + 10  # generous: the read ends at its next read
            while not outcome and time.monotonic() < deadline:
                time.sleep(0.05)
            assert outcome == ["ClientDisconnect" if end == "connection lost" else "CancelledError"]
            if end != "connection lost":
                thread.join(10)
                assert not thread.is_alive()
        finally:
            stop.set()
            client.join(30)
            disk.close()


@pytest.mark.parametrize(
    ("error", "disconnect"),
    [(errno.EHOSTUNREACH, True), (errno.ENETUNREACH, True), (errno.ECONNABORTED, True),
     (errno.ETIMEDOUT, True), (errno.EBADF, False)],
)  # fmt: skip
def test_a_network_error_reading_the_body_is_the_client_gone(
    monkeypatch: pytest.MonkeyPatch, error: int, disconnect: bool
) -> None:
    """The network failing under a read (as an ICMP error on the connection would make
    it) is the client gone, answered as such, not the service failing; anything else
    is still an error of the service."""
    a, b = socket.socketpair()
    body = SocketBody(os.dup(a.fileno()), b"", 10, lambda _: None)

    def failing(fd: int, buffers: list[memoryview]) -> int:
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(os, "readv", failing)
    try:
        with pytest.raises(ClientDisconnect if disconnect else OSError) as caught:
            body.read_into(memoryview(bytearray(10)))
        assert isinstance(caught.value, ClientDisconnect) == disconnect
    finally:
        monkeypatch.undo()
        body.release()
        a.close()
        b.close()
