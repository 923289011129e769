"""Moving file bytes over HTTP: streamed uploads to hidden temporary files, and downloads.

Both directions move large chunks through a worker thread (hashing and pread/write
release the GIL), with the next chunk's disk work overlapping the network work of the
current one, so the event loop stays free and memory stays at a few chunks.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import os
import re
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime

from starlette.datastructures import Headers
from starlette.types import Receive, Scope, Send

from batchingest import metrics
from batchingest.api.common import run_blocking
from batchingest.api.errors import ApiError

WRITE_CHUNK = 4 << 20
IN_FLIGHT = 2
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
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


def _hash_all(hasher: hashlib._Hash, parts: list[bytes]) -> None:
    for part in parts:
        hasher.update(part)  # releases the GIL for large pieces


def _write_all(fd: int, parts: list[bytes]) -> None:
    """Write the pieces as they came, with writev: joining them would copy."""
    views = [memoryview(p) for p in parts]
    while views:
        n = os.writev(fd, views[:_IOV_MAX])
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]


async def receive_into(fd: int, chunks: AsyncIterator[bytes], max_upload: int) -> Upload:
    """Write a request body into fd, hashing it; raise too_large past max_upload.

    Network chunks are gathered into WRITE_CHUNK batches. Each batch is hashed by one
    thread and written by another, both in order, while the next batches arrive: SHA-256
    and the copy into the page cache then overlap each other and the network. At most
    IN_FLIGHT batches wait, which bounds memory.
    """
    loop = asyncio.get_running_loop()
    hasher = hashlib.sha256()
    hashing = ThreadPoolExecutor(1, thread_name_prefix="upload-hash")
    writing = ThreadPoolExecutor(1, thread_name_prefix="upload-write")
    in_flight: deque[asyncio.Future[None]] = deque()

    def submit(batch: list[bytes]) -> None:
        in_flight.append(loop.run_in_executor(hashing, _hash_all, hasher, batch))
        in_flight.append(loop.run_in_executor(writing, _write_all, fd, batch))

    size = 0
    parts: list[bytes] = []
    gathered = 0
    try:
        async for chunk in chunks:
            if not chunk:
                continue
            size += len(chunk)
            if max_upload and size > max_upload:
                raise too_large(max_upload)
            parts.append(chunk)
            gathered += len(chunk)
            if gathered >= WRITE_CHUNK:
                while len(in_flight) >= 2 * IN_FLIGHT:
                    await in_flight.popleft()
                submit(parts)
                parts, gathered = [], 0
        if parts:
            submit(parts)
        while in_flight:
            await in_flight.popleft()
    finally:
        if in_flight:
            # the threads must be done with fd before the caller closes it
            await asyncio.shield(asyncio.gather(*in_flight, return_exceptions=True))
        hashing.shutdown(wait=False)
        writing.shutdown(wait=False)
    metrics.uploaded(size)
    return Upload(size, hasher.digest())


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
