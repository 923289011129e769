"""`/jobs/{id}/events` (one job's history) and `/events` (every job's, by cursor or SSE).

Shapes follow the Globus Transfer API's lists: `{"DATA_TYPE": "event_list", ...,
"DATA": [{"DATA_TYPE": "event", ...}]}`. A job's history is read in a thread (it may be
up to 16 MiB); a page of the feed is one seek and a bounded read, done on the loop.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from batchingest import events, fs
from batchingest.api.common import json_response, run_blocking
from batchingest.api.errors import ApiError
from batchingest.api.paths import job_name
from batchingest.config import Config
from batchingest.store import Job, JobBusy, Store

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
# how often a stream looks for new events, and how long it stays silent at most
STREAM_POLL = 0.2
STREAM_KEEPALIVE = 15.0


def _number(request: Request, key: str, default: int, most: int | None = None) -> int:
    raw = request.query_params.get(key)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or len(raw) > 9:
        raise ApiError(400, "InvalidParameter", f"{key} must be a whole number, not {raw[:50]!r}")
    value = int(raw)
    if most is not None and not 1 <= value <= most:
        raise ApiError(400, "InvalidParameter", f"{key} must be from 1 to {most}, not {value}")
    return value


def _cursor(text: str | None) -> events.Cursor | None:
    if text is None or text == "":
        return None
    try:
        return events.Cursor.parse(text.strip())
    except events.BadCursor as e:
        raise ApiError(400, "InvalidCursor", str(e)) from None


def _history(store: Store, job: Job) -> list[dict[str, Any]]:
    try:
        dir_fd = store.open_job(job)
    except FileNotFoundError:
        return []  # moved meanwhile: store.read looks again
    try:
        return events.read_history(dir_fd)
    except (fs.UnsafePath, fs.NotRegular):
        return []  # a link or FIFO planted as `.events` is never read: no history
    finally:
        os.close(dir_fd)


def _listed(event: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"DATA_TYPE": "event", **event, **extra}


def routes(cfg: Config, store: Store) -> list[BaseRoute]:
    feeds: list[events.Feed] = []

    def feed() -> events.Feed:
        """The feed, for reading; opened once it exists (a fresh root has none yet)."""
        if not feeds or feeds[0].dir_fd < 0:
            found = events.Feed(store.root_fd, ".events", create=False)
            if found.dir_fd < 0:
                return found
            feeds[:] = [found]
        return feeds[0]

    async def job_events(request: Request) -> Response:
        name = job_name(request.path_params["id"])
        limit = _number(request, "limit", DEFAULT_LIMIT, MAX_LIMIT)
        offset = _number(request, "offset", 0)
        try:
            found = await run_blocking(store.read, name, lambda job: _history(store, job))
        except JobBusy as e:
            raise ApiError(409, "JobBusy", str(e)) from None
        if found is None:
            raise ApiError(404, "JobNotFound", f"no job named {name!r}")
        history = found[1]
        page = [_listed(e) for e in history[offset : offset + limit]]
        body = {"DATA_TYPE": "event_list", "total": len(history), "offset": offset,
                "limit": limit, "DATA": page}  # fmt: skip
        return json_response(body)

    async def all_events(request: Request) -> Response:
        accept = request.headers.get("accept", "")
        after = _cursor(request.query_params.get("after"))
        if "text/event-stream" in accept:
            resume = _cursor(request.headers.get("last-event-id")) or after
            return _stream(feed(), resume)
        limit = _number(request, "limit", DEFAULT_LIMIT, MAX_LIMIT)
        try:
            page, more = feed().read(after, limit)
        except events.BadCursor as e:
            raise ApiError(400, "InvalidCursor", str(e)) from None
        data = [_listed(e, cursor=c.text) for e, c in page]
        next_cursor = page[-1][1].text if more else None
        return json_response({"DATA_TYPE": "event_list", "DATA": data, "next_cursor": next_cursor})

    return [
        Route("/jobs/{id}/events", job_events, methods=["GET"]),
        Route("/events", all_events, methods=["GET"]),
    ]


def _stream(feed: events.Feed, resume: events.Cursor | None) -> Response:
    """Server-sent events: `id:` is the cursor; without one, from the live end."""
    try:
        start = resume or feed.live_end()
        feed.read(start, 1)  # a bad Last-Event-ID is a 400 now, not a broken stream
    except events.BadCursor as e:
        raise ApiError(400, "InvalidCursor", str(e)) from None

    async def lines() -> AsyncIterator[bytes]:
        cursor = start
        yield b": batchingest event stream\n\n"
        quiet = 0.0
        while True:
            page, more = feed.read(cursor, DEFAULT_LIMIT)
            for event, at in page:
                data = json.dumps(_listed(event, cursor=at.text), ensure_ascii=False)
                yield f"id: {at.text}\ndata: {data}\n\n".encode()
            if page:
                cursor, quiet = page[-1][1], 0.0
            if more:
                continue
            await asyncio.sleep(STREAM_POLL)
            quiet += STREAM_POLL
            if quiet >= STREAM_KEEPALIVE:
                quiet = 0.0
                yield b": keepalive\n\n"  # also finds a client that went away

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(lines(), media_type="text/event-stream", headers=headers)


OPENAPI_PATHS: dict[str, Any] = {
    "/jobs/{id}/events": {
        "get": {
            "summary": "The job's history, oldest first: event_list with total, offset, "
            "limit (default 100, at most 1000)",
            "tags": ["events"],
            "responses": {"200": {"description": "event_list"}},
        }
    },
    "/events": {
        "get": {
            "summary": "Every job's events after a cursor (after=, limit=); with Accept: "
            "text/event-stream, a stream of server-sent events (Last-Event-ID resumes)",
            "tags": ["events"],
            "responses": {"200": {"description": "event_list with next_cursor"}},
        }
    },
}
