"""Limits on HTTP connections that uvicorn does not set by itself.

uvicorn (with httptools) reads a request head for as long as the client likes, buffers
a head of any size, and accepts connections until the process runs out of file
descriptors; about 180 half-sent requests were enough to starve the processor. So the
HTTP protocol the service runs is uvicorn's httptools protocol with three limits added:

- at most `max_connections` open connections; one more is answered 503 and closed
  before anything is read, so descriptors stay free for jobs;
- a request head (request line and headers) must arrive within `header_timeout`
  seconds of its first byte, or of the connection being opened (408, closed);
- a request head may be at most `max_header_size` bytes (431, closed): it is counted
  as it arrives, so a huge header costs no more memory than that;
- an upload's body may go at most `body_timeout` seconds without a byte (a client
  that stalls mid-body holds a connection, a thread and a temporary file): then its
  connection is closed and the upload dropped (BodyTimeout).

Idle keep-alive connections are closed by uvicorn's own `timeout_keep_alive`.

For the limits only public interfaces are used: the protocol class is handed to uvicorn
through `uvicorn.Config(http=...)`, and what is added hooks into asyncio.Protocol
methods and the httptools parser callbacks (`on_message_begin`, `on_headers_complete`),
which are the interface between httptools and any protocol using it.

It also offers a handler the rest of a request body straight from the parser
(`BodyStream`, through the scope extension `BODY_STREAM`), for uploads: uvicorn's own
receive() copies each piece twice (into its buffer, then out again) and wakes the
handler once per socket read. That needs uvicorn's own request cycle (`body`,
`more_body`, `disconnected`, `response_complete`) and flow control (`flow`), which are
not a public interface: the stream is offered only while they are all there, so a
uvicorn that changes them makes uploads fall back to receive(), which always works.
The rest of a body with a Content-Length can be taken further (`SocketBody`, through
`BODY_SOCKET`): the server stops reading the socket, the handler reads the body from it
in a thread, and when all of it is read a new parser takes the connection's next
request (the old one never saw those bytes); if the body is not read to its end, the
connection is closed. That needs uvicorn's `parser` and `flow` too (checked by
tests/test_upload_stream.py and tests/e2e/test_upload_stream_e2e.py).

tests/e2e/test_limits.py checks each limit, and tests/e2e/test_upload_stream_e2e.py the
stream, against the uvicorn that is installed.

And it sends a response's head with the first piece of its body (`OneSend`): uvicorn
writes the status line and headers, then the body, with a send() each, which for a small
answer is two trips through the TCP stack (and two wake-ups of the client) where one
does. That needs only the transport interface (uvicorn writes through
`protocol.transport`) and one method of uvicorn's protocol (`on_response_complete`,
called once each response is over).

Last, it answers some requests from their head alone, without the ASGI app (`quick`,
LimitedHttpToolsProtocol.answer_at_once; GET /jobs/{id}, api.app.QuickJobInfo): a
request cycle, a task and the ASGI messages through the middleware cost more CPU than
the job's info. That relies on uvicorn's per-request state (`cycle`, `pipeline`,
`headers`, `url`, the keep-alive timer): tests/test_connections.py checks both against
the uvicorn that is installed, send() by send(), and tests/e2e/test_quick_e2e.py that
the service's answers, access lines and metrics are the app's.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import logging
import os
import resource
import select
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, cast

import httptools
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("batchingest.api")

# Descriptors one connection may hold at once: its socket, plus a file being sent or an
# upload's temporary file, its folder and a duplicate of the socket (SocketBody).
FDS_PER_CONNECTION = 4


@dataclass(frozen=True)
class Limits:
    max_connections: int = 256
    header_timeout: float = 10.0
    max_header_size: int = 64 << 10
    body_timeout: float = 60.0


class BodyTimeout(ClientDisconnect):
    """No byte of the request body for `Limits.body_timeout`: the connection is closed,
    and the request's work dropped as if the client had gone."""


def connection_budget(wanted: int, workers: int) -> int:
    """At most `wanted` connections, fewer if the descriptor limit cannot carry them.

    What is kept aside covers the processor (lock, LOG and JOB of every running job,
    spawning tasks), webhook delivery (up to 32 sockets and outbox files) and the rest.
    """
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    reserve = 128 + 8 * workers
    fits = max(1, (soft - reserve) // FDS_PER_CONNECTION)
    if fits < wanted:
        log.warning(
            "--max-connections %d lowered to %d: the descriptor limit (ulimit -n) is %d",
            wanted,
            fits,
            soft,
        )
        return fits
    return wanted


def _response(status: int, reason: str, code: str, message: str) -> bytes:
    """A complete HTTP/1.1 answer in the API's error shape, closing the connection."""
    body = json.dumps({"code": code, "message": message, "request_id": "", "resource": ""})
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nx-error-code: {code}\r\nconnection: close\r\n\r\n"
    )
    return (head + body).encode()


TOO_MANY = _response(503, "Service Unavailable", "TooManyConnections",
                     "too many open connections; try again later")  # fmt: skip
TOO_SLOW = _response(408, "Request Timeout", "RequestTimeout",
                     "the request head did not arrive in time")  # fmt: skip
TOO_LARGE = _response(431, "Request Header Fields Too Large", "HeadersTooLarge",
                      "the request line and headers are too large")  # fmt: skip


# a flood must not flood the log too: one line per this many seconds
WARN_EVERY = 60.0
_last_warning = [-WARN_EVERY]


def _warn_refusing(limit: int) -> None:
    now = time.monotonic()
    if now - _last_warning[0] >= WARN_EVERY:
        _last_warning[0] = now
        log.warning("refusing connections: %d are open (--max-connections)", limit)


# an interim answer, written before the head it must not be joined to
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class OneSend:
    """A connection's transport as uvicorn writes to it: the head of each response
    waits for the first piece of its body and goes out with it, in one send().

    The head is the first write after a response began (or the connection opened). It
    is held until the next write, a close, the end of the response (a HEAD request's
    or a 204's head has no body after it) or, at the latest, the event loop's next
    turn, so a streaming body that takes its time does not hold the head back. Every
    write goes through here, so the order of the bytes on the wire is always the order
    of the writes.
    """

    __slots__ = ("_expect_head", "_head", "_loop", "transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self._loop = loop
        self._head: bytes | None = None
        self._expect_head = True

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self.transport.writelines((head, data))  # one writev: no copy of a large body
        elif self._expect_head and data != _CONTINUE:
            self._expect_head = False
            self._head = data
            self._loop.call_soon(self.flush)
        else:
            self.transport.write(data)

    def flush(self) -> None:
        head = self._head
        if head is not None:
            self._head = None
            if not self.transport.is_closing():  # a lost connection: nothing to send to
                self.transport.write(head)

    def write_whole(self, head: bytes, body: bytes) -> None:
        """A whole answer, head and body, in one send() (after a head still held)."""
        self.flush()
        self.transport.writelines((head, body))

    def response_done(self) -> None:
        """The response is over: out with its head if it is still here; the next write
        is the next response's head."""
        self.flush()
        self._expect_head = True

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def pause_reading(self) -> None:
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.transport.resume_reading()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)  # get_extra_info, set_protocol, ...


# scope["extensions"][BODY_STREAM](): the rest of the body as a BodyStream, or None
BODY_STREAM = "batchingest.body_stream"
# bytes a BodyStream holds before it stops reading the socket (TCP then holds the client)
STREAM_HIGH = 1 << 20


class BodyStream:
    """The rest of one request body, as the parser hands it over: no copies, and the
    pieces that arrived meanwhile taken in one turn. Iterate it on the loop; reading
    stops while more than STREAM_HIGH bytes wait, and ClientDisconnect is raised if
    the client goes."""

    def __init__(
        self, pause: Callable[[], None], resume: Callable[[], None],
        idle: float = 60.0, drop: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        self._pause = pause
        self._resume = resume
        self._idle = idle  # Limits.body_timeout
        self._drop = drop  # closes the connection
        self._chunks: deque[bytes] = deque()
        self._queued = 0
        self._done = False
        self._lost = False
        self._wake = asyncio.Event()

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._queued += len(data)
        if self._queued > STREAM_HIGH:
            self._pause()
        self._wake.set()

    def end(self) -> None:
        self._done = True
        self._wake.set()

    def lose(self) -> None:
        self._lost = True
        self._wake.set()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._pieces()

    async def _pieces(self) -> AsyncIterator[bytes]:
        while True:
            while self._chunks:
                data = self._chunks.popleft()
                self._queued -= len(data)
                yield data
            if self._done:
                return
            if self._lost:
                raise ClientDisconnect()
            self._wake.clear()
            self._resume()
            try:
                async with asyncio.timeout(self._idle):  # (a timer, not a task, a wait)
                    await self._wake.wait()
            except TimeoutError:
                if self._drop is not None:
                    self._drop()
                raise BodyTimeout() from None


# scope["extensions"][BODY_SOCKET](): the rest of a Content-Length body, to be read
# straight from the socket (SocketBody), or None
BODY_SOCKET = "batchingest.body_socket"
# how often a read waiting for the client looks whether it was told to stop
_STOP_POLL_MS = 250
# errors of a read that say the client or the network went (not the service's fault)
_NETWORK_ERRORS = frozenset(
    (errno.ECONNABORTED, errno.ECONNRESET, errno.EHOSTDOWN, errno.EHOSTUNREACH,
     errno.ENETDOWN, errno.ENETRESET, errno.ENETUNREACH, errno.ENOTCONN, errno.EPIPE,
     errno.EPROTO, errno.ETIMEDOUT)
)  # fmt: skip


class SocketBody:
    """The rest of one Content-Length request body, read by its handler from the
    connection's socket in a thread of its own while the server does not read it: no
    event-loop turn, parser callback or copy per piece, just read(2) into the
    handler's buffer. `head` is what the server had read already.

    `read_into` runs in that thread; `release` runs on the loop once no thread reads
    any more, always: with the whole body read, the connection goes on to its next
    request; otherwise (the client went, or `stop` was called) it is closed. The
    socket is read through a duplicate of its descriptor, so a connection closed
    meanwhile can never make the thread read another file that got its number.
    """

    def __init__(self, fd: int, head: bytes, remaining: int,
                 done: Callable[[SocketBody], None], idle: float = 60.0) -> None:  # fmt: skip
        self.head = head
        self.remaining = remaining
        self._fd = fd
        self._done = done
        self._idle = idle  # Limits.body_timeout
        self._stopped = False
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    def read_into(self, view: memoryview) -> int:
        """Up to len(view) bytes of the body into view (blocking); 0 once all is read.
        ClientDisconnect if the client goes first, or once stop() was called."""
        if not self.remaining:
            return 0
        if not view:
            raise ValueError("no room to read the body into")
        while True:
            # looked at before every read: a client sending faster than the body is
            # written never leaves the socket empty, so _wait alone may never see it
            if self._stopped:
                raise ClientDisconnect()
            try:
                n = os.readv(self._fd, [view[: self.remaining]])
            except BlockingIOError:
                self._wait()
                continue
            except OSError as e:
                if isinstance(e, (ConnectionError, TimeoutError)) or e.errno in _NETWORK_ERRORS:
                    raise ClientDisconnect() from None
                raise
            if not n:
                raise ClientDisconnect()
            self.remaining -= n
            return n

    def _wait(self) -> None:
        give_up = time.monotonic() + self._idle
        while not self._stopped:
            if self._poll.poll(_STOP_POLL_MS):
                return
            if time.monotonic() > give_up:
                self.stop()  # the connection goes with the read (release)
                raise BodyTimeout()
        raise ClientDisconnect()

    @property
    def stopped(self) -> bool:
        return self._stopped

    def stop(self) -> None:
        """Make the read give up: at its next read, or within _STOP_POLL_MS if it waits
        for the client. The connection is abandoned (release closes it), so it is shut
        down here already: the client learns at once, not when the thread is done, and
        a read then finds the end of the stream."""
        self._stopped = True
        if self._fd < 0:
            return
        sock = socket.socket(fileno=self._fd)  # a socket object that does not close it:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # the client has gone already
            pass
        finally:
            sock.detach()

    def release(self) -> None:
        """Give the connection back (on the loop, once no thread reads any more)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self._done(self)


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The one Content-Length of a request without Transfer-Encoding, else None."""
    length = None
    for name, value in headers:
        if name == b"transfer-encoding" or (name == b"content-length" and length is not None):
            return None
        if name == b"content-length":
            if not value.isdigit():
                return None
            length = int(value)
    return length


# what of uvicorn's request cycle a BodyStream relies on
_CYCLE_ATTRIBUTES = ("body", "more_body", "disconnected", "response_complete")


class LazyTimer:
    """A deadline that is set and cleared once a request, with one timer behind it.

    Setting or clearing the deadline makes no timer (making one and cancelling it for
    every request of a keep-alive connection costs more than the rest of the bookkeeping);
    the timer, when it fires, calls `due` if the deadline it finds has passed, waits again
    if it moved later, and does nothing if it was cleared.
    """

    __slots__ = ("_deadline", "_due", "_handle", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, due: Callable[[], None]) -> None:
        self._loop = loop
        self._due = due
        self._deadline: float | None = None  # loop time
        self._handle: asyncio.TimerHandle | None = None

    @property
    def running(self) -> bool:
        return self._deadline is not None

    def set(self, seconds: float) -> None:
        self._deadline = self._loop.time() + seconds
        if self._handle is None:
            self._handle = self._loop.call_at(self._deadline, self._fire)

    def clear(self) -> None:
        self._deadline = None

    def cancel(self) -> None:
        self._deadline = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        deadline = self._deadline
        if deadline is None:
            return
        if self._loop.time() + 0.001 >= deadline:  # timers may fire a little early
            self._deadline = None
            self._due()
        else:
            self._handle = self._loop.call_at(deadline, self._fire)


# A request's answer from its head alone, without the ASGI app: given the method, the
# request target as sent (path and query) and the headers, the status, headers and body
# of the answer, or None to leave the request to the app (api.app.QuickJobInfo).
Quick = Callable[
    [str, bytes, list[tuple[bytes, bytes]]], tuple[int, list[tuple[bytes, bytes]], bytes] | None
]
# headers of a request that has a body (unless Content-Length is 0)
_BODY_HEADERS = (b"content-length", b"transfer-encoding")


def limited_protocol(limits: Limits, quick: Quick | None = None) -> type[asyncio.Protocol]:
    """The protocol class for one server: its limits, its own connection count, and
    what it answers at once (`quick`, see LimitedHttpToolsProtocol.answer_at_once)."""
    attrs = {"limits": limits, "open_connections": [0], "quick": quick and staticmethod(quick)}
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,), attrs)


@functools.cache
def _status_line(status: int) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode())


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with Limits; see limited_protocol."""

    limits = Limits()
    open_connections = [0]  # shared by the connections of one server
    quick: Quick | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._body_seen = 0  # bytes of this request's body the parser handed over
        self._socket_body: SocketBody | None = None
        self._counted = False
        self._conn: OneSend | None = None
        self._head_timer = LazyTimer(self.loop, lambda: self._refuse(TOO_SLOW))
        # an idle connection after a quick answer (uvicorn's own timer after its answers)
        self._idle_timer = LazyTimer(self.loop, self.timeout_keep_alive_handler)
        self._head_bytes: int | None = 0  # None: not reading a request head
        self._stream: BodyStream | None = None
        self._stream_cycle: object = None
        self._answered = False  # the request being parsed was answered at its head

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self.open_connections[0] >= self.limits.max_connections:
            transport.write(TOO_MANY)
            transport.close()
            _warn_refusing(self.limits.max_connections)
            return  # uvicorn never sees it
        self.open_connections[0] += 1
        self._counted = True
        self._conn = OneSend(transport, self.loop)
        super().connection_made(cast(asyncio.Transport, self._conn))
        self._start_head()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._counted:
            return
        self._counted = False
        self.open_connections[0] -= 1
        self._stop_head()
        self._head_timer.cancel()
        self._idle_timer.cancel()
        super().connection_lost(exc)
        if self._stream is not None:
            self._stream.lose()
            self._stream = self._stream_cycle = None
        if self._socket_body is not None:
            self._socket_body.stop()

    def on_response_complete(self) -> None:
        if self._conn is not None:
            self._conn.response_done()
        super().on_response_complete()

    def data_received(self, data: bytes) -> None:
        if not self._counted:
            return
        self._idle_timer.clear()
        super().data_received(data)
        if self._head_bytes is not None and self._conn and not self._conn.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_size:
                self._refuse(TOO_LARGE)

    # httptools parser callbacks
    def on_message_begin(self) -> None:
        # a request pipelined behind a quick answer, in the same read: the connection
        # is busy again, though data_received cleared the idle timer before that answer
        self._idle_timer.clear()
        self._start_head()
        self._answered = False
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._stop_head()
        if self.quick is not None and self.answer_at_once(self.quick):
            return
        super().on_headers_complete()
        cycle = self.cycle
        self._stream = self._stream_cycle = None  # any stream was an earlier request's
        self._body_seen = 0
        if hasattr(self, "flow") and all(hasattr(cycle, a) for a in _CYCLE_ATTRIBUTES):
            extensions: dict[str, Any] = cycle.scope.setdefault("extensions", {})  # type: ignore[assignment]
            extensions[BODY_STREAM] = lambda: self._open_stream(cycle)
            if hasattr(self, "parser"):
                extensions[BODY_SOCKET] = lambda: self._open_socket_body(cycle)

    def on_body(self, body: bytes) -> None:
        self._body_seen += len(body)
        stream = self._stream
        if stream is not None and self._streaming():
            stream.feed(body)
        else:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._answered:
            return  # no cycle of uvicorn's for it
        super().on_message_complete()
        if self._stream is not None and self._streaming():
            self._stream.end()
            self._stream = self._stream_cycle = None

    def answer_at_once(self, quick: Quick) -> bool:
        """Answer the request whose head just arrived with `quick`, on the spot: no
        request cycle, no task, no ASGI messages. Only a request without a body, while
        no answer before it is still being sent (so answers keep the requests' order)
        and the client reads what it is sent (so one that only sends cannot make answers
        pile up here). True if it was answered; False: uvicorn runs the app for it."""
        conn = self._conn
        parser = self.parser
        cycle = self.cycle
        if (
            conn is None
            or (cycle is not None and not cycle.response_complete)
            or self.pipeline
            or self.flow.write_paused  # the client is not reading: uvicorn's path waits
            or self.root_path
            or parser.should_upgrade()
            or any(k in _BODY_HEADERS and v != b"0" for k, v in self.headers)
        ):
            return False
        if conn.is_closing():  # after a `Connection: close` request: no more answers
            self._answered = True
            return True
        method = parser.get_method().decode("ascii")
        try:
            answer = quick(method, self.url, self.headers)
        except Exception:
            log.exception("a quick answer to %s %r failed; the app answers it", method, self.url)
            return False
        if answer is None:
            return False
        status, headers, body = answer
        keep_alive = parser.get_http_version() != "1.0" and parser.should_keep_alive()
        head = [_status_line(status)]
        for name, value in (*self.server_state.default_headers, *headers):
            head += (name, b": ", value, b"\r\n")
        head.append(b"\r\n" if keep_alive else b"connection: close\r\n\r\n")
        self._answered = True
        self.server_state.total_requests += 1
        conn.write_whole(b"".join(head), b"" if method == "HEAD" else body)
        if not keep_alive:
            conn.close()
        else:  # closed if idle for --keep-alive, as uvicorn does after its answers
            self._idle_timer.set(self.timeout_keep_alive)
        return True

    def _streaming(self) -> bool:
        """Is the body now parsed the one a stream takes, still wanted?"""
        return self.cycle is self._stream_cycle and not self.cycle.response_complete

    def _open_stream(self, cycle: Any) -> BodyStream | None:
        """The rest of cycle's body as a BodyStream; what uvicorn holds comes first."""
        if cycle is not self.cycle or cycle.disconnected:
            return None
        stream = BodyStream(self.flow.pause_reading, self.flow.resume_reading,
                            self.limits.body_timeout, self._drop_connection)  # fmt: skip
        if cycle.body:
            stream.feed(bytes(cycle.body))
            cycle.body = bytearray()
        if cycle.more_body:
            self._stream, self._stream_cycle = stream, cycle
        else:
            stream.end()
        return stream

    def _open_socket_body(self, cycle: Any) -> SocketBody | None:
        """The rest of cycle's body as a SocketBody, if it has a Content-Length and
        nothing else reads it; the server stops reading the socket until it is released."""
        conn = self._conn
        current = cycle is self.cycle and cycle.more_body and not cycle.disconnected
        taken = self._stream_cycle is cycle or self._socket_body is not None
        if conn is None or conn.is_closing() or not current or taken:
            return None
        length = _content_length(cycle.scope["headers"])
        sock = conn.get_extra_info("socket")
        tls = conn.get_extra_info("sslcontext") is not None  # the socket holds TLS records
        if length is None or length <= self._body_seen or sock is None or tls:
            return None
        self.flow.pause_reading()
        head = bytes(cycle.body)
        cycle.body = bytearray()
        remaining = length - self._body_seen
        done = lambda body: self._socket_body_done(cycle, body)  # noqa: E731
        self._socket_body = SocketBody(os.dup(sock.fileno()), head, remaining, done,
                                       self.limits.body_timeout)  # fmt: skip
        return self._socket_body

    def _drop_connection(self) -> None:
        """A body stalled (BodyStream): nothing more is read or answered on it."""
        if self._conn is not None and not self._conn.is_closing():
            self._conn.close()

    def _socket_body_done(self, cycle: Any, body: SocketBody) -> None:
        """The parser never saw what a SocketBody read: with all of it read, a new
        parser takes the next request and the body is complete; else the connection
        cannot go on."""
        if body is not self._socket_body:
            return
        self._socket_body = None
        if self._conn is None or self._conn.is_closing():
            return
        if body.remaining or body.stopped or cycle is not self.cycle:
            self._conn.close()
            return
        self.parser = httptools.HttpRequestParser(self)
        lenient = getattr(self.parser, "set_dangerous_leniencies", None)  # httptools 0.6.3+
        if lenient is not None:  # as uvicorn sets its own parser up
            lenient(lenient_data_after_close=True)
        self.on_message_complete()
        self.flow.resume_reading()

    def _start_head(self) -> None:
        if not self._head_timer.running:
            self._head_bytes = 0
            self._head_timer.set(self.limits.header_timeout)

    def _stop_head(self) -> None:
        self._head_bytes = None
        self._head_timer.clear()

    def _refuse(self, answer: bytes) -> None:
        self._stop_head()
        if self._conn is not None and not self._conn.is_closing():
            self._conn.write(answer)
            self._conn.close()
