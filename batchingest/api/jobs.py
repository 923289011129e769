"""`/jobs` and `/jobs/{id}`: list, inspect, create, delete and queue jobs.

Jobs are `{"Name": ..., "Status": ...}` as in the original service. Small file-system
calls (a few stats, reading JOB) run inline on the event loop: they take microseconds,
less than handing them to a thread would.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterator
from itertools import islice, repeat
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from batchingest import events, jobfile
from batchingest.api.errors import ApiError
from batchingest.api.paths import job_name
from batchingest.config import Config
from batchingest.store import (
    STATE_OF_STATUS,
    STATES,
    STATUS_OF_STATE,
    Job,
    JobBusy,
    Store,
)

BUSY_STATES = ("queue", "processing")
_STATE_RANK = {s: i for i, s in enumerate(STATES)}


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
    return Response(body, status, headers, media_type="application/json")


def find_job(store: Store, name: str) -> Job:
    job = store.find(name)
    if job is None:
        raise ApiError(404, "JobNotFound", f"no job named {name!r}")
    return job


def job_info(job: Job) -> dict[str, Any]:
    """Name, Status, and Todo/Finished as the processor would read them from JOB."""
    info: dict[str, Any] = {"Name": job.name, "Status": job.status}
    try:
        jf = jobfile.load(job.path)
    except (jobfile.JobFileError, OSError) as e:
        info.update(Todo=None, Finished=None, JobError=str(e))
    else:
        info.update(Todo=jf.todo, Finished=jf.finished)
    return info


def _states(param: str | None) -> list[str]:
    if param is None:
        return list(STATES)
    states = []
    for status in (s.strip() for s in param.split(",")):
        if not status:
            continue
        state = STATE_OF_STATUS.get(status, status if status in STATES else None)
        if state is None:
            known = ", ".join(STATUS_OF_STATE.values())
            raise ApiError(400, "InvalidParameter", f"unknown status {status!r} (use {known})")
        if state not in states:
            states.append(state)
    return states


def _count(request: Request, key: str) -> int | None:
    raw = request.query_params.get(key)
    if raw is None or raw == "":
        return None
    if not raw.isdigit() or len(raw) > 9:
        raise ApiError(400, "InvalidParameter", f"{key} must be a whole number, not {raw[:50]!r}")
    return int(raw)


def _listing(page: Iterator[tuple[str, str]]) -> bytes:
    # names and statuses are plain [A-Za-z0-9._-]: nothing needs escaping
    rows = ",".join([f'{{"Name":"{n}","Status":"{STATUS_OF_STATE[s]}"}}' for n, s in page])
    return f"[{rows}]".encode()


def routes(cfg: Config, store: Store) -> list[BaseRoute]:
    async def list_jobs(request: Request) -> Response:
        states = _states(request.query_params.get("status"))
        limit = _count(request, "limit")
        offset = _count(request, "offset") or 0
        per_state = [(state, store.job_names(state)) for state in states]
        total = sum(len(names) for _, names in per_state)
        stop = None if limit is None else offset + limit
        nonempty = [(s, names) for s, names in per_state if names]
        page: Iterator[tuple[str, str]]
        if len(nonempty) == 1:
            state, names = nonempty[0]
            page = zip(names[offset:stop], repeat(state))
        else:
            # each state's names are sorted already: merge, and stop after the page
            merged: Iterator[tuple[str, int, str]] = heapq.merge(
                *[zip(names, repeat(_STATE_RANK[s]), repeat(s)) for s, names in nonempty]
            )
            page = ((n, s) for n, _, s in islice(merged, offset, stop))
        headers = {"X-Total-Count": str(total)}
        if limit is not None and offset + limit < total:
            query = {"limit": str(limit), "offset": str(offset + limit)}
            if "status" in request.query_params:
                query["status"] = request.query_params["status"]
            headers["Link"] = f'</jobs?{urlencode(query)}>; rel="next"'
        return Response(_listing(page), 200, headers, media_type="application/json")

    async def get_job(request: Request) -> Response:
        name = job_name(request.path_params["id"])
        try:
            found = store.read(name, job_info)
        except JobBusy as e:
            raise ApiError(409, "JobBusy", str(e)) from None
        if found is None:
            raise ApiError(404, "JobNotFound", f"no job named {name!r}")
        return json_response(found[1])

    async def put_job(request: Request) -> Response:
        name = job_name(request.path_params["id"])
        job, created = store.create(name)
        if created:
            events.created(store, job)
            return json_response(job_info(job), 201, {"Location": f"/jobs/{name}"})
        return json_response(job_info(job))

    async def delete_job(request: Request) -> Response:
        name = job_name(request.path_params["id"])
        try:
            await _in_thread(store.delete, name)
        except JobBusy as e:
            raise ApiError(409, "JobBusy", str(e)) from None
        return Response(status_code=204)

    async def queue_job(request: Request) -> Response:
        name = job_name(request.path_params["id"])
        find_job(store, name)
        try:
            # in a thread: the move waits for its webhook event to be on disk
            job, moved = await _in_thread(events.queue, store, name)
        except JobBusy as e:
            raise ApiError(409, "JobBusy", str(e)) from None
        except LookupError:
            raise ApiError(404, "JobNotFound", f"no job named {name!r}") from None
        return json_response(job_info(job), 202 if moved else 200)

    return [
        # the hottest route first: routes are tried in order
        by_method("/jobs/{id}", {"GET": get_job, "PUT": put_job, "DELETE": delete_job}),
        Route("/jobs", list_jobs, methods=["GET"]),
        Route("/jobs/", list_jobs, methods=["GET"]),
        Route("/jobs/{id}/queue", queue_job, methods=["POST"]),
    ]


async def _in_thread(fn: Any, *args: Any) -> Any:
    """Deleting a big job removes many files: keep that off the event loop."""
    from anyio import to_thread

    return await to_thread.run_sync(fn, *args)


def by_method(path: str, handlers: dict[str, Any]) -> Route:
    """One route per path, so a 405 lists every method the path allows."""

    async def dispatch(request: Request) -> Any:
        method = "GET" if request.method == "HEAD" else request.method
        return await handlers[method](request)

    return Route(path, dispatch, methods=list(handlers))
