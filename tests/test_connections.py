"""The HTTP protocol of batchingest.connections under a real uvicorn, over real sockets:
a response's head and body in one send() (OneSend) and answers given from the request
head alone (`quick`), each against what uvicorn's own path answers."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from in_thread import uvicorn_in_thread
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from batchingest.connections import Limits, Quick, limited_protocol

Writes = list[bytes]  # what went to the socket, one entry per send()


def recording(protocol: type[asyncio.Protocol], writes: Writes) -> type[asyncio.Protocol]:
    """protocol, with every write to its socket's transport noted."""

    class Recorder:
        def __init__(self, transport: asyncio.Transport) -> None:
            self.transport = transport

        def write(self, data: bytes) -> None:
            writes.append(bytes(data))
            self.transport.write(data)

        def writelines(self, pieces: tuple[bytes, ...]) -> None:
            writes.append(b"".join(pieces))
            self.transport.writelines(pieces)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.transport, name)

    class Recording(protocol):  # type: ignore[valid-type,misc]
        def connection_made(self, transport: asyncio.Transport) -> None:
            # small socket buffers: a client that does not read is felt at once
            transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            super().connection_made(Recorder(transport))

    return Recording


@contextmanager
def serving(
    app: Any, quick: Quick | None = None, limits: Limits | None = None, **settings: Any
) -> Iterator[tuple[int, Writes]]:
    """uvicorn with the service's protocol on a free port: (port, its writes)."""
    writes: Writes = []
    protocol = recording(limited_protocol(limits or Limits(), quick), writes)
    with uvicorn_in_thread(app, protocol, **settings) as (port, _, _):
        yield port, writes


def exchange(port: int, request: bytes, answers: int = 1, head_only: bool = False) -> bytes:
    """Send request; read until `answers` complete answers arrived or the server closed
    (head_only: an answer to HEAD, whose body is left out)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while (b"\r\n\r\n" not in data) if head_only else len(answers_in(data)) < answers:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def answers_in(data: bytes) -> list[tuple[bytes, bytes]]:
    """The complete (head, body) pairs in data: bodies by Content-Length or chunked."""
    found = []
    while b"\r\n\r\n" in data:
        head, _, rest = data.partition(b"\r\n\r\n")
        fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
        if head.split()[1] in (b"204", b"304"):
            body, data = b"", rest
        elif b"content-length" in fields:
            size = int(fields[b"content-length"])
            if len(rest) < size:
                break
            body, data = rest[:size], rest[size:]
        elif fields.get(b"transfer-encoding") == b"chunked":
            if b"0\r\n\r\n" not in rest:
                break
            body, _, data = rest.partition(b"0\r\n\r\n")
        else:
            body, data = rest, b""
        found.append((head, body))
    return found


def get(path: str, *extra: str, method: str = "GET") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: x", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def plain(scope: Scope, receive: Receive, send: Send) -> None:
    await Response(b'{"ok":true}\n', media_type="application/json")(scope, receive, send)


# -- one send() a response -------------------------------------------------------------


def test_a_small_answer_is_one_send_with_head_and_body() -> None:
    with serving(plain) as (port, writes):
        data = exchange(port, get("/a"))
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(b'\r\n\r\n{"ok":true}\n')
    assert writes == [data]


def test_head_and_204_answers_are_one_send_each() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        status = 204 if scope["path"] == "/none" else 200
        await Response(b"" if status == 204 else b"12345", status)(scope, receive, send)

    with serving(app) as (port, writes):
        head = exchange(port, get("/a", method="HEAD"), head_only=True)
        none = exchange(port, get("/none"))
    assert head.startswith(b"HTTP/1.1 200") and b"content-length: 5\r\n" in head
    assert head.endswith(b"\r\n\r\n")  # no body for HEAD
    assert none.startswith(b"HTTP/1.1 204")
    assert writes == [head, none]


def test_a_streaming_body_gets_its_head_before_its_first_piece() -> None:
    """The head is not held for a body that takes its time: the client has it while
    the app still waits, and the pieces follow as they come, chunked."""
    go_on = threading.Event()

    async def pieces() -> Any:
        while not go_on.is_set():
            await asyncio.sleep(0.01)
        for piece in (b"one,", b"two,", b"three"):
            yield piece
            await asyncio.sleep(0.01)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await StreamingResponse(pieces(), media_type="text/plain")(scope, receive, send)

    with (
        serving(app) as (port, writes),
        socket.create_connection(("127.0.0.1", port), timeout=10) as s,
    ):
        s.sendall(get("/s"))
        head = s.recv(65536)
        assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")
        assert b"transfer-encoding: chunked" in head
        go_on.set()
        rest = b""
        while not rest.endswith(b"0\r\n\r\n"):
            rest += s.recv(65536)
    assert rest == b"4\r\none,\r\n4\r\ntwo,\r\n5\r\nthree\r\n0\r\n\r\n"
    assert writes[0] == head and b"".join(writes[1:]) == rest


def test_keep_alive_and_pipelined_requests_are_answered_in_order() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/slow":
            await asyncio.sleep(0.1)
        if scope["path"].startswith("/sleep/"):
            await asyncio.sleep(float(scope["path"].removeprefix("/sleep/")))
        await Response(scope["path"].encode())(scope, receive, send)

    with serving(app) as (port, writes):
        data = exchange(port, get("/slow") + get("/a") + get("/b"), answers=3)
    assert [body for _, body in answers_in(data)] == [b"/slow", b"/a", b"/b"]
    assert len(writes) == 3 and b"".join(writes) == data


def test_an_app_failing_after_its_head_closes_the_connection_after_the_head() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-length", b"10")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        raise RuntimeError("gone wrong")

    with serving(app) as (port, _):
        data = exchange(port, get("/a"))
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"content-length: 10\r\n\r\n")


def test_an_app_failing_before_its_head_is_a_500() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("gone wrong")

    with serving(app) as (port, writes):
        data = exchange(port, get("/a"))
    assert data.startswith(b"HTTP/1.1 500") and data.endswith(b"Internal Server Error")
    assert writes == [data]


def test_100_continue_goes_out_before_and_apart_from_the_answer() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await Response(body[::-1])(scope, receive, send)

    with (
        serving(app) as (port, writes),
        socket.create_connection(("127.0.0.1", port), timeout=10) as s,
    ):
        s.sendall(get("/up", "Content-Length: 5", "Expect: 100-continue", method="PUT"))
        assert s.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(b"hello")
        answer = b""
        while not answer.endswith(b"olleh"):
            answer += s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200")
    assert writes == [b"HTTP/1.1 100 Continue\r\n\r\n", answer]


# -- answers from the request head alone -------------------------------------------------


class Quickly:
    """A quick handler for /q/...: what it saw, and what it answers."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bytes]] = []

    def __call__(
        self, method: str, target: bytes, headers: list[tuple[bytes, bytes]]
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
        self.seen.append((method, target))
        if target == b"/q/fail":
            raise RuntimeError("a bug")
        if not target.startswith(b"/q/"):
            return None
        body = b"quick " + target
        return 200, [(b"content-length", b"%d" % len(body)), (b"x-by", b"quick")], body


class Counting:
    """An ASGI app that says it answered, and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls += 1
        if scope["path"] == "/slow":
            await asyncio.sleep(0.1)
        if scope["path"].startswith("/sleep/"):
            await asyncio.sleep(float(scope["path"].removeprefix("/sleep/")))
        await Response(b"app " + scope["path"].encode())(scope, receive, send)


def test_a_quick_answer_has_the_apps_framing_and_needs_no_app() -> None:
    app, quick = Counting(), Quickly()
    with serving(app, quick) as (port, writes):
        data = exchange(port, get("/q/a?x=1", "X-Api-Token: t"))
        by_app = exchange(port, get("/other"))
    head, body = answers_in(data)[0]
    assert body == b"quick /q/a?x=1" and app.calls == 1  # the one call: /other
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK"
    names = [line.split(b": ")[0] for line in lines[1:]]
    assert names == [b"date", b"server", b"content-length", b"x-by"]
    # the date and server headers as uvicorn's own answers carry them
    app_head = answers_in(by_app)[0][0].split(b"\r\n")
    assert lines[1:3] == app_head[1:3]
    assert writes == [data, by_app]
    assert quick.seen == [("GET", b"/q/a?x=1"), ("GET", b"/other")]


def test_quick_answers_to_head_keep_alive_and_close() -> None:
    with serving(Counting(), Quickly()) as (port, _):
        head = exchange(port, get("/q/h", method="HEAD"), head_only=True)
        assert head.endswith(b"content-length: 10\r\nx-by: quick\r\n\r\n")  # and no body
        both = exchange(port, get("/q/1") + get("/q/2"), answers=2)
        assert [body for _, body in answers_in(both)] == [b"quick /q/1", b"quick /q/2"]
        # Connection: close is honoured, and what follows on the connection ignored
        closed = exchange(port, get("/q/3", "Connection: close") + get("/q/4"), answers=2)
        assert [body for _, body in answers_in(closed)] == [b"quick /q/3"]
        assert b"connection: close\r\n" in closed
        old = exchange(port, b"GET /q/5 HTTP/1.0\r\n\r\n" + get("/q/6"), answers=2)
        assert [body for _, body in answers_in(old)] == [b"quick /q/5"]


def test_a_request_behind_an_unfinished_answer_waits_its_turn() -> None:
    app = Counting()
    with (
        serving(app, Quickly()) as (port, _),
        socket.create_connection(("127.0.0.1", port), timeout=10) as s,
    ):
        s.sendall(get("/slow") + get("/q/after") + get("/q/too"))
        data = b""
        while len(answers_in(data)) < 3:
            data += s.recv(65536)
        # these came while /slow was being answered: the app answers them, in turn
        assert [body for _, body in answers_in(data)] == [
            b"app /slow",
            b"app /q/after",
            b"app /q/too",
        ]
        s.sendall(get("/q/later"))  # nothing in the way any more
        data = b""
        while not answers_in(data):
            data += s.recv(65536)
        assert answers_in(data)[0][1] == b"quick /q/later"


def test_what_quick_does_not_take_goes_to_the_app() -> None:
    app, quick = Counting(), Quickly()
    with serving(app, quick) as (port, _):
        with_body = exchange(port, get("/q/b", "Content-Length: 3", method="PUT") + b"abc")
        chunked = exchange(port, get("/q/c", "Transfer-Encoding: chunked") + b"0\r\n\r\n")
        empty = exchange(port, get("/q/e", "Content-Length: 0"))
        failing = exchange(port, get("/q/fail"))
    assert answers_in(with_body)[0][1] == b"app /q/b"
    assert answers_in(chunked)[0][1] == b"app /q/c"
    assert answers_in(empty)[0][1] == b"quick /q/e"  # an empty body is no body
    assert answers_in(failing)[0][1] == b"app /q/fail"  # a failing handler: the app's turn
    assert app.calls == 3
    assert ("PUT", b"/q/b") not in quick.seen


@pytest.mark.parametrize("quick", [None, Quickly()])
def test_the_head_timeout_holds_on_a_keep_alive_connection(quick: Quickly | None) -> None:
    """One head timer a connection: a head begun long after the timer was set still
    gets its full time, and a head that never ends is still refused."""
    with (
        serving(Counting(), quick, Limits(header_timeout=0.5)) as (port, _),
        socket.create_connection(("127.0.0.1", port), timeout=10) as s,
    ):
        s.sendall(get("/q/1"))
        assert b"/q/1" in s.recv(65536)
        time.sleep(0.3)  # the next head begins 0.3 s into the first timer's 0.5 s
        s.sendall(b"GET /q/2 HTTP/1.1\r\nHo")
        time.sleep(0.35)  # past the first timer, within this head's own time
        s.sendall(b"st: x\r\n\r\n")
        assert b"/q/2" in s.recv(65536)
        s.sendall(b"GET /q/3 HTTP/1.1\r\n")  # and never the rest
        t0 = time.monotonic()
        refused = s.recv(65536)
        assert refused.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 3


def test_a_connection_idle_after_quick_answers_is_closed_after_keep_alive() -> None:
    with (
        serving(Counting(), Quickly(), timeout_keep_alive=0.5) as (port, _),
        socket.create_connection(("127.0.0.1", port), timeout=10) as s,
    ):
        for i in range(5):  # busy for 1.2 s, longer than keep-alive: stays open
            s.sendall(get(f"/q/{i}"))
            assert f"/q/{i}".encode() in s.recv(65536)
            time.sleep(0.3)
        t0 = time.monotonic()
        assert s.recv(65536) == b""  # then idle: closed
        assert 0.1 < time.monotonic() - t0 < 3


def test_a_request_pipelined_behind_a_quick_answer_outlives_keep_alive() -> None:
    """The keep-alive timer set after a quick answer is for an idle connection: a
    request that arrived with it, in the same read, and takes the app longer than
    keep-alive still gets its answer."""
    with (
        serving(Counting(), Quickly(), timeout_keep_alive=0.5) as (port, _),
        socket.create_connection(("127.0.0.1", port), timeout=10) as s,
    ):
        s.sendall(get("/q/1") + get("/sleep/1.5"))
        data = b""
        while len(answers_in(data)) < 2:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    assert [body for _, body in answers_in(data)] == [b"quick /q/1", b"app /sleep/1.5"]


@pytest.mark.parametrize("every_app", [7, 0])
def test_a_client_that_does_not_read_gets_every_answer_in_order_at_last(every_app: int) -> None:
    """Many pipelined requests, read only once all are sent: once the socket's buffers
    are full the protocol stops answering at once and uvicorn's path, which waits for
    the client, takes over (answers do not pile up in memory); every answer still
    comes, in order. every_app: every so many a request only the app answers."""
    app = Counting()
    requests = [
        f"/app/{i}" if every_app and i % every_app == 0 else f"/q/{i:05}" for i in range(2000)
    ]
    with (
        serving(app, Quickly()) as (port, _),
        socket.create_connection(("127.0.0.1", port), timeout=60) as s,
    ):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"".join(get(path) for path in requests))
        time.sleep(0.5)  # the server answers into a full socket meanwhile
        data = b""
        while len(answers_in(data)) < len(requests):
            chunk = s.recv(1 << 20)
            assert chunk, "closed early"
            data += chunk
    bodies = [body.split()[-1].decode() for _, body in answers_in(data)]
    assert bodies == requests
    assert app.calls > (len(requests) // every_app if every_app else 0)
