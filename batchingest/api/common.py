"""Helpers every route module shares: JSON responses, finding a job, one route per path,
and the one way to run blocking work off the event loop."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec
from anyio import to_thread
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from batchingest.api.errors import ApiError
from batchingest.store import Job, Store

T = TypeVar("T")


def json_dumps(data: Any) -> bytes:
    """A compact JSON document ending in a newline, so that outputs of consecutive
    `curl` calls do not run together on a terminal."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json_dumps(data), status, headers, media_type="application/json")


def model_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A document of api/models.py (or a list of them), encoded as its model says."""
    body = msgspec.json.encode(data) + b"\n"
    return Response(body, status, headers, media_type="application/json")


def find_job(store: Store, name: str) -> Job:
    job = store.find(name)
    if job is None:
        raise ApiError(404, "JobNotFound", f"no job named {name!r}")
    return job


async def run_blocking(fn: Callable[..., T], *args: Any) -> T:
    """Run fn(*args) on a worker thread: file-system work that may take a while (a big
    folder listed or removed, a file flushed) must not stall every other request."""
    return await to_thread.run_sync(fn, *args)


def by_method(path: str, handlers: dict[str, Any]) -> Route:
    """One route per path, so a 405 lists every method the path allows."""

    async def dispatch(request: Request) -> Any:
        method = "GET" if request.method == "HEAD" else request.method
        return await handlers[method](request)

    return Route(path, dispatch, methods=list(handlers))


async def read_body(request: Request, limit: int, code: str = "RequestTooLarge") -> bytes:
    """The whole request body, at most `limit` bytes: 413 (`code`) as soon as it is more,
    by its Content-Length or by what arrives."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, code, f"request body larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, code, f"request body larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
