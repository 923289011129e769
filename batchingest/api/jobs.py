"""`/jobs` and `/jobs/{id}`: list, inspect, create, delete and queue jobs.

Jobs are `{"Name": ..., "Status": ...}` as in the original service. Small file-system
calls (a few stats, reading JOB) run inline on the event loop: they take microseconds,
less than handing them to a thread would.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route
from starlette.types import Scope, Send

from batchingest import control, events, filetimes, fs, jobfile
from batchingest.api import joblist
from batchingest.api.common import by_method, find_job, json_dumps, run_blocking
from batchingest.api.common import json_response as json_response  # app.py uses jobs.json_response
from batchingest.api.errors import ApiError
from batchingest.api.paths import job_name
from batchingest.config import Config
from batchingest.store import (
    BUSY,
    STATUS_OF_STATE,
    Job,
    Store,
    parse_statuses,
    valid_name,
)

# JOB is read whole to show it; the processor refuses larger ones too


def job_info(store: Store, job: Job, job_fd: int | None = None) -> dict[str, Any]:
    """Name, Status, Created, Modified, Events, and Todo/Finished as the processor would
    read them from JOB (the times: see batchingest/filetimes.py).

    JOB is read through the job folder's descriptor (job_fd, or one opened here): a JOB
    that is a link, a FIFO or huge is reported as a JobError, never followed or read whole.
    """
    try:
        fd = store.open_job(job) if job_fd is None else job_fd
    except OSError as e:
        return {"Name": job.name, "Status": job.status, "Created": None, "Modified": None,
                "Todo": None, "Finished": None, "JobError": _reason(e)}  # fmt: skip
    try:
        return folder_info(job.name, job.state, fd)
    finally:
        if job_fd is None:
            os.close(fd)


def folder_info(name: str, state: str, job_fd: int) -> dict[str, Any]:
    """job_info of the job `name` whose folder, in `state`, is open as job_fd."""
    info = _head(name, state, filetimes.shown_times(job_fd), events.count(job_fd))
    try:
        raw = fs.read_file(job_fd, jobfile.JOB_FILE, jobfile.JOB_LIMIT)
        jf = jobfile.JobFile() if raw is None else jobfile.parse(raw)
    except (jobfile.JobFileError, OSError) as e:
        info.update(Todo=None, Finished=None, JobError=_reason(e))
    else:
        info.update(Todo=jf.todo, Finished=jf.finished)
    return info


def _head(
    name: str, state: str, times: tuple[str | None, str | None], count: int
) -> dict[str, Any]:
    created, modified = times
    return {"Name": name, "Status": STATUS_OF_STATE[state], "Created": created,
            "Modified": modified, "Events": count}  # fmt: skip


def folder_info_json(name: str, state: str, job_fd: int) -> bytes:
    """json_dumps(folder_info(name, state, job_fd)), the same bytes, built for less.

    For a JOB that reads well (nearly always) the document is put together from its
    parts: the name, status and times need no escaping, and the task lists of a JOB seen
    before are taken as they were encoded then (_task_lists), JOB itself not even read
    again while its lstat says it is what it was (_job_tasks). A JOB that cannot be read
    or is not valid goes the long way, from what was read here (JOB is read once).
    """
    times = filetimes.shown_times(job_fd)
    count = events.count(job_fd)
    try:
        tasks = _job_tasks(job_fd)
    except (jobfile.JobFileError, OSError) as e:
        info = _head(name, state, times, count)
        info.update(Todo=None, Finished=None, JobError=_reason(e))
        return json_dumps(info)
    created, modified = _json_text(times[0]), _json_text(times[1])
    status = STATUS_OF_STATE[state]
    head = f'{{"Name":"{name}","Status":"{status}","Created":{created},"Modified":{modified}'
    return b'%s,"Events":%d,%s}\n' % (head.encode(), count, tasks)


# fs.version of a JOB -> its task lists (_task_lists): an unchanged JOB is not opened
_TASKS_OF_VERSION: dict[tuple[int, int, int, int, int], bytes] = {}


def _job_tasks(job_fd: int) -> bytes:
    """_task_lists of the JOB in job_fd; JobFileError or OSError where it is not valid or
    cannot be read (the error says why)."""
    try:
        st = os.stat(jobfile.JOB_FILE, dir_fd=job_fd, follow_symlinks=False)
    except FileNotFoundError:
        return _task_lists(None)
    key = fs.version(st)
    tasks = _TASKS_OF_VERSION.get(key)
    if tasks is not None:
        return tasks
    # a link, FIFO or device is refused here, as always
    tasks = _task_lists(fs.read_file(job_fd, jobfile.JOB_FILE, jobfile.JOB_LIMIT))
    # read after the lstat: what is kept is never older than the key it is kept under
    if stat.S_ISREG(st.st_mode) and st.st_size <= _TASK_LISTS_LARGEST:
        if len(_TASKS_OF_VERSION) >= _TASK_LISTS_KEPT:
            _TASKS_OF_VERSION.clear()
        _TASKS_OF_VERSION[key] = tasks
    return tasks


def _json_text(value: str | None) -> str:
    # only for texts that need no escaping: names, status words, RFC 3339 times
    return "null" if value is None else f'"{value}"'


# JOB's bytes -> its `"Todo":[...],"Finished":[...]` as encoded: a JOB changes far less
# often than it is shown. Only small ones are kept, and few, so memory stays bounded.
_TASK_LISTS: dict[bytes | None, bytes] = {}
_TASK_LISTS_KEPT = 256
_TASK_LISTS_LARGEST = 4096


def _task_lists(raw: bytes | None) -> bytes:
    """The task lists of a JOB (None: no JOB) as JSON members; JobFileError if invalid."""
    known = _TASK_LISTS.get(raw)
    if known is not None:
        return known
    jf = jobfile.JobFile() if raw is None else jobfile.parse(raw)
    tasks = json_dumps({"Todo": jf.todo, "Finished": jf.finished})[1:-2]  # no {, }\n
    if raw is None or len(raw) <= _TASK_LISTS_LARGEST:
        if len(_TASK_LISTS) >= _TASK_LISTS_KEPT:
            _TASK_LISTS.clear()
        _TASK_LISTS[raw] = tasks
    return tasks


def _reason(e: Exception) -> str:
    if isinstance(e, OSError) and e.filename == jobfile.JOB_FILE:
        return f"JOB: {e.strerror}"
    return str(e) if not isinstance(e, OSError) else f"JOB cannot be read: {e.strerror}"


def _states(param: str | None) -> list[str]:
    try:
        return list(parse_statuses(param))
    except ValueError as e:
        raise ApiError(400, "InvalidParameter", str(e)) from None


def _count(request: Request, key: str) -> int | None:
    raw = request.query_params.get(key)
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9:  # str.isdigit takes '²' too
        raise ApiError(400, "InvalidParameter", f"{key} must be a whole number, not {raw[:50]!r}")
    return int(raw)


_PAGING = ("limit", "offset")


class JobRoutes:
    """`/jobs`, `/jobs/{id}` and its queue and cancel actions."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def list_jobs(self, request: Request) -> Response:
        states = _states(request.query_params.get("status"))
        limit = _count(request, "limit")
        offset = _count(request, "offset") or 0
        per_state = [(state, self.store.job_names(state)) for state in states]
        if joblist.asked(request.query_params):
            return await self._queried(request, per_state, offset, limit)
        total = sum(len(names) for _, names in per_state)
        stop = None if limit is None else offset + limit
        rows = joblist.page(per_state, offset, stop)
        headers = {"X-Total-Count": str(total)}
        if limit is not None and offset + limit < total:
            query = {"limit": str(limit), "offset": str(offset + limit)}
            if "status" in request.query_params:
                query["status"] = request.query_params["status"]
            headers["Link"] = f'</jobs?{urlencode(query)}>; rel="next"'
        shown = (total if stop is None else min(stop, total)) - offset
        if shown > joblist.STREAM_FROM:  # sent as it is rendered: memory stays bounded
            return StreamingResponse(joblist.chunks(rows), 200, headers, "application/json")
        return Response(joblist.body(rows), 200, headers, media_type="application/json")

    async def _queried(
        self,
        request: Request,
        per_state: list[tuple[str, list[str]]],
        offset: int,
        limit: int | None,
    ) -> Response:
        q = joblist.parse(request.query_params)
        stop = None if limit is None else offset + limit
        # in a thread: a filter or order on times looks at every job folder
        total, page = await run_blocking(joblist.select, self.store, per_state, q, (offset, stop))
        headers = {"X-Total-Count": str(total)}
        if limit is not None and offset + limit < total:
            kept = [(k, v) for k, v in request.query_params.multi_items() if k not in _PAGING]
            query = [*kept, ("limit", str(limit)), ("offset", str(offset + limit))]
            headers["Link"] = f'</jobs?{urlencode(query)}>; rel="next"'
        return json_response(page, 200, headers)

    def info(self, job: Job) -> dict[str, Any]:
        return job_info(self.store, job)

    async def get_job(self, request: Request) -> Response:
        name = job_name(request.path_params["id"])
        found = self.store.open_state(name)
        if found is None:
            raise ApiError(404, "JobNotFound", f"no job named {name!r}")
        state, job_fd = found
        try:
            body = folder_info_json(name, state, job_fd)
        finally:
            os.close(job_fd)
        return Response(body, media_type="application/json")

    async def put_job(self, request: Request) -> Response:
        name = job_name(request.path_params["id"])
        job, created = self.store.create(name)
        if created:
            events.created(self.store, job)
            return json_response(self.info(job), 201, {"Location": f"/jobs/{name}"})
        if self.store.find(name) is None:
            # the name is taken by something that is not a job folder (a file, a link)
            raise ApiError(409, "Conflict", f"{name!r} exists in data/ but is not a job folder")
        return json_response(self.info(job))

    async def delete_job(self, request: Request) -> Response:
        name = job_name(request.path_params["id"])
        await run_blocking(self.store.delete, name)
        return Response(status_code=204)

    async def queue_job(self, request: Request) -> Response:
        name = job_name(request.path_params["id"])
        job = find_job(self.store, name)
        if job.state not in BUSY and (why := control.own_deadline_passed(self.store, job)):
            raise ApiError(409, "DeadlinePassed", why)
        # in a thread: the move waits for its webhook event to be on disk
        job, moved = await run_blocking(events.queue, self.store, name)
        return json_response(self.info(job), 202 if moved else 200)

    async def cancel_job(self, request: Request) -> Response:
        name = job_name(request.path_params["id"])
        find_job(self.store, name)
        try:
            job = await run_blocking(control.request_cancel, self.store, name)
        except control.NotCancellable as e:
            raise ApiError(409, "JobNotCancellable", str(e), extra={"status": e.job.status}) from e
        return json_response(self.info(job), 202)


# what DirectJobInfo.answer gives: status, headers and body of a whole answer
Answer = tuple[int, list[tuple[bytes, bytes]], bytes]


class DirectJobInfo:
    """`GET /jobs/{id}` (and HEAD) answered from ApiMiddleware, past Starlette's routing,
    and from the HTTP protocol itself (app.QuickJobInfo).

    The hottest request there is, and the router, the exception middleware, the Request
    and the Response around it cost as much CPU as the job's info itself. A job that is
    found is answered here with the bytes and headers the route would send, and a job
    that is not with the route's 404 (`not_found`, the API's error shape); anything else
    (an error reading the folder) is left to the route, which answers it as always.
    `route` is the `/jobs/{id}` route, for the access line and metrics.
    """

    def __init__(
        self, store: Store, route: BaseRoute, not_found: Callable[[Scope, str], Response]
    ) -> None:
        self.store = store
        self.route = route
        self.not_found = not_found

    async def __call__(self, scope: Scope, send: Send) -> bool:
        """True if it answered the request; False: route it as usual."""
        answer = self.answer(scope)
        if answer is None:
            return False
        status, headers, body = answer
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return True

    def answer(self, scope: Scope) -> Answer | None:
        """The answer to scope's request, or None: route it as usual."""
        path: str = scope["path"]
        name = path[6:]  # after "/jobs/": the route's {id} is one non-empty segment
        if (
            scope["method"] not in ("GET", "HEAD")
            or not path.startswith("/jobs/")
            or not name
            or "/" in name
            or scope.get("root_path")
            or not valid_name(name)
        ):
            return None
        try:
            found = self.store.open_state(name)
            if found is not None:
                state, job_fd = found
                try:
                    body = folder_info_json(name, state, job_fd)
                finally:
                    os.close(job_fd)
        except OSError:
            return None  # the route maps it to its error, as for any request
        scope["route"] = self.route
        if found is None:  # the route's own 404, without looking a second time
            error = self.not_found(scope, f"no job named {name!r}")
            return error.status_code, error.raw_headers, bytes(error.body)
        headers = [(b"content-length", b"%d" % len(body)), (b"content-type", b"application/json")]
        return 200, headers, body


def direct_info(
    store: Store, routes: list[BaseRoute], not_found: Callable[[Scope, str], Response]
) -> DirectJobInfo:
    """The DirectJobInfo of an app whose routes are `routes` (jobs.routes among them)."""
    route = next(r for r in routes if getattr(r, "path", None) == "/jobs/{id}")
    return DirectJobInfo(store, route, not_found)


def routes(cfg: Config, store: Store) -> list[BaseRoute]:
    api = JobRoutes(store)
    return [
        # the hottest route first: routes are tried in order
        by_method("/jobs/{id}", {"GET": api.get_job, "PUT": api.put_job, "DELETE": api.delete_job}),
        Route("/jobs", api.list_jobs, methods=["GET"]),
        Route("/jobs/", api.list_jobs, methods=["GET"]),
        Route("/jobs/{id}/queue", api.queue_job, methods=["POST"]),
        Route("/jobs/{id}/cancel", api.cancel_job, methods=["POST"]),
    ]
