"""Moving file bytes over HTTP: streamed uploads to hidden temporary files, and downloads.

The rest of an upload with a Content-Length is read straight from the socket by a
thread of its own (connections.SocketBody), which writes each read at once and hands
full buffers to a second thread for the SHA-256: nothing per piece on the event loop,
and no copies but the two any server that writes what it receives makes. Other bodies
(chunked) come through the event loop and are copied into buffers hashed and written by
worker threads. Downloads read the next chunk in a worker thread while the current one
is sent. Memory stays at a few buffers either way.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import mmap
import os
import queue
import re
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime

from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive, Scope, Send

from batchingest import metrics
from batchingest.api.common import run_blocking
from batchingest.api.errors import ApiError
from batchingest.connections import BODY_SOCKET, BODY_STREAM, SocketBody

# Uploads are copied into buffers of BATCH bytes, each hashed and written in one call:
# one hand-off to a thread per buffer, not per network chunk. A thread that gives up the
# GIL for a call can wait up to the switch interval (5 ms) to get it back while the loop
# runs Python, so the fewer such calls, the better; BUFFERS bound the memory.
BATCH = 2 << 20
BUFFERS = 3
WRITE_PIECE = 256 << 10
# A body read straight from the socket is read into buffers of this size (each read
# at most one), written at once, and hashed by a thread of its own
HASH_BUFFER = 1 << 20
HASH_BUFFERS = 4
READ_CHUNK = 1 << 20


# -- uploads ---------------------------------------------------------------------------


@dataclass
class Upload:
    size: int
    sha256: bytes


def expected_sha256(header: str | None) -> bytes | None:
    """The sha-256 member of an RFC 9530 `Content-Digest` header, if any.

    Other algorithms are ignored, as the RFC allows; a malformed sha-256 value is a 400.
    """
    if not header:
        return None
    for member in header.split(","):
        key, sep, value = member.strip().partition("=")
        if not sep or key.strip().lower() != "sha-256":
            continue
        value = value.strip()
        if len(value) < 2 or value[0] != ":" or value[-1] != ":":
            raise ApiError(400, "InvalidDigest", "Content-Digest sha-256 must be :<base64>:")
        try:
            digest = base64.b64decode(value[1:-1], validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "InvalidDigest", "Content-Digest sha-256 is not base64") from None
        if len(digest) != 32:
            raise ApiError(400, "InvalidDigest", "Content-Digest sha-256 is not 32 bytes")
        return digest
    return None


def too_large(limit: int) -> ApiError:
    return ApiError(413, "PayloadTooLarge", f"uploads are limited to {limit} bytes")


def check_length(header: str | None, max_upload: int) -> None:
    """413 at once for a declared Content-Length over the limit (any number of digits)."""
    if not max_upload or header is None or not header.isdigit():
        return
    digits = header.lstrip("0") or "0"
    if len(digits) > 19 or int(digits) > max_upload:
        raise too_large(max_upload)


def _write_all(fd: int, data: memoryview) -> None:
    """Write data in WRITE_PIECE writes: on this kernel a write of 2 MiB or more gets
    large page-cache folios, which cost several times more to fill on a virtual machine
    than the same bytes in small writes (0.25-0.5 s of CPU per 256 MiB, not 0.05 s)."""
    while data:
        data = data[os.write(fd, data[:WRITE_PIECE]) :]


class _Batches:
    """Full buffers hashed by one thread and written by another, each in order.

    SHA-256 and the copy into the page cache overlap each other and the network; a
    buffer is reused once both threads are done with it. At most BUFFERS exist.
    """

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.hasher = hashlib.sha256()
        self.loop = asyncio.get_running_loop()
        self.hashing = ThreadPoolExecutor(1, thread_name_prefix="upload-hash")
        self.writing = ThreadPoolExecutor(1, thread_name_prefix="upload-write")
        self.made = 0
        self.free: list[bytearray] = []
        self.busy: deque[tuple[bytearray, asyncio.Future[None], asyncio.Future[None]]] = deque()

    async def take(self) -> bytearray:
        """An empty buffer: a new one, or the oldest once its threads are done."""
        if not self.free and self.made < BUFFERS:
            self.made += 1
            return bytearray(self.size)
        if not self.free:
            await self._finish_oldest()
        return self.free.pop()

    def submit(self, buf: bytearray, n: int) -> None:
        data = memoryview(buf)[:n]
        hashed = self.loop.run_in_executor(self.hashing, self.hasher.update, data)
        written = self.loop.run_in_executor(self.writing, _write_all, self.fd, data)
        self.busy.append((buf, hashed, written))

    async def _finish_oldest(self) -> None:
        buf, hashed, written = self.busy[0]
        results = await asyncio.gather(hashed, written, return_exceptions=True)
        self.busy.popleft()
        for result in results:
            if isinstance(result, BaseException):
                raise result
        self.free.append(buf)

    async def drain(self) -> bytes:
        """Wait for every buffer; the SHA-256 of everything submitted."""
        while self.busy:
            await self._finish_oldest()
        return self.hasher.digest()

    async def close(self) -> None:
        """The threads must be done with fd before the caller closes it, even on error."""
        pending = [f for _, hashed, written in self.busy for f in (hashed, written)]
        if pending:
            await asyncio.shield(asyncio.gather(*pending, return_exceptions=True))
        self.hashing.shutdown(wait=False)
        self.writing.shutdown(wait=False)


async def receive_body(request: Request, fd: int, max_upload: int) -> Upload:
    """A request body into fd, hashed. The first piece comes through receive() (which
    answers `Expect: 100-continue`); the rest of a Content-Length body straight from
    the socket where the server hands it over (connections.SocketBody), else piece by
    piece from its BodyStream or, failing that, receive()."""
    message = await request.receive()
    if message["type"] == "http.disconnect":
        raise ClientDisconnect()
    first = message.get("body", b"")
    more = message.get("more_body", False)
    extensions = request.scope.get("extensions", {})
    opener = extensions.get(BODY_SOCKET) if more else None
    body = opener() if opener is not None else None
    if body is not None:
        return await _from_socket(body, first, fd, max_upload)
    return await receive_into(fd, _pieces(request, first, more), max_upload)


async def _pieces(request: Request, first: bytes, more: bool) -> AsyncIterator[bytes]:
    yield first
    if not more:
        return
    opener = request.scope.get("extensions", {}).get(BODY_STREAM)
    stream = opener() if opener is not None else None
    async for chunk in stream if stream is not None else request.stream():
        yield chunk


async def _from_socket(body: SocketBody, first: bytes, fd: int, max_upload: int) -> Upload:
    """The body read and written by a thread of its own, hashed by another
    (_copy_from_socket).

    The connection is released when the thread ends, whatever happens to this task;
    fd stays in use until then, so this returns only after it, even when cancelled.
    """
    size = len(first) + len(body.head) + body.remaining
    try:
        if max_upload and size > max_upload:  # check_length refused it already
            raise too_large(max_upload)
        pool = ThreadPoolExecutor(1, thread_name_prefix="upload")
        args = (body, [first, body.head], fd)
        work = asyncio.get_running_loop().run_in_executor(pool, _copy_from_socket, *args)
    except BaseException:
        body.release()  # no thread will: the connection must not stay paused
        raise
    work.add_done_callback(lambda _: body.release())
    pool.shutdown(wait=False)
    try:
        got = await asyncio.shield(work)
    except asyncio.CancelledError:
        body.stop()
        while not work.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([work])
        work.exception()  # the thread's ClientDisconnect: this task was cancelled anyway
        raise
    metrics.uploaded(got.size)
    return got


class _HashThread:
    """The SHA-256 of buffers, in the order given, on a thread of its own, so that it
    overlaps the reading and writing of the next ones. Buffers come back once hashed;
    there are HASH_BUFFERS of them. `first` is hashed before the thread starts."""

    def __init__(self, first: list[bytes]) -> None:
        self.hasher = hashlib.sha256()
        for data in first:
            self.hasher.update(data)
        self.free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        self.full: queue.SimpleQueue[tuple[mmap.mmap, int] | None] = queue.SimpleQueue()
        # mapped, not allocated: the heap of a short-lived thread keeps what it freed,
        # and every upload's threads are new ones (RSS grew 4 MiB an upload)
        for _ in range(HASH_BUFFERS):
            self.free.put(mmap.mmap(-1, HASH_BUFFER))
        self.thread = threading.Thread(target=self._run, name="upload-hash", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.full.get()) is not None:
            buf, n = item
            self.hasher.update(memoryview(buf)[:n])
            self.free.put(buf)

    def take(self) -> mmap.mmap:
        return self.free.get()

    def give(self, buf: mmap.mmap, n: int) -> None:
        self.full.put((buf, n))

    def close(self) -> bytes:
        """The digest of everything given, once the thread is done (callable again)."""
        if self.thread.is_alive():
            self.full.put(None)
            self.thread.join()
        return bytes(self.hasher.digest())


class _Sink:
    """Where a body read from the socket goes: each read is written to fd at once, while
    its bytes are still in the CPU's cache, and each full buffer is hashed by a
    _HashThread. After a write error the rest of the body is still read, so that the
    connection can go on, but nothing more is written or hashed; finish() raises it."""

    def __init__(self, fd: int, first: list[bytes]) -> None:
        self.fd = fd
        self.size = 0
        self.failed: OSError | None = None
        for data in first:
            self._write(memoryview(data))
        self.hashing = _HashThread(first)
        self.buf = self.hashing.take()
        self.filled = 0

    def space(self) -> memoryview:
        """Room for the next read: the rest of the current buffer."""
        if self.filled == len(self.buf):
            self._pass_on()
        return memoryview(self.buf)[self.filled :]

    def put(self, n: int) -> None:
        """n bytes were read into space()."""
        self._write(memoryview(self.buf)[self.filled : self.filled + n])
        self.filled += n

    def _write(self, data: memoryview) -> None:
        self.size += len(data)
        if self.failed is None:
            try:
                _write_all(self.fd, data)
            except OSError as e:
                self.failed = e

    def _pass_on(self) -> None:
        if self.failed is None:
            self.hashing.give(self.buf, self.filled)
            self.buf = self.hashing.take()
        self.filled = 0

    def finish(self) -> Upload:
        if self.filled:
            self._pass_on()
        digest = self.hashing.close()
        if self.failed is not None:
            raise self.failed
        return Upload(self.size, digest)


def _copy_from_socket(body: SocketBody, first: list[bytes], fd: int) -> Upload:
    """Read the rest of the body from the socket, write it and hash it: the work of a
    plain server that writes what it receives, plus the SHA-256 beside it on a second
    thread, and nothing per piece on the event loop."""
    sink = _Sink(fd, first)
    try:
        while n := body.read_into(sink.space()):
            sink.put(n)
        return sink.finish()
    finally:
        sink.hashing.close()


async def receive_into(
    fd: int, chunks: AsyncIterator[bytes], max_upload: int, batch: int = BATCH
) -> Upload:
    """Write a request body into fd, hashing it; raise too_large past max_upload.

    Network chunks are copied into buffers of `batch` bytes (see _Batches) while earlier
    buffers are hashed and written; when all BUFFERS are busy the body is not read, so
    the client waits (TCP flow control) and memory stays bounded.
    """
    batches = _Batches(fd, batch)
    size = filled = 0
    buf: bytearray | None = None
    try:
        async for chunk in chunks:
            size += len(chunk)
            if max_upload and size > max_upload:
                raise too_large(max_upload)
            view = memoryview(chunk)
            while view:
                if buf is None:
                    buf = await batches.take()
                n = min(len(view), batch - filled)
                buf[filled : filled + n] = view[:n]
                filled += n
                view = view[n:]
                if filled == batch:
                    batches.submit(buf, filled)
                    buf, filled = None, 0
        if buf is not None and filled:
            batches.submit(buf, filled)
        digest = await batches.drain()
    finally:
        await batches.close()
    metrics.uploaded(size)
    return Upload(size, digest)


# -- downloads ---------------------------------------------------------------------------


def http_date(ts: float) -> str:
    return formatdate(ts, usegmt=True)


def etag_of(st: os.stat_result) -> str:
    return f'"{st.st_mtime_ns:x}-{st.st_size:x}"'


_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
# More digits than any file size can have: such a number is read as "beyond any end"
# rather than converted (int() refuses numbers of thousands of digits).
_MAX_DIGITS = 19


def _number(digits: str, size: int) -> int:
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= _MAX_DIGITS else size + (1 << 63)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end exclusive) of a single byte range, or None to send everything.

    Several ranges or a syntax we do not know are ignored (the whole file is sent, as
    RFC 9110 allows); a range beyond the end is a 416.
    """
    if not header:
        return None
    m = _RANGE.fullmatch(header.strip())
    if m is None or (not m.group(1) and not m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if first:
        start = _number(first, size)
        end = min(_number(last, size) + 1, size) if last else size
        if last and _number(last, size) < start:
            return None
    else:
        suffix = _number(last, size)
        start, end = max(size - suffix, 0), size
        if suffix == 0:
            start = size
    if start >= size:
        raise ApiError(
            416,
            "RangeNotSatisfiable",
            f"range {header.strip()[:100]!r} is outside the file of {size} bytes",
            headers={"Content-Range": f"bytes */{size}"},
        )
    return start, end


def _etags(header: str) -> list[str]:
    """The entity-tags of an If-None-Match list, weak ones as their opaque tag."""
    return [tag.strip().removeprefix("W/") for tag in header.split(",")]


def not_modified(request: Headers, etag: str, mtime: float) -> bool:
    """RFC 9110 13.1.2 and 13.1.3 for a GET or HEAD: If-None-Match (`*` matches any
    file that exists; tags compare weakly) and, only when it is absent, If-Modified-Since
    (a date that cannot be read, or is in the future, is ignored)."""
    if_none_match = request.get("if-none-match")
    if if_none_match is not None:
        return if_none_match.strip() == "*" or etag in _etags(if_none_match)
    since = request.get("if-modified-since")
    if not since:
        return False
    try:
        when = parsedate_to_datetime(since).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return False
    return when <= time.time() and int(mtime) <= when


class FileBody:
    """A regular file sent over HTTP, as Starlette's FileResponse: validators (ETag,
    Last-Modified), If-None-Match, Range and If-Range, HEAD, and the body streamed from
    an open descriptor, which this closes when done.

    It works on the descriptor only, so what is sent is the file that was opened and
    checked, whatever happens to its name meanwhile.
    """

    def __init__(self, fd: int, st: os.stat_result, request: Headers) -> None:
        self.fd = fd
        etag = etag_of(st)
        self.headers = [
            (b"content-type", b"application/octet-stream"),
            (b"etag", etag.encode()),
            (b"last-modified", http_date(st.st_mtime).encode()),
            (b"accept-ranges", b"bytes"),
        ]
        self.start = self.end = 0
        if not_modified(request, etag, st.st_mtime):
            self.status = 304
            return
        size = st.st_size
        byte_range = None
        if_range = request.get("if-range")
        if if_range is None or if_range.strip() == etag:
            byte_range = parse_range(request.get("range"), size)
        if byte_range is None:
            self.start, self.end, self.status = 0, size, 200
        else:
            self.start, self.end = byte_range
            self.status = 206
            content_range = f"bytes {self.start}-{self.end - 1}/{size}"
            self.headers.append((b"content-range", content_range.encode()))
        self.headers.append((b"content-length", str(self.end - self.start).encode()))

    @classmethod
    def open(cls, fd: int, st: os.stat_result, request: Headers) -> FileBody:
        """The response for fd; fd is closed here if the request cannot be answered (416)."""
        try:
            return cls(fd, st, request)
        except BaseException:
            os.close(fd)
            raise

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send(
                {"type": "http.response.start", "status": self.status, "headers": self.headers}
            )
            if scope["method"] == "HEAD" or self.start >= self.end:
                await send({"type": "http.response.body", "body": b""})
                return
            await self._stream(receive, send)
        finally:
            os.close(self.fd)

    async def _stream(self, receive: Receive, send: Send) -> None:
        gone = asyncio.Event()

        async def watch() -> None:
            # uvicorn drops body messages to a vanished client silently; notice it here
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.ensure_future(watch())
        try:
            offset = self.start
            n = min(READ_CHUNK, self.end - offset)
            nxt: asyncio.Future[bytes] = asyncio.ensure_future(
                run_blocking(os.pread, self.fd, n, offset)
            )
            while True:
                data = await nxt
                if not data:
                    raise OSError("file shrank while it was being sent")
                offset += len(data)
                more = offset < self.end
                if more:
                    n = min(READ_CHUNK, self.end - offset)
                    nxt = asyncio.ensure_future(run_blocking(os.pread, self.fd, n, offset))
                await send({"type": "http.response.body", "body": data, "more_body": more})
                metrics.downloaded(len(data))
                if not more or gone.is_set():
                    if more:
                        await nxt
                    return
        finally:
            watcher.cancel()
