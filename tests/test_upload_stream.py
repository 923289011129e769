"""Uploads' receiving end (api/transfer.receive_into): whatever pieces a body arrives in,
the file holds exactly the body and the SHA-256 is the body's; limits and write errors
surface as errors, with the worker threads done before the call returns. And the
installed uvicorn offers the body stream (batchingest.connections) uploads read from."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import itertools
import os
import socket
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from batchingest.api import transfer
from batchingest.api.errors import ApiError
from batchingest.api.transfer import Upload
from batchingest.connections import BODY_STREAM, Limits, limited_protocol


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

    sock = socket.create_server(("127.0.0.1", 0))
    config = uvicorn.Config(app, http=limited_protocol(Limits()), log_config=None, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=asyncio.run, args=(server.serve(sockets=[sock]),))
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        body = os.urandom(5 << 20)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
        assert httpx.put(url, content=body, timeout=30).status_code == 200
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
    assert seen["stream"] == "BodyStream"
    assert seen["body"] == body
