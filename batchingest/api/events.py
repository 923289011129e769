"""`/jobs/{id}/events` (one job's history) and `/events` (every job's, by cursor or SSE).

Shapes follow the Globus Transfer API's lists: `{"DATA_TYPE": "event_list", ...,
"DATA": [{"DATA_TYPE": "event", ...}]}`. A job's history is read in a thread (it may be
up to 16 MiB); a page of the feed is one seek and a bounded read, done on the loop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from batchingest import events, fs
from batchingest.api import models, openapi
from batchingest.api.common import model_response, run_blocking
from batchingest.api.errors import ApiError
from batchingest.api.openapi import Op, param
from batchingest.api.paths import job_name
from batchingest.config import Config
from batchingest.store import FEED, Job, JobBusy, Store

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
# how often a stream looks for new events, and how long it stays silent at most
STREAM_POLL = 0.2
STREAM_KEEPALIVE = 15.0


def _number(request: Request, key: str, default: int, most: int | None = None) -> int:
    raw = request.query_params.get(key)
    if raw is None:  # given empty, it is not a number: 400, as the spec's integer says
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


def _listed(event: dict[str, Any]) -> models.Event:
    """A recorded event (its fields' types checked as it was read) as its document."""
    return msgspec.convert({"DATA_TYPE": "event", **event}, models.Event)


def routes(cfg: Config, store: Store) -> list[BaseRoute]:
    feeds: list[events.Feed] = []

    def feed() -> events.Feed:
        """The feed, for reading; opened once it exists (a fresh root has none yet)."""
        if not feeds or feeds[0].dir_fd < 0:
            found = events.Feed(store.root_fd, FEED, create=False)
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
        return model_response(models.JobEventList("event_list", len(history), offset, limit, page))

    async def all_events(request: Request) -> Response:
        accept = request.headers.get("accept", "")
        after = _cursor(request.query_params.get("after"))
        resume = _cursor(request.headers.get("last-event-id"))  # 400 if malformed, always
        if "text/event-stream" in accept:
            return _stream(feed(), resume or after)
        limit = _number(request, "limit", DEFAULT_LIMIT, MAX_LIMIT)
        try:
            page, more = feed().read(after, limit)
        except events.BadCursor as e:
            raise ApiError(400, "InvalidCursor", str(e)) from None
        data = [models.feed_event(e, c.text) for e, c in page]
        next_cursor = page[-1][1].text if more else None
        return model_response(models.FeedEventList("event_list", data, next_cursor))

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
                data = msgspec.json.encode(models.feed_event(event, at.text))
                yield f"id: {at.text}\ndata: ".encode() + data + b"\n\n"
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


_LIMIT = param(
    "limit",
    "query",
    f"at most this many (default {DEFAULT_LIMIT})",
    {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
)
_CURSOR = {"type": "string", "pattern": r"^([0-9a-f]{20})?$"}
_FEED = {
    "description": "event_list with next_cursor; with Accept: text/event-stream, server-sent "
    "events whose id: is the cursor",
    "content": {
        "application/json": {"schema": models.ref(models.FeedEventList)},
        "text/event-stream": {"schema": {"type": "string"}},
    },
}
OPS = (
    Op("get", "/jobs/{id}/events", "getJobEvents", "events", "the job's history, oldest first",
       {"200": models.JobEventList}, ("InvalidName", "InvalidPath", "InvalidParameter",
                                      "JobNotFound", "JobBusy"),
       (openapi.JOB_ID, _LIMIT, param("offset", "query", "skip this many events first",
                                      {"type": "integer", "minimum": 0, "maximum": 999_999_999}))),
    Op("get", "/events", "getEvents", "events",
       "every job's events after a cursor (from the start without one)", {"200": _FEED},
       ("InvalidParameter", "InvalidCursor"),
       (param("after", "query", "the cursor of the last event seen", _CURSOR), _LIMIT,
        param("Last-Event-ID", "header", "a stream's cursor to resume from", _CURSOR))),
)  # fmt: skip
OPENAPI_PATHS = openapi.paths(OPS)
